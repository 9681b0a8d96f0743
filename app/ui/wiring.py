"""What every tab's event wiring shares: the settings of private UI steps and of the one model queue, and how a
failed action is told to the user — the one place where exceptions become `gr.Error`.

Errors go out as plain text (an API caller reads them as they are; the page's toast shows them through Gradio's
HTML sanitizer, so a message that quotes user input cannot run script). Our own errors (`LoraloomError`: a bad
value, a refused path or upload, a LoRA that does not fit) say what is wrong and how to fix it, and are shown as
they are. Anything else is a bug or a library failing: it is logged here with its traceback and a short reference,
and the user sees one line naming the action, the exception type and that reference — never a traceback, a raw
repr or the path of a temporary upload.
"""

from __future__ import annotations

import functools
import inspect
import logging
import re
import secrets
import threading
from collections import OrderedDict
from pathlib import Path

import gradio as gr

from loraloom.composition.errors import LoraloomError

log = logging.getLogger(__name__)
MODEL_QUEUE = "model"  # one concurrency group: one generation (or model load) at a time
# Form-only steps: no API endpoint, and no wait behind a running generation. They go through the queue all the same
# (with no concurrency limit): a step outside the queue that fails is a bare HTTP 500 the page does not show.
PRIVATE = dict(api_visibility="private", queue=True, concurrency_limit=None)
# Steps that cannot fail and change nothing but the page (a panel shown, a value copied): no queue round trip.
INSTANT = dict(api_visibility="private", queue=False)
ON_MODEL_QUEUE = dict(concurrency_id=MODEL_QUEUE, concurrency_limit=1)
EXPECTED_ERRORS = (LoraloomError,)  # a user's mistake, worded for the user: shown as it is, not logged
MAX_MESSAGE = 2000  # characters of one error message (a message quoting a huge input is cut)


# Folders whose paths an error message shows by their short name (`register_roots`): the server's folders are
# nobody's business but the operator's, and the user knows them by these names.
_ROOTS: dict[str, str] = {}
_LAST_ERRORS: OrderedDict[str, str] = OrderedDict()  # session hash -> the last error message shown to it
_LAST_LOCK = threading.Lock()
MAX_REMEMBERED = 1000


def register_roots(roots: dict[str, str]) -> None:
    """Show paths inside these folders as `label/relative/path` in error messages ({folder: label})."""
    for folder, label in roots.items():
        for text in {str(Path(folder).expanduser()), str(Path(folder).expanduser().resolve())}:
            _ROOTS[text.rstrip("/")] = label


def _short_paths(text: str) -> str:
    for folder in sorted(_ROOTS, key=len, reverse=True):
        label = _ROOTS[folder]
        text = re.sub(re.escape(folder) + r"(?=/|\b|$)", label, text)
    return text


def upload_folder() -> Path:
    """Where Gradio keeps uploaded files (`GRADIO_TEMP_DIR`, else <tmp>/gradio)."""
    from gradio.utils import get_upload_folder

    return Path(get_upload_folder())


def _without_upload_paths(text: str) -> str:
    """`text` with every path inside Gradio's upload folder replaced by the file's own name."""
    folders = {str(upload_folder())}
    folders.add(str(upload_folder().resolve()))
    for folder in sorted(folders, key=len, reverse=True):
        text = re.sub(re.escape(folder.rstrip("/")) + r"/(?:[^/\s'\"]+/)*([^/\s'\"]+)", r"\1", text)
    return text


