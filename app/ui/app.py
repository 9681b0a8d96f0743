"""The Gradio workbench: Compose (left) with Generate / Compare / Reproduce (right), and the LoRA Library.

Every action that generates is an API endpoint (`/generate`, `/compare`, `/reproduce`, `/library`,
`/save_metadata`, `/add_lora`, `/load_model`) on one queue for the model (`concurrency_id="model"`, limit 1).
The form's LoRA slots and method controls are first gathered into plain JSON values by a private step, so the
public endpoints take stable arguments that do not change when a method is added.
"""

from __future__ import annotations

import html
import logging
import os
import random
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from loraloom.composition.errors import LoraloomError  # noqa: E402
from loraloom.composition.metadata import CATEGORIES  # noqa: E402
from loraloom.composition.methods import available_methods  # noqa: E402
from loraloom.pipelines.schedulers import scheduler_names  # noqa: E402

from .config import UIConfig  # noqa: E402
from .params import collect, control_values, make_control, method_fields  # noqa: E402
from .service import GenerationService, LibraryItem  # noqa: E402
from .streaming import StepEvent, stream_generation  # noqa: E402

log = logging.getLogger(__name__)
MODEL_QUEUE = "model"  # one concurrency group: one generation (or model load) at a time
MAX_GALLERY = 48
LIBRARY_HEADERS = ["name", "family", "rank", "category", "triggers", "suggested triggers", "preview", "file", "error"]
CSS = """
#status { min-height: 1.5em; }
/* small model outputs (the toy world's are 32 px) are shown enlarged with crisp pixels */
#gallery img, #compare-gallery img, #preview img { image-rendering: pixelated; }
#preview img { height: 200px; width: auto; max-width: 100%; object-fit: contain; }
#lib-previews img { image-rendering: pixelated; }
/* Compare: the whole caption (method, CLIPScore, seconds) under each image, not cut off */
#compare-gallery .caption-label { white-space: normal; max-width: 100%; left: var(--block-label-margin); }
"""


def error_message(err: BaseException) -> str:
    """What the page shows for a failed action: our own errors as they are, anything else with its type."""
    if isinstance(err, (LoraloomError, ValueError, PermissionError)):
        return str(err)
    if "out of memory" in str(err).lower():
        return f"out of memory: {err}. Fix: smaller images, fewer LoRAs, or composite's max_batch."
    return f"{type(err).__name__}: {err}"


def _fail(err: BaseException) -> gr.Error:
    if not isinstance(err, (LoraloomError, ValueError, PermissionError)):
        log.exception("UI action failed", exc_info=err)
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # freeing cache is best effort
        pass
    return gr.Error(html.escape(error_message(err), quote=False), print_exception=False)


def insert_triggers(prompt: str, triggers: list[str]) -> str:
    """`prompt` with its `{triggers}` placeholder filled, else with each trigger word it lacks appended."""
    prompt = (prompt or "").strip()
    if "{triggers}" in prompt:
        return prompt.replace("{triggers}", ", ".join(dict.fromkeys(t for t in triggers if t)))
    missing = [t for t in dict.fromkeys(triggers) if t and t.lower() not in prompt.lower()]
    if not missing:
        return prompt
    return ", ".join([prompt, *missing]) if prompt else ", ".join(missing)


def library_rows(items: list[LibraryItem]) -> list[list[Any]]:
    rows = []
    for i in items:
        info = i.info
        rows.append([
            i.name, (info.family or "?") if info else "", info.rank if info else "", (info.category or "") if info else "",
            ", ".join(info.triggers) if info else "", ", ".join(info.trigger_suggestions) if info else "",
            "yes" if i.preview else "", i.path.name, i.error or "",
        ])
    return rows


def preview_image(item: LibraryItem, side: int = 256):
    """The LoRA's preview image as a small RGB picture (read here, so its folder is never served as files)."""
    from PIL import Image

    if item.preview is None:
        return None
    try:
        with Image.open(item.preview) as im:
            im = im.convert("RGB")
            im.thumbnail((side, side))
            return im
    except OSError:
        return None


