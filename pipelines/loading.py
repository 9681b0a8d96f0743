"""Loading base models: a diffusers folder, a hub id (optionally `local_files_only`), a single-file checkpoint,
or a tiny offline model (`tiny:sd1`, `tiny:sdxl`, `tiny:flux`, `tiny:sd3`)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from loraloom.composition.errors import LoraloomError

DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}
SUPPORTED_PIPELINES = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl", "FluxPipeline": "flux",
                       "StableDiffusion3Pipeline": "sd3"}


class ModelLoadError(LoraloomError, ValueError):
    pass


def pipeline_family(pipe) -> str:
    """'sd1', 'sd2', 'sdxl', 'flux' or 'sd3' from the loaded pipeline (`pipelines.families`)."""
    from .families import pipeline_family as family_name

    return family_name(pipe)


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return getattr(torch, DTYPES[str(dtype)])
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}") from None


# Every original-layout SD 1.x/2.x/SDXL checkpoint keeps its UNet under this prefix (diffusers reads nothing else).
LDM_UNET_PREFIX = "model.diffusion_model."
# Layouts diffusers also tells apart by their keys (`single_file_utils.CHECKPOINT_KEY_NAMES`) that share FLUX.1's
# `double_blocks.` names but are other models: refused by name rather than loaded as FLUX.1.
OTHER_DIT_LAYOUTS = {"flux2": "FLUX.2", "chroma": "Chroma"}
FAMILY_LABELS = {"sd": "Stable Diffusion 1.x/2.x/XL", "flux": "FLUX.1", "sd3": "SD 3/3.5"}
DIT_CLASSES = {"flux": ("FluxPipeline", "FluxTransformer2DModel"),
               "sd3": ("StableDiffusion3Pipeline", "SD3Transformer2DModel")}
# Where the all-in-one saves keep the VAE and the text encoders (diffusers' LDM_VAE_KEYS, CHECKPOINT_KEY_NAMES).
VAE_PREFIXES = ("first_stage_model.", "vae.")
TEXT_ENCODER_PREFIXES = {"flux": ("text_encoders.clip_l.", "text_encoders.t5xxl."),
                         "sd3": ("text_encoders.clip_l.", "text_encoders.clip_g.", "text_encoders.t5xxl.")}
CONFIG_EXAMPLES = {"flux": "black-forest-labs/FLUX.1-dev for a FLUX.1-dev file, black-forest-labs/FLUX.1-schnell for schnell",
                   "sd3": "stabilityai/stable-diffusion-3.5-large for SD 3.5 Large, "
                          "stabilityai/stable-diffusion-3-medium-diffusers for SD 3 Medium"}


def _file_keys(path: Path) -> list[str]:
    """The tensor names of a .safetensors file (its header only)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as err:
        raise ModelLoadError(f"{path}: not a readable .safetensors file ({err}).") from err


def single_file_family(path: str | Path, family: str | None = None) -> str:
    """'sd' (SD 1.x/2.x/XL), 'flux' or 'sd3' from a single-file checkpoint's keys (header only), by the keys diffusers'
    single-file loader checks (`CHECKPOINT_KEY_NAMES`: FLUX.1's `double_blocks.0.img_attn.norm.key_norm.scale`, SD3's
    `joint_blocks.0.context_block.adaLN_modulation.1.bias`, with or without `model.diffusion_model.`). Files of no
    known layout are refused naming the file, as is a `family` the keys contradict."""
    from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES

    path = Path(path)
    keys = set(_file_keys(path))

    def has(name: str) -> bool:
        return any(k in keys for k in CHECKPOINT_KEY_NAMES[name])

    for name, label in OTHER_DIT_LAYOUTS.items():
        if has(name):
            raise ModelLoadError(f"{path}: a {label} checkpoint; loraloom runs Stable Diffusion 1.x/2.x/XL, SD 3/3.5 and "
                                 "FLUX.1.")
    if has("flux"):
        found = "flux"
    elif has("sd3") or has("sd35_large"):
        found = "sd3"
    elif any(k.startswith(LDM_UNET_PREFIX) for k in keys):
        found = "sd"
    else:
        listed = sorted(keys)
        example = ", ".join(repr(k) for k in listed[:3]) or "none"
        if any(re.search(r"lora|hada_|lokr_", k, re.IGNORECASE) for k in keys):
            raise ModelLoadError(f"{path}: this is a LoRA/adapter file, not a base model ({len(keys)} tensors such as "
                                 f"{example}). Load it as a LoRA on top of a base model.")
        raise ModelLoadError(
            f"{path}: not a Stable Diffusion checkpoint (SD 1.x/2.x/XL, SD 3/3.5 or FLUX.1) in the original layout: none "
            f"of its {len(keys)} tensors is a UNet weight ({LDM_UNET_PREFIX}*), an SD3 joint block (joint_blocks.N.*) or "
            f"a FLUX.1 double-stream block (double_blocks.N.*); keys such as {example}.")
    given = "sd" if family in ("sd1", "sd2", "sdxl") else family
    if given is not None and given != found:
        raise ModelLoadError(f"{path}: the family was given as {family}, but the file's keys are a {FAMILY_LABELS[found]} "
                             "checkpoint's. Leave the family out (it is read from the file) or give the right one.")
    return found


