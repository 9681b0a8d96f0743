"""The Compare tab: the Compose form's prompt and seed with each chosen method, side by side, with CLIPScore and
seconds per image."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from loraloom.composition.errors import LoraloomError, SpecError

from .config import UIConfig
from .service import GenerationService
from .streaming import StepEvent, stream_generation
from .tab_compose import ComposeForm, submit
from .wiring import ON_MODEL_QUEUE, PRIVATE, code_span, error_markdown, fail, guarded, report


@dataclass
class CompareTab:
    methods: gr.CheckboxGroup
    button: gr.Button
    status: gr.Markdown
    gallery: gr.Gallery
    table: gr.Dataframe


def compare_tab(config: UIConfig, methods: list[str]) -> CompareTab:
    """Lay out the tab; `config.compare_methods` (those available here) are ticked, else every method."""
    compare0 = [m for m in (config.compare_methods or methods) if m in methods] or methods[:3]
    with gr.Tab("Compare", id="compare"):
        chosen = gr.CheckboxGroup(methods, value=compare0, label="Methods", elem_id="compare-methods")
        button = gr.Button("Compare", variant="primary", elem_id="compare-btn")
        status = gr.Markdown("", elem_id="compare-status")
        gallery = gr.Gallery(label="Same prompt and seed", format="png", columns=max(len(compare0), 1),
                             fit_columns=False, preview=False, height=360, object_fit="contain",
                             elem_id="compare-gallery")
        table = gr.Dataframe(headers=["method", "CLIPScore", "seconds", "file", "error"], interactive=False,
                             elem_id="compare-table")
    return CompareTab(chosen, button, status, gallery, table)


def compare_action(service: GenerationService, config: UIConfig):
    """The `/compare` endpoint's function (its parameter names are the API's)."""

    @guarded("compare")
    def compare(model, prompt, negative_prompt, loras, methods, method_params_by_method, steps, guidance_scale,
                height, width, scheduler, seed, progress=gr.Progress()):
        """The same prompt and seed with each method; yields the gallery (captions: CLIPScore, seconds) and a table."""
        methods = list(methods or [])
        if not methods:
            raise fail(SpecError("choose at least one method to compare"))
        by_method = method_params_by_method or {}
        if not isinstance(by_method, dict):
            raise fail(SpecError("method_params_by_method must be a JSON object: {method: {parameter: value}}"))
        specs = [service.make_spec(model, prompt, negative_prompt, loras, m, by_method.get(m, {}), steps,
                                   guidance_scale, height, width, scheduler, seed) for m in methods]
        shown, rows, errors = [], [], []
        total = len(specs) * max(int(steps), 1)
        for k, spec in enumerate(specs):
            result = None
            try:
                for ev in stream_generation(service, spec, preview_every=0, min_interval=config.preview_interval):
                    if isinstance(ev, StepEvent):
                        progress((k * ev.total + ev.step, total), desc=f"{spec.method}: step {ev.step}/{ev.total}")
                    else:
                        result = ev
                score = service.clip_score(result)
            except Exception as err:
                msg = report(err, f"compare ({spec.method})")
                errors.append(f"{spec.method}: {msg}")
                rows.append([spec.method, None, None, "", msg])
                yield gr.skip(), rows, error_markdown("; ".join(errors))
                continue
            shown.append((str(result.path), caption(spec.method, score, result.seconds)))
            rows.append([spec.method, None if score is None else round(score, 2), round(result.seconds, 3),
                         result.path.name, ""])
            yield shown, rows, f"{len(shown)}/{len(specs)} done"
        if not shown:
            raise fail(LoraloomError("every method failed: " + "; ".join(errors)))
        yield shown, rows, f"compared {len(shown)} method(s) with seed {specs[0].seed}" + (
            " — **errors:** " + code_span("; ".join(errors)) if errors else "")

    return compare


def caption(method: str, score: float | None, seconds: float) -> str:
    """The text under one compared image."""
    if score is None:
        return f"{method} · CLIPScore n/a (no CLIP configured) · {seconds:.2f} s"
    return f"{method} · CLIPScore {score:.1f} · {seconds:.2f} s"


def wire_compare(tab: CompareTab, form: ComposeForm, service: GenerationService, config: UIConfig):
    """Compare: gather the form, then `/compare` on the model queue; the gallery has a column per ticked method.
    Returns the compare event (for the Stop button)."""
    compare_event = submit(form, tab.button).success(
        compare_action(service, config),
        [form.model, form.prompt, form.negative, form.loras_json, tab.methods, form.params_all_json, form.steps,
         form.cfg, form.height, form.width, form.scheduler, form.seed],
        [tab.gallery, tab.table, tab.status], api_name="compare", show_progress_on=[tab.gallery], **ON_MODEL_QUEUE)
    tab.methods.change(lambda ms: gr.Gallery(columns=max(len(ms or []), 1)), tab.methods, tab.gallery, **PRIVATE)
    return compare_event
