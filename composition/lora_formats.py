"""LoRA key layouts: detect which one a file uses and bring it to PEFT module names with diffusers' converters.

Like ComfyUI's weight-adapter registry, each layout is a small class that says whether a set of keys is
its own (`matches`) and converts them (`convert`). The key renaming itself is diffusers' work:
`StableDiffusionXLLoraLoaderMixin.lora_state_dict` (kohya/A1111 -> diffusers, SDXL sgm block remapping),
`convert_unet_state_dict_to_peft`, `convert_state_dict_to_diffusers` and `convert_state_dict_to_peft`.
We only add what diffusers does not do: keeping each module's alpha; the other adapter types of the kohya/LyCORIS
key layout (LoHa, LoKr, Tucker LoCon, DoRA `dora_scale`, OFT/BOFT, full and norm diffs) and PEFT's DoRA magnitude
vectors, kept per module as named parts that `composition.adapters.build_adapter` turns into adapter objects (a
file mixing types gives each module its own class); refusing the types loraloom cannot apply by name instead of
dropping keys; errors that name the file.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass

import torch

from .errors import LoRAFileError, UnsupportedLoRAFormat
from .lora_file import peft_adapter_metadata

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")

# Adapter types loraloom cannot apply, recognised by a key segment (exact match): refused by name.
_UNSUPPORTED_SEGMENTS: dict[str, str] = {
    "on_input": "IA3 (LyCORIS)",
    "a1": "GLoRA (LyCORIS)", "a2": "GLoRA (LyCORIS)", "b1": "GLoRA (LyCORIS)", "b2": "GLoRA (LyCORIS)", "bm": "GLoRA (LyCORIS)",
    "lambda_layer": "T-LoRA (LyCORIS)", "q_layer": "T-LoRA (LyCORIS)", "p_layer": "T-LoRA (LyCORIS)",
    "lokr_t1": "LoKr with a Tucker core on w1 (lokr_t1)",
    "oft_r": "OFT (PEFT)", "oft_R": "OFT (PEFT)", "oft_s": "OFT (PEFT)", "boft_R": "BOFT (PEFT)", "boft_s": "BOFT (PEFT)",
    "vera_lambda_b": "VeRA (PEFT)", "vera_lambda_d": "VeRA (PEFT)",
}
_UNSUPPORTED_PREFIXES: tuple[tuple[str, str], ...] = (("ia3_", "IA3 (PEFT)"), ("lora_embedding_", "embedding LoRA (PEFT)"))

# kohya / LyCORIS per-module key suffixes -> part names (composition.adapters.build_adapter reads these).
KOHYA_PARTS: dict[str, str] = {
    "lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid", "dora_scale": "dora_scale",
    "hada_w1_a": "hada_w1_a", "hada_w1_b": "hada_w1_b", "hada_w2_a": "hada_w2_a", "hada_w2_b": "hada_w2_b",
    "hada_t1": "hada_t1", "hada_t2": "hada_t2",
    "lokr_w1": "lokr_w1", "lokr_w1_a": "lokr_w1_a", "lokr_w1_b": "lokr_w1_b",
    "lokr_w2": "lokr_w2", "lokr_w2_a": "lokr_w2_a", "lokr_w2_b": "lokr_w2_b", "lokr_t2": "lokr_t2",
    "oft_blocks": "oft_blocks", "rescale": "rescale", "diff": "diff", "diff_b": "diff_b", "w_norm": "w_norm", "b_norm": "b_norm",
}
# Segments of LyCORIS types: in a diffusers/PEFT-layout file they mean an adapter loraloom does not read there.
_LYCORIS_SEGMENT_NAMES = {"hada_": "LoHa", "lokr_": "LoKr", "oft_blocks": "OFT/BOFT", "diff": "full diff", "diff_b": "full diff",
                          "w_norm": "norm diff", "b_norm": "norm diff", "lora_mid": "Tucker LoCon", "dora_scale": "DoRA"}


@dataclass
class RawLayer:
    """One adapted module: its tensors by part name (`down`/`up` for LoRA, `hada_w1_a`…, `lokr_w1`…, `oft_blocks`,
    `diff`, `w_norm`, `dora_scale` or PEFT's `magnitude`), its alpha (None = not stored) and the file's module name
    (`source`, kohya-style, for the paths diffusers' converter cannot spell)."""

    parts: dict[str, torch.Tensor]
    alpha: float | None = None
    source: str | None = None

    @property
    def down(self) -> torch.Tensor:
        return self.parts["down"]

    @property
    def up(self) -> torch.Tensor:
        return self.parts["up"]


Layers = dict[str, dict[str, RawLayer]]  # component -> module path -> layer


def find_unsupported(keys) -> dict[str, list[str]]:
    """Adapter types present that loraloom cannot apply: {type name: example keys}."""
    found: dict[str, list[str]] = {}
    for key in keys:
        for segment in key.split("."):
            name = _UNSUPPORTED_SEGMENTS.get(segment)
            if name is None:
                name = next((n for p, n in _UNSUPPORTED_PREFIXES if segment.startswith(p)), None)
            if name is not None:
                found.setdefault(name, []).append(key)
    return found


def _lycoris_segments(keys) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for key in keys:
        for segment in key.split("."):
            for marker, name in _LYCORIS_SEGMENT_NAMES.items():
                if segment == marker or (marker.endswith("_") and segment.startswith(marker)):
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
    """Group `<component>.<module>.lora_A/lora_B.weight` keys (plus `<module>.alpha`, and PEFT DoRA's
    `<module>.lora_magnitude_vector`) into layers."""
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
        m = re.match(r"^(.*)\.(?:lora_(A|B)\.weight|lora_(magnitude)_vector(?:\.weight)?)$", rest)
        if m is None:
            raise LoRAFileError(path, f"has a key loraloom does not understand: {key!r}.", "check that this is a LoRA for Stable Diffusion 1.x/2.x/XL.")
        part = {"A": "down", "B": "up"}.get(m.group(2) or "", "magnitude")
        layers.setdefault(comp, {}).setdefault(m.group(1), {})[part] = value
    stray = set(alpha_tensors) - {(c, m) for c, mods in layers.items() for m in mods}
    if stray:
        logging.getLogger(__name__).warning("%s: alpha values without a matching layer ignored: %s", path, sorted(stray)[:3])
    out: Layers = {}
    for comp, modules in layers.items():
        for module, parts in modules.items():
            if not {"down", "up"} <= set(parts):
                missing = "lora_B (up)" if "up" not in parts else "lora_A (down)"
                raise LoRAFileError(path, f"module {comp}.{module} has no {missing} weight.", "the file is incomplete; export it again.")
            alpha = alpha_tensors.get((comp, module))
            if alpha is None and alphas is not None:
                alpha = alphas.get((comp, module))
            out.setdefault(comp, {})[module] = RawLayer(parts, alpha)
    return out


def _pattern_value(patterns: dict, module: str):
    """PEFT's rank/alpha pattern lookup: a pattern applies to a module whose name ends with it."""
    for pattern, value in patterns.items():
        pattern = pattern.lstrip("^")
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return None


def alphas_from_adapter_metadata(metadata: dict[str, str], layers: Layers, path=None) -> None:
    """Fill alphas from diffusers' `lora_adapter_metadata` header (the saved LoraConfig of each component); a
    component saved with `use_dora` must carry the magnitude vectors."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError:
        return
    for comp, modules in layers.items():
        if cfg.get(f"{comp}.use_dora"):
            bare = sorted(m for m, l in modules.items() if "magnitude" not in l.parts)
            if bare:
                raise LoRAFileError(path, f"is a DoRA adapter (use_dora=true for {comp} in lora_adapter_metadata) but module "
                                          f"{comp}.{bare[0]} has no lora_magnitude_vector.",
                                    "the file is incomplete; export it again with its magnitude vectors.")
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
    """diffusers >= 0.26 / PEFT: `unet.<module>.lora_A.weight`, `text_encoder.<module>.lora_B.weight`; DoRA adds
    `<module>.lora_magnitude_vector` (diffusers' `save_lora_weights` of a PEFT `use_dora` adapter)."""

    name = "diffusers-peft"

    @staticmethod
    def matches(keys):
        return any(".lora_A." in k or ".lora_B." in k for k in keys)

    @staticmethod
    def convert(state_dict, metadata, path, unet_config=None):
        if any(k.startswith("base_model.model.") for k in state_dict):  # PEFT's save_pretrained of a bare UNet
            metadata = peft_adapter_metadata(path, metadata, "unet")
        state_dict = mixed_to_peft({k.removeprefix("base_model.model."): v for k, v in state_dict.items()})
        layers = _group_peft(state_dict, path)
        alphas_from_adapter_metadata(metadata, layers, path)
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
        layers = _group_peft(mixed_to_peft(state_dict), path)
        alphas_from_adapter_metadata(metadata, layers, path)
        return layers


_OLD_DIFFUSERS_KEY = re.compile(r"(\.lora\.(down|up)\.|_lora\.(down|up)\.|\.lora_linear_layer\.)")


def mixed_to_peft(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys in the old diffusers spellings converted to PEFT names, the others kept: diffusers' own
    `convert_state_dict_to_diffusers` (what its training scripts save) writes `lora.down` for the UNet,
    `lora_linear_layer` for the text encoders' attention projections and `lora_A` for their MLP in one file."""
    old = {k: v for k, v in state_dict.items() if _OLD_DIFFUSERS_KEY.search(k)}
    if not old:
        return state_dict
    return {**{k: v for k, v in state_dict.items() if k not in old}, **_old_diffusers_to_peft(old)}


# Paths diffusers' kohya converter spells wrongly (it turns every `_` it does not know into `.`).
_PATH_FIXES: tuple[tuple[str, str], ...] = (
    (r"\.layer\.norm(\d)$", r".layer_norm\1"),  # CLIP encoder layers
    (r"(^|\.)final\.layer\.norm$", r"\1final_layer_norm"),
    (r"^conv\.norm\.out$", "conv_norm_out"),
    (r"\.in\.layers\.0$", ".norm1"),  # SGM resnets: in_layers.0 / out_layers.0 are the group norms
    (r"\.out\.layers\.0$", ".norm2"),
    (r"^out\.0$", "conv_norm_out"),
)
_PROBE_SUFFIX = re.compile(r"^(.*?)\.(?:lora_A\.weight|lora\.down\.weight|lora_linear_layer\.down\.weight|lora_down\.weight)$")


def kohya_module_path(name: str, unet_config=None) -> tuple[str, str]:
    """(component, module path) of a kohya module name (`lora_unet_…`, `lora_te1_…`; LyCORIS/SimpleTuner's
    `lycoris_…` is the UNet), through diffusers' converter (SD 1.x/2.x names, SDXL's SGM block names)."""
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin

    probe_name = "lora_unet_" + name[len("lycoris_"):] if name.startswith("lycoris_") else name
    probe = {f"{probe_name}.lora_down.weight": torch.zeros(1, 1), f"{probe_name}.lora_up.weight": torch.zeros(1, 1)}
    out, _ = StableDiffusionXLLoraLoaderMixin.lora_state_dict(probe, unet_config=unet_config)
    key = next(iter(_old_diffusers_to_peft(out)))
    comp, rest = _split_component(key)
    m = _PROBE_SUFFIX.match(rest)
    module = m.group(1) if m else rest
    for pattern, repl in _PATH_FIXES:
        module = re.sub(pattern, repl, module)
    return comp, module


class KohyaLayout(KeyLayout):
    """kohya-ss / A1111 / LyCORIS: `lora_unet_*`, `lora_te_*`, `lora_te1_*`, `lora_te2_*` (LyCORIS on a bare model:
    `lycoris_*`, the UNet), each module with its adapter's keys: `lora_down`/`lora_up`[/`lora_mid`] (LoRA, LoCon,
    Tucker), `hada_*` (LoHa), `lokr_*` (LoKr), `oft_blocks` (OFT/BOFT), `diff`/`diff_b` (full), `w_norm`/`b_norm`
    (norm layers), plus `alpha` and DoRA's `dora_scale`; `diff_b` beside `lora_down`/`lora_up` is a LoRA with a bias
    diff (ComfyUI's "Extract and Save Lora" with bias_diff; `adapters.LoRABias`).

    Module names are mapped to diffusers paths one module at a time through diffusers' converter (so each keeps its
    own alpha and adapter type). The file's name stays with the layer (`source`): where the converter cannot spell a
    path (norm layers, some embeddings) the routing layer matches that name against the model's own module names.
    """

    name = "kohya"
    PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lycoris_")

    @classmethod
    def matches(cls, keys):
        return bool(keys) and all(k.startswith(cls.PREFIXES) for k in keys)

    @classmethod
    def convert(cls, state_dict, metadata, path, unet_config=None):
        modules: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in state_dict.items():
            name, _, rest = key.partition(".")
            modules.setdefault(name, {})[rest] = value
        out: Layers = {}
        quiet = logging.getLogger("diffusers.loaders.lora_conversion_utils")
        level = quiet.level
        quiet.setLevel(logging.WARNING)
        try:
            for name, keys in modules.items():
                unknown = set(keys) - set(KOHYA_PARTS) - {"alpha"}
                if unknown:
                    raise LoRAFileError(path, f"module {name} has keys loraloom does not understand: {sorted(unknown)}.",
                                        "check the adapter type (loraloom reads LoRA, LoCon, Tucker LoCon, LoHa, LoKr, DoRA, "
                                        "OFT, BOFT, full and norm diffs).")
                parts = {KOHYA_PARTS[k]: v for k, v in keys.items() if k != "alpha"}
                if not parts:
                    raise LoRAFileError(path, f"module {name} has an alpha but no weights.", "the file is incomplete; export it again.")
                try:
                    comp, module = kohya_module_path(name, unet_config)
                except (ValueError, KeyError, IndexError, StopIteration) as err:
                    raise LoRAFileError(path, f"module {name} cannot be mapped to a diffusers module ({err}).", "this LoRA was probably made for another model architecture.") from None
                alpha = None
                if "alpha" in keys:
                    a = keys["alpha"]
                    alpha = float("nan") if a.device.type == "meta" else float(a.item() if a.numel() == 1 else a.flatten()[0])
                bare = name.partition("_")[2].partition("_")[2] if not name.startswith("lycoris_") else name[len("lycoris_"):]
                mods = out.setdefault(comp, {})
                if module in mods:  # the converter gave two file modules one path: keep both, resolved by name later
                    other = mods.pop(module)
                    mods[other.source or module] = other
                    module = bare
                mods[module] = RawLayer(parts, alpha, bare)
        finally:
            quiet.setLevel(level)
        return out


LAYOUTS: tuple[type[KeyLayout], ...] = (KohyaLayout, PeftLayout, OldDiffusersLayout)


def detect_layout(keys: list[str], path=None) -> type[KeyLayout]:
    """The layout of a LoRA file's keys, or a clear error for unsupported or non-LoRA content."""
    unsupported = find_unsupported(keys)
    if unsupported:
        kinds = "; ".join(f"{name} (e.g. {ex[0]!r})" for name, ex in unsupported.items())
        raise UnsupportedLoRAFormat(
            path,
            f"contains adapter weights loraloom does not support: {kinds}.",
            "loraloom composes LoRA, LoCon, Tucker LoCon, LoHa, LoKr, DoRA, OFT, BOFT, full and norm diffs; convert the "
            "adapter to one of these (e.g. extract a LoRA from the fine-tuned weights) or use a tool that supports its type.",
        )
    for layout in LAYOUTS:
        if layout.matches(keys):
            if layout is not KohyaLayout:
                lycoris = _lycoris_segments(keys)
                if lycoris:
                    kinds = "; ".join(f"{name} (e.g. {ex[0]!r})" for name, ex in lycoris.items())
                    raise UnsupportedLoRAFormat(
                        path, f"holds LyCORIS adapter keys in the {layout.name} layout, which loraloom reads only in the "
                              f"kohya/LyCORIS layout (`lora_unet_…`): {kinds}.",
                        "save the adapter with LyCORIS' or kohya's own tools (kohya key names).")
            return layout
    example = ", ".join(repr(k) for k in list(keys)[:3])
    raise LoRAFileError(
        path,
        f"does not contain LoRA weights (no lora_A/lora_B, lora_down/lora_up or LyCORIS keys; found {len(keys)} keys "
        f"such as {example}). It looks like a full model checkpoint, an embedding or another kind of file.",
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
