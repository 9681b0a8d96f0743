"""The Compare / X-Y-Z plot tab: the Compose form varied along one or two axes (and an optional Z, one page each):
method, seed, any LoRA's weight, CFG, steps, scheduler, size, any method parameter. The result is a labelled grid
image per page (`loraloom.pipelines.grid`, the same as `loraloom grid`), shown large and downloadable, each cell's
PNG with its spec, and a table with CLIPScore and seconds per cell (below the grid, never over the images).
Cells already made are reused. `/grid` is the endpoint; `/compare` (methods side by side) stays for API callers."""

from __future__ import annotations

import time
from dataclasses import dataclass

import gradio as gr

from loraloom.composition.errors import LoraloomError, SpecError
from loraloom.pipelines.grid import AXIS_HELP, draw_grid, parse_axis, plan_grid, run_grid, save_grid

from .config import UIConfig
from .params import method_fields
from .service import Cancelled, GenerationService
from .streaming import StepEvent, stream_generation
from .tab_compose import ComposeForm, submit
from .wiring import INSTANT, ON_MODEL_QUEUE, code_span, error_markdown, fail, guarded, report, show_failures

NONE = "(none)"
BASIC_KINDS = ["method", "seed", "CFG", "steps", "scheduler", "size"]
TABLE_HEADERS = ["x", "y", "z", "method", "seed", "CLIPScore", "seconds", "file", "error"]
REDRAW_SECONDS = 0.5  # the partial grid is redrawn at most this often (and after the first and the last cell)


@dataclass
class GridTab:
    kinds: list[gr.Dropdown]  # x, y, z
    values: list[gr.Textbox]
    axes: list[gr.Textbox]  # hidden: "KIND=VALUES" per axis, what /grid takes
    score: gr.Checkbox
    button: gr.Button
    status: gr.Markdown
    pages: gr.Gallery
    files: gr.File
    table: gr.Dataframe
    # the legacy /compare endpoint (API only)
    compare_methods: gr.CheckboxGroup
    compare_button: gr.Button
    compare_gallery: gr.Gallery
    compare_table: gr.Dataframe
    compare_status: gr.Markdown


def axis_kinds(methods: list[str], lora_names: list[str]) -> list[str]:
    """The axis kinds offered: the basic ones, every LoRA's weight, every method parameter."""
    return [*BASIC_KINDS, *[f"weight:{n}" for n in lora_names],
            *[f"param:{f.method}.{f.name}" for m in methods for f in method_fields(m) if not f.path]]


def default_values(kind: str, config: UIConfig, methods: list[str]) -> str:
    """What a freshly chosen axis kind starts with."""
    if kind == "method":
        return ", ".join([m for m in (config.compare_methods or methods) if m in methods] or methods[:3])
    return {"seed": "0-3", "CFG": "1, 2, 4", "steps": "10, 20, 30", "scheduler": "default, ddim, euler",
            "size": "32x32, 64x64"}.get(kind, "0.5, 1" if kind.startswith("weight:") else "")


def axis_text(kind: str | None, values: str | None) -> str:
    """`KIND=VALUES` from the dropdown and the values box ('' for no axis)."""
    if not kind or kind == NONE:
        return ""
    head = {"CFG": "cfg"}.get(kind, kind)
    return f"{head}={values or ''}"


