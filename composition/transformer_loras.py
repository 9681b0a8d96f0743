"""LoRA files for the diffusion-transformer families (FLUX.1, SD 3/3.5): key layouts brought to diffusers' PEFT
module names by diffusers' own converters, then the same adapter objects, description and checks as every LoRA.

FLUX.1 (`FluxLoraLoaderMixin.lora_state_dict`): diffusers/PEFT (`transformer.…lora_A.weight`, alphas in
`lora_adapter_metadata` or `.alpha` keys), kohya/sd-scripts (`lora_unet_double_blocks_…`, `lora_unet_single_blocks_…`,
`lora_te1_…`; alpha folded into the factors by the converter), XLabs (`double_blocks.N.processor.…`), BFL and
ai-toolkit/OneTrainer spellings the converter knows. SD 3/3.5 (`SD3LoraLoaderMixin.lora_state_dict`): the
diffusers/PEFT layout. Base family: the header (`modelspec.architecture`, `ss_base_model_version`) read by
`metadata.family_key`, else the key names (`key_families`).

The SD layouts' reader (`lora_formats`) refuses `transformer.` keys; this module is the reader for these families.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch

from .errors import IncompatibleLoRA, LoRAFileError
from .lora import LoRA, LoRAInfo, build_adapters, check_finite, describe_lora, read_lora_info, tensor_element_size
from .lora_file import read_header, read_tensors
from .lora_formats import RawLayer, alphas_from_adapter_metadata
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
    """The layout as `loraloom loras` shows it: kohya, xlabs, bfl (`diffusion_model.`) or diffusers-peft."""
    keys = list(keys)
    if any(k.startswith(("lora_unet_", "lora_te", "lora_transformer_")) for k in keys):
        return "kohya"
    if any(".processor." in k for k in keys):
        return "xlabs"
    if any(k.startswith("diffusion_model.") for k in keys):
        return "bfl"
    return "diffusers-peft"


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
    except (ValueError, KeyError, IndexError, RuntimeError, AttributeError) as err:
        raise LoRAFileError(path, f"cannot be read as a {FAMILY_NAMES[family]} LoRA ({str(err).splitlines()[0][:200]}).",
                            f"check that the file is a LoRA for {FAMILY_NAMES[family]}.") from None
    finally:
        quiet.setLevel(level)
    return out, dict(alphas or {})


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
