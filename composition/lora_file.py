"""Reading LoRA files: the safetensors header alone (cheap) or the tensors; pickles only on explicit opt-in."""

from __future__ import annotations

import hashlib
import json
import os
import time
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


@dataclass(frozen=True)
class FileDigest:
    """The hashes of one read of a file: the sha256 of all of it and, for a .safetensors file, the sha256 of its
    tensor data alone (the bytes after the 8-byte header length and the JSON header it announces)."""

    sha256: str
    data_sha256: str | None = None

    @property
    def autov2(self) -> str:
        """A1111's short hash of a checkpoint, civitai's "AutoV2": the whole file's sha256, first 10 hex digits
        (A1111 modules/sd_models.py, CheckpointInfo.calculate_shorthash: `self.shorthash = self.sha256[0:10]`,
        written as "Model hash"). civitai's A1111 extension writes the same for every resource in "Hashes"."""
        return self.sha256[:10]

    @property
    def autov3(self) -> str:
        """A1111's short hash of a LoRA, civitai's "AutoV3", written in "Lora hashes": A1111's
        extensions-builtin/Lora/network.py hashes a .safetensors file with modules/hashes.py
        `addnet_hash_safetensors` (read 8 bytes, n = int.from_bytes(them, "little"), sha256 of everything from
        offset n + 8 on; kohya-ss sd-scripts' definition) and any other file whole, then keeps `hash[0:12]`."""
        return (self.data_sha256 or self.sha256)[:12]


def file_digest(path: str | os.PathLike, chunk: int = 1 << 20) -> FileDigest:
    """`FileDigest` of a file in one read (a .safetensors file also gets its tensor-data hash)."""
    full = hashlib.sha256()
    data = hashlib.sha256() if Path(path).suffix.lower() in SAFE_SUFFIXES else None
    with open(path, "rb") as f:
        head = f.read(8)
        full.update(head)
        # As addnet_hash_safetensors: the data starts 8 + (the little-endian length in the first 8 bytes) bytes in;
        # past the end of the file it is empty.
        start, pos = 8 + int.from_bytes(head, "little"), len(head)
        while block := f.read(chunk):
            full.update(block)
            if data is not None and pos + len(block) > start:
                data.update(memoryview(block)[max(0, start - pos):])
            pos += len(block)
    return FileDigest(full.hexdigest(), data.hexdigest() if data is not None else None)


@dataclass(frozen=True)
class FileState:
    """What `stat` says about a file. Its bytes may have changed when any of these did: size, modification and
    change times (written in place), device and inode (replaced by another file, e.g. an atomic rename)."""

    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, path: str | os.PathLike) -> FileState:
        st = os.stat(path)
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def settled(self, margin_s: float = 2.0) -> bool:
        """Last changed more than `margin_s` ago. File times tick coarsely (milliseconds; 2 s on FAT), so a write in
        the same tick as the change before it leaves them as they were: a file that changed just now is checked by
        its bytes, not its times (git's "racily clean" rule)."""
        return max(self.mtime_ns, self.ctime_ns) < time.time_ns() - int(margin_s * 1e9)


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


PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model"  # PEFT's save_pretrained: adapter_model.safetensors (or .bin) in the adapter's folder


def lora_name(path: str | os.PathLike) -> str:
    """The name a LoRA file goes by: its file name without the extension, or, for PEFT's `adapter_model.safetensors`
    (every PEFT adapter's file is called that), the name of its folder."""
    path = Path(path)
    return path.parent.name if path.stem == PEFT_WEIGHTS and path.parent.name not in ("", ".", "/") else path.stem


def peft_adapter_metadata(path: str | os.PathLike, metadata: dict[str, str], component: str) -> dict[str, str]:
    """The header `metadata` with PEFT's saved LoraConfig added as diffusers' `lora_adapter_metadata` for `component`.

    PEFT's `save_pretrained` writes the factors to `adapter_model.safetensors` and alpha, rank/alpha patterns, rsLoRA
    and DoRA to `adapter_config.json` beside it, not to the header; without it every layer would be read at alpha =
    rank. A header that already has `lora_adapter_metadata` (diffusers' own saves) wins; no config file: unchanged.
    """
    config_path = Path(path).with_name(PEFT_CONFIG)
    if "lora_adapter_metadata" in metadata or not config_path.is_file():
        return metadata
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LoRAFileError(config_path, f"cannot be read as PEFT's adapter config ({err}).",
                            f"fix or remove {PEFT_CONFIG}; without it the LoRA is read at alpha = rank.") from None
    if not isinstance(config, dict):
        raise LoRAFileError(config_path, "is not a JSON object (PEFT writes its LoraConfig as one).",
                            f"fix or remove {PEFT_CONFIG}.")
    kind = str(config.get("peft_type", "LORA")).upper()
    if kind != "LORA":
        raise LoRAFileError(config_path, f"describes a PEFT {kind} adapter; loraloom reads PEFT LoRA adapters from "
                                         f"{PEFT_CONFIG} + adapter_model.safetensors.",
                            "use a LoRA adapter (peft_type LORA), or the LyCORIS export of this adapter.")
    keys = ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora")
    saved = {f"{component}.{k}": config[k] for k in keys if k in config}
    return {**metadata, "lora_adapter_metadata": json.dumps(saved)}
