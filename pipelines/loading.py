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


def _check_single_file(path: Path) -> None:
    """Fail early, naming the file, when a .safetensors file cannot be a base model (reads the header only)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception as err:
        raise ModelLoadError(f"{path}: not a readable .safetensors file ({err}).") from err
    if any(k.startswith(LDM_UNET_PREFIX) for k in keys):
        return
    example = ", ".join(repr(k) for k in keys[:3]) or "none"
    if any(re.search(r"lora|hada_|lokr_", k, re.IGNORECASE) for k in keys):
        raise ModelLoadError(f"{path}: this is a LoRA/adapter file, not a base model ({len(keys)} tensors such as {example}). "
                             "Load it as a LoRA on top of a Stable Diffusion base model.")
    raise ModelLoadError(f"{path}: not a Stable Diffusion checkpoint: none of its {len(keys)} tensors is a UNet weight in the "
                         f"original layout ({LDM_UNET_PREFIX}*); keys such as {example}.")


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
    Single files are SD 1.x/2.x/XL checkpoints; FLUX and SD3 load from a diffusers folder or hub id (`family`
    'flux'/'sd3' for a hub id)."""
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
        kwargs = {"dtype": torch_dtype, "local_files_only": local_files_only}
        if config:
            kwargs["config"] = config
        if cls is StableDiffusionPipeline:
            kwargs.update(safety_checker=None, requires_safety_checker=False)
        _check_single_file(path)
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
