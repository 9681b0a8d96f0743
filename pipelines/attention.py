"""Attention backends and attention-map capture.

Fast path: PyTorch SDPA by default, xformers when the `gpu` extra is installed and CUDA is present
(`enable_fast_attention`). Map capture (CLoRA, `capture_cross_attention`): only the cross-attention layers at one
chosen resolution get an explicit-softmax processor for the duration of the capture; every other layer keeps its
SDPA/xformers processor. LoRA updates live inside `to_q/to_k/to_v/to_out` (the routing layer wraps those Linear
modules), so the capturing processor sees every routed LoRA exactly as the fast processors do, row by row.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

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


# --- which layers, at which resolution -------------------------------------------------------------------------
_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.|^(mid_block)\.")


def cross_attention_depths(unet) -> dict[int, list[tuple[str, torch.nn.Module]]]:
    """Cross-attention modules of a diffusers UNet grouped by depth (number of downsamplings above the latent).

    down_blocks.i works at depth i, the mid block at the deepest level, up_blocks.j at depth (n_up - 1 - j).
    """
    from diffusers.models.attention_processor import Attention

    n_down, n_up = len(unet.down_blocks), len(unet.up_blocks)
    out: dict[int, list] = {}
    for name, module in unet.named_modules():
        if not isinstance(module, Attention) or not module.is_cross_attention:
            continue
        m = _BLOCK.match(name)
        if m is None:
            continue
        if m.group(3):
            depth = n_down - 1
        elif m.group(1) == "down_blocks":
            depth = int(m.group(2))
        else:
            depth = n_up - 1 - int(m.group(2))
        out.setdefault(depth, []).append((name, module))
    return out


def map_size_at(latent_hw: tuple[int, int], depth: int) -> tuple[int, int]:
    """Spatial size at `depth` (stride-2 convolutions with padding 1 round up)."""
    h, w = latent_hw
    for _ in range(depth):
        h, w = (h + 1) // 2, (w + 1) // 2
    return h, w


MIN_AUTO_SIDE = 8


def choose_map_depth(unet, latent_hw: tuple[int, int], side: int | None = None) -> int:
    """The depth whose cross-attention maps CLoRA uses.

    `side=None` (auto): the reference's rule, ceil(W/32) across for an 8x VAE, i.e. a quarter of the latent width
    (SD 1.x 512² -> 16x16, SDXL 1024² -> 32x32), but at least 8 cells across (coarser maps cannot separate two
    concepts: the 32x32 toy world, 16x16 latents, uses 8x8), snapped to the nearest depth that has cross-attention.
    `side=n`: the depth whose maps are n cells across (error if none).
    """
    depths = cross_attention_depths(unet)
    if not depths:
        raise ValueError("this UNet has no cross-attention layers; attention maps cannot be captured")
    widths = {d: map_size_at(latent_hw, d)[1] for d in depths}
    if side is not None and side > 0:
        hit = [d for d, w in widths.items() if w == side]
        if not hit:
            raise ValueError(f"no cross-attention at {side} cells across for this size; available: "
                             f"{sorted(set(widths.values()), reverse=True)}")
        return hit[0]
    target = max(math.ceil(latent_hw[1] / 4), MIN_AUTO_SIDE)
    # nearest in log scale; on a tie the finer map wins
    return min(depths, key=lambda d: (abs(math.log2(widths[d] / target)), d))


# --- capture ---------------------------------------------------------------------------------------------------
class StopForward(Exception):
    """Raised by the capturing processor after the last captured layer when the rest of the UNet is not needed."""


class AttentionMapStore:
    """Cross-attention probabilities of chosen tokens, averaged over layers x heads, per batch row.

    `tokens` (rows, K): token positions to keep for each row of the batch (-1: nothing; such entries stay 0).
    Only the selected columns of the probabilities are kept, summed layer by layer: memory is rows x h x w x K,
    whatever the number of layers. The average is the plain mean over (layers x heads), as the CLoRA reference
    code (A&E's AttentionStore) concatenates every kept map and averages. A UNet call covering rows
    [r0, r0 + b) ends after `num_layers` layers; chunked calls (`max_batch`) continue with the next rows.
    """

    def __init__(self, tokens: torch.Tensor, num_layers: int, size: tuple[int, int], stop_after_last: bool = False):
        self.tokens = tokens.long()
        self.num_layers = num_layers
        self.size = size
        self.stop_after_last = stop_after_last
        self._chunks: list[torch.Tensor] = []
        self._row = 0
        self._sum: torch.Tensor | None = None
        self._heads = 0
        self._layers = 0

    def add(self, probs: torch.Tensor) -> None:
        """`probs` (b, heads, Q, S) of one layer for rows [row, row + b) of the current call."""
        b, heads, q, s = probs.shape
        if q != self.size[0] * self.size[1]:
            raise RuntimeError(f"captured layer has {q} queries, expected {self.size[0]}x{self.size[1]}")
        idx = self.tokens[self._row:self._row + b].to(probs.device)
        if idx.shape[0] != b:
            raise RuntimeError(f"attention capture: {self._row + b} rows seen, tokens given for {len(self.tokens)}")
        if (idx >= s).any():
            raise ValueError(f"token position {int(idx.max())} is beyond the {s} text tokens of this model")
        valid = (idx >= 0).to(probs.dtype)
        k = idx.shape[1]
        picked = probs.gather(-1, idx.clamp_min(0)[:, None, None, :].expand(b, heads, q, k))
        part = picked.sum(1) * valid[:, None, :]
        self._sum = part if self._sum is None else self._sum + part
        self._heads += heads
        self._layers += 1
        if self._layers == self.num_layers:
            self._chunks.append(self._sum / self._heads)
            self._row += b
            self._sum, self._heads, self._layers = None, 0, 0
            if self.stop_after_last:
                raise StopForward

    def maps(self) -> torch.Tensor:
        """(rows, h, w, K) averaged maps of every row captured so far."""
        if self._sum is not None:
            raise RuntimeError("attention capture: a UNet call ended before all captured layers ran")
        if not self._chunks:
            raise RuntimeError("attention capture: no UNet call ran inside the capture")
        m = torch.cat(self._chunks)
        return m.reshape(m.shape[0], *self.size, m.shape[-1])


class CrossAttentionCaptureProcessor:
    """diffusers' classic `AttnProcessor` (explicit softmax) that hands the probabilities to a store."""

    def __init__(self, store: AttentionMapStore):
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query = attn.head_to_batch_dim(query)
        key = attn.head_to_batch_dim(key)
        value = attn.head_to_batch_dim(value)
        probs = attn.get_attention_scores(query, key, attention_mask)  # (b * heads, Q, S)
        hidden_states = torch.bmm(probs, value)
        hidden_states = attn.batch_to_head_dim(hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        hidden_states = hidden_states / attn.rescale_output_factor
        # Last: the store may stop the forward here (StopForward) once every captured layer has run.
        self.store.add(probs.view(batch_size, attn.heads, *probs.shape[1:]))
        return hidden_states


@dataclass
class CaptureLayers:
    depth: int
    size: tuple[int, int]
    modules: list  # [(name, Attention)]


def capture_layers(unet, latent_hw: tuple[int, int], side: int | None = None) -> CaptureLayers:
    depth = choose_map_depth(unet, latent_hw, side)
    return CaptureLayers(depth, map_size_at(latent_hw, depth), cross_attention_depths(unet)[depth])


@contextmanager
def processors_installed(modules, make):
    """Within the block, each attention module runs `make(its processor)` instead of its processor; the original
    processors are put back on exit, also on error."""
    saved = [(m, m.processor) for m in modules]
    for m, p in saved:
        m.set_processor(make(p))
    try:
        yield
    finally:
        for m, p in saved:
            m.set_processor(p)


@contextmanager
def capture_cross_attention(unet, tokens: torch.Tensor, latent_hw: tuple[int, int], side: int | None = None,
                            stop_after_last: bool = False):
    """Within the block, UNet calls record the cross-attention maps of the chosen tokens at one resolution.

    Yields the `AttentionMapStore` (read `.maps()` after the calls). The original processors (SDPA/xformers) are
    put back on exit; layers at other resolutions and all self-attention never leave them.
    """
    layers = capture_layers(unet, latent_hw, side)
    store = AttentionMapStore(tokens, len(layers.modules), layers.size, stop_after_last)
    processor = CrossAttentionCaptureProcessor(store)
    with processors_installed([m for _, m in layers.modules], lambda _: processor):
        yield store


def token_positions(tokenizer, prompt: str, words: Sequence[str], max_length: int | None = None) -> list[list[int]]:
    """Positions (BOS = 0) of each word's tokens in the prompt as the text encoder sees it (truncated to
    `max_length`, default the tokenizer's length); a word appearing twice gives all its positions; a missing word
    gives []."""
    ids = tokenizer(prompt, truncation=True, max_length=max_length or tokenizer.model_max_length).input_ids
    out = []
    for word in words:
        pieces = tokenizer(word, add_special_tokens=False).input_ids
        found: list[int] = []
        n = len(pieces)
        if n:
            for i in range(len(ids) - n + 1):
                if ids[i:i + n] == pieces:
                    found.extend(range(i, i + n))
        out.append(sorted(set(found)))
    return out


__all__ = [
    "AttentionMapStore",
    "CrossAttentionCaptureProcessor",
    "StopForward",
    "capture_cross_attention",
    "capture_layers",
    "choose_map_depth",
    "cross_attention_depths",
    "enable_fast_attention",
    "map_size_at",
    "token_positions",
    "xformers_available",
]
