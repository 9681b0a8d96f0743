"""Checks on uploaded files before anything reads them: type (extension and magic bytes), size, and for images
the pixel count (a PNG can decompress to gigabytes)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from loraloom.composition.errors import LoraloomError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MAX_PNG_PIXELS = 8192 * 8192
SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def human_size(n: float) -> str:
    """Bytes as people read them: '1.5 GB', '20.0 MB', '20 kB', '64 bytes'."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 1e3:.0f} kB" if n >= 1e3 else f"{int(n)} bytes"


class UploadRefused(LoraloomError, ValueError):
    """An uploaded file that is not what it claims, or too large."""


def _first_checks(path, max_bytes: int, name: str | None, suffix: str, what: str) -> tuple[Path, str]:
    """Extension and size (before any byte is parsed); returns the path and how messages name the file."""
    path = Path(path)
    label = f"the uploaded file {name or path.name!r}"
    if path.suffix.lower() != suffix:
        raise UploadRefused(f"{label} is not a {suffix} file; {what}")
    size = path.stat().st_size
    if size > max_bytes:
        raise UploadRefused(f"{label} is {human_size(size)}; the limit is {human_size(max_bytes)}.")
    if size == 0:
        raise UploadRefused(f"{label} is empty.")
    return path, label


def check_png_upload(path: str | os.PathLike, max_bytes: int, name: str | None = None) -> Path:
    """A PNG no larger than `max_bytes` with a sane pixel count; returns its path or raises `UploadRefused`."""
    from PIL import Image

    path, label = _first_checks(path, max_bytes, name, ".png", "drop a PNG made by loraloom.")
    with open(path, "rb") as f:
        if f.read(len(PNG_MAGIC)) != PNG_MAGIC:
            raise UploadRefused(f"{label} has a .png name but is not a PNG image.")
    try:
        with Image.open(path) as im:  # reads the header only
            w, h = im.size
    except (OSError, SyntaxError, Image.DecompressionBombError) as err:
        raise UploadRefused(f"{label} cannot be read as a PNG ({err}).") from None
    if w * h > MAX_PNG_PIXELS:
        raise UploadRefused(f"{label} is {w}x{h} pixels, more than the {MAX_PNG_PIXELS} pixels the UI reads.")
    return path


def check_lora_upload(path: str | os.PathLike, max_bytes: int, name: str | None = None) -> Path:
    """A .safetensors file no larger than `max_bytes` that loads as a LoRA (every tensor read: NaN/Inf refused here,
    not at the first generation that uses it); raises `UploadRefused`."""
    from loraloom.composition.errors import LoRAFileError
    from loraloom.composition.lora import load_lora

    path, label = _first_checks(path, max_bytes, name, ".safetensors",
                                "only safetensors LoRAs are accepted (pickles can run code).")
    try:
        load_lora(path)
    except LoRAFileError as err:
        raise UploadRefused(f"{label} is not a usable LoRA: {err.problem}" + (f" Fix: {err.fix}" if err.fix else "")) from None
    return path


def safe_file_name(name: str, suffix: str) -> str:
    """A plain file name (letters, digits, . _ -) with `suffix`, from whatever name the browser sent."""
    stem = SAFE_NAME.sub("_", Path(name).stem).strip("._") or "upload"
    return stem[:100] + suffix


def upload_path(value) -> tuple[str, str] | None:
    """(path on the server, the name the client gave) of an upload as an event receives it without Gradio's
    preprocessing (a FileData dict), or as a plain path; None when nothing was uploaded."""
    if not value:
        return None
    if isinstance(value, dict):
        path = value.get("path")
        if not path:
            return None
        return str(path), str(value.get("orig_name") or Path(path).name)
    return str(value), Path(str(value)).name


def discard_upload(path: str | os.PathLike | None, folder: str | os.PathLike) -> bool:
    """Delete an uploaded file once it has been handled (used or refused) — only when it lies inside the server's
    upload `folder` (never a file elsewhere) — and the per-upload folder Gradio made for it when that is now empty.
    Returns whether a file was deleted."""
    if not path:
        return False
    root = Path(folder).resolve()
    p = Path(path)
    try:
        real_parent = p.parent.resolve()
    except OSError:
        return False
    if not real_parent.is_relative_to(root) or p.is_dir():
        return False
    try:
        (real_parent / p.name).unlink(missing_ok=True)
    except OSError:
        return False
    if real_parent != root:
        try:
            real_parent.rmdir()  # only when empty
        except OSError:
            pass
    return True
