"""The Compose panel (left of the Workbench): base model, LoRA rows (weight, and per-LoRA controls: TE/UNet
strengths, block weights, start/stop), prompts with a token counter, the method (its description, docs link, basic
and advanced parameters), sampling (seed -1 = random, batch count) and regions. Generate, the X/Y/Z plot, History,
Import and the LoRA browser read or fill this form; `submit` turns it into the plain JSON values the public
endpoints take, and `apply_settings` puts a settings dict (a PNG's, a history item's) back into it."""

from __future__ import annotations

import hashlib
import io
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr

from loraloom.composition.controls import LBW_PRESETS
from loraloom.composition.errors import SpecError
from loraloom.composition.methods import get_method
from loraloom.composition.spatial import NAMED_REGIONS
from loraloom.pipelines.schedulers import scheduler_names

from .config import UIConfig
from .params import ParamField, basic_fields, collect, make_control, method_fields, plain_markdown
from .service import MAX_SEED, GenerationService, LibraryItem
from .wiring import INSTANT, ON_MODEL_QUEUE, PRIVATE, guarded, show_failures

START_ROWS = 2  # LoRA rows shown at first (more when the defaults preset more)
MAX_REGIONS = 3
DRAWN = "drawn / uploaded mask"
SPLITS = {
    "no regions": [],
    "left / right": ["left", "right"],
    "top / bottom": ["top", "bottom"],
    "thirds, side by side": ["left-third", "middle-third", "right-third"],
    "thirds, stacked": ["top-third", "center-third", "bottom-third"],
    "custom": None,
}
REGION_COLOURS = [(230, 60, 60), (60, 120, 230), (60, 190, 90)]
METHOD_DOCS = Path(__file__).resolve().parents[2] / "docs" / "methods"


@dataclass
class LoRARow:
    """One LoRA row: the name, its weight, a remove button, and its controls (collapsed)."""

    group: gr.Group
    name: gr.Dropdown
    weight: gr.Number
    remove: gr.Button
    te: gr.Number
    unet: gr.Number
    lbw: gr.Dropdown
    start: gr.Number
    stop: gr.Number

    @property
    def values(self) -> list:
        return [self.name, self.weight, self.te, self.unet, self.lbw, self.start, self.stop]


@dataclass
class RegionRow:
    group: gr.Group
    mask: gr.Dropdown
    editor: gr.ImageEditor
    upload: gr.Image  # a mask image uploaded as a file (taken before the editor when given)
    prompt: gr.Textbox
    loras: gr.Dropdown
    feather: gr.Number

    @property
    def values(self) -> list:
        return [self.mask, self.editor, self.upload, self.prompt, self.loras, self.feather]


REGION_VALUES = 6  # components per region in RegionRow.values


@dataclass
class ComposeForm:
    """The Compose panel's components, and the methods and fields (in control order) they were made for."""

    methods: list[str]
    fields: list[ParamField]
    model: gr.Dropdown
    rows: list[LoRARow]
    shown: gr.State  # how many LoRA rows are shown
    add_row: gr.Button
    prompt: gr.Textbox
    tokens: gr.Markdown
    triggers_btn: gr.Button
    negative: gr.Textbox
    method: gr.Dropdown
    method_info: gr.Markdown
    groups: list[gr.Column]  # one parameter panel per method
    controls: list  # every method's parameter controls, in `fields` order
    steps: gr.Number
    cfg: gr.Number
    height: gr.Number
    width: gr.Number
    scheduler: gr.Dropdown
    seed: gr.Number
    dice: gr.Button
    reuse_seed: gr.Button
    batch: gr.Number
    split: gr.Dropdown
    base_weight: gr.Number
    regions: list[RegionRow]
    mask_preview: gr.Image
    preview_btn: gr.Button
    status: gr.Markdown  # the form's own status line (errors of form-only steps)
    loras_json: gr.JSON
    params_json: gr.JSON
    params_all_json: gr.JSON
    regions_json: gr.JSON
    last_image: gr.State = field(default=None)  # path of the newest image (mask preview, "use as preview", reuse seed)

    @property
    def slot_names(self) -> list[gr.Dropdown]:
        return [r.name for r in self.rows]

    @property
    def slot_weights(self) -> list[gr.Number]:
        return [r.weight for r in self.rows]

    def raw_inputs(self) -> list:
        """What `submit` reads, in its order."""
        return [*[c for r in self.rows for c in r.values], self.method, *self.controls, self.split, self.base_weight,
                *[c for r in self.regions for c in r.values], self.height, self.width]

    def settings_outputs(self) -> list:
        """What `apply_settings` fills, in its order."""
        return [self.model, self.prompt, self.negative, self.shown, *[r.group for r in self.rows],
                *[c for r in self.rows for c in r.values], self.method, *self.groups, self.method_info, *self.controls,
                self.steps, self.cfg, self.height, self.width, self.scheduler, self.seed, self.split, self.base_weight,
                *[r.group for r in self.regions], *[c for r in self.regions for c in r.values]]


