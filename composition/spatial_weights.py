"""Spatial weights per LoRA made during a run, from the model's own outputs: LoRAtorio's patch weights and
token-routed masks. Pure functions on tensors; the methods that call them are `methods/loratorio.py` and
`methods/tokenroute.py`.

- LoRAtorio (Foteinopoulou, Budvytis, Liwicki 2025, arXiv 2508.11624): each LoRA's conditional noise prediction
  is cut into patches, each patch compared with the base model's by cosine similarity, and a SoftMin over the
  LoRAs turns the similarities into weights (the LoRA that departs most from the base model in a patch weighs most
  there); the base model's unconditional prediction re-centres classifier-free guidance. Spec:
  docs/methods/loratorio.md.
- Token-routed fusion after FreeFuse (Liu, Ding, Zhou 2025, arXiv 2510.23515): each subject LoRA gets the region
  its words attend to (contrastive cross-attention scores, a distribution over positions per LoRA, then a hard
  argmax or a soft share per position). Spec: docs/methods/tokenroute.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import MethodError

_EPS = 1e-8


# --- LoRAtorio ----------------------------------------------------------------------------------------------------
def patch_cosine(eps: torch.Tensor, ref: torch.Tensor, patch: int) -> torch.Tensor:
    """s_i(p) = cos(eps_i[p], ref[p]): cosine similarity per square patch of `patch` x `patch` latent cells, taken
    over every channel and cell of the patch (docs/methods/loratorio.md#spatial-weights).

    `eps`: (k, B, C, H, W), one prediction per LoRA; `ref`: (B, C, H, W), the base model's. Returns (k, B, h, w)
    with h = ceil(H / patch), w = ceil(W / patch): edge patches are smaller where `patch` does not divide the
    latent, and a patch larger than the latent is the whole latent. A patch where either prediction is zero has
    similarity 0.
    """
    if patch < 1:
        raise MethodError(f"patch size must be >= 1 latent cell, got {patch}")
    k, b, _, hh, ww = eps.shape
    kernel = (min(patch, hh), min(patch, ww))

    def pool(x: torch.Tensor) -> torch.Tensor:  # (n, H, W) -> (n, h, w): the mean over each patch
        return F.avg_pool2d(x.unsqueeze(1), kernel, kernel, ceil_mode=True).squeeze(1)

    dot = pool((eps * ref.unsqueeze(0)).sum(2).reshape(k * b, hh, ww))
    sq = pool(eps.pow(2).sum(2).reshape(k * b, hh, ww))
    sq_ref = pool(ref.pow(2).sum(1)).repeat(k, 1, 1)
    # mean(a b) / sqrt(mean(a^2) mean(b^2)): the patch's cell count cancels, so smaller edge patches are exact too
    cos = dot / (sq * sq_ref).sqrt().clamp_min(_EPS)
    return cos.reshape(k, b, *cos.shape[-2:])


def softmin_weights(sim: torch.Tensor, temperature: float = 1.0, top_k: int = 0, selection: str = "step") -> torch.Tensor:
    """Omega_i(p) = exp(-s_i(p) / T) / sum_j exp(-s_j(p) / T): SoftMin over the LoRAs (dim 0) of the patch
    similarities `sim` (k, B, h, w), so the LoRA least like the base model in a patch weighs most there
    (docs/methods/loratorio.md#spatial-weights). Each patch's weights sum to 1.

    Dynamic selection (docs/methods/loratorio.md#dynamic-selection), `top_k` in 1..k-1: only k of the LoRAs take
    part, the SoftMin running over those alone. `selection="step"`: the same k LoRAs for the whole image at this
    step, those with the lowest mean similarity over the patches; `"patch"`: the k least similar LoRAs of each patch.
    `top_k` 0 or >= k: every LoRA takes part.
    """
    if temperature <= 0:
        raise MethodError(f"SoftMin temperature must be > 0, got {temperature}")
    logits = -sim / temperature
    k = sim.shape[0]
    if 0 < top_k < k:
        if selection == "patch":
            kth = logits.topk(top_k, dim=0).values[-1:]  # the k-th largest logit per patch
            keep = logits >= kth
        elif selection == "step":
            score = sim.mean(dim=(-2, -1))  # (k, B): the LoRA's mean similarity to the base model over the image
            chosen = (-score).topk(top_k, dim=0).indices  # (top_k, B): the least similar LoRAs
            keep = torch.zeros_like(score, dtype=torch.bool).scatter_(0, chosen, True)[..., None, None].expand_as(logits)
        else:
            raise MethodError(f"selection must be 'step' or 'patch', got {selection!r}")
        logits = logits.masked_fill(~keep, float("-inf"))
    return torch.softmax(logits, dim=0)


def patches_to_latent(weights: torch.Tensor, height: int, width: int, patch: int) -> torch.Tensor:
    """Per-patch weights (k, B, h, w) as per-cell weights (k, B, 1, height, width): every cell of a patch takes the
    patch's weight (edge patches cut to the latent)."""
    ph, pw = min(patch, height), min(patch, width)
    cells = weights.repeat_interleave(ph, dim=-2).repeat_interleave(pw, dim=-1)[..., :height, :width]
    return cells.unsqueeze(2)


def loratorio_guidance(base_uncond: torch.Tensor, lora_uncond: torch.Tensor, lora_cond: torch.Tensor,
                       weights: torch.Tensor, scale: float, recenter: float = 0.5) -> torch.Tensor:
    """LoRAtorio's combining step (docs/methods/loratorio.md#re-centred-guidance):

        eps_c   = sum_i Omega_i * eps_i(c)                               (spatially weighted conditional)
        eps_u^L = sum_i Omega_i * eps_i(n)                               (the same weights on the LoRAs' unconditional)
        eps_u   = lambda * eps_0(n) + (1 - lambda) * eps_u^L             (re-centring on the base model, lambda = 0.5)
        eps     = eps_u + s (eps_c - eps_u)                              (classifier-free guidance)

    `lora_uncond`, `lora_cond`: (k, B, C, H, W); `weights`: Omega at the latent's cells, (k, B, 1, H, W), summing to
    1 over the LoRAs; `base_uncond`: (B, C, H, W). With one LoRA and `recenter=0` this is that LoRA's plain CFG.
    """
    cond = (weights * lora_cond).sum(0)
    uncond = recenter * base_uncond + (1.0 - recenter) * (weights * lora_uncond).sum(0)
    return uncond + scale * (cond - uncond)


# --- token-routed masks (FreeFuse-style) ------------------------------------------------------------------------------
def contrastive_scores(maps: torch.Tensor) -> torch.Tensor:
    """C_i = n A_i - sum_{j != i} A_j for the n subject maps `maps` (n, ...): each LoRA's cross-attention map with
    the others' subtracted, so a place where several subjects' words attend counts for none of them (FreeFuse's
    contrastive token score, as its reference code computes it; docs/methods/tokenroute.md#masks)."""
    n = maps.shape[0]
    return (n + 1) * maps - maps.sum(0, keepdim=True)


def position_distributions(scores: torch.Tensor, temperature: float = 0.0) -> torch.Tensor:
    """S_i = softmax over the positions of C_i / T_i (scores (n, h, w) -> (n, h, w), each map summing to 1): where
    LoRA i's subject is, as a distribution over the image (docs/methods/tokenroute.md#masks). `temperature` > 0 is
    one fixed T for every LoRA (the reference code: a fixed per-model constant on its feature similarities, none on
    its cross-attention fallback, i.e. 1); 0 (auto) divides each LoRA's scores by their standard deviation over the
    positions, which makes the maps independent of the attention's scale (a constant map stays uniform)."""
    n = scores.shape[0]
    flat = scores.reshape(n, -1)
    if temperature > 0:
        t = torch.full((n, 1), float(temperature), dtype=flat.dtype, device=flat.device)
    elif temperature == 0:
        t = flat.std(dim=1, keepdim=True, unbiased=False).clamp_min(_EPS)
    else:
        raise MethodError(f"temperature must be >= 0 (0 = auto), got {temperature}")
    return torch.softmax(flat / t, dim=1).reshape(scores.shape)


def route_masks(dists: torch.Tensor, mode: str = "hard") -> torch.Tensor:
    """Masks (n, h, w) from the position distributions `dists` (n, h, w); they sum to 1 at every position.

    `"hard"`: M_i(p) = 1[i = argmax_j S_j(p)], each position routed to one LoRA (FreeFuse's indicator I(p in R_i);
    ties go to the first LoRA). `"soft"`: M_i(p) = S_i(p) / sum_j S_j(p), the LoRAs sharing each position.
    One LoRA gets 1 everywhere either way (docs/methods/tokenroute.md#masks).
    """
    if mode == "hard":
        return F.one_hot(dists.argmax(0), dists.shape[0]).movedim(-1, 0).to(dists.dtype)
    if mode == "soft":
        return dists / dists.sum(0, keepdim=True).clamp_min(_EPS)
    raise MethodError(f"mask mode must be 'hard' or 'soft', got {mode!r}")


def masks_to_latent(masks: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Masks (n, h, w) at the latent's size (n, height, width), bilinear (as the reference code resizes its masks to
    each layer): linear, so masks that sum to 1 still do, and a mask of ones stays ones."""
    if tuple(masks.shape[-2:]) == (height, width):
        return masks
    return F.interpolate(masks.unsqueeze(1).float(), size=(height, width), mode="bilinear", align_corners=False).squeeze(1)
