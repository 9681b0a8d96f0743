"""LoRA files for the diffusion-transformer families (FLUX.1, SD 3/3.5): key layouts brought to diffusers' PEFT
module names by diffusers' own converters, then the same adapter objects, description and checks as every LoRA.

FLUX.1 layouts read (`FluxLoraLoaderMixin.lora_state_dict` converts each):

- diffusers/PEFT (`transformer.…lora_A.weight`, alphas in `lora_adapter_metadata` or `.alpha` keys; ai-toolkit and
  SimpleTuner save this), and its spelling with kohya's factor names (`transformer.….lora_down.weight`, no alpha);
- kohya/sd-scripts (`lora_unet_double_blocks_…`, `lora_unet_single_blocks_…`, CLIP-L as `lora_te1_…`; alpha folded
  into the factors by the converter);
- ComfyUI (BFL paths under `diffusion_model.` with `lora_down`/`lora_up`/`alpha`, CLIP-L under
  `text_encoders.clip_l.transformer.`);
- OneTrainer (`lora_transformer_…`: kohya-style spellings of diffusers' paths; the converter maps the blocks'
  attention projections, the embedders and the output layers, and CLIP-L as `lora_te1_…`);
- XLabs (`double_blocks.N.processor.…`);
- LyCORIS (LoRA/LoCon, LoHa, LoKr, full diffs, DoRA) in kohya or ComfyUI names: `fused_lycoris` (the converter's
  module map, BFL's fused q/k/v and linear1 split by rows).

Refused by name: BFL's names with PEFT factors (`diffusion_model.double_blocks.N.img_attn.qkv.lora_A.weight`: no
diffusers converter reads them), BFL's Control LoRAs (`query_norm.scale` keys: norm weights and a widened input
layer for FluxControlPipeline), T5 text-encoder layers (`lora_te3_`/`lora_te2_`, `text_encoders.t5xxl.`: the
converter drops them), OneTrainer block layers other than attention (the converter has no path for them).

SD 3/3.5 (`SD3LoraLoaderMixin.lora_state_dict`): the diffusers/PEFT layout only; kohya/sd-scripts
(`lora_unet_joint_blocks_…`), OneTrainer and ComfyUI SD3 files are refused by name (diffusers converts none of them).

Base family: the header (`modelspec.architecture`, `ss_base_model_version`) read by `metadata.family_key`, else the
key names (`key_families`). The SD layouts' reader (`lora_formats`) refuses `transformer.` keys; this module is the
reader for these families.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch

from . import fused_lycoris
from .errors import IncompatibleLoRA, LoRAFileError
from .lora import LoRA, LoRAInfo, build_adapters, check_finite, describe_lora, read_lora_info, tensor_element_size
from .lora_file import read_header, read_tensors
from .lora_formats import RawLayer, alphas_from_adapter_metadata, mixed_to_peft
from .metadata import FAMILY_NAMES, family_key

COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
_PEFT_KEY = re.compile(r"^(.*)\.lora_(A|B)\.weight$")
# Keys of UNet LoRAs (diffusers and kohya spellings of SD 1.x/2.x/XL blocks).
_UNET_KEY = re.compile(r"^unet\.|^lora_unet_(down_blocks|up_blocks|mid_block|input_blocks|output_blocks|middle_block)_"
                       r"|^diffusion_model\.(input_blocks|output_blocks|middle_block)\.")


def key_families(keys) -> tuple[tuple[str, ...], str | None]:
    """Families the key names fit, with the evidence: FLUX's single-stream blocks or kohya/BFL block names; SD3's
    joint blocks; a UNet's blocks (SD 1.x/2.x/XL)."""
    keys = list(keys)
    if any(_UNET_KEY.search(k) for k in keys):
        return ("sd1", "sd2", "sdxl"), "UNet block names"
    if any(("single_transformer_blocks" in k or "single_blocks" in k or "double_blocks" in k) for k in keys):
        return ("flux",), "FLUX double/single-stream block names"
    if any("joint_blocks" in k or "context_block" in k for k in keys):
        return ("sd3",), "SD3 joint block names"
    return (), None


def layout_name(keys) -> str:
    """The layout as `loraloom loras` shows it: kohya (sd-scripts `lora_unet_…`/`lora_te1_…`, OneTrainer's
    `lora_transformer_…`, LyCORIS in kohya names), xlabs, bfl-control, fal-kontext (`base_model.model.double_blocks…`),
    comfyui (`diffusion_model.` BFL paths with `lora_down`), bfl (the same paths with `lora_A`) or diffusers-peft."""
    keys = list(keys)
    if any(k.startswith(("lora_unet_", "lora_te", "lora_transformer_")) for k in keys):
        return "kohya"
    if any(".processor." in k for k in keys):
        return "xlabs"
    if any("query_norm.scale" in k for k in keys):
        return "bfl-control"
    if any(k.startswith("base_model.model.") and ("double_blocks." in k or "single_blocks." in k) for k in keys):
        return "fal-kontext"
    if any(k.startswith("diffusion_model.") for k in keys):
        return "comfyui" if any(".lora_down." in k or fused_lycoris.is_lycoris([k]) for k in keys) else "bfl"
    return "diffusers-peft"