def insert_triggers(prompt: str, triggers: list[str]) -> str:
    """`prompt` with its `{triggers}` placeholder filled, else with each trigger word it lacks appended."""
    prompt = (prompt or "").strip()
    if "{triggers}" in prompt:
        return prompt.replace("{triggers}", ", ".join(dict.fromkeys(t for t in triggers if t)))
    missing = [t for t in dict.fromkeys(triggers) if t and t.lower() not in prompt.lower()]
    if not missing:
        return prompt
    return ", ".join([prompt, *missing]) if prompt else ", ".join(missing)


def method_pages() -> dict[str, str]:
    """{method: docs page file name} from docs/methods/README.md's table (`merge`, `switch` -> composlora.md), plus
    docs/methods/<method>.md for a method the table does not list. Empty where the docs are not installed."""
    import re

    index = METHOD_DOCS / "README.md"
    pages: dict[str, str] = {}
    if index.is_file():
        for line in index.read_text(encoding="utf-8").splitlines():
            m = re.match(r"\|\s*(.+?)\s*\|\s*\[([\w.-]+\.md)\]", line)
            if m:
                for name in re.findall(r"`(\w+)`", m.group(1)):
                    pages.setdefault(name, m.group(2))
    if METHOD_DOCS.is_dir():
        for page in METHOD_DOCS.glob("*.md"):
            pages.setdefault(page.stem, page.name)
    return pages


def method_summary(method: str, pages: dict[str, str] | None = None) -> str:
    """One line for the method: its description (as written) and a link to its docs page when there is one."""
    pages = method_pages() if pages is None else pages
    description = plain_markdown(getattr(get_method(method), "description", "") or "")
    link = f" · [docs/methods/{pages[method]}](/loraloom/docs/methods/{pages[method]})" if method in pages else ""
    return f"**{method}** — {description}{link}"


