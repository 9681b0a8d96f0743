"""A loaded LoRA: one adapter object per module (`composition.adapters`: LoRA/LoCon factors, LoHa, LoKr, DoRA, OFT,
full and norm diffs; never a dense delta unless the type needs one), alpha/rank scaling and metadata."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapters import Adapter, AdapterPartsError, LoRALayer, build_adapter
from .errors import LoRAFileError, UnsupportedLoRAFormat
from .lora_file import lora_name, read_header, read_tensors
from .lora_formats import Layers, convert_to_layers
from .metadata import family_from_keys, family_from_metadata, read_sidecar, trigger_suggestions

_CONTAINER = re.compile(r"^.*(?:transformer_blocks|resnets|attentions|layers|downsamplers|upsamplers)\.\d+\.")


def target_name(module_path: str) -> str:
    """The layer kind a module path points at: `...transformer_blocks.0.attn1.to_q` -> `attn1.to_q`."""
    return _CONTAINER.sub("", module_path)


__all__ = ["Adapter", "LoRA", "LoRAInfo", "LoRALayer", "build_adapters", "describe_lora", "load_lora", "read_lora_info", "target_name",
           "tensor_element_size"]


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
    # Adapter types per component (`Adapter.kind`: LoRA, LoCon-Tucker, LoHa, LoKr, DoRA, OFT, BOFT, full, norm).
    types: dict[str, list[str]] = field(default_factory=dict)
    factor_bytes: int = 0  # the adapters' tensors, at the file's dtype
    cache_bytes: int = 0  # what becoming resident adds (Khatri-Rao/dense LoHa, DoRA and OFT vectors), at the file's dtype

    @property
    def rank(self) -> int:
        return max((r for rs in self.ranks.values() for r in rs), default=0)

    @property
    def kind(self) -> str:
        """The file's adapter type(s): 'LoRA', 'LoHa', or 'LoKr+norm' for a file that mixes types."""
        kinds = sorted({k for ks in self.types.values() for k in ks}, key=lambda k: (k == "norm", k))
        return "+".join(kinds) if kinds else "LoRA"

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
            "type": self.kind,
            "types": self.types,
            "factor_bytes": self.factor_bytes,
            "cache_bytes": self.cache_bytes,
        }


def describe_lora(path, name, layout, adapters: dict[str, dict[str, Adapter]], metadata, file_size, file_keys=(),
                  element_size: int | None = None) -> LoRAInfo:
    """The `LoRAInfo` of a LoRA file from its adapters (per component, per module), header metadata and size; the
    family comes from the metadata, else from the keys and shapes. Used by every reader (SD and `transformer_loras`)."""
    shapes = {c: {m: tuple(a.family_shape()) for m, a in mods.items()} for c, mods in adapters.items()}
    key_families, evidence = family_from_keys(shapes, file_keys)
    family, source = family_from_metadata(metadata)
    if family is None and len(key_families) == 1:
        family, source = key_families[0], f"keys: {evidence}"
    sidecar = read_sidecar(path) if path is not None else {}
    suggestions = trigger_suggestions(metadata)
    every = [a for mods in adapters.values() for a in mods.values()]
    size = element_size or 4
    return LoRAInfo(
        path=Path(path) if path is not None else None,
        name=name,
        layout=layout,
        family=family,
        family_source=source,
        ranks={c: sorted({a.producer_rank for a in mods.values() if a.producer_rank}) for c, mods in adapters.items()},
        targets={c: sorted({target_name(m) for m in mods}) for c, mods in adapters.items()},
        num_modules=sum(len(m) for m in adapters.values()),
        file_size=file_size,
        metadata=metadata,
        category=sidecar.get("category"),
        triggers=list(sidecar.get("triggers") or suggestions[:1]),
        trigger_suggestions=suggestions,
        sidecar=sidecar,
        key_families=key_families,
        key_evidence=evidence,
        types={c: sorted({a.kind for a in mods.values()}) for c, mods in adapters.items()},
        factor_bytes=sum(t.numel() for a in every for t in _own_tensors(a)) * size,
        cache_bytes=sum(a.cache_elements() for a in every) * size,
    )


