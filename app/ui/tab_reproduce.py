"""The Import tab: drop a PNG made by loraloom or by A1111 (or Forge, or anything that writes A1111's `parameters`
text) and what maps onto this UI fills the Compose form: prompt, negative prompt, steps, sampler, CFG, seed, size,
model and LoRAs (by name, else by the A1111 AutoV3 hash of the library's files). What does not map is listed."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from .service import GenerationService
from .tab_compose import ComposeForm, apply_settings
from .uploads import discard_upload, upload_path
from .wiring import INSTANT, guarded, show_failures, upload_folder


@dataclass
class ReproduceTab:
    png: gr.File
    status: gr.Markdown
    spec: gr.Code
    settings: gr.JSON


def reproduce_tab() -> ReproduceTab:
    with gr.Tab("Import", id="reproduce"):
        png = gr.File(label="Drop a PNG made by loraloom or A1111 (its settings fill the form)", file_types=[".png"],
                      type="filepath", elem_id="png-drop")
        status = gr.Markdown("", elem_id="restore-status")
        spec = gr.Code(language="json", label="Settings in the PNG (loraloom spec, or A1111 text)",
                       elem_id="restored-spec")
        settings = gr.JSON(None, visible=False, label="settings")
    return ReproduceTab(png, status, spec, settings)


def restore_note(name: str, r) -> str:
    s = r.settings
    what = (f"restored the settings of `{name}` (method {s.get('method', r.spec.method)}, seed {s.get('seed', '?')})"
            if r.source == "loraloom" else
            f"imported the settings of `{name}` ({r.source}: seed {s.get('seed', '?')}, "
            f"{len(s.get('loras', []))} LoRA(s))")
    if r.warnings:
        what += "\n\n**Not restored** (left as it was):\n" + "\n".join(f"- {w}" for w in r.warnings)
    return what


def reproduce_action(service: GenerationService, methods: list[str]):
    """The `/reproduce` endpoint's function: (settings, note, spec text)."""

    @guarded("reproduce")
    def reproduce(file):
        """Read the settings a loraloom or A1111 PNG carries. Returns (settings, note, spec): `settings` holds the
        form's values to restore ({model, prompt, negative_prompt, loras: [{name, weight, …}], method,
        method_params: {method: {…}}, steps, guidance_scale, height, width, scheduler, seed, …}; keys left out are
        not restored), `note` says what was and lists what was not, `spec` is the text as the PNG carries it."""
        upload = upload_path(file)
        if upload is None:
            return gr.skip(), gr.skip(), gr.skip()
        path, name = upload
        try:
            r = service.import_png(path, name)
        finally:  # the upload's temporary file goes, whether it was refused or read
            discard_upload(path, upload_folder())
        settings = dict(r.settings)
        if settings.get("method") is not None and settings["method"] not in methods:
            r.warnings.append(f"method {settings['method']!r} is not available here; method left as it was.")
            settings.pop("method")
            settings.pop("method_params", None)
        return settings, restore_note(name, r), r.text

    return reproduce


def wire_reproduce(tab: ReproduceTab, form: ComposeForm, service: GenerationService) -> None:
    """Dropping a PNG calls `/reproduce` (not on the model queue: it reads the PNG and the library, no model), then
    the settings fill the form (a step of their own: a refused PNG touches nothing in the form). Without Gradio's
    preprocessing: the handler checks the file itself (type, size, content) and deletes it in every case."""
    event = tab.png.upload(reproduce_action(service, form.methods), tab.png, [tab.settings, tab.status, tab.spec],
                           api_name="reproduce", preprocess=False, show_progress_on=[tab.status])
    show_failures(event, tab.status, "reproduce")
    max_rows = len(form.rows)
    event.success(lambda s: apply_settings(form, s, max_rows), tab.settings, form.settings_outputs(), **INSTANT)