def compose_panel(config: UIConfig, service: GenerationService, methods: list[str],
                  items: list[LibraryItem]) -> ComposeForm:
    """Lay out the Compose column; image sizes come from the first model's configs (see `service.geometry`)."""
    default_model = service.model_choices()[0]
    side, multiple = service.geometry(default_model, load=False)
    method0 = config.method if config.method in methods else methods[0]
    names = [i.name for i in items if i.info is not None]
    pages = method_pages()
    with gr.Column(scale=5, elem_id="compose"):
        model = gr.Dropdown(service.model_choices(), value=default_model, label="Base model",
                            allow_custom_value=True, elem_id="model",
                            info="a configured model, or a path inside the model folders")
        rows, shown, add_row = _lora_rows(config, names)
        prompt = gr.Textbox(config.prompt, label="Prompt", lines=2, elem_id="prompt",
                            info=plain_markdown("{triggers} is replaced by the chosen LoRAs' trigger words; "
                                                "<lora:name:weight> chooses and weights a LoRA (A1111's syntax, also "
                                                "te=, unet=, lbw=, start=, stop=); Ctrl+Enter generates"))
        with gr.Row():
            tokens = gr.Markdown("", elem_id="token-count")
            triggers_btn = gr.Button("Insert trigger words", size="sm", elem_id="insert-triggers", scale=0, min_width=160)
        negative = gr.Textbox(config.negative_prompt, label="Negative prompt", lines=1, elem_id="negative")
        method = gr.Dropdown(methods, value=method0, label="Method", elem_id="method")
        method_info = gr.Markdown(method_summary(method0, pages), elem_id="method-info")
        groups, controls = _method_panels(config, methods, method0)
        with gr.Accordion("Sampling", open=True):
            with gr.Row():
                # empty: the model family's (SD 30 / 7.5, FLUX.1-dev 28 / 3.5, schnell 4 / 0, SD 3.5 28 / 3.5)
                steps = gr.Number(config.steps, precision=0, step=1, label="Steps", elem_id="steps", min_width=90,
                                  placeholder="model's")
                cfg = gr.Number(config.guidance_scale, step=0.5, label="CFG scale", elem_id="cfg", min_width=90,
                                placeholder="model's")
                height = gr.Number(config.height or side, precision=0, step=multiple, label="Height", elem_id="height",
                                   min_width=90, info=f"multiple of {multiple}")
                width = gr.Number(config.width or side, precision=0, step=multiple, label="Width", elem_id="width",
                                  min_width=90, info=f"multiple of {multiple}")
            with gr.Row():
                scheduler = gr.Dropdown(scheduler_names(), value=config.scheduler, label="Scheduler",
                                        elem_id="scheduler", allow_custom_value=True, min_width=120)
                seed = gr.Number(config.seed, precision=0, label="Seed", elem_id="seed", info="-1: a new random seed "
                                 "per image", min_width=120)
                batch = gr.Number(1, precision=0, label="Batch count", elem_id="batch-count", info="images, seed +1 "
                                  "each", min_width=90)
            with gr.Row():
                dice = gr.Button("random seed", size="sm", elem_id="dice")
                reuse_seed = gr.Button("reuse last seed", size="sm", elem_id="reuse-seed")
        split, base_weight, regions, mask_preview, preview_btn = _regions_panel(names)
        status = gr.Markdown("", elem_id="form-status")
        # Plain JSON values the public endpoints take (filled from the form by `submit`).
        loras_json = gr.JSON(None, label="loras", visible=False)
        params_json = gr.JSON(None, label="method_params", visible=False)
        params_all_json = gr.JSON(None, label="method_params_by_method", visible=False)
        regions_json = gr.JSON(None, label="regions", visible=False)
        last_image = gr.State(None)
    return ComposeForm(methods, [f for m in methods for f in method_fields(m)], model, rows, shown, add_row,
                       prompt, tokens, triggers_btn, negative, method, method_info, groups, controls, steps, cfg, height,
                       width, scheduler, seed, dice, reuse_seed, batch, split, base_weight, regions, mask_preview,
                       preview_btn, status, loras_json, params_json, params_all_json, regions_json, last_image)


def _lora_rows(config: UIConfig, names: list[str]) -> tuple[list[LoRARow], gr.State, gr.Button]:
    """`config.max_loras` LoRA rows (the first ones preset from `config.loras`; `START_ROWS` or as many as preset are
    shown), each with its controls in a closed accordion, and the "+ LoRA" button."""
    preset = [(n, w) for n, w in config.loras if n in names][: config.max_loras]
    n_shown = max(START_ROWS, len(preset))
    rows = []
    lbw_choices = ["", *LBW_PRESETS]
    with gr.Column(elem_id="lora-rows"):
        for k in range(config.max_loras):
            name, weight = preset[k] if k < len(preset) else ("", 1.0)
            with gr.Group(visible=k < n_shown, elem_id=f"lora-row-{k + 1}") as group:
                with gr.Row(equal_height=True):
                    dd = gr.Dropdown(["", *names], value=name, label=f"LoRA {k + 1}", elem_id=f"lora-{k + 1}", scale=4,
                                     min_width=160)
                    w = gr.Number(weight, step=0.05, label="weight", elem_id=f"weight-{k + 1}", scale=1, min_width=80)
                    rm = gr.Button("✕", size="sm", scale=0, min_width=36, elem_id=f"remove-{k + 1}",
                                   elem_classes=["remove-lora"])
                with gr.Accordion("controls: TE/UNet, block weights, start/stop", open=False,
                                  elem_id=f"controls-{k + 1}"):
                    with gr.Row():
                        te = gr.Number(1.0, step=0.05, label="TE", info="text-encoder strength", elem_id=f"te-{k + 1}",
                                       min_width=80)
                        unet = gr.Number(1.0, step=0.05, label="UNet", info="UNet (FLUX/SD3: transformer) strength",
                                         elem_id=f"unet-{k + 1}", min_width=80)
                        lbw = gr.Dropdown(lbw_choices, value="", label="block weights", allow_custom_value=True,
                                          info="a preset, or one number per block: SD 12/17/20/26; FLUX.1 58 (BASE, D00–D18, "
                                               "S00–S37; ALL, NONE, ALL0.5); SD3 BASE + joint blocks",
                                          elem_id=f"lbw-{k + 1}", min_width=140)
                    with gr.Row():
                        # 0 = not set (an empty number box shows, and sends, 0 once the accordion opens)
                        start = gr.Number(0, label="start", info="step (or fraction) it starts at; 0: the first",
                                          elem_id=f"start-{k + 1}", min_width=80)
                        stop = gr.Number(0, label="stop", info="step (or fraction) it stops before; 0: the end",
                                         elem_id=f"stop-{k + 1}", min_width=80)
            rows.append(LoRARow(group, dd, w, rm, te, unet, lbw, start, stop))
        add_row = gr.Button("+ LoRA", size="sm", elem_id="add-lora", visible=n_shown < config.max_loras)
    return rows, gr.State(n_shown), add_row


