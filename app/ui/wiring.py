"""What every tab's event wiring shares: the settings of private UI steps and of the one model queue, and the
message a failed action shows."""

from __future__ import annotations

import html
import logging

import gradio as gr

from loraloom.composition.errors import LoraloomError

log = logging.getLogger(__name__)
MODEL_QUEUE = "model"  # one concurrency group: one generation (or model load) at a time
# Form-only steps: no API endpoint, and no wait behind a running generation.
PRIVATE = dict(api_visibility="private", queue=False)
ON_MODEL_QUEUE = dict(concurrency_id=MODEL_QUEUE, concurrency_limit=1)
EXPECTED_ERRORS = (LoraloomError, ValueError, PermissionError)  # a user's mistake, shown as it is, not logged


def error_message(err: BaseException) -> str:
    """What the page shows for a failed action: our own errors as they are, anything else with its type."""
    if isinstance(err, EXPECTED_ERRORS):
        return str(err)
    if "out of memory" in str(err).lower():
        return f"out of memory: {err}. Fix: smaller images, fewer LoRAs, or composite's max_batch."
    return f"{type(err).__name__}: {err}"


def fail(err: BaseException) -> gr.Error:
    """The gr.Error to raise for a failed action (unexpected ones are logged; the GPU cache is freed)."""
    if not isinstance(err, EXPECTED_ERRORS):
        log.exception("UI action failed", exc_info=err)
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # freeing cache is best effort
        pass
    return gr.Error(html.escape(error_message(err), quote=False), print_exception=False)


def error_markdown(message: str) -> str:
    """An error as the status line shows it (escaped: messages quote user input)."""
    return "**Error:** " + html.escape(message, quote=False)