def build_app(config: UIConfig, service: GenerationService | None = None) -> gr.Blocks:
    """The Blocks app (not launched). Scans the library; sizes the image controls from the first model's configs
    (loading it only when it is not a diffusers folder, e.g. `tiny:sd1`)."""
    config.check()
    service = service or GenerationService(config)
    methods = available_methods()
    fields = [f for m in methods for f in method_fields(m)]
    default_model = service.model_choices()[0]
    side, multiple = service.geometry(default_model, load=False)
    max_side = max(4 * side, 256)
    items = service.library()
    names = [i.name for i in items if i.info is not None]
    preset = [(n, w) for n, w in config.loras if n in names][: config.max_loras]
    method0 = config.method if config.method in methods else methods[0]
    compare0 = [m for m in (config.compare_methods or methods) if m in methods] or methods[:3]

    with gr.Blocks(title="loraloom") as demo:
        gr.Markdown(f"## loraloom — compose LoRAs\nModel set: **{config.name}** · outputs in `{config.output_dir}`")
        with gr.Tabs():
            with gr.Tab("Workbench", id="workbench"):
                with gr.Row(equal_height=False):
                    # ---------------- Compose ----------------
                    with gr.Column(scale=5, elem_id="compose"):
                        model = gr.Dropdown(service.model_choices(), value=default_model, label="Base model",
                                            allow_custom_value=True, elem_id="model",
                                            info="a configured model, or a path inside the model folders")
                        slot_names, slot_weights = [], []
                        with gr.Group():
                            for k in range(config.max_loras):
                                name, weight = preset[k] if k < len(preset) else ("", 1.0)
                                with gr.Row():
                                    slot_names.append(gr.Dropdown(["", *names], value=name, label=f"LoRA {k + 1}",
                                                                  elem_id=f"lora-{k + 1}", scale=3))
                                    slot_weights.append(gr.Slider(-2.0, 2.0, value=weight, step=0.05, label="weight",
                                                                  elem_id=f"weight-{k + 1}", scale=2))
                        prompt = gr.Textbox(config.prompt, label="Prompt", lines=2, elem_id="prompt",
                                            info="{triggers} is replaced by the chosen LoRAs' trigger words")
                        triggers_btn = gr.Button("Insert trigger words", size="sm", elem_id="insert-triggers")
                        negative = gr.Textbox(config.negative_prompt, label="Negative prompt", lines=1, elem_id="negative")
                        method = gr.Dropdown(methods, value=method0, label="Method", elem_id="method")
                        groups, controls = [], []
                        for m in methods:
                            with gr.Column(visible=(m == method0), variant="panel", elem_id=f"params-{m}") as group:
                                gr.Markdown(f"**{m}** parameters")
                                for f in method_fields(m):
                                    controls.append(make_control(f, config.method_params.get(m, {}).get(f.name)))
                            groups.append(group)
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
                        # Plain JSON values the public endpoints take (filled from the form by a private step).
                        loras_json = gr.JSON(None, label="loras", visible=False)
                        params_json = gr.JSON(None, label="method_params", visible=False)
                        params_all_json = gr.JSON(None, label="method_params_by_method", visible=False)
                    # ---------------- Generate / Compare / Reproduce ----------------
                    with gr.Column(scale=6):
                        with gr.Tabs():
                            with gr.Tab("Generate", id="generate"):
                                with gr.Row():
                                    generate_btn = gr.Button("Generate", variant="primary", elem_id="generate-btn")
                                    stop_btn = gr.Button("Stop", variant="stop", elem_id="stop-btn")
                                status = gr.Markdown("", elem_id="status")
                                with gr.Row():
                                    preview = gr.Image(label="Preview (per step)", type="pil", format="png",
                                                       interactive=False, elem_id="preview", height=256)
                                    latest = gr.File(label="Download PNG (spec embedded)", interactive=False,
                                                     elem_id="download")
                                gallery = gr.Gallery(label="Results", format="png", columns=4, fit_columns=False,
                                                     height=360, preview=False, object_fit="contain",
                                                     elem_id="gallery", buttons=["download", "fullscreen"])
                                result_view = gr.JSON(label="Last result", elem_id="result")
                                with gr.Accordion("Spec of the last image (as embedded in the PNG)", open=False):
                                    spec_view = gr.Code(language="json", label="spec", elem_id="spec")
                                results = gr.State([])
                            with gr.Tab("Compare", id="compare"):
                                compare_methods = gr.CheckboxGroup(methods, value=compare0, label="Methods",
                                                                   elem_id="compare-methods")
                                compare_btn = gr.Button("Compare", variant="primary", elem_id="compare-btn")
                                compare_status = gr.Markdown("", elem_id="compare-status")
                                compare_gallery = gr.Gallery(label="Same prompt and seed", format="png",
                                                             columns=max(len(compare0), 1), fit_columns=False,
                                                             preview=False, height=360, object_fit="contain",
                                                             elem_id="compare-gallery")
                                compare_table = gr.Dataframe(headers=["method", "CLIPScore", "seconds", "file", "error"],
                                                             interactive=False, elem_id="compare-table")
                            with gr.Tab("Reproduce", id="reproduce"):
                                png = gr.File(label="Drop a PNG made by loraloom", file_types=[".png"], type="filepath",
                                              elem_id="png-drop")
                                restore_status = gr.Markdown("", elem_id="restore-status")
                                restored_spec = gr.Code(language="json", label="Spec in the PNG", elem_id="restored-spec")
            # ---------------- Library ----------------
            with gr.Tab("Library", id="library"):
                with gr.Row():
                    refresh_btn = gr.Button("Refresh", size="sm", elem_id="refresh")
                    lib_status = gr.Markdown("", elem_id="library-status")
                table = gr.Dataframe(library_rows(items), headers=LIBRARY_HEADERS, interactive=False,
                                     elem_id="library-table", wrap=True)
                with gr.Row():
                    with gr.Column(scale=2):
                        sel_name = gr.Textbox(label="LoRA", interactive=False, elem_id="sel-name")
                        sel_category = gr.Dropdown(["", *CATEGORIES], value="", label="Category", elem_id="sel-category")
                        sel_triggers = gr.Textbox(label="Trigger words (comma-separated)", elem_id="sel-triggers")
                        sel_suggestions = gr.Markdown("")
                        save_btn = gr.Button("Save to sidecar", elem_id="save-meta")
                    sel_preview = gr.Image(label="Preview", interactive=False, type="pil", scale=1, height=200)
                    lib_gallery = gr.Gallery(_preview_items(items), label="Previews", columns=6, fit_columns=False,
                                             format="png", scale=3, height=200, object_fit="contain",
                                             elem_id="lib-previews")
                lora_upload = gr.File(label="Add a LoRA (.safetensors, checked before it is copied into the library)",
                                      file_types=[".safetensors"], type="filepath", visible=config.allow_lora_upload,
                                      elem_id="lora-upload")

        # ====================== events ======================
        private = dict(api_visibility="private", queue=False)
        model_queue = dict(concurrency_id=MODEL_QUEUE, concurrency_limit=1)

        def show_params(m):
            return [gr.Column(visible=(x == m)) for x in methods]

        method.change(show_params, method, groups, **private)
        dice.click(lambda: random.randint(0, 2**31 - 1), None, seed, **private)

        def chosen_triggers(prompt_text, *slots):
            lib = {i.name: i for i in service.library()}
            words = [t for n in slots if n and n in lib for t in lib[n].triggers]
            return insert_triggers(prompt_text, words)

        triggers_btn.click(chosen_triggers, [prompt, *slot_names], prompt, **private)

        def gather(*values):
            k = config.max_loras
            names_, weights_, m, raws = values[:k], values[k:2 * k], values[2 * k], values[2 * k + 1:]
            try:
                by_method = collect(fields, list(raws))
            except ValueError as err:
                raise _fail(err) from None
            loras = [[n, float(w)] for n, w in zip(names_, weights_) if n]
            return loras, by_method.get(m, {}), by_method

        gather_inputs = [*slot_names, *slot_weights, method, *controls]
        gather_outputs = [loras_json, params_json, params_all_json]

        def generate(model, prompt, negative_prompt, loras, method, method_params, steps, guidance_scale, height, width,
                     scheduler, seed, progress=gr.Progress()):
            """Generate one image; yields per-step previews. Returns (preview, PNG file, result, spec JSON, status)."""
            try:
                spec = service.make_spec(model, prompt, negative_prompt, loras, method, method_params, steps,
                                         guidance_scale, height, width, scheduler, seed)
            except Exception as err:
                raise _fail(err) from None
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
                yield skip, skip, skip, skip, f"**Error:** {html.escape(error_message(err), quote=False)}"
                raise _fail(err) from None
            # The spec goes out as the JSON text the PNG carries (a dict with "path" keys would look like a file to clients).
            info = {"file": str(result.path), "seconds": round(result.seconds, 4), "method": result.spec.method,
                    "seed": result.spec.seed, "width": result.image.width, "height": result.image.height}
            done = f"done in {result.seconds:.2f} s → `{result.path.name}`"
            yield result.image, str(result.path), info, result.spec.to_json(), done

        def add_to_gallery(result_, results_):
            png_file = (result_ or {}).get("file")
            paths = [png_file, *[p for p in (results_ or []) if p != png_file]][:MAX_GALLERY] if png_file else results_
            return paths, paths

        generate_event = generate_btn.click(gather, gather_inputs, gather_outputs, **private).success(
            generate, [model, prompt, negative, loras_json, method, params_json, steps, cfg, height, width, scheduler,
                       seed],
            [preview, latest, result_view, spec_view, status], api_name="generate", show_progress_on=[latest],
            **model_queue)
        generate_event.success(add_to_gallery, [result_view, results], [gallery, results], **private)

        def compare(model, prompt, negative_prompt, loras, methods, method_params_by_method, steps, guidance_scale,
                    height, width, scheduler, seed, progress=gr.Progress()):
            """The same prompt and seed with each method; yields the gallery (captions: CLIPScore, seconds) and a table."""
            methods = list(methods or [])
            if not methods:
                raise _fail(ValueError("choose at least one method to compare"))
            try:
                specs = [service.make_spec(model, prompt, negative_prompt, loras, m, (method_params_by_method or {}).get(m, {}),
                                           steps, guidance_scale, height, width, scheduler, seed) for m in methods]
            except Exception as err:
                raise _fail(err) from None
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
                    msg = error_message(err)
                    errors.append(f"{spec.method}: {msg}")
                    rows.append([spec.method, None, None, "", msg])
                    yield gr.skip(), rows, "**Error:** " + html.escape("; ".join(errors), quote=False)
                    continue
                caption = f"{spec.method} · CLIPScore {score:.1f} · {result.seconds:.2f} s" if score is not None \
                    else f"{spec.method} · CLIPScore n/a (no CLIP configured) · {result.seconds:.2f} s"
                shown.append((str(result.path), caption))
                rows.append([spec.method, None if score is None else round(score, 2), round(result.seconds, 3),
                             result.path.name, ""])
                yield shown, rows, f"{len(shown)}/{len(specs)} done"
            if not shown:
                raise _fail(LoraloomError("every method failed: " + "; ".join(errors)))
            yield shown, rows, f"compared {len(shown)} method(s) with seed {specs[0].seed}" + (
                " — **errors:** " + html.escape("; ".join(errors), quote=False) if errors else "")

        compare_event = compare_btn.click(gather, gather_inputs, gather_outputs, **private).success(
            compare, [model, prompt, negative, loras_json, compare_methods, params_all_json, steps, cfg, height, width,
                      scheduler, seed],
            [compare_gallery, compare_table, compare_status], api_name="compare", show_progress_on=[compare_gallery],
            **model_queue)

        compare_methods.change(lambda ms: gr.Gallery(columns=max(len(ms or []), 1)), compare_methods, compare_gallery,
                               **private)
        stop_btn.click(service.interrupt, None, None, cancels=[generate_event, compare_event], **private)

        restore_outputs = [model, prompt, negative, *slot_names, *slot_weights, method, *controls, steps, cfg, height,
                           width, scheduler, seed, restore_status, restored_spec]

        def reproduce(file):
            """Read the settings a loraloom PNG carries into the form (the spec is the last output)."""
            if not file:
                return [gr.skip()] * len(restore_outputs)
            try:
                r = service.restore(file, Path(file).name)
            except Exception as err:
                raise _fail(err) from None
            s = r.spec
            warnings = list(r.warnings)
            if s.method not in methods:
                warnings.append(f"method {s.method!r} is not available here; method left as it was.")
            lnames = [n for n, _ in r.loras] + [""] * (config.max_loras - len(r.loras))
            lweights = [w for _, w in r.loras] + [1.0] * (config.max_loras - len(r.loras))
            values = control_values(fields, {s.method: s.method_params})
            note = f"restored the settings of `{Path(file).name}` (method {s.method}, seed {s.seed})"
            if warnings:
                note += "\n\n**Not restored:** " + " ".join(warnings)
            return [r.model or gr.skip(), s.prompt, s.negative_prompt, *lnames[: config.max_loras],
                    *lweights[: config.max_loras], s.method if s.method in methods else gr.skip(), *values,
                    s.steps, s.guidance_scale, s.height or gr.skip(), s.width or gr.skip(), s.scheduler, s.seed, note,
                    s.to_json()]

        png.upload(reproduce, png, restore_outputs, api_name="reproduce")

        def load_model(model, height, width):
            """Load a base model (waits for a running generation); returns the size controls fitted to it."""
            try:
                side_, mult = service.geometry(model)
            except Exception as err:
                raise _fail(err) from None
            top = max(4 * side_, 256)

            def fit(v):
                v = int(v or 0)
                return v if v >= mult and v % mult == 0 and v <= top else side_

            return (gr.Slider(minimum=mult, maximum=top, step=mult, value=fit(height)),
                    gr.Slider(minimum=mult, maximum=top, step=mult, value=fit(width)), f"model ready: `{model}`")

        model.change(load_model, [model, height, width], [height, width, status], api_name="load_model", **model_queue)

        # ---------------- Library events ----------------
        def library_outputs(items_, note=""):
            names_ = ["", *[i.name for i in items_ if i.info is not None]]
            return [library_rows(items_), _preview_items(items_), note, *[gr.Dropdown(choices=names_) for _ in slot_names]]

        lib_outputs = [table, lib_gallery, lib_status, *slot_names]

        def refresh():
            """Rescan the LoRA folders; returns the library table."""
            items_ = service.library(refresh=True)
            return library_outputs(items_, f"{len(items_)} file(s) in {', '.join(str(d) for d in config.lora_dirs)}")

        refresh_btn.click(refresh, None, lib_outputs, api_name="library")

        def select(evt: gr.SelectData):
            row = evt.row_value or []
            item = next((i for i in service.library() if row and i.name == row[0]), None)
            if item is None or item.info is None:
                return "", "", "", (item.error if item else ""), None
            sugg = ", ".join(item.info.trigger_suggestions)
            return (item.name, item.info.category or "", ", ".join(item.info.triggers),
                    f"suggested by the file: {sugg}" if sugg else "", preview_image(item))

        table.select(select, None, [sel_name, sel_category, sel_triggers, sel_suggestions, sel_preview], **private)

        def save_metadata(name, category, triggers):
            """Save a LoRA's category and trigger words to its sidecar file; returns the library table."""
            try:
                triggers_list = [t.strip() for t in (triggers or "").split(",") if t.strip()]
                target = service.save_lora_metadata(name, category or None, triggers_list)
            except Exception as err:
                raise _fail(err) from None
            return library_outputs(service.library(), f"saved `{target.name}`")

        save_btn.click(save_metadata, [sel_name, sel_category, sel_triggers], lib_outputs, api_name="save_metadata")

        def add_lora(file):
            """Check an uploaded .safetensors LoRA and copy it into the first LoRA folder."""
            if not file:
                return [gr.skip()] * len(lib_outputs)
            if not config.allow_lora_upload:
                raise _fail(PermissionError("LoRA uploads are switched off (--no-lora-upload)"))
            try:
                item = service.add_lora_file(file, Path(file).name)
            except Exception as err:
                raise _fail(err) from None
            return library_outputs(service.library(), f"added `{item.name}` ({item.info.family}, rank {item.info.rank})")

        lora_upload.upload(add_lora, lora_upload, lib_outputs, api_name="add_lora", **model_queue)

    demo.service = service  # for callers that want the engine behind the page (tests, `loraloom ui`)
    return demo


def _preview_items(items: list[LibraryItem]) -> list:
    return [(img, i.name) for i in items if (img := preview_image(i)) is not None]


def launch(demo: gr.Blocks, config: UIConfig, host: str = "127.0.0.1", port: int | None = None,
           auth: tuple[str, str] | None = None, share: bool = False, prevent_thread_lock: bool = False, quiet: bool = False):
    """Queue (one model, `config.max_queue` waiting) and serve. Only the output folder is served as files."""
    demo.queue(max_size=config.max_queue, default_concurrency_limit=1)
    max_bytes = int(max(config.max_png_mb, config.max_lora_mb if config.allow_lora_upload else 0) * 1e6)
    return demo.launch(
        server_name=host, server_port=port, auth=auth, share=share, prevent_thread_lock=prevent_thread_lock,
        allowed_paths=[str(config.output_dir)], max_file_size=max_bytes, ssr_mode=False, quiet=quiet,
        show_error=True, theme=gr.themes.Soft(), css=CSS, footer_links=["api", "settings"],
    )


__all__ = ["build_app", "error_message", "insert_triggers", "launch", "library_rows"]