def _method_panels(config: UIConfig, methods: list[str], method0: str) -> tuple[list[gr.Column], list]:
    """One panel per method (only `method0`'s visible): its basic parameters, then the others in a closed
    "advanced" accordion. Returns the panels and the controls (in `method_fields` order)."""
    groups, controls = [], []
    for m in methods:
        fields = method_fields(m)
        basic = basic_fields(m, fields)
        made: dict[str, Any] = {}
        with gr.Column(visible=(m == method0), variant="panel", elem_id=f"params-{m}") as group:
            for f in fields:
                if f.name in basic:
                    made[f.name] = make_control(f, config.method_params.get(m, {}).get(f.name))
            rest = [f for f in fields if f.name not in basic]
            if rest:
                with gr.Accordion(f"advanced ({len(rest)})", open=False, elem_id=f"advanced-{m}"):
                    for f in rest:
                        made[f.name] = make_control(f, config.method_params.get(m, {}).get(f.name))
        controls.extend(made[f.name] for f in fields)
        groups.append(group)
    return groups, controls


def _regions_panel(names: list[str]):
    """Regions (docs/controls.md): a preset split or custom masks, each region's prompt and LoRAs, the base
    weight, and a preview of the masks over the last image."""
    choices = [*NAMED_REGIONS, DRAWN]
    regions = []
    with gr.Accordion("Regions", open=False, elem_id="regions"):
        with gr.Row():
            split = gr.Dropdown(list(SPLITS), value="no regions", label="split", elem_id="region-split",
                                info="a preset split, or custom masks")
            base_weight = gr.Number(0.0, step=0.05, label="base weight", elem_id="base-weight",
                                    info="share of the main prompt mixed into every region (0 to 1)")
        for k in range(MAX_REGIONS):
            with gr.Group(visible=False, elem_id=f"region-{k + 1}") as group:
                with gr.Row():
                    mask = gr.Dropdown(choices, value="full", label=f"region {k + 1} mask", elem_id=f"region-mask-{k + 1}",
                                       min_width=140)
                    feather = gr.Number(0.0, step=0.01, label="feather", elem_id=f"region-feather-{k + 1}",
                                        info="softens the edge (0 to 0.5)", min_width=90)
                prompt = gr.Textbox("", label=f"region {k + 1} prompt", lines=1, elem_id=f"region-prompt-{k + 1}")
                loras = gr.Dropdown(names, value=[], multiselect=True, label=f"region {k + 1} LoRAs",
                                    elem_id=f"region-loras-{k + 1}", info="these LoRAs act only in this region")
                editor = gr.ImageEditor(label=f"region {k + 1}: draw the region in white",
                                        type="pil", image_mode="RGBA", visible=False, height=260,
                                        elem_id=f"region-editor-{k + 1}",
                                        brush=gr.Brush(colors=["#ffffff"], color_mode="fixed", default_size=6),
                                        canvas_size=(256, 256))
                upload = gr.Image(label=f"region {k + 1}: or upload a mask image (white = the region)", type="pil",
                                  sources=["upload"], image_mode="L", visible=False, height=160,
                                  elem_id=f"region-upload-{k + 1}")
            regions.append(RegionRow(group, mask, editor, upload, prompt, loras, feather))
        with gr.Row():
            preview_btn = gr.Button("Preview the masks over the last image", size="sm", elem_id="mask-preview-btn")
        mask_preview = gr.Image(label="masks (red, blue, green: regions 1, 2, 3)", type="pil", interactive=False,
                                height=200, elem_id="mask-preview", format="png")
    return split, base_weight, regions, mask_preview, preview_btn