def grid_tab(config: UIConfig, methods: list[str], lora_names: list[str]) -> GridTab:
    kinds = axis_kinds(methods, lora_names)
    with gr.Tab("X/Y/Z plot", id="grid"):
        gr.Markdown("Vary the form along one or two axes (and Z: one page per value). Values: a list `a, b, c` or a "
                    "range `1-5`, `1-9 (+2)`, `0.5-1.5 [3]`; `method=*` is every method. Cells already made are "
                    "reused.", elem_id="grid-help")
        dd, boxes, hidden = [], [], []
        for axis, kind0 in (("X", "method"), ("Y", NONE), ("Z", NONE)):
            with gr.Row(equal_height=True):
                k = gr.Dropdown([NONE, *kinds] if axis != "X" else kinds, value=kind0, label=f"{axis} axis",
                                elem_id=f"axis-{axis.lower()}-kind", scale=2, min_width=140)
                v = gr.Textbox(default_values(kind0, config, methods) if kind0 != NONE else "", label=f"{axis} values",
                               elem_id=f"axis-{axis.lower()}-values", scale=3, min_width=160)
            dd.append(k)
            boxes.append(v)
            hidden.append(gr.Textbox(visible=False, label=f"{axis.lower()}"))
        with gr.Row():
            score = gr.Checkbox(bool(config.clip), label="CLIPScore per cell", elem_id="grid-score",
                                interactive=bool(config.clip), scale=1)
            button = gr.Button("Run X/Y/Z plot", variant="primary", elem_id="grid-btn", scale=2)
        status = gr.Markdown("", elem_id="grid-status")
        pages = gr.Gallery(label="X/Y/Z plot (one image per Z value; download or full screen)", format="png",
                           show_label=False,
                           columns=1, preview=False, object_fit="contain", height="auto", elem_id="grid-image",
                           buttons=["download", "fullscreen"], allow_preview=True)
        table = gr.Dataframe(headers=TABLE_HEADERS, interactive=False, elem_id="grid-table", wrap=True)
        with gr.Accordion("files: the grid and every cell's PNG (spec embedded)", open=False, elem_id="grid-files-box"):
            files = gr.File(label="the grid and every cell's PNG (spec embedded)", file_count="multiple",
                            interactive=False, elem_id="grid-files")
        # /compare, the methods side by side (kept for API callers): hidden controls
        with gr.Column(visible=False):
            compare_methods = gr.CheckboxGroup(methods, value=[m for m in (config.compare_methods or methods)
                                                               if m in methods] or methods[:3], label="Methods")
            compare_button = gr.Button("Compare")
            compare_gallery = gr.Gallery(format="png")
            compare_table = gr.Dataframe(headers=["method", "CLIPScore", "seconds", "file", "error"])
            compare_status = gr.Markdown("")
    return GridTab(dd, boxes, hidden, score, button, status, pages, files, table, compare_methods, compare_button,
                   compare_gallery, compare_table, compare_status)


def _cell_runner(service: GenerationService, config: UIConfig, owner: str | None, on_step):
    def run(spec):
        result = None
        for ev in stream_generation(service, spec, preview_every=0, min_interval=config.preview_interval, owner=owner):
            if isinstance(ev, StepEvent):
                on_step(ev)
            else:
                result = ev
        return result.path, result.image, result.seconds

    return run


def _rows(plan) -> list[list]:
    x, y, z = plan.axes
    rows = []
    for c in plan.cells:
        if not c.done:
            continue
        rows.append([x.labels()[c.x] if x else "", y.labels()[c.y] if y else "", z.labels()[c.z] if z else "",
                     c.spec.method, c.spec.seed, None if c.score is None else round(c.score, 2),
                     "reused" if c.reused else (None if c.seconds is None else round(c.seconds, 3)),
                     c.path.name if c.path else "", (c.error or "") + (f" ({c.note})" if c.note else "")])
    return rows


