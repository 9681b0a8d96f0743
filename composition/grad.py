"""Gradient bookkeeping shared by everything that differentiates through a frozen model (merge objectives,
CLoRA's latent updates)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def frozen(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Parameters of `module` do not require grad inside (each flag restored afterwards): the autograd graph then
    tracks only what the caller optimises (merge coefficients, latents), not the model's weights."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