# --- reading the form -----------------------------------------------------------------------------------------
def _num(value, where: str, default=None, required: bool = True):
    if value is None or value == "":
        if default is not None or not required:
            return default
        raise SpecError(f"{where} is empty. Fix: type a number")
    return value


def lora_entries(values: list, n_rows: int) -> list[dict]:
    """LoRA entries ({name, weight, te, unet, lbw, start, stop}, controls only when set) from the rows' values."""
    out = []
    for k in range(n_rows):
        name, weight, te, unet, lbw, start, stop = values[7 * k: 7 * k + 7]
        if not name:
            continue
        where = f"LoRA {k + 1} ({name})"
        entry = {"name": name, "weight": _num(weight, f"{where} weight")}
        te, unet = _num(te, f"{where} TE", 1.0), _num(unet, f"{where} UNet", 1.0)
        if te != 1.0:
            entry["te"] = te
        if unet != 1.0:
            entry["unet"] = unet
        if lbw not in (None, "", "NONE"):
            entry["lbw"] = lbw
        if start not in (None, "", 0):  # 0: from the first step, as when left out
            entry["start"] = start
        if stop not in (None, "", 0):  # 0: to the end, as when left out (a window that ends at 0 is empty)
            entry["stop"] = stop
        out.append(entry)
    return out


def save_drawn_mask(service: GenerationService, value, where: str, upload=None) -> str:
    """The mask uploaded as an image (`upload`, taken first) or drawn or uploaded in an image editor (`value`), as a
    PNG in the output folder's masks/ (named by its content, written through the write policy); returns its path.
    White (strokes, or a bright upload) = the region."""
    from loraloom.composition.files import write_file

    mask = upload.convert("L") if upload is not None else _editor_mask(value, where)
    if mask.getbbox() is None:
        raise SpecError(f"{where}: the mask is empty (all black). Fix: draw the region in white, or upload a mask image")
    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    data = buf.getvalue()
    path = service.config.output_dir / "masks" / f"mask_{hashlib.sha256(data).hexdigest()[:16]}.png"
    if not path.exists():
        write_file(path, lambda tmp: tmp.write_bytes(data), service.write_policy, what="mask image", replace=False)
    return str(path)


def _editor_mask(value, where: str):
    """The grey mask an image editor's value holds: its bright opaque strokes, else its background (an upload)."""
    from PIL import Image, ImageChops

    if not isinstance(value, dict):
        raise SpecError(f"{where}: no mask drawn or uploaded. Fix: draw the region in white, or upload a mask image")
    layers = [im for im in (value.get("layers") or []) if im is not None]
    background = value.get("background")
    if background is None and not layers:
        raise SpecError(f"{where}: no mask drawn or uploaded yet. Fix: draw the region in white, or upload a mask image "
                        "(and wait until the editor shows it)")
    mask = None
    for layer in layers:  # strokes: where a layer is opaque and bright
        rgba = layer.convert("RGBA")
        stroke = Image.composite(rgba.convert("L"), Image.new("L", rgba.size, 0), rgba.getchannel("A"))
        mask = stroke if mask is None else ImageChops.lighter(mask, stroke)
    if (mask is None or mask.getbbox() is None) and background is not None:
        mask = background.convert("L")
    if mask is None or mask.getbbox() is None:
        raise SpecError(f"{where}: the mask is empty (all black). Fix: draw the region in white, or upload a mask image")
    return mask


