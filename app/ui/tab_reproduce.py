"""The Reproduce tab: drop a PNG that loraloom made and its embedded settings fill the Compose form again."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from .params import control_values
from .service import GenerationService
from .tab_compose import ComposeForm
from .uploads import discard_upload, upload_path
from .wiring import guarded, upload_folder


@dataclass
class ReproduceTab:
    png: gr.File
    status: gr.Markdown
    spec: gr.Code


def reproduce_tab() -> ReproduceTab:
    with gr.Tab("Reproduce", id="reproduce"):
        png = gr.File(label="Drop a PNG made by loraloom", file_types=[".png"], type="filepath", elem_id="png-drop")
        status = gr.Markdown("", elem_id="restore-status")
        spec = gr.Code(language="json", label="Spec in the PNG", elem_id="restored-spec")
    return ReproduceTab(png, status, spec)


def restore_outputs(tab: ReproduceTab, form: ComposeForm) -> list:
    """What `/reproduce` fills, in its order: the whole Compose form, then this tab's note and spec."""
    return [form.model, form.prompt, form.negative, *form.slot_names, *form.slot_weights, form.method, *form.controls,
            form.steps, form.cfg, form.height, form.width, form.scheduler, form.seed, tab.status, tab.spec]


def reproduce_action(form: ComposeForm, service: GenerationService, n_outputs: int):
    """The `/reproduce` endpoint's function; returns `n_outputs` values in `restore_outputs` order."""
    max_loras = len(form.slot_names)

    @guarded("reproduce")
    def reproduce(file):
        """Read the settings a loraloom PNG carries into the form (the spec is the last output). What cannot be
        restored is listed in the note and left as it was in the form."""
        upload = upload_path(file)
        if upload is None:
            return [gr.skip()] * n_outputs
        path, name = upload
        try:
            r = service.restore(path, name)
        finally:  # the upload's temporary file goes, whether it was refused or read
            discard_upload(path, upload_folder())
        s = r.spec
        warnings = list(r.warnings)
        method_ok = "method" not in r.refused and s.method in form.methods
        if "method" not in r.refused and s.method not in form.methods:
            warnings.append(f"method {s.method!r} is not available here; method left as it was.")

        def value(name, v):
            return gr.skip() if name in r.refused or v is None else v

        lnames = [n for n, _ in r.loras] + [""] * (max_loras - len(r.loras))
        lweights = [w for _, w in r.loras] + [1.0] * (max_loras - len(r.loras))
        values = control_values(form.fields, {s.method: s.method_params})
        values = [gr.skip() if "method" in r.refused or (f.method == s.method and f.name in r.refused_params) else v
                  for f, v in zip(form.fields, values, strict=True)]
        note = f"restored the settings of `{name}` (method {s.method}, seed {s.seed})"
        if warnings:
            note += "\n\n**Not restored** (left as it was):\n" + "\n".join(f"- {w}" for w in warnings)
        return [r.model or gr.skip(), value("prompt", s.prompt), value("negative_prompt", s.negative_prompt),
                *lnames[:max_loras], *lweights[:max_loras], s.method if method_ok else gr.skip(), *values,
                value("steps", s.steps), value("guidance_scale", s.guidance_scale), value("height", s.height),
                value("width", s.width), value("scheduler", s.scheduler), value("seed", s.seed), note, r.text]

    return reproduce


def wire_reproduce(tab: ReproduceTab, form: ComposeForm, service: GenerationService) -> None:
    """Dropping a PNG calls `/reproduce` (not on the model queue: it reads the PNG and the library, no model). Without
    Gradio's preprocessing: the handler checks the file itself (type, size, content) and deletes it in every case."""
    outputs = restore_outputs(tab, form)
    tab.png.upload(reproduce_action(form, service, len(outputs)), tab.png, outputs, api_name="reproduce",
                   preprocess=False)
