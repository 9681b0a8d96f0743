"""Loading base models: a diffusers folder, a hub id (optionally `local_files_only`), a single-file checkpoint,
or a tiny offline model (`tiny:sd1`, `tiny:sdxl`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from composition.errors import LoraloomError

SUPPORTED_PIPELINES = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl"}


class ModelLoadError(LoraloomError, ValueError):
    pass


def pipeline_family(pipe) -> str:
    """'sdxl', 'sd2' or 'sd1' from the loaded components (SD 2.x has 1024-wide text context)."""
    if getattr(pipe, "text_encoder_2", None) is not None or pipe.unet.config.get("addition_embed_type") == "text_time":
        return "sdxl"
    return "sd2" if pipe.unet.config.cross_attention_dim == 1024 else "sd1"


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    try:
        return table[str(dtype)]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of {sorted(table)}") from None


def load_base_pipeline(
    model: str,
    *,
    family: str | None = None,
    dtype="float32",
    device: str | torch.device = "cpu",
    local_files_only: bool = False,
    config: str | None = None,
):
    """Load a Stable Diffusion 1.x/2.x or SDXL pipeline (diffusers classes; no safety checker)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from .testing import TINY_BUILDERS

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
        try:
            pipe = cls.from_single_file(str(path), **kwargs)
        except Exception as err:
            raise ModelLoadError(
                f"{path}: cannot load as a single-file {cls.__name__} ({err}). Pass --family (sd1/sd2/sdxl) and, "
                "offline, --model-config pointing at a diffusers folder or hub id of the same architecture."
            ) from err
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
        raise ModelLoadError(f"{model}: {class_name} is not supported; loraloom runs Stable Diffusion 1.x/2.x and SDXL.")
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