_T5_PREFIXES = ("lora_te3_", "lora_te2_", "text_encoders.t5xxl.")


def refuse_unconverted(state_dict: dict[str, torch.Tensor], family: str, path) -> dict[str, torch.Tensor]:
    """Refuse, naming the layout, what diffusers' converters do not read (or would silently drop); returns the state
    dict without parts that are all zeros where diffusers drops them too (T5 layers)."""
    keys = list(state_dict)
    layout = layout_name(keys)
    if family == "sd3":
        if layout != "diffusers-peft" or any("joint_blocks" in k for k in keys):
            example = next((k for k in keys if not k.startswith(("transformer.", "text_encoder"))), keys[0])
            raise LoRAFileError(path, f"is an SD3 LoRA in the {layout} layout (e.g. {example!r}); diffusers has no converter "
                                      "for SD3 LoRAs in kohya/sd-scripts (`lora_unet_joint_blocks_…`), OneTrainer or ComfyUI "
                                      "names, and loraloom reads SD3 LoRAs through diffusers (the diffusers/PEFT layout only).",
                                "use the LoRA in the diffusers layout (`transformer.transformer_blocks.N.attn.to_q.lora_A.weight`), "
                                "e.g. the trainer's diffusers export.")
        return state_dict
    if layout == "bfl":
        raise LoRAFileError(path, "is in BFL's key layout with PEFT factor names (`diffusion_model.double_blocks.N.img_attn.qkv."
                                  "lora_A.weight`), which diffusers' FLUX.1 converter does not read (it reads these paths "
                                  "with kohya's `lora_down`/`lora_up`, as ComfyUI saves them).",
                            "use the LoRA in the diffusers (`transformer.…lora_A.weight`), kohya or ComfyUI layout.")
    if layout == "bfl-control":
        raise LoRAFileError(path, "is a FLUX.1 Control LoRA (BFL's Canny/Depth layout: `query_norm.scale` norm weights and a "
                                  "widened input layer), made for FluxControlPipeline with a control image, not for "
                                  "text-to-image composition.", "use a FLUX.1 text-to-image LoRA.")
    t5 = [k for k in keys if k.startswith(_T5_PREFIXES)]
    if t5:
        if any(bool(state_dict[k].any()) for k in t5):
            raise LoRAFileError(path, f"has T5-XXL text-encoder layers (e.g. {t5[0]!r}), which diffusers' FLUX.1 converter "
                                      "does not load (it drops them); loraloom does not apply LoRA layers to FLUX's T5 encoder.",
                                "use the LoRA without its T5 part (re-export it with the T5 layers left out).")
        state_dict = {k: v for k, v in state_dict.items() if k not in set(t5)}  # all zeros: no effect (diffusers drops them)
    if any(k.startswith("lora_transformer_") for k in keys):
        unmapped = sorted({k.partition(".")[0] for k in keys if re.match(r"lora_transformer_(single_)?transformer_blocks_\d+_", k)
                           and "_attn_" not in k})
        if unmapped:
            raise LoRAFileError(path, f"is a OneTrainer-style FLUX.1 LoRA (`lora_transformer_…`) with block layers diffusers' "
                                      f"converter has no mapping for (it maps attention projections only): {unmapped[:3]}.",
                                "use the LoRA in the diffusers (`transformer.…lora_A.weight`) or kohya (`lora_unet_…`) layout.")
    return state_dict


def _to_diffusers(state_dict: dict[str, torch.Tensor], family: str, path) -> tuple[dict[str, torch.Tensor], dict]:
    """diffusers' converter for the family: (PEFT-named state dict, {key.alpha: value})."""
    from diffusers.loaders import FluxLoraLoaderMixin, SD3LoraLoaderMixin

    quiet = logging.getLogger("diffusers.loaders.lora_conversion_utils")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        if family == "flux":
            out, alphas = FluxLoraLoaderMixin.lora_state_dict(dict(state_dict), return_alphas=True)
        else:
            out, alphas = SD3LoraLoaderMixin.lora_state_dict(dict(state_dict)), {}
    except (ValueError, KeyError, IndexError, RuntimeError, AttributeError, AssertionError, NotImplementedError) as err:
        raise LoRAFileError(path, f"cannot be read as a {FAMILY_NAMES[family]} LoRA ({str(err).splitlines()[0][:200]}).",
                            f"check that the file is a LoRA for {FAMILY_NAMES[family]}.") from None
    finally:
        quiet.setLevel(level)
    # the converter spells CLIP's layers in old diffusers names (`self_attn.to_q_lora.down`, `lora_linear_layer`)
    return mixed_to_peft(out), dict(alphas or {})


def _split(key: str) -> tuple[str, str]:
    key = key.removeprefix("base_model.model.")
    for comp in COMPONENTS:
        if key.startswith(comp + "."):
            return comp, key[len(comp) + 1:]
    return "transformer", key  # a bare transformer state dict (PEFT's get_peft_model_state_dict)