def grid_action(service: GenerationService, config: UIConfig):
    """The `/grid` endpoint's function (its parameter names are the API's)."""

    @guarded("X/Y/Z plot")
    def grid(model, prompt, negative_prompt, loras, method, method_params_by_method, steps, guidance_scale, height,
             width, scheduler, seed, x, y="", z="", score=False, regions=None, base_weight=0.0,
             request: gr.Request = None, progress=gr.Progress()):
        """Vary the form along axes `x`, `y`, `z` (each `KIND=VALUES`; y and z may be empty). Yields the grid
        page(s) as they fill, then returns (grid pages, files: the grid PNGs then every cell's PNG, table, status)."""
        if not x:
            raise fail(SpecError(f"the X axis is empty. Fix: {AXIS_HELP}"))
        by_method = method_params_by_method or {}
        if not isinstance(by_method, dict):
            raise fail(SpecError("method_params_by_method must be a JSON object: {method: {parameter: value}}"))
        axes = [parse_axis(text, f"{name} axis") if text else None for name, text in (("X", x), ("Y", y), ("Z", z))]
        if axes[1] is None and axes[2] is not None:
            axes[1], axes[2] = axes[2], None
        base = service.make_spec(model, prompt, negative_prompt, loras, method, by_method.get(method, {}), steps,
                                 guidance_scale, height, width, scheduler, seed, regions, base_weight)
        plan = plan_grid(base, axes[0], axes[1], axes[2], by_method)
        nx, ny, nz = plan.shape
        total = len(plan.cells)
        owner = getattr(request, "session_hash", None)
        state = {"cell": 0}

        def on_step(ev):
            progress((state["cell"] * ev.total + ev.step, total * ev.total),
                     desc=f"cell {state['cell'] + 1}/{total}: step {ev.step}/{ev.total}")

        run = _cell_runner(service, config, owner, on_step)
        skip = gr.skip()
        start, last_draw = time.perf_counter(), 0.0
        yield skip, skip, skip, f"{nx} x {ny}" + (f" x {nz}" if nz > 1 else "") + f" = {total} cells; waiting for the model …"
        from . import tab_generate

        if owner:
            tab_generate.RUNNING[owner] = ""
        try:
            for k, _ in enumerate(run_grid(plan, run, service.config.output_dir, fatal=(Cancelled,))):
                state["cell"] = k + 1
                if owner:
                    tab_generate.RUNNING[owner] = f"cell {k + 2}/{total}: "
                now = time.perf_counter()
                if k == 0 or k + 1 == total or now - last_draw >= REDRAW_SECONDS:
                    last_draw = now
                    pages = [(draw_grid(plan, zi), f"{axes[2].name} = {axes[2].labels()[zi]}" if axes[2] else None)
                             for zi in range(nz)]
                    yield pages, skip, _rows(plan), f"{k + 1}/{total} cells ({time.perf_counter() - start:.1f} s)"
        except Cancelled as err:
            made = sum(c.image is not None for c in plan.cells)
            yield skip, skip, _rows(plan), f"{err}; the {made} cell(s) made before it are saved"
            return
        except LoraloomError as err:
            message = report(err, "X/Y/Z plot")
            yield skip, skip, _rows(plan), error_markdown(message)
            raise fail(err, "X/Y/Z plot") from None
        finally:
            if owner:
                tab_generate.RUNNING.pop(owner, None)
        errors = [c for c in plan.cells if c.error]
        if score:
            done = [c for c in plan.cells if c.image is not None]
            scores = service.clip_scores([c.image for c in done], [c.spec for c in done])
            if scores is None:
                errors_note = " (no CLIP configured: no CLIPScore)"
            else:
                errors_note = ""
                for c, s in zip(done, scores):
                    c.score = s
        else:
            errors_note = ""
        paths = [save_grid(draw_grid(plan, zi), plan, zi, service.config.output_dir, service.write_policy)
                 for zi in range(nz)]
        pages = [(str(p), f"{axes[2].name} = {axes[2].labels()[zi]}" if axes[2] else None) for zi, p in enumerate(paths)]
        files = [str(p) for p in paths] + list(dict.fromkeys(str(c.path) for c in plan.cells if c.path))
        reused = sum(c.reused for c in plan.cells)
        note = (f"X/Y/Z plot: {total} cells in {time.perf_counter() - start:.1f} s ({reused} reused) → "
                f"`{paths[0].name}`{errors_note}")
        if errors:
            note += " — **failed cells:** " + code_span("; ".join(f"{c.spec.method} seed {c.spec.seed}: {c.error}"
                                                                for c in errors[:5]))
        if len(errors) == total:
            raise fail(LoraloomError("every cell failed: " + "; ".join(dict.fromkeys(c.error for c in errors))))
        yield pages, files, _rows(plan), note

    return grid


