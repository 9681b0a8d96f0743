"""The loraloom web UI (Gradio): `build_app(config)` makes the Blocks app, `launch(...)` serves it safely
(127.0.0.1, optional auth, no share link unless asked, one generation at a time). See docs/ui.md."""

from .config import UIConfig, default_config, from_spec
from .paths import PathRefused, is_inside, resolve_inside
from .service import Cancelled, GenerationResult, GenerationService, LibraryItem, Restored, parse_loras
from .uploads import UploadRefused, check_lora_upload, check_png_upload

__all__ = [
    "Cancelled",
    "GenerationResult",
    "GenerationService",
    "LibraryItem",
    "PathRefused",
    "Restored",
    "UIConfig",
    "UploadRefused",
    "build_app",
    "check_lora_upload",
    "check_png_upload",
    "default_config",
    "from_spec",
    "is_inside",
    "launch",
    "parse_loras",
    "resolve_inside",
]


def __getattr__(name):  # gradio is imported only when the app itself is asked for
    if name in ("build_app", "launch"):
        from . import app

        return getattr(app, name)
    raise AttributeError(name)
