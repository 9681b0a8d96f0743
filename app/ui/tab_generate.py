"""The Generate tab: images from the Compose form (batch count, seed -1 = random), with per-step previews, the PNG
(spec embedded) to download, this session's results, and Stop ("stopped at step k/N, nothing saved")."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from .config import UIConfig
from .service import Cancelled, GenerationService, random_seed
from .streaming import StepEvent, stream_generation
from .tab_compose import ComposeForm, submit
from .wiring import INSTANT, ON_MODEL_QUEUE, PRIVATE, code_span, error_markdown, fail, guarded, report, show_failures

MAX_GALLERY = 48
MAX_BATCH = 64
API_UPDATE_SECONDS = 1.0  # an API client's progress updates: at most one a second
RUNNING: dict[str, str] = {}  # page session -> what it is generating now ("image 2/4"), for Stop's message


@dataclass
class GenerateTab:
    button: gr.Button
    stop: gr.Button
    status: gr.Markdown
    preview: gr.Image
    latest: gr.File
    gallery: gr.Gallery
    result_view: gr.JSON
    spec_view: gr.Code
    results: gr.State  # the gallery's PNG paths, newest first


def generate_tab() -> GenerateTab:
    with gr.Tab("Generate", id="generate"):
        with gr.Row(elem_id="generate-bar"):
            button = gr.Button("Generate", variant="primary", elem_id="generate-btn", scale=3)
            stop = gr.Button("Stop", variant="stop", elem_id="stop-btn", scale=1)
        status = gr.Markdown("", elem_id="status")
        with gr.Row():
            preview = gr.Image(label="Preview (per step)", type="pil", format="png",
                               interactive=False, elem_id="preview", height=256)
            latest = gr.File(label="Download PNG (spec embedded)", interactive=False, elem_id="download")
        gallery = gr.Gallery(label="Results of this session (all images: History)", format="png", columns=4,
                             fit_columns=False, height=360, preview=False, object_fit="contain",
                             elem_id="gallery", buttons=["download", "fullscreen"])
        result_view = gr.JSON(label="Last result", elem_id="result")
        with gr.Accordion("Spec of the last image (as embedded in the PNG)", open=False):
            spec_view = gr.Code(language="json", label="spec", elem_id="spec")
        results = gr.State([])
    return GenerateTab(button, stop, status, preview, latest, gallery, result_view, spec_view, results)


def generate_action(service: GenerationService, config: UIConfig):
    """The `/generate` endpoint's function (its parameter names are the API's)."""

    @guarded("generate")
    def generate(model, prompt, negative_prompt, loras, method, method_params, steps, guidance_scale, height, width,
                 scheduler, seed, regions=None, base_weight=0.0, batch_count=1, request: gr.Request = None,
                 progress=gr.Progress()):
        """Generate `batch_count` images (seed, seed + 1, …; seed -1: a random seed each); yields per-step previews.
        Returns (preview, PNG file, result, spec JSON, status) of the last image; result["files"] lists them all."""
        count = 1 if batch_count in (None, "") else batch_count
        if not isinstance(count, (int, float)) or int(count) != count or not 1 <= count <= MAX_BATCH:
            raise fail(ValueError(f"batch count must be a whole number from 1 to {MAX_BATCH}, got {batch_count!r}"))
        count = int(count)
        seeds = [(random_seed() if seed in (-1, -1.0) else None) for _ in range(count)]
        first = service.make_spec(model, prompt, negative_prompt, loras, method, method_params, steps,
                                  guidance_scale, height, width, scheduler, seeds[0] if seeds[0] is not None else seed,
                                  regions, base_weight)
        specs = [first] + [first.__class__.from_dict({**first.to_dict(), "seed": s if s is not None else first.seed + k})
                           for k, s in enumerate(seeds[1:], 1)]
        skip = gr.skip()
        owner = getattr(request, "session_hash", None)
        # An API client (gradio_client marks its requests) downloads every file of every update it is sent, so it
        # gets the progress and the status but no preview images (the page keeps them), and at most one update a
        # second (the first and the last step always): each costs the generation time on a small machine.
        headers = getattr(request, "headers", None) or {}
        api = headers.get("x-gradio-user") == "api"
        previews = 0 if api else config.preview_every
        interval = max(config.preview_interval, API_UPDATE_SECONDS) if api else config.preview_interval
        files, infos, result = [], [], None
        try:
            for k, spec in enumerate(specs):
                label = f"image {k + 1}/{count}: " if count > 1 else ""
                if owner:
                    RUNNING[owner] = label
                yield skip, skip, skip, skip, f"{label}waiting for the model … ({spec.method}, seed {spec.seed})"
                try:
                    for ev in stream_generation(service, spec, previews, interval, owner=owner):
                        if isinstance(ev, StepEvent):
                            progress((k * ev.total + ev.step, count * ev.total), desc=f"{label}{spec.method}: step {ev.step}/{ev.total}")
                            yield (ev.preview if ev.preview is not None else skip), skip, skip, skip, \
                                f"{label}{spec.method}: step {ev.step}/{ev.total}"
                        else:
                            result = ev
                except Cancelled as err:
                    kept = f"; the {len(files)} image(s) before it are saved" if files else ""
                    yield skip, skip, skip, skip, f"{label}{err}{kept}"
                    return
                except Exception as err:
                    message = report(err, "generate")  # logged once here (with its reference) when unexpected
                    yield skip, skip, skip, skip, error_markdown(message)
                    raise fail(gr.Error(message), "generate") from None
                files.append(str(result.path))
                infos.append({"file": str(result.path), "seed": result.spec.seed, "seconds": round(result.seconds, 4)})
        finally:
            if owner:
                RUNNING.pop(owner, None)
        # The spec goes out as the JSON text the PNG carries (a dict with "path" keys looks like a file to clients).
        info = {"file": str(result.path), "seconds": round(result.seconds, 4), "method": result.spec.method,
                "seed": result.spec.seed, "width": result.image.width, "height": result.image.height}
        if count > 1:
            info.update(files=files, seeds=[i["seed"] for i in infos])
        took = sum(i["seconds"] for i in infos)
        done = (f"done: {count} images in {took:.2f} s, seeds {infos[0]['seed']}…{infos[-1]['seed']}" if count > 1
                else f"done in {result.seconds:.2f} s, seed {result.spec.seed}") + f" → `{result.path.name}`"
        warning = service.truncation(result.spec)
        if warning:
            done += "\n\n" + code_span(warning)
        yield result.image, str(result.path), info, result.spec.to_json(), done

    return generate


def add_to_gallery(result_, results_):
    """The newest PNGs first, then the earlier ones (at most MAX_GALLERY); for the gallery, its state and the
    form's last image."""
    new = list(reversed((result_ or {}).get("files") or ([result_["file"]] if (result_ or {}).get("file") else [])))
    if not new:
        return results_, results_, gr.skip()
    paths = [*new, *[p for p in (results_ or []) if p not in new]][:MAX_GALLERY]
    return paths, paths, new[0]


