"""The Reproduce tab: drop a PNG that loraloom made and its embedded settings fill the Compose form again."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from .params import control_values
from .service import GenerationService
from .tab_compose import ComposeForm
from .wiring import fail


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

    def reproduce(file):
        """Read the settings a loraloom PNG carries into the form (the spec is the last output)."""
        if not file:
            return [gr.skip()] * n_outputs
        try:
            r = service.restore(file, Path(file).name)
        except Exception as err:
            raise fail(err) from None
        s = r.spec
        warnings = list(r.warnings)
        if s.method not in form.methods:
            warnings.append(f"method {s.method!r} is not available here; method left as it was.")
        lnames = [n for n, _ in r.loras] + [""] * (max_loras - len(r.loras))
        lweights = [w for _, w in r.loras] + [1.0] * (max_loras - len(r.loras))
        values = control_values(form.fields, {s.method: s.method_params})
        note = f"restored the settings of `{Path(file).name}` (method {s.method}, seed {s.seed})"
        if warnings:
            note += "\n\n**Not restored:** " + " ".join(warnings)
        return [r.model or gr.skip(), s.prompt, s.negative_prompt, *lnames[:max_loras],
                *lweights[:max_loras], s.method if s.method in form.methods else gr.skip(), *values,
                s.steps, s.guidance_scale, s.height or gr.skip(), s.width or gr.skip(), s.scheduler, s.seed, note,
                s.to_json()]

    return reproduce


def wire_reproduce(tab: ReproduceTab, form: ComposeForm, service: GenerationService) -> None:
    """Dropping a PNG calls `/reproduce` (not on the model queue: it reads the PNG and the library, no model)."""
    outputs = restore_outputs(tab, form)
    tab.png.upload(reproduce_action(form, service, len(outputs)), tab.png, outputs, api_name="reproduce")
