"""The Score tab: CLIPScore of the last image, of this session's results or of the newest History images (the toy
world's own CLIP for toy-world images, as `loraloom eval`), and with an MLLM judge configured (`loraloom ui
--judge …`) ComposLoRA's pairwise comparison of the images of one set and seed, results in tables."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from loraloom.evaluation.parsing import PAIRWISE_DIMENSIONS

from .service import GenerationService
from .wiring import ON_MODEL_QUEUE, guarded, show_failures

CLIP_HEADERS = ["file", "method", "seed", "CLIPScore"]
JUDGE_HEADERS = ["method a", "method b", "seed", *[f"{d} {x}" for d in PAIRWISE_DIMENSIONS for x in ("a", "b", "outcome")],
                 "error"]


@dataclass
class ScoreTab:
    last: gr.Button
    session: gr.Button
    history: gr.Button
    newest: gr.Number
    judge: gr.Checkbox
    status: gr.Markdown
    clip_table: gr.Dataframe
    judge_table: gr.Dataframe
    files: gr.JSON  # hidden: what /score takes


def score_tab(has_judge: bool) -> ScoreTab:
    with gr.Tab("Score", id="score"):
        with gr.Row():
            last = gr.Button("Score the last image", size="sm", elem_id="score-last")
            session = gr.Button("Score this session's results", size="sm", elem_id="score-session")
        with gr.Row():
            newest = gr.Number(8, precision=0, label="newest History images", min_width=90, elem_id="score-newest")
            history = gr.Button("Score them", size="sm", elem_id="score-history")
            judge = gr.Checkbox(has_judge, label="also the MLLM judge (pairwise)", interactive=has_judge,
                                elem_id="score-judge", info=None if has_judge else "no judge configured: loraloom ui "
                                "--judge openai --judge-model …")
        status = gr.Markdown("", elem_id="score-status")
        clip_table = gr.Dataframe(headers=CLIP_HEADERS, interactive=False, elem_id="score-clip")
        judge_table = gr.Dataframe(headers=JUDGE_HEADERS, interactive=False, elem_id="score-judge-table",
                                   visible=has_judge)
        files = gr.JSON(None, visible=False, label="files")
    return ScoreTab(last, session, history, newest, judge, status, clip_table, judge_table, files)


def score_action(service: GenerationService):
    @guarded("score")
    def score(files, judge=True):
        """CLIPScore (and the judge's pairwise comparisons) of images of the output folder, by file name. Returns
        (CLIPScore table: file, method, seed, CLIPScore; judge table; status)."""
        if isinstance(files, str):
            files = [files]
        clip_rows, judge_rows, note = service.score(list(files or []), bool(judge))
        return clip_rows, judge_rows, note

    return score


def wire_score(tab: ScoreTab, service: GenerationService, last_image, results) -> None:
    fn = score_action(service)

    def pick_last(last):
        return [last] if last else []

    def pick_history(n):
        return [i.path.name for i in service.history.items(max(1, int(n or 8))) if i.kind == "image"]

    outputs = [tab.clip_table, tab.judge_table, tab.status]
    for button, chooser, inputs, api in ((tab.last, pick_last, last_image, "score"), (tab.session, lambda r: list(r or []), results, None),
                                         (tab.history, pick_history, tab.newest, None)):
        chosen = button.click(chooser, inputs, tab.files, api_visibility="private", queue=False)
        kwargs = {"api_name": api} if api else {"api_visibility": "private"}
        ev = chosen.success(fn, [tab.files, tab.judge], outputs, show_progress_on=[tab.status], **kwargs,
                            **ON_MODEL_QUEUE)
        show_failures(ev, tab.status, "score")