def _load_dit_single_file(path: Path, family: str, *, torch_dtype, local_files_only: bool, config: str | None):
    """A FLUX.1 or SD 3/3.5 pipeline from an original-layout file and the diffusers folder or hub id `config`.

    The transformer comes from the file (the transformer class's `from_single_file`), and so does the VAE where the
    file has one (`first_stage_model.*` / `vae.*`: `AutoencoderKL.from_single_file`); everything else (text encoders,
    tokenizers, scheduler) from `config`. A file that holds every text encoder too (the all-in-one saves:
    `text_encoders.clip_l.*`, `clip_g.*` for SD3, `t5xxl.*`) loads through the pipeline's `from_single_file`, which
    reads every model from the file. (diffusers' pipeline loader looks for text-encoder weights in the config folder
    under diffusers' weight names, which transformers does not use, so it cannot fill in missing encoders.)"""
    import diffusers

    pipe_name, transformer_name = DIT_CLASSES[family]
    label = FAMILY_LABELS[family]
    if not config:
        raise ModelLoadError(
            f"{path}: a {label} single file needs the model config (--model-config / model_config): a diffusers "
            f"{pipe_name} folder or hub id of the same architecture (e.g. {CONFIG_EXAMPLES[family]}). Its text "
            "encoders, tokenizers, VAE and scheduler are read from there where the file has none.")
    index = Path(config).expanduser() / "model_index.json"
    if index.is_file():
        class_name = json.loads(index.read_text()).get("_class_name")
        if class_name != pipe_name:
            raise ModelLoadError(f"{path}: a {label} checkpoint, but the model config {config} is a {class_name} folder; "
                                 f"give a diffusers {pipe_name} folder or hub id (--model-config / model_config).")
    pipe_cls, transformer_cls = getattr(diffusers, pipe_name), getattr(diffusers, transformer_name)
    keys = _file_keys(path)
    has_vae = any(k.startswith(VAE_PREFIXES) for k in keys)
    has_encoders = all(any(k.startswith(prefix) for k in keys) for prefix in TEXT_ENCODER_PREFIXES[family])
    kwargs = {"config": config, "dtype": torch_dtype, "local_files_only": local_files_only}
    try:
        if has_vae and has_encoders:
            return pipe_cls.from_single_file(str(path), **kwargs)
        models = {"transformer": transformer_cls.from_single_file(str(path), subfolder="transformer", **kwargs)}
        if has_vae:
            models["vae"] = diffusers.AutoencoderKL.from_single_file(str(path), subfolder="vae", **kwargs)
        return pipe_cls.from_pretrained(config, **models, dtype=torch_dtype, local_files_only=local_files_only)
    except Exception as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(
            f"{path}: cannot load as a single-file {label} checkpoint with the model config {config} ({detail}). The "
            f"config (--model-config / model_config) must be a diffusers {pipe_name} folder or hub id of the same "
            "architecture; offline, a local folder or one in the Hugging Face cache."
        ) from err