def region_entries(service: GenerationService, split: str, values: list) -> list[dict]:
    """Region entries ({mask, prompt, loras, feather}) from the Regions panel; [] for "no regions"."""
    if split == "no regions" or not split:
        return []
    names = SPLITS.get(split)
    count = len(names) if names else MAX_REGIONS
    out = []
    for k in range(count):
        mask, editor, upload, prompt, loras, feather = values[REGION_VALUES * k: REGION_VALUES * (k + 1)]
        where = f"region {k + 1}"
        if names is None and not (prompt or loras or mask == DRAWN):
            continue  # custom split: a region left empty is not one
        if mask == DRAWN:
            mask = save_drawn_mask(service, editor, where, upload)
        entry: dict[str, Any] = {"mask": mask}
        if prompt:
            entry["prompt"] = prompt
        if loras:
            entry["loras"] = list(loras)
        feather = _num(feather, f"{where} feather", 0.0)
        if feather:
            entry["feather"] = feather
        out.append(entry)
    return out


def submit(form: ComposeForm, button: gr.Button, service: GenerationService | None = None, status=None):
    """`button`'s click gathering the LoRA rows, method controls and regions into `loras_json`, `params_json` (the
    chosen method's), `params_all_json` (every method's) and `regions_json`; chain the public endpoint with
    `.success`. A value that is not one (an empty weight, invalid JSON, a number out of a parameter's range) is
    refused by name in the status line and a notice, and nothing runs."""
    n = len(form.rows)

    @guarded("reading the form")
    def gather(*values):
        rows, rest = list(values[: 7 * n]), list(values[7 * n:])
        m, raws = rest[0], rest[1: 1 + len(form.controls)]
        split = rest[1 + len(form.controls)]  # rest[2 + …]: the base weight, which /generate takes as it is
        region_values = rest[3 + len(form.controls): 3 + len(form.controls) + REGION_VALUES * MAX_REGIONS]
        by_method = collect(form.fields, list(raws))
        loras = lora_entries(rows, n)
        regions = region_entries(service, split, region_values) if service is not None else []
        return loras, by_method.get(m, {}), by_method, regions

    event = button.click(gather, form.raw_inputs(), [form.loras_json, form.params_json, form.params_all_json,
                                                     form.regions_json], show_progress="hidden", **PRIVATE)
    show_failures(event, status if status is not None else form.status, "reading the form")
    return event


# --- filling the form -----------------------------------------------------------------------------------------
def apply_settings(form: ComposeForm, settings: dict | None, max_rows: int) -> list:
    """Values for `form.settings_outputs()` showing `settings` (keys it lacks: left as they are)."""
    s = settings or {}
    skip = gr.skip()
    out: list = [s.get("model", skip) or skip, s.get("prompt", skip), s.get("negative_prompt", skip)]
    loras = s.get("loras")
    if loras is not None:
        n = min(max(START_ROWS, len(loras)), max_rows)
        out.append(n)
        out += [gr.Group(visible=k < n) for k in range(max_rows)]
        for k in range(max_rows):
            e = loras[k] if k < len(loras) else {}
            lbw = e.get("lbw")
            out += [e.get("name", ""), e.get("weight", 1.0), e.get("te", 1.0), e.get("unet", 1.0),
                    ",".join(f"{v:g}" for v in lbw) if isinstance(lbw, list) else (lbw or ""), e.get("start") or 0,
                    e.get("stop") or 0]
    else:
        out += [skip] * (1 + max_rows + 7 * max_rows)
    method = s.get("method")
    if method in form.methods:
        out += [method, *[gr.Column(visible=(m == method)) for m in form.methods], method_summary(method)]
    else:
        out += [skip] * (2 + len(form.methods))
    params = s.get("method_params") or {}
    for f in form.fields:
        given = params.get(f.method, {})
        out.append(f.to_control(given[f.name]) if f.name in given else
                   (f.to_control(f.default) if f.method == method and method in params else skip))
    for key in ("steps", "guidance_scale", "height", "width", "scheduler", "seed"):
        out.append(s[key] if key in s else skip)
    regions = s.get("regions")
    if regions is not None:
        masks = [r.get("mask") for r in regions]
        split = next((name for name, parts in SPLITS.items() if parts == masks), "custom" if regions else "no regions")
        out += [split, s.get("base_weight", 0.0)]
        out += [gr.Group(visible=k < len(regions)) for k in range(MAX_REGIONS)]
        for k in range(MAX_REGIONS):
            r = regions[k] if k < len(regions) else {}
            mask = r.get("mask", "full")
            named = mask if isinstance(mask, str) and mask in NAMED_REGIONS else None
            editor = skip
            if named is None and r:
                editor = _mask_editor_value(mask)
            drawn = named is None and bool(r)
            out += [named or (DRAWN if r else "full"), editor if drawn else gr.ImageEditor(visible=False),
                    gr.Image(value=None, visible=drawn), r.get("prompt") or "", list(r.get("loras") or []),
                    r.get("feather", 0.0)]
    else:
        out += [skip, skip] + [skip] * MAX_REGIONS + [skip] * (REGION_VALUES * MAX_REGIONS)
    return out


