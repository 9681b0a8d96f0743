"""Pure functions of the combining step and of schedules. Each cites the equation it implements."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import MethodError
from ..metadata import CATEGORIES


def classifier_free_guidance(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """eps = eps_u + s (eps_c - eps_u): classifier-free guidance (Ho & Salimans, 2022, eq. 6)."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def composite_guidance(
    eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float, weights: Sequence[float] | torch.Tensor | None = None
) -> torch.Tensor:
    """LoRA Composite (Zhong et al., 2024, sec. 3.3): eps = (1/k) sum_i w_i [eps_i(n) + s (eps_i(c) - eps_i(n))].

    `eps_uncond`, `eps_cond` are stacked per LoRA along dim 0: shape (k, B, ...). Uniform w_i = 1 is the paper's
    Composite; CMLoRA's dominant-LoRA weights enter through `weights`.
    """
    guided = classifier_free_guidance(eps_uncond, eps_cond, scale)
    k = guided.shape[0]
    if weights is None:
        return guided.mean(dim=0)
    w = torch.as_tensor(weights, dtype=guided.dtype, device=guided.device).reshape(k, *([1] * (guided.ndim - 1)))
    return (w * guided).sum(dim=0) / k


def switch_active_index(step: int, interval: int, n: int, reference_timing: bool = False) -> int:
    """LoRA Switch (Zhong et al., 2024, sec. 3.2): the LoRA active at `step` when rotating every `interval` steps.

    Paper: a(s) = floor(s / tau) mod k. The reference code switches in a step-end callback that fires after step
    index tau, so its first LoRA runs tau + 1 steps: a(s) = floor(max(s - 1, 0) / tau) mod k
    (`reference_timing=True` reproduces that).
    """
    if interval < 1:
        raise MethodError(f"switch interval must be >= 1, got {interval}")
    if n < 1:
        raise MethodError("LoRA Switch needs at least one LoRA")
    s = max(step - 1, 0) if reference_timing else step
    return (s // interval) % n


def category_rank(category: str | None) -> int:
    """Position of a category in ComposLoRA's order: character, clothing, style, background, object; unknown last."""
    return CATEGORIES.index(category) if category in CATEGORIES else len(CATEGORIES)
