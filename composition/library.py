"""A folder of LoRA files as a library: every file described from its header (FLUX.1/SD3 files: loaded through their
converters, `read_any_lora_info`), bad files reported, not fatal."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import LoRAFileError
from .lora import LoRAInfo
from .lora_file import LORA_SUFFIXES
from .transformer_loras import read_any_lora_info


@dataclass
class LibraryEntry:
    path: Path
    info: LoRAInfo | None = None
    error: str | None = None

    @property
    def preview(self) -> Path | None:
        """An image beside the file with the same stem (`name.png`, `name.preview.png`, …), if any."""
        for suffix in (".png", ".jpg", ".jpeg", ".webp", ".preview.png", ".preview.jpg"):
            candidate = self.path.with_name(self.path.stem + suffix)
            if candidate.exists():
                return candidate
        return None


def scan_loras(folder: str | os.PathLike, recursive: bool = True, allow_pickle: bool = False) -> list[LibraryEntry]:
    """Describe every LoRA-looking file under `folder` (sorted by path). Files that fail carry their error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LoRAFileError(folder, "is not a folder.", "pass the folder that holds your LoRA files.")
    pattern = "**/*" if recursive else "*"
    out = []
    for path in sorted(p for p in folder.glob(pattern) if p.is_file() and p.suffix.lower() in LORA_SUFFIXES):
        try:
            out.append(LibraryEntry(path, info=read_any_lora_info(path, allow_pickle=allow_pickle)))
        except LoRAFileError as err:
            out.append(LibraryEntry(path, error=str(err)))
    return out
