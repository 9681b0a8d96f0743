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
- LyCORIS (LoRA/LoCon, LoHa, LoKr, full diffs, DoRA) in kohya or ComfyUI names, and LoRAs with a bias diff
  (`diff_b` beside `lora_down`/`lora_up`: ComfyUI's "Extract and Save Lora" with bias_diff; diffusers drops diff_b):
  `fused_lycoris` (the converter's module map, BFL's fused q/k/v and linear1 split by rows; norm diffs refused).

Read by loraloom before the converter (`respell_peft_names`, `t5_layers`, `fold_final_layer_alpha`):

- BFL module paths with PEFT factor names: fal's Kontext LoRAs (`base_model.model.double_blocks.N.img_attn.qkv.
  lora_A.weight`) and the bare and `diffusion_model.` spellings ComfyUI also loads — respelled as ComfyUI's;
- PEFT's `save_pretrained` folders (`adapter_model.safetensors` with `base_model.model.` + diffusers paths, alpha from
  `adapter_config.json` beside it) — respelled as diffusers';
- T5-XXL text-encoder layers (sd-scripts `lora_te3_`, OneTrainer `lora_te2_`, ComfyUI `text_encoders.t5xxl.`), which
  the converter drops: applied to `text_encoder_2`;
- the final layer's alpha, which the converter leaves out (and diffusers then drops the layer): folded in.

Refused by name: BFL's Control LoRAs (`query_norm.scale` keys: norm weights and a widened input layer for
FluxControlPipeline), OneTrainer block layers other than attention (the converter has no path for them).

SD 3/3.5 (`SD3LoraLoaderMixin.lora_state_dict`): the diffusers/PEFT layout and PEFT `save_pretrained` folders; kohya/sd-scripts
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
from .lora_file import lora_name, peft_adapter_metadata, read_header, read_tensors
from .lora_formats import KOHYA_PARTS, RawLayer, alphas_from_adapter_metadata, mixed_to_peft
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


# BFL's own module paths (the original FLUX.1 code's names), bare or under a prefix ComfyUI accepts.
_BFL_PATH = re.compile(r"^(?:diffusion_model\.|base_model\.model\.|model\.diffusion_model\.)?"
                       r"((?:double_blocks|single_blocks)\.\d+\.|final_layer\.|(?:img|txt|time|vector|guidance)_in\.)")
# Top-level modules of diffusers' FLUX/SD3 transformers (what PEFT's `save_pretrained` writes under `base_model.model.`).
_DIFFUSERS_PATH = re.compile(r"^base_model\.model\.((?:single_)?transformer_blocks\.|x_embedder\.|context_embedder\.|"
                             r"time_text_embed\.|norm_out\.|proj_out\.|pos_embed\.)")


def layout_name(keys) -> str:
    """The layout as `loraloom loras` shows it: kohya (sd-scripts `lora_unet_…`/`lora_te1_…`, OneTrainer's
    `lora_transformer_…`, LyCORIS in kohya names), xlabs, bfl-control, fal-kontext (`base_model.model.double_blocks…`),
    comfyui (`diffusion_model.` BFL paths with `lora_down`), bfl (BFL paths with `lora_A`, bare or under
    `diffusion_model.`), peft-adapter (PEFT's `save_pretrained`: `base_model.model.` + diffusers paths) or
    diffusers-peft."""
    keys = list(keys)
    if any(k.startswith(("lora_unet_", "lora_te", "lora_transformer_")) for k in keys):
        return "kohya"
    if any(".processor." in k for k in keys):
        return "xlabs"
    if any("query_norm.scale" in k for k in keys):
        return "bfl-control"
    if any(k.startswith("base_model.model.") and _BFL_PATH.match(k) for k in keys):
        return "fal-kontext"
    if any(_DIFFUSERS_PATH.match(k) for k in keys):
        return "peft-adapter"
    if any(k.startswith("diffusion_model.") for k in keys):
        return "comfyui" if any(".lora_down." in k or fused_lycoris.is_lycoris([k]) for k in keys) else "bfl"
    if any(_BFL_PATH.match(k) for k in keys):
        return "bfl"
    return "diffusers-peft"


def respell_peft_names(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Two PEFT spellings diffusers' FLUX.1 converter misreads, respelled to ones it reads (values untouched):

    - BFL module paths with PEFT factor names — fal's Kontext LoRAs (`base_model.model.double_blocks.N.img_attn.qkv.
      lora_A.weight`), and the bare and `diffusion_model.` spellings ComfyUI's loader also takes — become ComfyUI's
      `diffusion_model.….lora_down.weight` / `lora_up.weight` (alpha keys kept; a file without them is read at
      alpha = rank, as ComfyUI and diffusers' fal converter read it). diffusers' own fal converter is not used: it
      hard-codes FLUX.1's 19 + 38 blocks and 3072 width, so it reads no other size and refuses a file that leaves a
      module out; on FLUX.1-sized files both give the same state dict (tested).
    - PEFT's `save_pretrained` of a diffusers transformer (`base_model.model.transformer_blocks.…`) becomes
      `transformer.…` (diffusers would take any `base_model` key for a fal Kontext file).
    """
    out = {}
    for key, value in state_dict.items():
        if _DIFFUSERS_PATH.match(key):
            key = "transformer." + key.removeprefix("base_model.model.")
        elif (m := _BFL_PATH.match(key)) is not None:
            rest = key[m.start(1):]
            rest = re.sub(r"\.lora_A(\.default)?\.weight$", ".lora_down.weight", rest)
            rest = re.sub(r"\.lora_B(\.default)?\.weight$", ".lora_up.weight", rest)
            key = "diffusion_model." + rest
        out[key] = value
    return out


_T5_PREFIXES = ("lora_te3_", "lora_te2_", "text_encoders.t5xxl.transformer.")
# sd-scripts (`lora_te3_`, ComfyUI's slot for T5) and OneTrainer (`lora_te2_`) spell T5's module paths with `_` for `.`;
# T5's own names hold underscores too (`SelfAttention`, `DenseReluDense`, `wi_0`), so the path is parsed, not guessed.
_T5_KOHYA = re.compile(r"^(?:lora_te3_|lora_te2_)encoder_block_(\d+)_layer_(\d+)_(SelfAttention|DenseReluDense)_"
                       r"(q|k|v|o|wi_0|wi_1|wi|wo)$")


def t5_module(name: str) -> str | None:
    """The T5 encoder's module path (transformers' `T5EncoderModel`: `encoder.block.N.layer.M.SelfAttention.q`) of a
    kohya (`lora_te3_encoder_block_0_layer_0_SelfAttention_q`) or ComfyUI (`text_encoders.t5xxl.transformer.encoder.
    block.0.layer.0.SelfAttention.q`) module name; None when it is not one."""
    if name.startswith("text_encoders.t5xxl.transformer."):
        return name.removeprefix("text_encoders.t5xxl.transformer.")
    m = _T5_KOHYA.match(name)
    if m is None:
        return None
    block, layer, sub, proj = m.groups()
    return f"encoder.block.{block}.layer.{layer}.{sub}.{proj}"


def t5_layers(state_dict: dict[str, torch.Tensor], path) -> tuple[dict[str, torch.Tensor], dict[str, RawLayer]]:
    """(the state dict without its T5 part, {T5 module path: RawLayer}) for FLUX.1's T5-XXL encoder
    (`text_encoder_2`).

    diffusers' FLUX converter drops T5 layers (with a log line), so a LoRA trained with them (sd-scripts
    `--network_train_t5_attn`, OneTrainer, ai-toolkit's ComfyUI export) would lose part of what it learnt; loraloom
    reads them itself: kohya factor names (`lora_down`/`lora_up`/`alpha`, and LyCORIS's) per module, applied as on
    every other layer. A part that is all zeros is dropped as diffusers drops it (it changes nothing)."""
    t5 = {k: v for k, v in state_dict.items() if k.startswith(_T5_PREFIXES)}
    if not t5:
        return state_dict, {}
    rest = {k: v for k, v in state_dict.items() if k not in t5}
    if not any(bool(v.any()) for v in t5.values()):
        return rest, {}
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in t5.items():
        parts = fused_lycoris.split_key(key)
        module = t5_module(parts[0]) if parts else None
        if module is None:
            raise LoRAFileError(path, f"has a T5 text-encoder key loraloom does not read: {key!r}.",
                                "loraloom reads T5 layers as `lora_te3_encoder_block_N_layer_M_SelfAttention_q.lora_down."
                                "weight` (sd-scripts), `lora_te2_…` (OneTrainer) or `text_encoders.t5xxl.transformer.…` "
                                "(ComfyUI); re-export the LoRA without its T5 part if it is in another layout.")
        modules.setdefault(module, {})[parts[1]] = value
    out = {}
    for module, keys in modules.items():
        alpha_t = keys.pop("alpha", None)
        out[module] = RawLayer({KOHYA_PARTS[k]: v for k, v in keys.items()},
                               None if alpha_t is None else float(alpha_t.flatten()[0]), module)
    return rest, out


