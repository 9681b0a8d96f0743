"""The Gradio workbench: Compose (left) with Generate / Compare X-Y-Z / LoRAs / History / Import / Score (right),
and the LoRA Library.

`build_app` assembles the tabs, each laid out and wired in its own module (tab_*.py). Every action is an API
endpoint (`/generate`, `/grid`, `/compare`, `/reproduce`, `/history`, `/history_settings`, `/score`,
`/make_preview`, `/set_preview`, `/library`, `/save_metadata`, `/add_lora`, `/load_model`); those that use the
model share one queue (`concurrency_id="model"`, limit 1). `launch` serves the app.
"""

from __future__ import annotations

import html
import os
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
from starlette.middleware import Middleware  # noqa: E402

from loraloom.composition.methods import available_methods  # noqa: E402

from .config import UIConfig  # noqa: E402
from .http_limits import UploadLimits  # noqa: E402
from .service import GenerationService  # noqa: E402
from .tab_browser import browser_tab, cards, wire_browser  # noqa: E402
from .tab_compose import METHOD_DOCS, compose_panel, insert_triggers, wire_compose, wire_model_loading  # noqa: E402
from .tab_generate import generate_tab, wire_generate, wire_stop  # noqa: E402
from .tab_grid import grid_tab, wire_grid  # noqa: E402
from .tab_history import history_tab, wire_history  # noqa: E402
from .tab_library import library_rows, library_tab, wire_library  # noqa: E402
from .tab_reproduce import reproduce_tab, wire_reproduce  # noqa: E402
from .tab_score import score_tab, wire_score  # noqa: E402
from .wiring import PRIVATE, error_message, register_roots  # noqa: E402

CSS = """
#status, #grid-status, #restore-status, #history-status, #browser-status, #score-status, #form-status { min-height: 1.5em; }
/* small model outputs (the toy world's are 32 px) are shown enlarged with crisp pixels */
#gallery img, #preview img, #history-gallery img, #lora-cards img, #mask-preview img { image-rendering: pixelated; }
#preview img { height: 200px; width: auto; max-width: 100%; object-fit: contain; }
#lib-previews img { image-rendering: pixelated; }
/* captions under the thumbnails, whole, never over the image */
#lora-cards .caption-label, #history-gallery .caption-label, #gallery .caption-label {
  position: static; white-space: normal; max-width: 100%; overflow: visible; text-overflow: clip;
  background: none; color: var(--body-text-color); font-size: var(--text-sm); padding: 2px 4px; text-align: left; }
#lora-cards .thumbnail-item, #history-gallery .thumbnail-item { flex-direction: column; height: auto; }
/* the X/Y/Z plot as large as the column allows (one page per row, its own aspect ratio, text stays smooth) */
#grid-image .grid-wrap, #grid-image .gallery-container { max-height: none; height: auto; min-height: 0; }
#grid-image .grid-container { padding-top: 0; }
#grid-image .thumbnail-item { aspect-ratio: auto; height: auto; width: 100%; }
#grid-image .thumbnail-item img { width: 100%; height: auto; max-height: none; object-fit: contain; }
.remove-lora { max-width: 40px; }
#token-count p { font-size: var(--text-sm); margin: 0; }
/* phones: the actions and the result first, the form after them */
@media (max-width: 820px) {
  #workbench { flex-direction: column; }
  #results { order: -1; }
  /* nothing wider than the screen: columns and tabs may shrink (the tab bar folds into its "..." menu), rows
     wrap, Generate and Stop share the width */
  #results, #compose, #results .tabs, #results .tabitem, #results .column { min-width: 0 !important; max-width: 100%; }
  #results .row, #compose .row { flex-wrap: wrap; }
  #generate-bar { flex-wrap: nowrap !important; }
  #generate-bar > * { min-width: 0 !important; }
}
"""

# Ctrl+Enter (Cmd+Enter) anywhere on the page generates.
HEAD = """<script>
document.addEventListener("keydown", function (e) {
  if ((e.ctrlKey || e.metaKey) && e.key === "Enter") {
    var b = document.querySelector("#generate-btn");
    if (b) { e.preventDefault(); b.click(); }
  }
});
</script>"""


