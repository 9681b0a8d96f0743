"""Regional prompts in cross-attention: each region's image tokens attend to its own prompt.

The conditioning of a regional run is the base prompt and every region's prompt, each encoded on its own and
concatenated along the token axis (`spans`). In every cross-attention layer a query attends to each span
separately (a softmax per span — the prompts never mix inside one attention) and the outputs are blended by the
regions' weights at that query's position: region r weighs its mask m_r, the base prompt what the regions leave
(`composition.spatial.region_weights`). This is the "attention couple" / Regional Prompter latent-mode idea
(the blend happens per layer on the attention output, so one UNet call serves all regions). A region's LoRAs act
only on its prompt's tokens in the keys and values (`SpatialGate.spans`) and only inside its mask elsewhere, so
outside its region every layer computes what it would without them.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from loraloom.composition.spatial import resize_mask, token_grid

from .attention import processors_installed


class RegionalCrossAttention:
    """Attention processor for cross-attention layers (`attn2`) over a conditioning of concatenated prompts.

    A prompt's attention is computed only for the queries where its region weight is above zero (a box over half the
    image: half the queries; the base prompt where the regions cover everything: none); elsewhere its term of the
    blend is zero, so skipping it changes no value. With one prompt per region this keeps the cost near one
    cross-attention over the image instead of one per prompt (bench line `masked_merge_vs_single`)."""

    def __init__(self, spans: Sequence[slice], weights: Sequence[torch.Tensor]):
        if len(spans) != len(weights):
            raise ValueError(f"{len(spans)} prompt spans but {len(weights)} region weight maps")
        self.spans = list(spans)
        self.weights = [w.float() for w in weights]  # (H, W) at the latent's resolution, summing to 1 per pixel
        self._grids: dict[tuple, list[torch.Tensor]] = {}

    def _weights_for(self, tokens: int, like: torch.Tensor) -> list[tuple]:
        """Per prompt at this layer's token grid: (weights (1, 1, tokens, 1), the query positions where the weight is
        above zero and the weights there, or None, None for all of them)."""
        key = (tokens, like.device, like.dtype)
        if key not in self._grids:
            h, w = token_grid(tokens, tuple(self.weights[0].shape))
            grids = []
            for m in self.weights:
                grid = resize_mask(m, h, w).reshape(1, 1, h * w, 1).to(like.device, like.dtype)
                where = torch.nonzero(grid.reshape(-1) > 0).reshape(-1)
                grids.append((grid, None, None) if where.numel() == tokens else (grid, where, grid.index_select(2, where)))
            self._grids[key] = grids
        return self._grids[key]

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if encoder_hidden_states is None or attention_mask is not None or hidden_states.ndim != 3:
            raise ValueError("regional prompts need a plain cross-attention layer (text conditioning, no mask, token input)")
        residual = hidden_states
        batch, tokens, _ = hidden_states.shape
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        out = None
        for span, (weight, where, weight_there) in zip(self.spans, self._weights_for(tokens, query), strict=True):
            if where is None:  # the prompt weighs in at every query
                part = F.scaled_dot_product_attention(query, key[:, :, span], value[:, :, span], dropout_p=0.0, is_causal=False)
                out = part * weight if out is None else out + part * weight
            elif where.numel():  # only the queries it weighs in at; its term is zero at the others
                part = F.scaled_dot_product_attention(query.index_select(2, where), key[:, :, span], value[:, :, span],
                                                      dropout_p=0.0, is_causal=False)
                out = torch.zeros_like(query) if out is None else out
                out.index_add_(2, where, part * weight_there)
        if out is None:  # no prompt weighs in anywhere (the weights sum to 1 per position, so never in a run)
            out = torch.zeros_like(query)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def cross_attention_modules(unet) -> list:
    """The UNet's cross-attention modules: `attn2` of every transformer block, and `attn1` of diffusers'
    `only_cross_attention` blocks (which attend to the prompt instead of the image)."""
    return [m for m in unet.modules() if getattr(m, "is_cross_attention", False) and hasattr(m, "set_processor")]


@contextmanager
def regional_cross_attention(unet, spans: Sequence[slice], weights: Sequence[torch.Tensor]):
    """Within the block, the UNet's cross-attention blends per-prompt attention by region (processors restored after)."""
    processor = RegionalCrossAttention(spans, weights)
    with processors_installed(cross_attention_modules(unet), lambda _: processor):
        yield processor


class RegionLayout:
    """How one run's regions and masked LoRAs lay out: the prompt copies of the conditioning (0 = the run's prompt,
    then one per region), the LoRAs acting in each, each copy's token span, and the masks at the latent's size.

    Explicit regions come first; a LoRA with a mask of its own and no region gets a region of its own with the
    run's prompt. A LoRA in no region acts everywhere (all spans, no mask).
    """

    def __init__(self, loras, regions, latent_hw: tuple[int, int], text_length: int, base_weight: float = 0.0):
        from loraloom.composition.controls import Region
        from loraloom.composition.spatial import mask_from, region_weights

        regions = list(regions or ())
        names = {a.name for a in loras}
        placed: dict[str, int] = {}
        for r, region in enumerate(regions):
            for name in region.loras:
                if name not in names:
                    raise ValueError(f"region {r + 1} names LoRA {name!r}, which is not in this generation ({', '.join(sorted(names))})")
                if name in placed:
                    raise ValueError(f"LoRA {name!r} is in two regions; bind each LoRA to one region")
                placed[name] = r
        for a in loras:
            if a.controls.mask is not None and a.name not in placed:
                regions.append(Region(a.controls.mask, loras=(a.name,), feather=a.controls.feather))
                placed[a.name] = len(regions) - 1
        self.regions = regions
        self.region_of = placed  # LoRA name -> region index (0-based, without the base)
        self.masks = [mask_from(r.mask, *latent_hw, feather=r.feather) for r in regions]
        self.spans = [slice(i * text_length, (i + 1) * text_length) for i in range(len(regions) + 1)]
        if regions:
            base, parts = region_weights(self.masks)
            if base_weight > 0:  # Regional Prompter's base ratio: the base prompt also in the regions, by this share
                parts = [p * (1.0 - base_weight) for p in parts]
                base = 1.0 - sum(parts)
            self.weights = [base, *parts]
        else:
            self.weights = []

    def __bool__(self) -> bool:
        return bool(self.regions)

    def gates(self) -> dict:
        """The spatial gate of every LoRA bound to a region: its region's mask, and its region's prompt span for the
        cross-attention keys and values."""
        from loraloom.composition.routing import SpatialGate

        return {name: SpatialGate(self.masks[r], [self.spans[r + 1]]) for name, r in self.region_of.items()}

    def copy_gates(self, text_gates) -> list[dict]:
        """Text-encoder gates of each prompt copy for one branch: the base copy without region LoRAs, region r's
        copy with the LoRAs that act everywhere plus its own."""
        everywhere = {k: v for k, v in text_gates.items() if k not in self.region_of}
        return [everywhere] + [{**everywhere, **{k: v for k, v in text_gates.items() if self.region_of.get(k) == r}}
                               for r in range(len(self.regions))]
