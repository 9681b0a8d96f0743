"""The Compose panel (left of the Workbench): base model, LoRA slots, prompts, method and its parameters, sampling.
Generate, Compare, Reproduce and the Library read or fill this form; `submit` turns it into the plain JSON values
the public endpoints take."""

from __future__ import annotations

import random
from dataclasses import dataclass

import gradio as gr

from loraloom.pipelines.schedulers import scheduler_names

from .config import UIConfig
from .params import ParamField, collect, make_control, method_fields
from .service import GenerationService, LibraryItem
from .wiring import ON_MODEL_QUEUE, PRIVATE, guarded


@dataclass
class ComposeForm:
    """The Compose panel's components, and the methods and fields (in control order) they were made for."""

    methods: list[str]
    fields: list[ParamField]
    model: gr.Dropdown
    slot_names: list[gr.Dropdown]
    slot_weights: list[gr.Slider]
    prompt: gr.Textbox
    triggers_btn: gr.Button
    negative: gr.Textbox
    method: gr.Dropdown
    groups: list[gr.Column]  # one parameter panel per method
    controls: list  # every method's parameter controls, in `fields` order
    steps: gr.Slider
    cfg: gr.Slider
    height: gr.Slider
    width: gr.Slider
    scheduler: gr.Dropdown
    seed: gr.Number
    dice: gr.Button
    loras_json: gr.JSON
    params_json: gr.JSON
    params_all_json: gr.JSON


def insert_triggers(prompt: str, triggers: list[str]) -> str:
    """`prompt` with its `{triggers}` placeholder filled, else with each trigger word it lacks appended."""
    prompt = (prompt or "").strip()
    if "{triggers}" in prompt:
        return prompt.replace("{triggers}", ", ".join(dict.fromkeys(t for t in triggers if t)))
    missing = [t for t in dict.fromkeys(triggers) if t and t.lower() not in prompt.lower()]
    if not missing:
        return prompt
    return ", ".join([prompt, *missing]) if prompt else ", ".join(missing)


def compose_panel(config: UIConfig, service: GenerationService, methods: list[str],
                  items: list[LibraryItem]) -> ComposeForm:
    """Lay out the Compose column; image sizes come from the first model's configs (see `service.geometry`)."""
    default_model = service.model_choices()[0]
    side, multiple = service.geometry(default_model, load=False)
    max_side = max(4 * side, 256)
    method0 = config.method if config.method in methods else methods[0]
    with gr.Column(scale=5, elem_id="compose"):
        model = gr.Dropdown(service.model_choices(), value=default_model, label="Base model",
                            allow_custom_value=True, elem_id="model",
                            info="a configured model, or a path inside the model folders")
        slot_names, slot_weights = _lora_slots(config, [i.name for i in items if i.info is not None])
        prompt = gr.Textbox(config.prompt, label="Prompt", lines=2, elem_id="prompt",
                            info="{triggers} is replaced by the chosen LoRAs' trigger words")
        triggers_btn = gr.Button("Insert trigger words", size="sm", elem_id="insert-triggers")
        negative = gr.Textbox(config.negative_prompt, label="Negative prompt", lines=1, elem_id="negative")
        method = gr.Dropdown(methods, value=method0, label="Method", elem_id="method")
        groups, controls = _method_panels(config, methods, method0)
        with gr.Accordion("Sampling", open=True):
            with gr.Row():
                steps = gr.Slider(1, 150, value=config.steps, step=1, label="Steps", elem_id="steps")
                cfg = gr.Slider(0.0, 30.0, value=config.guidance_scale, step=0.5, label="CFG scale", elem_id="cfg")
            with gr.Row():
                height = gr.Slider(multiple, max_side, value=config.height or side, step=multiple,
                                   label="Height", elem_id="height")
                width = gr.Slider(multiple, max_side, value=config.width or side, step=multiple,
                                  label="Width", elem_id="width")
            with gr.Row():
                scheduler = gr.Dropdown(scheduler_names(), value=config.scheduler, label="Scheduler",
                                        elem_id="scheduler", allow_custom_value=True)
                seed = gr.Number(config.seed, precision=0, minimum=0, label="Seed", elem_id="seed")
                dice = gr.Button("random seed", size="sm", scale=0, min_width=60)
        # Plain JSON values the public endpoints take (filled from the form by `submit`).
        loras_json = gr.JSON(None, label="loras", visible=False)
        params_json = gr.JSON(None, label="method_params", visible=False)
        params_all_json = gr.JSON(None, label="method_params_by_method", visible=False)
    return ComposeForm(methods, [f for m in methods for f in method_fields(m)], model, slot_names, slot_weights,
                       prompt, triggers_btn, negative, method, groups, controls, steps, cfg, height, width, scheduler,
                       seed, dice, loras_json, params_json, params_all_json)


