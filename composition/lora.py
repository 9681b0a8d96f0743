"""A loaded LoRA: its low-rank factors per module (never a dense delta), alpha/rank scaling and metadata."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import LoRAFileError
from .lora_file import read_header, read_tensors
from .lora_formats import Layers, convert_to_layers
from .metadata import family_from_keys, family_from_metadata, read_sidecar, trigger_suggestions

_CONTAINER = re.compile(r"^.*(?:transformer_blocks|resnets|attentions|layers|downsamplers|upsamplers)\.\d+\.")


def target_name(module_path: str) -> str:
    """The layer kind a module path points at: `...transformer_blocks.0.attn1.to_q` -> `attn1.to_q`."""
    return _CONTAINER.sub("", module_path)


@dataclass
class LoRALayer:
    """Factors of one adapted Linear/Conv2d: update = (alpha / rank) * up @ down (LoRA, Hu et al. 2021, eq. 3)."""

    down: torch.Tensor  # (r, in) for Linear; (r, in, kh, kw) for Conv2d (LoCon)
    up: torch.Tensor  # (out, r) for Linear; (out, r, 1, 1) for Conv2d
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    @property
    def is_conv(self) -> bool:
        return self.down.ndim == 4

    def delta(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense update scale * up @ down in the base weight's layout. Only for fusing and weight-space methods."""
        down = self.down if dtype is None else self.down.to(dtype)
        up = self.up if dtype is None else self.up.to(dtype)
        if self.is_conv:
            return self.scale * torch.einsum("or,rikl->oikl", up.flatten(1), down)
        return self.scale * (up @ down)

    @property
    def nbytes(self) -> int:
        return self.down.numel() * self.down.element_size() + self.up.numel() * self.up.element_size()


@dataclass
class LoRAInfo:
    """Everything about a LoRA file that does not need its weights."""

    path: Path | None
    name: str
    layout: str
    family: str | None
    family_source: str | None
    ranks: dict[str, list[int]]
    targets: dict[str, list[str]]
    num_modules: int
    file_size: int
    metadata: dict[str, str] = field(default_factory=dict, repr=False)
    category: str | None = None
    triggers: list[str] = field(default_factory=list)
    trigger_suggestions: list[str] = field(default_factory=list)
    sidecar: dict = field(default_factory=dict, repr=False)
    # Families the key names and shapes fit (whatever the header says) and why; () when they are not decisive.
    key_families: tuple[str, ...] = ()
    key_evidence: str | None = None

    @property
    def rank(self) -> int:
        return max((r for rs in self.ranks.values() for r in rs), default=0)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "path": str(self.path) if self.path else None,
            "layout": self.layout,
            "family": self.family,
            "family_source": self.family_source,
            "key_families": list(self.key_families),
            "rank": self.rank,
            "ranks": self.ranks,
            "targets": self.targets,
            "num_modules": self.num_modules,
            "file_size": self.file_size,
            "category": self.category,
            "triggers": self.triggers,
            "trigger_suggestions": self.trigger_suggestions,
        }


def _describe(path, name, layout, layers: Layers, metadata, file_size, file_keys=()) -> LoRAInfo:
    shapes = {c: {m: tuple(l.down.shape) for m, l in mods.items()} for c, mods in layers.items()}
    key_families, evidence = family_from_keys(shapes, file_keys)
    family, source = family_from_metadata(metadata)
    if family is None and len(key_families) == 1:
        family, source = key_families[0], f"keys: {evidence}"
    sidecar = read_sidecar(path) if path is not None else {}
    suggestions = trigger_suggestions(metadata)
    return LoRAInfo(
        path=Path(path) if path is not None else None,
        name=name,
        layout=layout,
        family=family,
        family_source=source,
        ranks={c: sorted({s[0] for s in mods.values()}) for c, mods in shapes.items()},
        targets={c: sorted({target_name(m) for m in mods}) for c, mods in shapes.items()},
        num_modules=sum(len(m) for m in layers.values()),
        file_size=file_size,
        metadata=metadata,
        category=sidecar.get("category"),
        triggers=list(sidecar.get("triggers") or suggestions[:1]),
        trigger_suggestions=suggestions,
        sidecar=sidecar,
        key_families=key_families,
        key_evidence=evidence,
    )