def group_layers(state_dict: dict[str, torch.Tensor], alphas: dict, path) -> dict[str, dict[str, RawLayer]]:
    """{component: {module: RawLayer}} from PEFT-named keys; anything else is refused by name."""
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        comp, rest = _split(key)
        m = _PEFT_KEY.match(rest)
        if m is None:
            raise LoRAFileError(path, f"has a key loraloom does not read on transformer models: {key!r}.",
                                "loraloom reads LoRA factors (lora_A/lora_B, lora_down/lora_up) on FLUX.1 and SD3 models; "
                                "biases, norms and other adapter types are not supported there yet.")
        parts.setdefault((comp, m.group(1)), {})["down" if m.group(2) == "A" else "up"] = value
    alpha_of = {}
    for key, value in alphas.items():
        comp, rest = _split(key)
        alpha_of[(comp, rest.removesuffix(".alpha"))] = float(value.flatten()[0]) if torch.is_tensor(value) else float(value)
    out: dict[str, dict[str, RawLayer]] = {}
    for (comp, module), p in parts.items():
        if set(p) != {"down", "up"}:
            missing = "lora_B (up)" if "up" not in p else "lora_A (down)"
            raise LoRAFileError(path, f"module {comp}.{module} has no {missing} weight.", "the file is incomplete; export it again.")
        out.setdefault(comp, {})[module] = RawLayer(p, alpha_of.get((comp, module)))
    return out


def load_transformer_lora(path: str | os.PathLike, family: str, name: str | None = None, *, allow_pickle: bool = False,
                          dtype: torch.dtype | None = None) -> LoRA:
    """Load a LoRA file for a `family` ('flux' or 'sd3') model. A file made for another family is refused (its
    header, else its key names) before anything is converted."""
    path = Path(path)
    state_dict, metadata = read_tensors(path, allow_pickle=allow_pickle)
    check_finite(state_dict, path)
    families, evidence = key_families(state_dict)
    if families and family not in families:
        made_for = " or ".join(FAMILY_NAMES.get(f, f) for f in families)
        raise IncompatibleLoRA(path, f"has keys for {made_for} ({evidence}), but the loaded model is {FAMILY_NAMES[family]}.",
                               f"use a {FAMILY_NAMES[family]} LoRA, or load a {made_for} base model.")
    state_dict = refuse_unconverted(state_dict, family, path)
    if family == "flux" and fused_lycoris.is_lycoris(state_dict):
        raw = fused_lycoris.flux_lycoris_layers(state_dict, lambda sd: _to_diffusers(sd, family, path)[0], path)
    else:
        converted, alphas = _to_diffusers(state_dict, family, path)
        raw = group_layers(converted, alphas, path)
    if not any(raw.values()):
        raise LoRAFileError(path, "holds no LoRA layers after conversion.", "check the file.")
    alphas_from_adapter_metadata(metadata, raw, path)
    adapters = build_adapters(raw, path)
    stem = name or path.stem
    info = describe_lora(path, stem, layout_name(state_dict), adapters,
                         metadata, path.stat().st_size, (), tensor_element_size(state_dict))
    # The SD key clues (text-encoder widths) say nothing here: these families' own evidence replaces them.
    info.key_families, info.key_evidence = (families, evidence) if families else ((), None)
    header = family_key(info.family) if info.family_source and not info.family_source.startswith("keys:") else None
    info.family, info.family_source = (header, info.family_source) if header else (
        (families[0], f"keys: {evidence}") if len(families) == 1 else (None, None))
    lora = LoRA(name=stem, layers=adapters, info=info)
    if dtype is not None:
        lora.to(dtype=dtype)
    return lora


def is_transformer_lora(keys) -> bool:
    """True for a file whose keys are a diffusion transformer's (FLUX.1/SD3): `transformer.` or `lora_transformer_`
    names, or block names only those models have."""
    keys = list(keys)
    if any(k.removeprefix("base_model.model.").startswith(("transformer.", "lora_transformer_")) for k in keys):
        return True
    families, _ = key_families(keys)
    return bool(families) and set(families) <= {"flux", "sd3"}


def read_any_lora_info(path: str | os.PathLike, allow_pickle: bool = False) -> LoRAInfo:
    """`lora.read_lora_info` for any family: SD LoRAs from the header alone; FLUX.1/SD3 LoRAs are loaded (their
    converters work on values), as the family their header or keys name (FLUX.1 when neither says)."""
    header = read_header(path, allow_pickle=allow_pickle)
    if not is_transformer_lora(header.shapes):
        return read_lora_info(path, allow_pickle=allow_pickle)
    families, _ = key_families(header.shapes)
    from .metadata import family_from_metadata

    named = family_key(family_from_metadata(header.metadata)[0])
    family = families[0] if len(families) == 1 else named if named in ("flux", "sd3") else "flux"
    return load_transformer_lora(path, family, allow_pickle=allow_pickle).info
