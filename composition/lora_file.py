"""Reading LoRA files: the safetensors header alone (cheap) or the tensors; pickles only on explicit opt-in."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .errors import LoRAFileError

SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
LORA_SUFFIXES = SAFE_SUFFIXES + PICKLE_SUFFIXES


@dataclass(frozen=True)
class FileHeader:
    """What a LoRA file says about itself without reading a single weight."""

    path: Path
    metadata: dict[str, str]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    file_size: int


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a whole file (hex), read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _corrupted(path, err) -> LoRAFileError:
    return LoRAFileError(
        path,
        f"cannot be read as safetensors; it is truncated or corrupted ({err}).",
        "download or export the file again; nothing else was changed.",
    )


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise LoRAFileError(path, "no such file.", "check the path.")
    if path.is_dir():
        raise LoRAFileError(path, "is a folder, not a LoRA file.", "point at the .safetensors file inside it.")
    if not path.is_file():  # a FIFO would block the read forever; a device has no end
        raise LoRAFileError(path, "is not a regular file (a pipe, socket or device).", "point at a .safetensors file.")


def refuse_pickle(path: Path, allow_pickle: bool) -> None:
    """Pickled checkpoints can run code when loaded; we refuse them unless the caller opts in."""
    if path.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
        raise LoRAFileError(
            path,
            f"is a pickled checkpoint ({path.suffix}); loraloom only loads .safetensors by default because "
            "unpickling can execute code.",
            "convert it to .safetensors, or opt in explicitly (allow_pickle=True / --allow-pickle); it is then "
            "loaded with torch.load(weights_only=True).",
        )
    if path.suffix.lower() not in LORA_SUFFIXES:
        raise LoRAFileError(path, f"has an unknown extension {path.suffix!r}.", "use a .safetensors LoRA file.")


def read_header(path: str | os.PathLike, allow_pickle: bool = False) -> FileHeader:
    """Metadata, tensor names and shapes. For safetensors this reads only the JSON header."""
    path = Path(path)
    _check_exists(path)
    refuse_pickle(path, allow_pickle)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        state_dict, metadata = read_tensors(path, allow_pickle=True)
        return FileHeader(
            path,
            metadata,
            {k: tuple(v.shape) for k, v in state_dict.items()},
            {k: str(v.dtype).removeprefix("torch.") for k, v in state_dict.items()},
            path.stat().st_size,
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            shapes, dtypes = {}, {}
            for key in f.keys():
                sl = f.get_slice(key)
                shapes[key] = tuple(sl.get_shape())
                dtypes[key] = str(sl.get_dtype())
    except (SafetensorError, OSError, json.JSONDecodeError, ValueError) as err:
        raise _corrupted(path, err) from None
    return FileHeader(path, metadata, shapes, dtypes, path.stat().st_size)


def read_tensors(path: str | os.PathLike, allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors (on CPU) and the header metadata."""
    path = Path(path)
    _check_exists(path)
    refuse_pickle(path, allow_pickle)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many types for bad pickles
            raise LoRAFileError(
                path, f"cannot be loaded with torch.load(weights_only=True) ({err}).", "convert it to .safetensors."
            ) from None
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise LoRAFileError(path, "does not hold a flat dict of tensors.", "export the LoRA as .safetensors.")
        return dict(obj), {}
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, json.JSONDecodeError, ValueError) as err:
        raise _corrupted(path, err) from None
    return tensors, metadata