def one_line(text: str) -> str:
    """Whitespace runs (newlines included) as single spaces, at most MAX_MESSAGE characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 1] + "…"


def error_message(err: BaseException, action: str = "the action", ref: str | None = None) -> str:
    """What the user (page or API caller) reads for a failed action, as plain text on one line. `ref`: the log
    reference of an unexpected error (see `report`)."""
    if isinstance(err, gr.Error):
        return one_line(_short_paths(_without_upload_paths(str(err.message))))
    if isinstance(err, EXPECTED_ERRORS):
        return one_line(_short_paths(_without_upload_paths(str(err))))
    if "out of memory" in str(err).lower():
        return (f"{action} ran out of memory. Fix: smaller images, fewer LoRAs, fewer steps of a method that keeps "
                "per-step tensors, or composite's max_batch.")
    where = f" under reference {ref}" if ref else ""
    return (f"{action} failed with an unexpected {type(err).__name__} (a bug, or a setting this model or method does "
            f"not support); the server log has the details{where}. Fix: try other settings (scheduler, steps, "
            "method); if it keeps failing, report it with that log entry.")


def report(err: BaseException, action: str = "the action") -> str:
    """`error_message` of `err`, after logging an unexpected error with its traceback and a short reference that
    the message names (so the operator finds the traceback of what the user saw)."""
    if isinstance(err, (gr.Error, *EXPECTED_ERRORS)):
        return error_message(err, action)
    ref = secrets.token_hex(4)
    log.error("%s failed (reference %s)", action, ref, exc_info=err)
    return error_message(err, action, ref)


def fail(err: BaseException, action: str = "the action") -> gr.Error:
    """The gr.Error to raise for a failed action (plain text; unexpected errors logged; the GPU cache freed)."""
    message = report(err, action)
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # freeing cache is best effort
        pass
    return gr.Error(message, print_exception=False)


def remember(request, message: str) -> None:
    """Keep `message` as the last error of the session that made `request` (for its status line, `show_failures`)."""
    key = getattr(request, "session_hash", None)
    if not key:
        return
    with _LAST_LOCK:
        _LAST_ERRORS[key] = message
        _LAST_ERRORS.move_to_end(key)
        while len(_LAST_ERRORS) > MAX_REMEMBERED:
            _LAST_ERRORS.popitem(last=False)


def last_error(request) -> str | None:
    """The last error message of this request's session, once (it is forgotten when read)."""
    key = getattr(request, "session_hash", None)
    with _LAST_LOCK:
        return _LAST_ERRORS.pop(key, None) if key else None


def guarded(action: str):
    """Decorator for an endpoint's function (plain or generator): any exception that escapes it becomes `fail(err)`,
    so no raw exception reaches the user, whichever line raised it. The message is also kept for the session's
    status line (`show_failures`). Keeps the signature Gradio reads the API from, plus a `gr.Request` parameter
    that Gradio fills in (not part of the API)."""

    def wrap(fn):
        sig = inspect.signature(fn)
        params = list(sig.parameters.values())
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        rest = [p for p in params if p not in positional]
        variadic = any(p.kind == p.VAR_POSITIONAL for p in params)  # *values: the request goes first
        n = len(positional)

        def split(args, kwargs):
            kwargs = dict(kwargs)
            request = kwargs.pop("_request", None)
            if variadic:
                if args:
                    request, args = args[0], args[1:]
            elif len(args) > n:
                args, request = args[:n], args[n]
            return args, kwargs, request

        def failed(err, request):
            error = fail(err, action)
            remember(request, str(error.message))
            return error

        if inspect.isgeneratorfunction(fn):
            @functools.wraps(fn)
            def gen(*args, **kwargs):
                args, kwargs, request = split(args, kwargs)
                try:
                    yield from fn(*args, **kwargs)
                except Exception as err:
                    raise failed(err, request) from None

            wrapper = gen
        else:
            @functools.wraps(fn)
            def call(*args, **kwargs):
                args, kwargs, request = split(args, kwargs)
                try:
                    return fn(*args, **kwargs)
                except Exception as err:
                    raise failed(err, request) from None

            wrapper = call
        extra = inspect.Parameter("_request", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                                  annotation=gr.Request)
        if variadic:
            extra = extra.replace(default=inspect.Parameter.empty)
            wrapper.__signature__ = sig.replace(parameters=[extra, *[p.replace(default=inspect.Parameter.empty)
                                                                     if p.kind == p.POSITIONAL_OR_KEYWORD else p
                                                                     for p in positional], *rest])
        else:
            wrapper.__signature__ = sig.replace(parameters=[*positional, extra, *rest])
        wrapper.__annotations__ = {**getattr(fn, "__annotations__", {}), "_request": gr.Request}
        return wrapper

    return wrap


def show_failures(event, status, action: str = "the action"):
    """When `event` fails, its session's last error message goes to the `status` line (Markdown) as well as the
    toast, so it stays on the page. Returns the failure step."""

    def on_failure(request: gr.Request):
        message = last_error(request)
        return error_markdown(message or f"{action} failed; the notice at the top right says why.")

    return event.failure(on_failure, None, status, show_progress="hidden", **PRIVATE)


def error_markdown(message: str) -> str:
    """An error as the status line (Markdown) shows it: the message as an inline code span, so the page shows the
    user's text literally and an API caller reads it unescaped."""
    return "**Error:** " + code_span(message)


def code_span(text: str) -> str:
    """`text` as a Markdown inline code span (a fence longer than any run of backticks inside it)."""
    text = one_line(text)
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or not text.strip() else ""
    return f"{fence}{pad}{text}{pad}{fence}"