def _lora_slots(config: UIConfig, names: list[str]) -> tuple[list[gr.Dropdown], list[gr.Slider]]:
    """`config.max_loras` rows of LoRA name and weight, the first ones preset from `config.loras`."""
    preset = [(n, w) for n, w in config.loras if n in names][: config.max_loras]
    slot_names, slot_weights = [], []
    with gr.Group():
        for k in range(config.max_loras):
            name, weight = preset[k] if k < len(preset) else ("", 1.0)
            with gr.Row():
                slot_names.append(gr.Dropdown(["", *names], value=name, label=f"LoRA {k + 1}",
                                              elem_id=f"lora-{k + 1}", scale=3))
                slot_weights.append(gr.Slider(-2.0, 2.0, value=weight, step=0.05, label="weight",
                                              elem_id=f"weight-{k + 1}", scale=2))
    return slot_names, slot_weights


def _method_panels(config: UIConfig, methods: list[str], method0: str) -> tuple[list[gr.Column], list]:
    """One panel of parameter controls per method (only `method0`'s visible); returns the panels and the controls."""
    groups, controls = [], []
    for m in methods:
        with gr.Column(visible=(m == method0), variant="panel", elem_id=f"params-{m}") as group:
            gr.Markdown(f"**{m}** parameters")
            for f in method_fields(m):
                controls.append(make_control(f, config.method_params.get(m, {}).get(f.name)))
        groups.append(group)
    return groups, controls


def wire_compose(form: ComposeForm, service: GenerationService) -> None:
    """The form's own helpers: the chosen method's parameter panel, a random seed, inserting trigger words."""

    def show_params(m):
        return [gr.Column(visible=(x == m)) for x in form.methods]

    form.method.change(show_params, form.method, form.groups, **PRIVATE)
    form.dice.click(lambda: random.randint(0, 2**31 - 1), None, form.seed, **PRIVATE)

    def chosen_triggers(prompt_text, *slots):
        lib = {i.name: i for i in service.library()}
        words = [t for n in slots if n and n in lib for t in lib[n].triggers]
        return insert_triggers(prompt_text, words)

    form.triggers_btn.click(chosen_triggers, [form.prompt, *form.slot_names], form.prompt, **PRIVATE)


def submit(form: ComposeForm, button: gr.Button):
    """`button`'s click gathering the LoRA slots and method controls into `loras_json`, `params_json` (the chosen
    method's) and `params_all_json` (every method's); chain the public endpoint with `.success`."""
    k = len(form.slot_names)

    @guarded("reading the form")
    def gather(*values):
        names_, weights_, m, raws = values[:k], values[k:2 * k], values[2 * k], values[2 * k + 1:]
        by_method = collect(form.fields, list(raws))
        loras = [[n, float(w)] for n, w in zip(names_, weights_) if n]
        return loras, by_method.get(m, {}), by_method

    return button.click(gather, [*form.slot_names, *form.slot_weights, form.method, *form.controls],
                        [form.loras_json, form.params_json, form.params_all_json], **PRIVATE)


def wire_model_loading(form: ComposeForm, status: gr.Markdown, service: GenerationService) -> None:
    """Choosing a base model loads it (on the model queue) and refits the size sliders; `status` says when."""

    @guarded("load model")
    def load_model(model, height, width):
        """Load a base model (waits for a running generation); returns the size controls fitted to it."""
        side_, mult = service.geometry(model)
        top = max(4 * side_, 256)

        def fit(v):
            v = int(v or 0)
            return v if v >= mult and v % mult == 0 and v <= top else side_

        return (gr.Slider(minimum=mult, maximum=top, step=mult, value=fit(height)),
                gr.Slider(minimum=mult, maximum=top, step=mult, value=fit(width)), f"model ready: `{model}`")

    form.model.change(load_model, [form.model, form.height, form.width], [form.height, form.width, status],
                      api_name="load_model", **ON_MODEL_QUEUE)
