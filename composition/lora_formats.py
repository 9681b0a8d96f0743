"""LoRA key layouts: detect which one a file uses and bring it to PEFT module names with diffusers' converters.

Like ComfyUI's weight-adapter registry, each layout is a small class that says whether a set of keys is
its own (`matches`) and converts them (`convert`). The key renaming itself is diffusers' work:
`StableDiffusionXLLoraLoaderMixin.lora_state_dict` (kohya/A1111 -> diffusers, SDXL sgm block remapping),
`convert_unet_state_dict_to_peft`, `convert_state_dict_to_diffusers` and `convert_state_dict_to_peft`.
We only add what diffusers does not do: keeping each module's alpha, refusing unsupported adapter types by
name instead of dropping keys, and errors that name the file.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass

import torch

from .errors import LoRAFileError, UnsupportedLoRAFormat

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")

# Key segments of adapter types that are not plain LoRA (matched against each dot-separated segment).
_UNSUPPORTED_SEGMENTS: tuple[tuple[str, str], ...] = (
    ("hada_", "LoHa (LyCORIS Hadamard-product adapter)"),
    ("lokr_", "LoKr (LyCORIS Kronecker-product adapter)"),
    ("dora_scale", "DoRA (weight-decomposed LoRA)"),
    ("lora_magnitude_vector", "DoRA (weight-decomposed LoRA)"),
    ("lora_mid", "LoCon with Tucker decomposition (lora_mid)"),
    ("oft_", "OFT/BOFT (orthogonal fine-tuning)"),
    ("ia3_", "IA3"),
    ("diff", "LyCORIS full weight difference"),
    ("diff_b", "LyCORIS full weight difference"),
    ("w_norm", "LyCORIS norm-layer training"),
    ("b_norm", "LyCORIS norm-layer training"),
)


@dataclass
class RawLayer:
    """One adapted module: PEFT-named factors and its alpha (None = not stored, meaning alpha = rank)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None


Layers = dict[str, dict[str, RawLayer]]  # component -> module path -> layer


def find_unsupported(keys) -> dict[str, list[str]]:
    """Adapter types present that are not plain LoRA: {type name: example keys}."""
    found: dict[str, list[str]] = {}
    for key in keys:
        for segment in key.split("."):
            for marker, name in _UNSUPPORTED_SEGMENTS:
                hit = segment == marker if marker in ("diff", "diff_b", "w_norm", "b_norm") else segment.startswith(marker)
                if hit:
                    found.setdefault(name, []).append(key)
    return found


def _split_component(key: str) -> tuple[str, str]:
    for comp in COMPONENTS:
        if key.startswith(comp + "."):
            return comp, key[len(comp) + 1 :]
    return "", key


class KeyLayout:
    """A LoRA key layout. Subclasses set `name` and implement `matches` and `convert`."""

    name = "base"

    @staticmethod
    def matches(keys: list[str]) -> bool:
        raise NotImplementedError

    @staticmethod
    def convert(state_dict: dict[str, torch.Tensor], metadata: dict[str, str], path, unet_config=None) -> Layers:
        raise NotImplementedError


def _group_peft(state_dict: dict[str, torch.Tensor], path, alphas: dict[tuple[str, str], float] | None = None) -> Layers:
    """Group `<component>.<module>.lora_A/lora_B.weight` keys into layers (plus optional `<module>.alpha`)."""
    layers: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    alpha_tensors: dict[tuple[str, str], float] = {}
    for key, value in state_dict.items():
        comp, rest = _split_component(key)
        if not comp:
            if key.startswith(("transformer.", "lora_transformer_", "diffusion_model.")):
                raise LoRAFileError(path, f"targets a diffusion transformer (FLUX/SD3-style key {key!r}).", "use a LoRA made for Stable Diffusion 1.x/2.x/XL.")
            comp = "unet"  # a bare PEFT UNet state dict
        if rest.endswith(".alpha"):
            alpha_tensors[(comp, rest[: -len(".alpha")])] = float(value.item() if value.numel() == 1 else value.flatten()[0])
            continue
        m = re.match(r"^(.*)\.lora_(A|B)\.weight$", rest)
        if m is None:
            raise LoRAFileError(path, f"has a key loraloom does not understand: {key!r}.", "check that this is a LoRA for Stable Diffusion 1.x/2.x/XL.")
        layers.setdefault(comp, {}).setdefault(m.group(1), {})[m.group(2)] = value
    stray = set(alpha_tensors) - {(c, m) for c, mods in layers.items() for m in mods}
    if stray:
        logging.getLogger(__name__).warning("%s: alpha values without a matching layer ignored: %s", path, sorted(stray)[:3])
    out: Layers = {}
    for comp, modules in layers.items():
        for module, ab in modules.items():
            if set(ab) != {"A", "B"}:
                missing = "lora_B (up)" if "B" not in ab else "lora_A (down)"
                raise LoRAFileError(path, f"module {comp}.{module} has no {missing} weight.", "the file is incomplete; export it again.")
            alpha = alpha_tensors.get((comp, module))
            if alpha is None and alphas is not None:
                alpha = alphas.get((comp, module))
            out.setdefault(comp, {})[module] = RawLayer(ab["A"], ab["B"], alpha)
    return out