def _own_tensors(adapter: Adapter):
    return [*adapter.inner.tensors, adapter.magnitude] if hasattr(adapter, "inner") else list(adapter.tensors)


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def build_adapters(raw: Layers, path) -> dict[str, dict[str, Adapter]]:
    """One `Adapter` (the class of its type: LoRA, LoHa, LoKr, DoRA, OFT, …) per module of each component, from
    the raw layers a layout reader produced; unknown or mixed types are refused naming `path`."""
    out: dict[str, dict[str, Adapter]] = {}
    for comp, mods in raw.items():
        for module, layer in mods.items():
            try:
                out.setdefault(comp, {})[module] = build_adapter(layer.parts, layer.alpha, layer.source)
            except AdapterPartsError as err:
                where = layer.source or f"{comp}.{module}"
                raise (UnsupportedLoRAFormat if err.fix else LoRAFileError)(
                    path, f"{where}: {err}.", err.fix or "the file is damaged or incomplete; export it again.") from None
    return out


def read_lora_info(path: str | os.PathLike, allow_pickle: bool = False, unet_config=None) -> LoRAInfo:
    """Describe a LoRA file from its header alone (no weight is read for .safetensors)."""
    header = read_header(path, allow_pickle=allow_pickle)
    meta_tensors = {k: torch.empty(s, device="meta", dtype=_SAFETENSORS_DTYPES.get(header.dtypes.get(k, ""), torch.float32))
                    for k, s in header.shapes.items()}
    layout, layers = convert_to_layers(meta_tensors, header.metadata, header.path, unet_config=unet_config)
    adapters = build_adapters(layers, header.path)
    return describe_lora(header.path, lora_name(path), layout, adapters, header.metadata, header.file_size, header.shapes,
                         tensor_element_size(meta_tensors))


def tensor_element_size(tensors) -> int | None:
    """Bytes per element of the widest floating-point tensor of a state dict (None: none), for memory estimates."""
    floats = [t for t in tensors.values() if t.is_floating_point()]
    return max((t.element_size() for t in floats), default=None)


@dataclass
class LoRA:
    """One LoRA file: `layers[component][module path]` -> its adapter (`LoRALayer` for plain LoRA/LoCon, or another
    `composition.adapters` type), plus its description."""

    name: str
    layers: dict[str, dict[str, Adapter]]
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
        """Bytes of the adapters' own tensors (the factors as loaded)."""
        return sum(l.nbytes for mods in self.layers.values() for l in mods.values())

    @property
    def cache_nbytes(self) -> int:
        """Bytes the routing layer built for the adapters while resident (LoHa's rank-r² or dense form, DoRA's and
        OFT's vectors and rotations); 0 for plain LoRA/LoCon and before the LoRA is resident."""
        return sum(l.cache_nbytes for mods in self.layers.values() for l in mods.values())

    @property
    def kinds(self) -> list[str]:
        return sorted({l.kind for mods in self.layers.values() for l in mods.values()})

    def to(self, device=None, dtype=None) -> LoRA:
        """Move/cast factors in place (the routing layer then shares these tensors: no second copy)."""
        for mods in self.layers.values():
            for layer in mods.values():
                layer.to(device=device, dtype=dtype)
        return self


def check_finite(state_dict: dict[str, torch.Tensor], path) -> None:
    """Refuse a file whose tensors hold NaN or Inf: it would silently turn every image it touches black."""
    for key, t in state_dict.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise LoRAFileError(path, f"tensor {key!r} holds {bad} NaN/Inf value(s) of {t.numel()}.",
                                "the file is damaged or comes from a diverged training run; export or download it again.")


def lora_from_layers(name: str, raw: Layers, info: LoRAInfo) -> LoRA:
    return LoRA(name=name, layers=build_adapters(raw, info.path), info=info)


def load_lora(
    path: str | os.PathLike,
    name: str | None = None,
    *,
    allow_pickle: bool = False,
    unet_config=None,
    dtype: torch.dtype | None = None,
) -> LoRA:
    """Load a LoRA file (diffusers/PEFT, old diffusers or kohya/A1111/LyCORIS layout) into adapter objects.

    `unet_config` lets diffusers remap SDXL kohya block names; `dtype` casts factors (default: as stored).
    Pickled files (.ckpt/.pt/.bin) are refused unless `allow_pickle=True`.
    """
    path = Path(path)
    state_dict, metadata = read_tensors(path, allow_pickle=allow_pickle)
    check_finite(state_dict, path)
    layout, raw = convert_to_layers(state_dict, metadata, path, unet_config=unet_config)
    adapters = build_adapters(raw, path)
    info = describe_lora(path, name or lora_name(path), layout, adapters, metadata, path.stat().st_size, state_dict,
                         tensor_element_size(state_dict))
    lora = LoRA(name=name or lora_name(path), layers=adapters, info=info)
    if dtype is not None:
        lora.to(dtype=dtype)
    return lora