def load_base_pipeline(
    model: str,
    *,
    family: str | None = None,
    dtype="float32",
    device: str | torch.device = "cpu",
    local_files_only: bool = False,
    config: str | None = None,
):
    """Load a Stable Diffusion 1.x/2.x/XL, SD 3/3.5 or FLUX.1 pipeline (diffusers classes; no safety checker).
    A single .safetensors file's family is read from its keys (`single_file_family`; an explicit `family` must agree);
    `config` is a diffusers folder or hub id of the same architecture (needed for FLUX.1 and SD3 files). A hub id
    needs `family` 'flux'/'sd3' for those."""
    import diffusers
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from .tiny import TINY_BUILDERS

    torch_dtype = _dtype(dtype)
    if model in TINY_BUILDERS:
        pipe = TINY_BUILDERS[model]()
        return pipe.to(device) if torch_dtype == torch.float32 else pipe.to(device=device, dtype=torch_dtype)
    path = Path(model).expanduser()
    if path.is_file():
        cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
        if path.suffix.lower() != ".safetensors":
            raise ModelLoadError(f"{path}: only .safetensors single-file checkpoints are loaded (pickles can run code).")
        found = single_file_family(path, family)
        if found in DIT_CLASSES:
            pipe = _load_dit_single_file(path, found, torch_dtype=torch_dtype, local_files_only=local_files_only,
                                         config=config)
            return pipe.to(device)
        kwargs = {"dtype": torch_dtype, "local_files_only": local_files_only}
        if config:
            kwargs["config"] = config
        if cls is StableDiffusionPipeline:
            kwargs.update(safety_checker=None, requires_safety_checker=False)
        try:
            pipe = cls.from_single_file(str(path), **kwargs)
        except Exception as err:
            # diffusers' first line says what failed; the rest is advice for its own API (kept in __cause__).
            detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ModelLoadError(
                f"{path}: cannot load as a single-file {cls.__name__} ({detail}). Set the family (sd1/sd2/sdxl) and, "
                "offline, the model config (--model-config / model_config): a diffusers folder or hub id of the same "
                "architecture."
            ) from err
        if family in ("sd1", "sd2", "sdxl") and pipeline_family(pipe) != family:
            raise ModelLoadError(f"{path}: the family was given as {family}, but the checkpoint and its config "
                                 f"load as {pipeline_family(pipe)}.")
        return pipe.to(device)
    if path.is_dir():
        index = path / "model_index.json"
        if not index.exists():
            raise ModelLoadError(f"{path}: not a diffusers pipeline folder (no model_index.json).")
        class_name = json.loads(index.read_text()).get("_class_name", "")
        source, local = str(path), True
    else:
        if model.startswith((".", "/", "~")) or model.count("/") > 1 or model.endswith((".safetensors", ".ckpt")):
            raise ModelLoadError(f"{model}: no such file or folder.")
        class_name, source, local = None, model, local_files_only
    if class_name is not None and class_name not in SUPPORTED_PIPELINES:
        raise ModelLoadError(f"{model}: {class_name} is not supported; loraloom runs Stable Diffusion 1.x/2.x/XL, SD 3/3.5 "
                             "and FLUX.1.")
    if class_name is None and family in ("flux", "sd3"):
        class_name = {"flux": "FluxPipeline", "sd3": "StableDiffusion3Pipeline"}[family]
    if class_name in ("FluxPipeline", "StableDiffusion3Pipeline"):
        cls = getattr(diffusers, class_name)
    else:
        cls = StableDiffusionXLPipeline if (class_name == "StableDiffusionXLPipeline" or family == "sdxl") else StableDiffusionPipeline
    kwargs = {"dtype": torch_dtype, "local_files_only": local}
    if cls is StableDiffusionPipeline:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        pipe = cls.from_pretrained(source, **kwargs)
    except OSError as err:
        hint = " (offline: is it in the local Hugging Face cache?)" if local else ""
        raise ModelLoadError(f"{model}: cannot load the base model{hint}: {err}") from err
    return pipe.to(device)