def _pattern_value(patterns: dict, module: str):
    """PEFT's rank/alpha pattern lookup: a pattern applies to a module whose name ends with it."""
    for pattern, value in patterns.items():
        pattern = pattern.lstrip("^")
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return None


def _alphas_from_adapter_metadata(metadata: dict[str, str], layers: Layers) -> None:
    """Fill alphas from diffusers' `lora_adapter_metadata` header (the saved LoraConfig of each component)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError:
        return
    for comp, modules in layers.items():
        if cfg.get(f"{comp}.use_dora"):
            raise UnsupportedLoRAFormat(None, "DoRA adapter (use_dora=true in lora_adapter_metadata).")
        alpha = cfg.get(f"{comp}.lora_alpha")
        alpha_pattern = cfg.get(f"{comp}.alpha_pattern") or {}
        rslora = bool(cfg.get(f"{comp}.use_rslora"))
        for module, layer in modules.items():
            if layer.alpha is not None:
                continue
            a = _pattern_value(alpha_pattern, module)
            a = alpha if a is None else a
            if a is None:
                continue
            rank = layer.down.shape[0]
            # rsLoRA scales by alpha/sqrt(r); store the equivalent plain alpha so scale = alpha/r everywhere.
            layer.alpha = float(a) * (rank**0.5) if rslora else float(a)


class PeftLayout(KeyLayout):
    """diffusers >= 0.26 / PEFT: `unet.<module>.lora_A.weight`, `text_encoder.<module>.lora_B.weight`."""

    name = "diffusers-peft"

    @staticmethod
    def matches(keys):
        return any(".lora_A." in k or ".lora_B." in k for k in keys)

    @staticmethod
    def convert(state_dict, metadata, path, unet_config=None):
        state_dict = {k.removeprefix("base_model.model."): v for k, v in state_dict.items()}
        layers = _group_peft(state_dict, path)
        try:
            _alphas_from_adapter_metadata(metadata, layers)
        except UnsupportedLoRAFormat as err:
            raise UnsupportedLoRAFormat(path, err.problem, "loraloom composes plain LoRAs only.") from None
        return layers


def _old_diffusers_to_peft(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Old diffusers names (`.lora.down`, `processor.to_q_lora`, `lora_linear_layer`) -> PEFT names."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft
    from diffusers.utils.state_dict_utils import StateDictType

    out: dict[str, torch.Tensor] = {}
    by_comp: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        comp, rest = _split_component(key)
        by_comp.setdefault(comp or "unet", {})[rest] = value
    for comp, part in by_comp.items():
        if comp == "unet":
            part = convert_unet_state_dict_to_peft(part)
        else:
            part = convert_state_dict_to_diffusers(part, original_type=StateDictType.DIFFUSERS_OLD)
            part = convert_state_dict_to_peft(part, original_type=StateDictType.DIFFUSERS)
        out.update({f"{comp}.{k}": v for k, v in part.items()})
    return out


class OldDiffusersLayout(KeyLayout):
    """diffusers < 0.26 (`unet.<module>.lora.down.weight`, attention-processor `to_q_lora`, `lora_linear_layer`)."""

    name = "diffusers-old"

    @staticmethod
    def matches(keys):
        return any(".lora.down." in k or "_lora.down." in k or ".lora_linear_layer." in k for k in keys)

    @staticmethod
    def convert(state_dict, metadata, path, unet_config=None):
        return _group_peft(_old_diffusers_to_peft(state_dict), path)


class KohyaLayout(KeyLayout):
    """kohya-ss / A1111: `lora_unet_*`, `lora_te_*`, `lora_te1_*`, `lora_te2_*` with lora_down/lora_up/alpha.

    Includes LoCon (conv layers: a k x k `lora_down` and a 1 x 1 `lora_up`). Each module is converted on its own
    through diffusers' converter so that its alpha stays attached to it.
    """

    name = "kohya"
    PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")

    @classmethod
    def matches(cls, keys):
        return bool(keys) and all(k.startswith(cls.PREFIXES) for k in keys)

    @classmethod
    def convert(cls, state_dict, metadata, path, unet_config=None):
        from diffusers.loaders import StableDiffusionXLLoraLoaderMixin

        modules: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in state_dict.items():
            name, _, rest = key.partition(".")
            modules.setdefault(name, {})[rest] = value
        converted: dict[str, torch.Tensor] = {}
        alphas: dict[tuple[str, str], float] = {}
        quiet = logging.getLogger("diffusers.loaders.lora_conversion_utils")
        level = quiet.level
        quiet.setLevel(logging.WARNING)
        try:
            for name, parts in modules.items():
                unknown = set(parts) - {"lora_down.weight", "lora_up.weight", "alpha"}
                if unknown:
                    raise LoRAFileError(path, f"module {name} has keys loraloom does not understand: {sorted(unknown)}.", "check the LoRA type (only plain LoRA/LoCon are supported).")
                if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
                    raise LoRAFileError(path, f"module {name} lacks its lora_down or lora_up weight.", "the file is incomplete; export it again.")
                mini = {f"{name}.lora_down.weight": parts["lora_down.weight"], f"{name}.lora_up.weight": parts["lora_up.weight"]}
                try:
                    out, _ = StableDiffusionXLLoraLoaderMixin.lora_state_dict(mini, unet_config=unet_config)
                except (ValueError, KeyError, IndexError) as err:
                    raise LoRAFileError(path, f"module {name} cannot be mapped to a diffusers module ({err}).", "this LoRA was probably made for another model architecture.") from None
                out = _old_diffusers_to_peft(out)
                converted.update(out)
                if "alpha" in parts:
                    key_a = next(k for k in out if ".lora_A." in k)
                    comp, rest = _split_component(key_a)
                    alphas[(comp, rest.split(".lora_A.")[0])] = float(parts["alpha"].item() if parts["alpha"].device.type != "meta" else float("nan"))
        finally:
            quiet.setLevel(level)
        return _group_peft(converted, path, alphas)


LAYOUTS: tuple[type[KeyLayout], ...] = (KohyaLayout, PeftLayout, OldDiffusersLayout)


def detect_layout(keys: list[str], path=None) -> type[KeyLayout]:
    """The layout of a LoRA file's keys, or a clear error for unsupported or non-LoRA content."""
    unsupported = find_unsupported(keys)
    if unsupported:
        kinds = "; ".join(f"{name} (e.g. {ex[0]!r})" for name, ex in unsupported.items())
        raise UnsupportedLoRAFormat(
            path,
            f"contains adapter weights loraloom does not support: {kinds}.",
            "loraloom composes plain LoRA/LoCon adapters; convert the adapter to a plain LoRA "
            "(e.g. extract a LoRA from the fine-tuned weights) or use it in a tool that supports this type.",
        )
    for layout in LAYOUTS:
        if layout.matches(keys):
            return layout
    example = ", ".join(repr(k) for k in list(keys)[:3])
    raise LoRAFileError(
        path,
        f"does not contain LoRA weights (no lora_A/lora_B, lora_down/lora_up keys; found {len(keys)} keys such as {example}). "
        "It looks like a full model checkpoint, an embedding or another kind of file.",
        "pass a LoRA file; base models go in the `model` field.",
    )


def convert_to_layers(state_dict, metadata, path=None, unet_config=None) -> tuple[str, Layers]:
    """Detect the layout and return (layout name, PEFT-named layers)."""
    layout = detect_layout(list(state_dict), path)
    layers = layout.convert(state_dict, metadata, path, unet_config=unet_config)
    if not any(layers.values()):
        raise LoRAFileError(path, "holds no LoRA layers after conversion.", "check the file.")
    unknown = set(layers) - set(COMPONENTS)
    if unknown:
        raise LoRAFileError(path, f"targets components loraloom does not handle: {sorted(unknown)}.", "use a LoRA for SD 1.x/2.x/XL UNet and text encoders.")
    return layout.name, layers