def read_lora_info(path: str | os.PathLike, allow_pickle: bool = False, unet_config=None) -> LoRAInfo:
    """Describe a LoRA file from its header alone (no weight is read for .safetensors)."""
    header = read_header(path, allow_pickle=allow_pickle)
    meta_tensors = {k: torch.empty(s, device="meta") for k, s in header.shapes.items()}
    layout, layers = convert_to_layers(meta_tensors, header.metadata, header.path, unet_config=unet_config)
    return _describe(header.path, Path(path).stem, layout, layers, header.metadata, header.file_size, header.shapes)


@dataclass
class LoRA:
    """One adapter: `layers[component][module path]` -> factors, plus its description."""

    name: str
    layers: dict[str, dict[str, LoRALayer]]
    info: LoRAInfo

    @property
    def path(self) -> Path | None:
        return self.info.path

    @property
    def category(self) -> str | None:
        return self.info.category

    @property
    def triggers(self) -> list[str]:
        return self.info.triggers

    @property
    def nbytes(self) -> int:
        return sum(l.nbytes for mods in self.layers.values() for l in mods.values())

    def to(self, device=None, dtype=None) -> LoRA:
        """Move/cast factors in place (the routing layer then shares these tensors: no second copy)."""
        for mods in self.layers.values():
            for layer in mods.values():
                layer.down = layer.down.to(device=device, dtype=dtype)
                layer.up = layer.up.to(device=device, dtype=dtype)
        return self


def check_finite(state_dict: dict[str, torch.Tensor], path) -> None:
    """Refuse a file whose tensors hold NaN or Inf: it would silently turn every image it touches black."""
    for key, t in state_dict.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise LoRAFileError(path, f"tensor {key!r} holds {bad} NaN/Inf value(s) of {t.numel()}.",
                                "the file is damaged or comes from a diverged training run; export or download it again.")


def lora_from_layers(name: str, raw: Layers, info: LoRAInfo) -> LoRA:
    layers = {
        comp: {m: LoRALayer(l.down, l.up, float(l.alpha) if l.alpha is not None else float(l.down.shape[0])) for m, l in mods.items()}
        for comp, mods in raw.items()
    }
    for comp, mods in layers.items():
        for module, layer in mods.items():
            if layer.up.shape[1] != layer.rank:
                raise LoRAFileError(info.path, f"{comp}.{module}: up factor has rank {layer.up.shape[1]} but down has {layer.rank}.", "the file is damaged; export it again.")
    return LoRA(name=name, layers=layers, info=info)


def load_lora(
    path: str | os.PathLike,
    name: str | None = None,
    *,
    allow_pickle: bool = False,
    unet_config=None,
    dtype: torch.dtype | None = None,
) -> LoRA:
    """Load a LoRA file (diffusers/PEFT, old diffusers or kohya/A1111 layout) into factors.

    `unet_config` lets diffusers remap SDXL kohya block names; `dtype` casts factors (default: as stored).
    Pickled files (.ckpt/.pt/.bin) are refused unless `allow_pickle=True`.
    """
    path = Path(path)
    state_dict, metadata = read_tensors(path, allow_pickle=allow_pickle)
    check_finite(state_dict, path)
    layout, raw = convert_to_layers(state_dict, metadata, path, unet_config=unet_config)
    info = _describe(path, name or path.stem, layout, raw, metadata, path.stat().st_size, state_dict)
    lora = lora_from_layers(name or path.stem, raw, info)
    if dtype is not None:
        lora.to(dtype=dtype)
    return lora
