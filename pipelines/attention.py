"""Attention backends: PyTorch SDPA by default, xformers when the `gpu` extra is installed and CUDA is present."""

from __future__ import annotations

import logging


log = logging.getLogger(__name__)


def xformers_available() -> bool:
    try:
        import xformers.ops  # noqa: F401
    except Exception:  # ImportError, or its CUDA extension failing to load
        return False
    return True


def enable_fast_attention(pipe) -> str:
    """Use xformers' memory-efficient attention on CUDA when it works; else keep diffusers' SDPA processors.

    Returns the backend in use ("xformers" or "sdpa").
    """
    if pipe.unet.device.type == "cuda" and xformers_available():
        try:
            pipe.enable_xformers_memory_efficient_attention()
            return "xformers"
        except Exception as err:  # built for another torch/CUDA: fall back quietly
            log.info("xformers present but unusable (%s); using PyTorch SDPA", err)
    return "sdpa"


__all__ = ["enable_fast_attention", "xformers_available"]