def wire_generate(tab: GenerateTab, form: ComposeForm, service: GenerationService, config: UIConfig):
    """Generate: gather the form, then `/generate` on the model queue, then add the PNGs to the gallery.
    Returns the generate event (for the Stop button)."""
    gathered = submit(form, tab.button, service, tab.status)
    generate_event = gathered.success(
        generate_action(service, config),
        [form.model, form.prompt, form.negative, form.loras_json, form.method, form.params_json, form.steps, form.cfg,
         form.height, form.width, form.scheduler, form.seed, form.regions_json, form.base_weight, form.batch],
        [tab.preview, tab.latest, tab.result_view, tab.spec_view, tab.status], api_name="generate",
        show_progress_on=[tab.latest], **ON_MODEL_QUEUE)
    show_failures(generate_event, tab.status, "generate")
    generate_event.success(add_to_gallery, [tab.result_view, tab.results], [tab.gallery, tab.results, form.last_image],
                           **INSTANT)

    def reuse(result_):
        seed = (result_ or {}).get("seed")
        return seed if seed is not None else gr.skip()

    form.reuse_seed.click(reuse, tab.result_view, form.seed, **INSTANT)
    return generate_event


def wire_stop(stop: gr.Button, status: gr.Markdown, service: GenerationService, events: list) -> None:
    """Stop ends this page's running generation after its current step and cancels `events` (Generate's and the
    X/Y/Z plot's); the status line says where it stopped and that nothing of it was saved."""

    def stop_run(request: gr.Request):
        owner = getattr(request, "session_hash", None)
        label = RUNNING.get(owner, "") if owner else ""
        where = service.interrupt(owner) if owner in RUNNING else None
        if where is None:
            return "nothing was running"
        done, total = where
        return f"{label}stopped at step {done}/{total}, nothing saved"

    stop.click(stop_run, None, status, cancels=events, show_progress="hidden", **PRIVATE)
