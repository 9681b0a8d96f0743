"""The Generate tab: one image from the Compose form, with per-step previews, the PNG (spec embedded) to download,
a gallery of this session's results, and the Stop button."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from .config import UIConfig
from .service import GenerationService
from .streaming import StepEvent, stream_generation
from .tab_compose import ComposeForm, submit
from .wiring import ON_MODEL_QUEUE, PRIVATE, error_markdown, fail, guarded, report

MAX_GALLERY = 48


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
        with gr.Row():
            button = gr.Button("Generate", variant="primary", elem_id="generate-btn")
            stop = gr.Button("Stop", variant="stop", elem_id="stop-btn")
        status = gr.Markdown("", elem_id="status")
        with gr.Row():
            preview = gr.Image(label="Preview (per step)", type="pil", format="png",
                               interactive=False, elem_id="preview", height=256)
            latest = gr.File(label="Download PNG (spec embedded)", interactive=False, elem_id="download")
        gallery = gr.Gallery(label="Results", format="png", columns=4, fit_columns=False,
                             height=360, preview=False, object_fit="contain",
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
                 scheduler, seed, progress=gr.Progress()):
        """Generate one image; yields per-step previews. Returns (preview, PNG file, result, spec JSON, status)."""
        spec = service.make_spec(model, prompt, negative_prompt, loras, method, method_params, steps,
                                 guidance_scale, height, width, scheduler, seed)
        skip = gr.skip()
        yield skip, skip, skip, skip, f"waiting for the model … ({spec.method}, seed {spec.seed})"
        result = None
        try:
            for ev in stream_generation(service, spec, config.preview_every, config.preview_interval):
                if isinstance(ev, StepEvent):
                    progress((ev.step, ev.total), desc=f"{spec.method}: step {ev.step}/{ev.total}")
                    yield (ev.preview if ev.preview is not None else skip), skip, skip, skip, \
                        f"{spec.method}: step {ev.step}/{ev.total}"
                else:
                    result = ev
        except Exception as err:
            message = report(err, "generate")  # logged once here (with its reference) when unexpected
            yield skip, skip, skip, skip, error_markdown(message)
            raise fail(gr.Error(message), "generate") from None
        # The spec goes out as the JSON text the PNG carries (a dict with "path" keys looks like a file to clients).
        info = {"file": str(result.path), "seconds": round(result.seconds, 4), "method": result.spec.method,
                "seed": result.spec.seed, "width": result.image.width, "height": result.image.height}
        done = f"done in {result.seconds:.2f} s → `{result.path.name}`"
        yield result.image, str(result.path), info, result.spec.to_json(), done

    return generate


def add_to_gallery(result_, results_):
    """The newest PNG first, then the earlier ones (at most MAX_GALLERY); for the gallery and its state."""
    png_file = (result_ or {}).get("file")
    paths = [png_file, *[p for p in (results_ or []) if p != png_file]][:MAX_GALLERY] if png_file else results_
    return paths, paths


def wire_generate(tab: GenerateTab, form: ComposeForm, service: GenerationService, config: UIConfig):
    """Generate: gather the form, then `/generate` on the model queue, then add the PNG to the gallery.
    Returns the generate event (for the Stop button)."""
    generate_event = submit(form, tab.button).success(
        generate_action(service, config),
        [form.model, form.prompt, form.negative, form.loras_json, form.method, form.params_json, form.steps, form.cfg,
         form.height, form.width, form.scheduler, form.seed],
        [tab.preview, tab.latest, tab.result_view, tab.spec_view, tab.status], api_name="generate",
        show_progress_on=[tab.latest], **ON_MODEL_QUEUE)
    generate_event.success(add_to_gallery, [tab.result_view, tab.results], [tab.gallery, tab.results], **PRIVATE)
    return generate_event


def wire_stop(stop: gr.Button, service: GenerationService, events: list) -> None:
    """Stop interrupts the running generation and cancels `events` (Generate's and Compare's)."""
    stop.click(service.interrupt, None, None, cancels=events, **PRIVATE)