def _mask_editor_value(mask):
    """An image editor showing a restored mask (an image file, or a box drawn as one)."""
    from PIL import Image

    from loraloom.composition.spatial import mask_from

    try:
        if isinstance(mask, dict):
            with Image.open(mask["image"]) as im:
                img = im.convert("RGB")
        else:
            img = Image.fromarray((mask_from(list(mask), 256, 256).numpy() * 255).astype("uint8")).convert("RGB")
    except Exception:  # the file is gone or not an image: an empty editor (the note says what was restored)
        return gr.ImageEditor(visible=True)
    return gr.ImageEditor(value={"background": img, "layers": [], "composite": img}, visible=True)


def mask_overlay(image, regions: list[dict], size: tuple[int, int]):
    """The regions' masks over `image` (or a grey canvas of `size` = (width, height)), one colour per region."""
    import numpy as np
    from PIL import Image

    from loraloom.composition.spatial import mask_from

    w, h = size
    base = image.convert("RGB") if image is not None else Image.new("RGB", (w, h), (128, 128, 128))
    scale = max(1, 256 // max(base.size))
    base = base.resize((base.width * scale, base.height * scale), Image.NEAREST)
    out = np.asarray(base, dtype=np.float32)
    for k, region in enumerate(regions):
        mask = region["mask"]
        spec = mask
        if isinstance(mask, str) and mask not in NAMED_REGIONS:
            with Image.open(mask) as im:
                spec = im.convert("L")
        m = mask_from(spec, base.height, base.width, float(region.get("feather", 0.0))).numpy()[..., None]
        colour = np.array(REGION_COLOURS[k % len(REGION_COLOURS)], dtype=np.float32)
        out = out * (1 - 0.45 * m) + colour * 0.45 * m
    return Image.fromarray(out.clip(0, 255).astype("uint8"))


# --- wiring -------------------------------------------------------------------------------------------------------
def wire_compose(form: ComposeForm, service: GenerationService) -> None:
    """The form's own helpers: the method's panel and description, LoRA rows added and removed, a random seed,
    trigger words, the token counter, the regions' rows and their mask preview."""
    pages = method_pages()
    max_rows = len(form.rows)

    def show_params(m):
        return [gr.Column(visible=(x == m)) for x in form.methods] + [method_summary(m, pages)]

    form.method.change(show_params, form.method, [*form.groups, form.method_info], **INSTANT)
    form.dice.click(lambda: random.randint(0, MAX_SEED), None, form.seed, **INSTANT)

    def add_row(n):
        n = min(int(n or 0) + 1, max_rows)
        return [n, *[gr.Group(visible=k < n) for k in range(max_rows)], gr.Button(visible=n < max_rows)]

    form.add_row.click(add_row, form.shown, [form.shown, *[r.group for r in form.rows], form.add_row], **INSTANT)

    for k, row in enumerate(form.rows):
        def remove(*values, k=k):
            """Take row k out: the rows below move up, the last shown row is hidden."""
            n, rows = int(values[0] or 0), [list(values[1 + 7 * j: 8 + 7 * j]) for j in range(max_rows)]
            rows.pop(k)
            rows.append(["", 1.0, 1.0, 1.0, "", 0, 0])
            n = max(1, n - 1)
            return [n, *[gr.Group(visible=j < n) for j in range(max_rows)], gr.Button(visible=n < max_rows),
                    *[v for r in rows for v in r]]

        row.remove.click(remove, [form.shown, *[c for r in form.rows for c in r.values]],
                         [form.shown, *[r.group for r in form.rows], form.add_row,
                          *[c for r in form.rows for c in r.values]], **INSTANT)

    @guarded("insert trigger words")
    def chosen_triggers(prompt_text, *slots):
        lib = {i.name: i for i in service.library()}
        words = [t for n in slots if n and n in lib for t in lib[n].triggers]
        return insert_triggers(prompt_text, words)

    ev = form.triggers_btn.click(chosen_triggers, [form.prompt, *form.slot_names], form.prompt,
                                 show_progress="hidden", **PRIVATE)
    show_failures(ev, form.status, "insert trigger words")

    def count_tokens(model, prompt_text, *slots):
        text, _ = service.token_report(model, prompt_text, [[n, 1.0] for n in slots if n])
        return text

    for trigger in (form.prompt.input, *[r.name.change for r in form.rows], form.model.change):
        trigger(count_tokens, [form.model, form.prompt, *form.slot_names], form.tokens, show_progress="hidden",
                trigger_mode="always_last", **PRIVATE)

    def show_split(split):
        names = SPLITS.get(split)
        count = MAX_REGIONS if names is None else len(names)
        out = [gr.Group(visible=k < count) for k in range(MAX_REGIONS)]
        masks = [gr.Dropdown(value=names[k]) if names and k < len(names) else gr.skip() for k in range(MAX_REGIONS)]
        return out + masks

    form.split.change(show_split, form.split, [*[r.group for r in form.regions], *[r.mask for r in form.regions]],
                      **INSTANT)
    for r in form.regions:
        r.mask.change(lambda m: (gr.ImageEditor(visible=(m == DRAWN)), gr.Image(visible=(m == DRAWN))), r.mask,
                      [r.editor, r.upload], **INSTANT)

    @guarded("preview the masks")
    def preview(last, height, width, split, *values):
        regions = region_entries(service, split, list(values))
        if not regions:
            raise SpecError("no regions to preview. Fix: choose a split (or custom masks) under Regions")
        from PIL import Image

        image = None
        if last and Path(last).is_file():
            with Image.open(last) as im:
                image = im.convert("RGB")
        return mask_overlay(image, regions, (int(width or 64), int(height or 64)))

    ev = form.preview_btn.click(preview, [form.last_image, form.height, form.width, form.split,
                                          *[c for r in form.regions for c in r.values]], form.mask_preview,
                                show_progress_on=[form.mask_preview], **PRIVATE)
    show_failures(ev, form.status, "preview the masks")


def wire_model_loading(form: ComposeForm, status: gr.Markdown, service: GenerationService) -> None:
    """Choosing a base model loads it (on the model queue) and fits the size boxes to it; `status` says when."""

    @guarded("load model")
    def load_model(model, height, width):
        """Load a base model (waits for a running generation); returns the size boxes fitted to it."""
        side_, mult = service.geometry(model)

        def fit(v):
            v = int(v or 0)
            return v if v >= mult and v % mult == 0 else side_

        return (gr.Number(value=fit(height), step=mult, info=f"multiple of {mult}"),
                gr.Number(value=fit(width), step=mult, info=f"multiple of {mult}"), f"model ready: `{model}`")

    ev = form.model.change(load_model, [form.model, form.height, form.width], [form.height, form.width, status],
                           api_name="load_model", show_progress_on=[status], **ON_MODEL_QUEUE)
    show_failures(ev, status, "load model")

    def fit_scheduler(model, scheduler):
        """A flow-matching model (FLUX.1, SD 3.x) samples with its own scheduler only: the Scheduler box shows
        'default' for it (an SD scheduler name would be refused at Generate); SD models keep the box as it is."""
        return service.scheduler_for(model, scheduler)

    ev.success(fit_scheduler, [form.model, form.scheduler], form.scheduler, **PRIVATE)