def build_app(config: UIConfig, service: GenerationService | None = None) -> gr.Blocks:
    """The Blocks app (not launched). Scans the library; sizes the image controls from the first model's configs
    (loading it only when it is not a diffusers folder, e.g. `tiny:sd1`)."""
    config.check()
    service = service or GenerationService(config)
    # error messages name the server's folders by their own names (`loras/x.safetensors`), never by their paths
    register_roots({str(d): Path(d).name for d in [*config.lora_dirs, config.output_dir]})
    register_roots({str(Path.home()): "~"})
    methods = available_methods()
    items = service.library()
    names = [i.name for i in items if i.info is not None]
    minutes = config.cache_minutes
    # Gradio's copies of previews, gallery images and uploads: swept every so often once `cache_minutes` old (all of
    # them when the server closes).
    delete_cache = (int(min(3600, max(60, minutes * 60 / 4))), int(minutes * 60)) if minutes and minutes > 0 else None
    with gr.Blocks(title="loraloom", delete_cache=delete_cache) as demo:
        gr.Markdown(f"## loraloom — compose LoRAs\nModel set: **{html.escape(config.name)}** · outputs in "
                    f"`{config.output_dir}` · Ctrl+Enter generates")
        with gr.Tabs():
            with gr.Tab("Workbench", id="workbench-tab"):
                with gr.Row(equal_height=False, elem_id="workbench"):
                    form = compose_panel(config, service, methods, items)
                    with gr.Column(scale=6, elem_id="results"):
                        with gr.Tabs():
                            generate = generate_tab()
                            grid = grid_tab(config, methods, names)
                            browser = browser_tab(items)
                            history = history_tab()
                            reproduce = reproduce_tab()
                            score = score_tab(config.judge is not None)
            library = library_tab(config, items)
        wire_compose(form, service)
        generate_event = wire_generate(generate, form, service, config)
        grid_events = wire_grid(grid, form, service, config)
        wire_stop(generate.stop, generate.status, service, [generate_event, *grid_events])
        wire_reproduce(reproduce, form, service)
        wire_model_loading(form, generate.status, service)
        wire_browser(browser, form, service, form.last_image)
        # after a generation the History tab is not in view: it reads the folder when opened
        wire_history(history, form, grid, service, [])
        wire_score(score, service, form.last_image, generate.results)
        wire_library(library, form.slot_names, service, config)

        def on_load(model, prompt, *slots):
            text, _ = service.token_report(model, prompt, [[n, 1.0] for n in slots if n])
            return text

        demo.load(on_load, [form.model, form.prompt, *form.slot_names], form.tokens, show_progress="hidden", **PRIVATE)
        # the LoRA cards as the library is now (previews made since the server started), not as it was at build time
        demo.load(lambda: cards(service.library()), None, [browser.gallery, browser.names], show_progress="hidden",
                  **PRIVATE)
        demo.load(lambda: history_refresh(service), None, [history.gallery, history.table, history.status, history.names],
                  show_progress="hidden", **PRIVATE)
    demo.service = service  # for callers that want the engine behind the page (tests, `loraloom ui`)
    return demo


def history_refresh(service: GenerationService):
    from .history import MAX_ITEMS

    items = service.history.items(MAX_ITEMS)
    return ([(str(i.path), i.caption) for i in items], [i.row() for i in items],
            f"{len(items)} item(s) in the output folder · click one to load its settings", [i.path.name for i in items])


def upload_limits(config: UIConfig) -> Middleware:
    """The per-type upload limits (`http_limits.UploadLimits`): PNGs `max_png_mb`, LoRAs `max_lora_mb` (the PNG
    limit when LoRA uploads are off), anything else the PNG limit."""
    png = int(config.max_png_mb * 1e6)
    lora = int(config.max_lora_mb * 1e6) if config.allow_lora_upload else png
    return Middleware(UploadLimits, limits={".png": png, ".safetensors": lora}, default=min(png, lora))


def docs_page(page: str):
    """A docs/methods page as HTML (the method panel links here), or 404."""
    from starlette.responses import HTMLResponse

    path = METHOD_DOCS / page
    if "/" in page or not page.endswith(".md") or not path.is_file():
        return HTMLResponse("no such page", status_code=404)
    text = path.read_text(encoding="utf-8")
    try:
        from markdown_it import MarkdownIt

        body = MarkdownIt("commonmark", {"html": False}).enable("table").render(text)
    except ImportError:  # shown as text
        body = f"<pre>{html.escape(text)}</pre>"
    return HTMLResponse(f"<!doctype html><meta charset=utf-8><title>{html.escape(page)}</title>"
                        "<style>body{max-width:60em;margin:2em auto;font-family:sans-serif;line-height:1.5;padding:0 1em}"
                        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}"
                        f"pre,code{{background:#f4f4f4}}</style>{body}")


def launch(demo: gr.Blocks, config: UIConfig, host: str = "127.0.0.1", port: int | None = None,
           auth: tuple[str, str] | None = None, share: bool = False, prevent_thread_lock: bool = False, quiet: bool = False):
    """Queue (one model, `config.max_queue` waiting) and serve. Only the output folder is served as files; uploads
    are limited per type at the HTTP layer; the page state of at most `config.max_sessions` sessions is kept."""
    demo.queue(max_size=config.max_queue, default_concurrency_limit=1)
    limits = upload_limits(config)
    max_bytes = max(limits.kwargs["limits"].values())  # Gradio's own limit, for its other routes that take files
    result = demo.launch(
        server_name=host, server_port=port, auth=auth, share=share, prevent_thread_lock=True,
        allowed_paths=[str(config.output_dir)], max_file_size=max_bytes, ssr_mode=False, quiet=quiet,
        show_error=True, theme=gr.themes.Soft(), css=CSS, head=HEAD, footer_links=["api", "settings"],
        state_session_capacity=max(1, config.max_sessions), app_kwargs={"middleware": [limits]},
    )
    from starlette.routing import Route

    demo.app.router.routes.insert(0, Route("/loraloom/docs/methods/{page}", lambda request: docs_page(
        request.path_params["page"]), methods=["GET"]))
    if not prevent_thread_lock:
        demo.block_thread()
    return result


__all__ = ["build_app", "error_message", "insert_triggers", "launch", "library_rows"]