def compare_action(service: GenerationService, config: UIConfig):
    """The `/compare` endpoint's function: the methods side by side (an X/Y/Z plot with a method axis)."""

    @guarded("compare")
    def compare(model, prompt, negative_prompt, loras, methods, method_params_by_method, steps, guidance_scale,
                height, width, scheduler, seed, request: gr.Request = None, progress=gr.Progress()):
        """The same prompt and seed with each method; returns the gallery (captions: CLIPScore, seconds), a table
        (method, CLIPScore, seconds, file, error) and the status."""
        methods = list(methods or [])
        if not methods:
            raise fail(SpecError("choose at least one method to compare"))
        by_method = method_params_by_method or {}
        if not isinstance(by_method, dict):
            raise fail(SpecError("method_params_by_method must be a JSON object: {method: {parameter: value}}"))
        axis = parse_axis("method=" + ",".join(methods), "methods")
        base = service.make_spec(model, prompt, negative_prompt, loras, methods[0], by_method.get(methods[0], {}),
                                 steps, guidance_scale, height, width, scheduler, seed)
        plan = plan_grid(base, axis, params_by_method=by_method)
        owner = getattr(request, "session_hash", None)
        shown, rows, errors = [], [], []
        run = _cell_runner(service, config, owner, lambda ev: None)
        for cell in plan.cells:
            try:
                cell.path, cell.image, cell.seconds = run(cell.spec)
                score = service.clip_score(_Result(cell))
            except Exception as err:
                msg = report(err, f"compare ({cell.spec.method})")
                errors.append(f"{cell.spec.method}: {msg}")
                rows.append([cell.spec.method, None, None, "", msg])
                yield gr.skip(), rows, error_markdown("; ".join(errors))
                continue
            shown.append((str(cell.path), caption(cell.spec.method, score, cell.seconds)))
            rows.append([cell.spec.method, None if score is None else round(score, 2), round(cell.seconds, 3),
                         cell.path.name, ""])
            yield shown, rows, f"{len(shown)}/{len(plan.cells)} done"
        if not shown:
            raise fail(LoraloomError("every method failed: " + "; ".join(errors)))
        yield shown, rows, f"compared {len(shown)} method(s) with seed {base.seed}" + (
            " — **errors:** " + code_span("; ".join(errors)) if errors else "")

    return compare


@dataclass
class _Result:
    cell: object

    @property
    def image(self):
        return self.cell.image

    @property
    def spec(self):
        return self.cell.spec


def caption(method: str, score: float | None, seconds: float) -> str:
    """The text under one compared image."""
    if score is None:
        return f"{method} · CLIPScore n/a (no CLIP configured) · {seconds:.2f} s"
    return f"{method} · CLIPScore {score:.1f} · {seconds:.2f} s"


def wire_grid(tab: GridTab, form: ComposeForm, service: GenerationService, config: UIConfig):
    """Run X/Y/Z: gather the form, compose the axes, then `/grid` on the model queue; `/compare` on its hidden
    button. Returns the events Stop cancels."""
    methods = form.methods
    for k, v in zip(tab.kinds, tab.values):
        k.change(lambda kind: default_values(kind, config, methods) if kind != NONE else "", k, v, **INSTANT)

    gathered = submit(form, tab.button, service, tab.status)
    axes = gathered.success(lambda *kv: [axis_text(kv[2 * i], kv[2 * i + 1]) for i in range(3)],
                            [c for pair in zip(tab.kinds, tab.values) for c in pair], tab.axes, **INSTANT)
    grid_event = axes.success(
        grid_action(service, config),
        [form.model, form.prompt, form.negative, form.loras_json, form.method, form.params_all_json, form.steps,
         form.cfg, form.height, form.width, form.scheduler, form.seed, *tab.axes, tab.score, form.regions_json,
         form.base_weight],
        [tab.pages, tab.files, tab.table, tab.status], api_name="grid", show_progress_on=[tab.pages], **ON_MODEL_QUEUE)
    show_failures(grid_event, tab.status, "X/Y/Z plot")
    compare_event = tab.compare_button.click(
        compare_action(service, config),
        [form.model, form.prompt, form.negative, form.loras_json, tab.compare_methods, form.params_all_json,
         form.steps, form.cfg, form.height, form.width, form.scheduler, form.seed],
        [tab.compare_gallery, tab.compare_table, tab.compare_status], api_name="compare", **ON_MODEL_QUEUE)
    return [grid_event, compare_event]
