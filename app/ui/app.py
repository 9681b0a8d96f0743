"""The Gradio workbench: Compose (left) with Generate / Compare / Reproduce (right), and the LoRA Library.

`build_app` assembles the tabs, each laid out and wired in its own module (tab_*.py). Every action is an API
endpoint (`/generate`, `/compare`, `/reproduce`, `/library`, `/save_metadata`, `/add_lora`, `/load_model`); those
that use the model share one queue (`concurrency_id="model"`, limit 1). `launch` serves the app.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
from starlette.middleware import Middleware  # noqa: E402

from loraloom.composition.methods import available_methods  # noqa: E402

from .config import UIConfig  # noqa: E402
from .http_limits import UploadLimits  # noqa: E402
from .service import GenerationService  # noqa: E402
from .tab_compare import compare_tab, wire_compare  # noqa: E402
from .tab_compose import compose_panel, insert_triggers, wire_compose, wire_model_loading  # noqa: E402
from .tab_generate import generate_tab, wire_generate, wire_stop  # noqa: E402
from .tab_library import library_rows, library_tab, wire_library  # noqa: E402
from .tab_reproduce import reproduce_tab, wire_reproduce  # noqa: E402
from .wiring import error_message  # noqa: E402

CSS = """
#status { min-height: 1.5em; }
/* small model outputs (the toy world's are 32 px) are shown enlarged with crisp pixels */
#gallery img, #compare-gallery img, #preview img { image-rendering: pixelated; }
#preview img { height: 200px; width: auto; max-width: 100%; object-fit: contain; }
#lib-previews img { image-rendering: pixelated; }
/* Compare: the whole caption (method, CLIPScore, seconds) under each image, not cut off */
#compare-gallery .caption-label { white-space: normal; max-width: 100%; left: var(--block-label-margin); }
"""


def build_app(config: UIConfig, service: GenerationService | None = None) -> gr.Blocks:
    """The Blocks app (not launched). Scans the library; sizes the image controls from the first model's configs
    (loading it only when it is not a diffusers folder, e.g. `tiny:sd1`)."""
    config.check()
    service = service or GenerationService(config)
    methods = available_methods()
    items = service.library()
    minutes = config.cache_minutes
    # Gradio's copies of previews, gallery images and uploads: swept every so often once `cache_minutes` old (all of
    # them when the server closes).
    delete_cache = (int(min(3600, max(60, minutes * 60 / 4))), int(minutes * 60)) if minutes and minutes > 0 else None
    with gr.Blocks(title="loraloom", delete_cache=delete_cache) as demo:
        gr.Markdown(f"## loraloom — compose LoRAs\nModel set: **{config.name}** · outputs in `{config.output_dir}`")
        with gr.Tabs():
            with gr.Tab("Workbench", id="workbench"):
                with gr.Row(equal_height=False):
                    form = compose_panel(config, service, methods, items)
                    with gr.Column(scale=6):
                        with gr.Tabs():
                            generate = generate_tab()
                            compare = compare_tab(config, methods)
                            reproduce = reproduce_tab()
            library = library_tab(config, items)
        # Wired in this order so that every event keeps its index (fn_index) in the page's config.
        wire_compose(form, service)
        generate_event = wire_generate(generate, form, service, config)
        compare_event = wire_compare(compare, form, service, config)
        wire_stop(generate.stop, service, [generate_event, compare_event])
        wire_reproduce(reproduce, form, service)
        wire_model_loading(form, generate.status, service)
        wire_library(library, form.slot_names, service, config)
    demo.service = service  # for callers that want the engine behind the page (tests, `loraloom ui`)
    return demo


def upload_limits(config: UIConfig) -> Middleware:
    """The per-type upload limits (`http_limits.UploadLimits`): PNGs `max_png_mb`, LoRAs `max_lora_mb` (the PNG
    limit when LoRA uploads are off), anything else the PNG limit."""
    png = int(config.max_png_mb * 1e6)
    lora = int(config.max_lora_mb * 1e6) if config.allow_lora_upload else png
    return Middleware(UploadLimits, limits={".png": png, ".safetensors": lora}, default=min(png, lora))


def launch(demo: gr.Blocks, config: UIConfig, host: str = "127.0.0.1", port: int | None = None,
           auth: tuple[str, str] | None = None, share: bool = False, prevent_thread_lock: bool = False, quiet: bool = False):
    """Queue (one model, `config.max_queue` waiting) and serve. Only the output folder is served as files; uploads
    are limited per type at the HTTP layer; the page state of at most `config.max_sessions` sessions is kept."""
    demo.queue(max_size=config.max_queue, default_concurrency_limit=1)
    limits = upload_limits(config)
    max_bytes = max(limits.kwargs["limits"].values())  # Gradio's own limit, for its other routes that take files
    return demo.launch(
        server_name=host, server_port=port, auth=auth, share=share, prevent_thread_lock=prevent_thread_lock,
        allowed_paths=[str(config.output_dir)], max_file_size=max_bytes, ssr_mode=False, quiet=quiet,
        show_error=True, theme=gr.themes.Soft(), css=CSS, footer_links=["api", "settings"],
        state_session_capacity=max(1, config.max_sessions), app_kwargs={"middleware": [limits]},
    )


__all__ = ["build_app", "error_message", "insert_triggers", "launch", "library_rows"]
