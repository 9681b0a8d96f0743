"""Spatial masks: where in the image a LoRA (or a region's prompt) acts.

A mask is a float map in [0, 1] over the image. Users give it as an image or array, a box in fractions of the
image, or a named region; the routing layer resizes it to every layer's own grid — a convolution's feature map,
an attention layer's token grid (h·w tokens of the latent at that depth) — and multiplies the LoRA's delta by it,
so outside the mask the layer computes exactly what the base model does. Pure functions on tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

# Named regions as boxes (x0, y0, x1, y1) in fractions of the width and height; (0, 0) is the top-left corner.
NAMED_REGIONS: dict[str, tuple[float, float, float, float]] = {
    "full": (0.0, 0.0, 1.0, 1.0),
    "left": (0.0, 0.0, 0.5, 1.0),
    "right": (0.5, 0.0, 1.0, 1.0),
    "top": (0.0, 0.0, 1.0, 0.5),
    "bottom": (0.0, 0.5, 1.0, 1.0),
    "center": (0.25, 0.25, 0.75, 0.75),
    "top-left": (0.0, 0.0, 0.5, 0.5),
    "top-right": (0.5, 0.0, 1.0, 0.5),
    "bottom-left": (0.0, 0.5, 0.5, 1.0),
    "bottom-right": (0.5, 0.5, 1.0, 1.0),
    "left-third": (0.0, 0.0, 1 / 3, 1.0),
    "middle-third": (1 / 3, 0.0, 2 / 3, 1.0),
    "right-third": (2 / 3, 0.0, 1.0, 1.0),
    "top-third": (0.0, 0.0, 1.0, 1 / 3),
    "center-third": (0.0, 1 / 3, 1.0, 2 / 3),
    "bottom-third": (0.0, 2 / 3, 1.0, 1.0),
}


def box_mask(box: Sequence[float], height: int, width: int, feather: float = 0.0) -> torch.Tensor:
    """(height, width) mask of a box (x0, y0, x1, y1 in fractions), 1 inside, 0 outside. `feather` (a fraction of
    the width and of the height) ramps the edge linearly from 0 to 1 over that distance, inside the box."""
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
        raise ValueError(f"box {tuple(box)} must be x0 < x1 and y0 < y1, all between 0 and 1")
    ys = (torch.arange(height, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, dtype=torch.float32) + 0.5) / width
    if feather <= 0:
        inside_y = ((ys >= y0) & (ys <= y1)).float()
        inside_x = ((xs >= x0) & (xs <= x1)).float()
        return inside_y[:, None] * inside_x[None, :]
    f = float(feather)
    ramp_y = torch.clamp(torch.minimum(ys - y0, y1 - ys) / f, 0.0, 1.0)
    ramp_x = torch.clamp(torch.minimum(xs - x0, x1 - xs) / f, 0.0, 1.0)
    return ramp_y[:, None] * ramp_x[None, :]


def mask_from(spec, height: int, width: int, feather: float = 0.0) -> torch.Tensor:
    """A (height, width) float mask in [0, 1] from a name in `NAMED_REGIONS`, a box (4 numbers), a 2-D array or
    tensor (any size: resized by area), or a PIL image (its luminance, white = 1)."""
    if isinstance(spec, str):
        key = spec.strip().lower()
        if key not in NAMED_REGIONS:
            raise ValueError(f"unknown region {spec!r}; use one of {', '.join(NAMED_REGIONS)}, a box [x0, y0, x1, y1] or an image")
        return box_mask(NAMED_REGIONS[key], height, width, feather)
    if hasattr(spec, "convert") and hasattr(spec, "size"):  # a PIL image
        import numpy as np

        spec = torch.from_numpy(np.asarray(spec.convert("L"), dtype=np.float32) / 255.0)
    if isinstance(spec, (list, tuple)) and len(spec) == 4 and all(isinstance(v, (int, float)) for v in spec):
        return box_mask(spec, height, width, feather)
    t = torch.as_tensor(spec, dtype=torch.float32)
    if t.ndim != 2:
        raise ValueError(f"a mask array must be 2-D (height x width), got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()) or float(t.min()) < 0.0 or float(t.max()) > 1.0:
        raise ValueError("a mask's values must lie between 0 and 1")
    return resize_mask(t, height, width)


def resize_mask(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """`mask` (H, W) at (height, width): area averaging when shrinking (a cell's value is the share of it covered),
    bilinear when growing."""
    if tuple(mask.shape) == (height, width):
        return mask
    x = mask[None, None].float()
    if height <= mask.shape[0] and width <= mask.shape[1]:
        return F.adaptive_avg_pool2d(x, (height, width))[0, 0]
    return F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)[0, 0]


def token_grid(tokens: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) grid of an attention layer's `tokens` queries in a UNet on a latent of `latent_hw`: the latent
    divided by 2^k at depth k (h·w = tokens); ValueError when no depth gives `tokens`."""
    lh, lw = latent_hw
    for k in range(8):
        h, w = math.ceil(lh / 2**k), math.ceil(lw / 2**k)
        if h * w == tokens:
            return h, w
    raise ValueError(f"{tokens} tokens are no downsampled grid of a {lh}x{lw} latent")


def region_weights(masks: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Blend weights of a base prompt and regions with these masks (all the same shape): region r weighs m_r, the
    base what the regions leave (1 - Σ m_r, at least 0); where the masks overlap past 1 they are scaled to sum to 1.
    Returns (base weight, [region weights]), every pixel summing to 1."""
    total = torch.stack(list(masks)).sum(0)
    scale = torch.where(total > 1.0, 1.0 / total.clamp_min(1e-8), torch.ones_like(total))
    regions = [m * scale for m in masks]
    return (1.0 - total * scale).clamp_min(0.0), regions