def refuse_unconverted(state_dict: dict[str, torch.Tensor], family: str, path) -> dict[str, torch.Tensor]:
    """Refuse, naming the layout, what diffusers' converters do not read (or would silently drop)."""
    keys = list(state_dict)
    layout = layout_name(keys)
    if family == "sd3":
        if layout not in ("diffusers-peft", "peft-adapter") or any("joint_blocks" in k for k in keys):
            example = next((k for k in keys if not k.startswith(("transformer.", "text_encoder"))), keys[0])
            raise LoRAFileError(path, f"is an SD3 LoRA in the {layout} layout (e.g. {example!r}); diffusers has no converter "
                                      "for SD3 LoRAs in kohya/sd-scripts (`lora_unet_joint_blocks_…`), OneTrainer or ComfyUI "
                                      "names, and loraloom reads SD3 LoRAs through diffusers (the diffusers/PEFT layout only).",
                                "use the LoRA in the diffusers layout (`transformer.transformer_blocks.N.attn.to_q.lora_A.weight`), "
                                "e.g. the trainer's diffusers export.")
        return state_dict
    if layout == "bfl-control":
        raise LoRAFileError(path, "is a FLUX.1 Control LoRA (BFL's Canny/Depth layout: `query_norm.scale` norm weights and a "
                                  "widened input layer), made for FluxControlPipeline with a control image, not for "
                                  "text-to-image composition.", "use a FLUX.1 text-to-image LoRA.")
    if any(k.startswith("lora_transformer_") for k in keys):
        unmapped = sorted({k.partition(".")[0] for k in keys if re.match(r"lora_transformer_(single_)?transformer_blocks_\d+_", k)
                           and "_attn_" not in k})
        if unmapped:
            raise LoRAFileError(path, f"is a OneTrainer-style FLUX.1 LoRA (`lora_transformer_…`) with block layers diffusers' "
                                      f"converter has no mapping for (it maps attention projections only): {unmapped[:3]}.",
                                "use the LoRA in the diffusers (`transformer.…lora_A.weight`) or kohya (`lora_unet_…`) layout.")
    return state_dict


