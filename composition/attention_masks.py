"""CLoRA's attention-map math (Meral et al., ICCV 2025, arXiv 2403.19776): the contrastive loss on cross-attention
maps, the masks made from them, and the masked fusion of the branches' noise predictions.

Pure functions on tensors; the maps themselves are captured by the pipeline (`pipelines/attention.py`).
Sections: docs/methods/clora.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

_EPS = 1e-8


def minmax_normalise(maps: torch.Tensor) -> torch.Tensor:
    """Scale each flattened map (rows of `maps`, shape (n, d)) to [0, 1] (docs/methods/clora.md#contrastive-loss: min-max normalisation).

    A constant map (max == min) becomes all zeros instead of NaN.
    """
    lo = maps.min(dim=-1, keepdim=True).values
    hi = maps.max(dim=-1, keepdim=True).values
    return (maps - lo) / (hi - lo).clamp_min(_EPS)


def info_nce_loss(embeddings: torch.Tensor, labels: Sequence[int] | torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent / InfoNCE over labelled embeddings (docs/methods/clora.md#contrastive-loss; pytorch-metric-learning `NTXentLoss`, cosine similarity).

    For every ordered positive pair (a, p), a != p, same label:
        l(a, p) = -log( e^{s_ap / T} / (e^{s_ap / T} + sum_{n: label(n) != label(a)} e^{s_an / T}) )
    averaged over all positive pairs; s = cosine similarity, T = temperature (CLoRA: 0.5, hard-coded in the code).
    Zero (still differentiable) when there is no positive pair.
    """
    labels = torch.as_tensor(labels, device=embeddings.device)
    z = F.normalize(embeddings.float(), dim=-1)
    sim = z @ z.T / temperature
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=embeddings.device)
    pos = same & ~eye
    neg = ~same
    if not pos.any():
        return embeddings.sum() * 0.0
    # log-sum-exp over {p} ∪ negatives(a), for every (a, p): numerically stable form of the denominator
    neg_sim = sim.masked_fill(~neg, float("-inf"))  # (n, n): row a holds s_an for negatives only
    a_idx, p_idx = pos.nonzero(as_tuple=True)
    s_ap = sim[a_idx, p_idx]
    denom = torch.logsumexp(torch.cat([s_ap[:, None], neg_sim[a_idx]], dim=1), dim=1)
    return (denom - s_ap).mean()


def token_embeddings(maps: torch.Tensor) -> torch.Tensor:
    """(n, h, w) token maps -> (n, h*w) min-max normalised embeddings (docs/methods/clora.md#contrastive-loss)."""
    return minmax_normalise(maps.flatten(1))


def binary_token_mask(maps: torch.Tensor, threshold: float) -> torch.Tensor:
    """Union over tokens of {A_k / max(A_k) > threshold}: `maps` (h, w, K) -> bool (h, w) (docs/methods/clora.md#masks).

    No tokens (K == 0) gives an empty mask.
    """
    if maps.shape[-1] == 0:
        return torch.zeros(maps.shape[:2], dtype=torch.bool, device=maps.device)
    peak = maps.flatten(0, 1).max(dim=0).values.clamp_min(_EPS)  # (K,)
    return (maps / peak > threshold).any(dim=-1)


def morphology(mask: torch.Tensor, op: str) -> torch.Tensor:
    """3x3 max-pool morphology on a bool (h, w) mask, as the CLoRA code offers (all off by default)."""
    if op in ("", "none"):
        return mask
    x = mask.float()[None, None]

    def dilate(t):
        return F.max_pool2d(t, 3, stride=1, padding=1)

    def erode(t):
        return -F.max_pool2d(-t, 3, stride=1, padding=1)

    ops = {"dilate": dilate, "erode": erode, "open": lambda t: dilate(erode(t)), "close": lambda t: erode(dilate(t))}
    if op not in ops:
        raise ValueError(f"unknown mask morphology {op!r}; use none, erode, dilate, open or close")
    return ops[op](x)[0, 0] > 0.5


def branch_masks(branch_maps: Sequence[torch.Tensor], threshold: float, op: str = "none") -> torch.Tensor:
    """Masks of all branches: `branch_maps[j]` (h, w, K_j) are branch j's mask-token maps, j >= 1 (index 0, the
    base branch, is ignored). Returns bool (N+1, h, w): branch j's union mask, and the base branch (0) filling
    every cell no other branch claims (docs/methods/clora.md#masks: background fill)."""
    concept = [morphology(binary_token_mask(m, threshold), op) for m in branch_maps[1:]]
    h, w = branch_maps[0].shape[:2]
    device = branch_maps[0].device
    claimed = torch.stack(concept).any(0) if concept else torch.zeros(h, w, dtype=torch.bool, device=device)
    return torch.stack([~claimed, *concept])


def fuse_predictions(eps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Masked fusion of branch noise predictions (docs/methods/clora.md#masks): eps (N+1, B, C, H, W), masks (N+1, h, w) ->
    sum_j M_j * eps_j / sum_j M_j with the masks nearest-upsampled to (H, W); overlaps are averaged.

    Every cell is covered by at least one mask (the base branch fills the rest), so the sum is >= 1.
    """
    m = F.interpolate(masks[:, None].float(), size=eps.shape[-2:], mode="nearest")  # (N+1, 1, H, W)
    m = m[:, None].to(eps.dtype)  # (N+1, 1, 1, H, W) broadcast over batch and channels
    return (m * eps).sum(0) / m.sum(0).clamp_min(1.0)


def masks_to_image(masks: torch.Tensor, cell: int = 8):
    """A PIL strip of the masks (base first), white = the branch acts there; `cell` pixels per map cell."""
    from PIL import Image

    m = masks.detach().cpu().bool()
    n, h, w = m.shape
    gap = max(1, cell // 2)
    strip = torch.full((h * cell, n * w * cell + (n - 1) * gap), 96, dtype=torch.uint8)
    for j in range(n):
        tile = m[j].repeat_interleave(cell, 0).repeat_interleave(cell, 1).to(torch.uint8) * 255
        x0 = j * (w * cell + gap)
        strip[:, x0:x0 + w * cell] = tile
    return Image.fromarray(strip.numpy(), mode="L")