_FINAL_LAYER = re.compile(r"^(lora_unet_final_layer_(?:linear|adaLN_modulation_1)|diffusion_model\.final_layer\."
                          r"(?:linear|adaLN_modulation\.1))\.alpha$")


def fold_final_layer_alpha(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The final layer's alpha folded into its down factor (down · alpha/rank), its alpha key dropped.

    diffusers 0.42's kohya/ComfyUI FLUX converter copies `final_layer.linear` and `final_layer.adaLN_modulation.1`
    without their alpha ("TODO: alphas" there) and names them without the `transformer.` prefix, so its own
    `load_lora_weights` drops them; ComfyUI and sd-scripts apply them at alpha/rank. loraloom applies them as those
    do: folded here, the converter's values are the producer's update."""
    out = dict(state_dict)
    for key in state_dict:
        m = _FINAL_LAYER.match(key)
        if m is None or f"{m.group(1)}.lora_down.weight" not in out:
            continue
        down = out[f"{m.group(1)}.lora_down.weight"]
        alpha = float(out.pop(key).flatten()[0])
        out[f"{m.group(1)}.lora_down.weight"] = down * (alpha / down.shape[0])
    return out


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
    original_keys = list(state_dict)
    state_dict = respell_peft_names(refuse_unconverted(state_dict, family, path))
    if layout_name(original_keys) == "peft-adapter":
        metadata = peft_adapter_metadata(path, metadata, "transformer")
    t5 = {}
    if family == "flux":
        state_dict, t5 = t5_layers(state_dict, path)
    if family == "flux" and fused_lycoris.is_lycoris(state_dict):
        raw = fused_lycoris.flux_lycoris_layers(state_dict, lambda sd: _to_diffusers(sd, family, path)[0], path)
    else:
        converted, alphas = _to_diffusers(fold_final_layer_alpha(state_dict) if family == "flux" else state_dict, family, path)
        raw = group_layers(converted, alphas, path)
    if t5:
        raw.setdefault("text_encoder_2", {}).update(t5)
    if not any(raw.values()):
        raise LoRAFileError(path, "holds no LoRA layers after conversion.", "check the file.")
    alphas_from_adapter_metadata(metadata, raw, path)
    adapters = build_adapters(raw, path)
    stem = name or lora_name(path)
    info = describe_lora(path, stem, layout_name(original_keys), adapters,
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
    if any(k.removeprefix("base_model.model.").startswith(("transformer.", "lora_transformer_")) or _DIFFUSERS_PATH.match(k)
           for k in keys):
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
