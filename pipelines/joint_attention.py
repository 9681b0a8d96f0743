"""Attention maps of the diffusion transformers (FLUX.1, SD 3/3.5): image-token -> text-token attention taken from
the joint attention, in the form `pipelines.attention` gives for the UNet's cross-attention (an `AttentionMapStore`:
per batch row, a map over the image token grid per chosen text token, averaged over heads and layers).

MMDiT joint attention (Esser et al. 2024, "Scaling Rectified Flow Transformers", Fig. 2): text and image tokens are
projected by their own weights, concatenated, and attend as one sequence. Its image-query x text-key block is what a
UNet's cross-attention is on its own; that block is what is captured here:

    A[i, t] = softmax_t( q_i . k_t / sqrt(d) ),   t over the text tokens only,

with q_i an image token's query (after the layer's QK-norm and, on FLUX, its rotary embedding) and k_t a text
token's key (the text stream's `add_k_proj`, its QK-norm, rotary). Softmax over the text keys only, not the text
columns of a softmax over all keys: the full softmax's text columns are scaled, per image position, by how much that
position attends to text at all (most of its mass goes to image keys, more in some regions than others), which would
bias every word's map by the same position-dependent factor; over text keys alone each position's row is a
distribution over the words, as a UNet's cross-attention row is, which is what the token-routed masks and CLoRA's
thresholds are written for. It also avoids forming the image x image block (4096² scores per head at 1024²).

Layers: every block whose attention has a separate text stream, FLUX's double-stream blocks (not the single-stream
blocks, where text and image share projections) and SD3's joint blocks (`attn`, not SD 3.5's image-only `attn2`).
Every one is at the same resolution (the packed token grid: FLUX h/2 x w/2 of the latent, SD3 h/p x w/p).

The capturing processor wraps the layer's own processor (SDPA or whatever backend is set): the layer's output is
exactly what it was; the map is computed beside it from a second evaluation of the two projections it needs (to_q on
the image tokens, add_k_proj on the text tokens), so routed LoRAs act on it as in the real forward.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .attention import AttentionMapStore, processors_installed


def joint_attention_modules(transformer, family: str) -> list[tuple[str, torch.nn.Module]]:
    """(name, attention module) of the blocks whose maps are captured: `transformer_blocks.i.attn` for FLUX and SD3."""
    if family not in ("flux", "sd3"):
        raise ValueError(f"no joint-attention capture for model family {family!r}")
    return [(f"transformer_blocks.{i}.attn", block.attn) for i, block in enumerate(transformer.transformer_blocks)]


def image_text_probs(attn, family: str, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                     image_rotary_emb=None) -> torch.Tensor:
    """(b, heads, image tokens, text tokens): softmax over the text keys of image queries x text keys (module doc)."""
    b, n_img, n_txt = hidden_states.shape[0], hidden_states.shape[1], encoder_hidden_states.shape[1]
    if family == "flux":
        from diffusers.models.embeddings import apply_rotary_emb

        q = attn.norm_q(attn.to_q(hidden_states).unflatten(-1, (-1, attn.head_dim)))
        k = attn.norm_added_k(attn.add_k_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim)))
        if image_rotary_emb is not None:  # rotary over [text, image] positions (the processor's order)
            cos, sin = image_rotary_emb
            q = apply_rotary_emb(q, (cos[n_txt:], sin[n_txt:]), sequence_dim=1)
            k = apply_rotary_emb(k, (cos[:n_txt], sin[:n_txt]), sequence_dim=1)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (b, heads, seq, d)
    else:
        q = attn.to_q(hidden_states)
        d = q.shape[-1] // attn.heads
        q = q.view(b, n_img, attn.heads, d).transpose(1, 2)
        k = attn.add_k_proj(encoder_hidden_states).view(b, n_txt, attn.heads, d).transpose(1, 2)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_added_k is not None:
            k = attn.norm_added_k(k)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    return scores.softmax(-1)


class JointAttentionCaptureProcessor:
    """Runs the layer's own processor, then hands the image->text probabilities to the store (which may then stop
    the forward: `StopForward` after the last captured layer)."""

    def __init__(self, original, store: AttentionMapStore, family: str):
        self.original = original
        self.store = store
        self.family = family

    # Explicit parameters: diffusers drops keyword arguments a processor's signature does not name.
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        kw = {"image_rotary_emb": image_rotary_emb} if image_rotary_emb is not None else {}
        out = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, **kw)
        if encoder_hidden_states is None:
            raise RuntimeError("joint-attention capture: a captured layer was called without text tokens")
        self.store.add(image_text_probs(attn, self.family, hidden_states, encoder_hidden_states, image_rotary_emb))
        return out


@contextmanager
def capture_joint_attention(transformer, family: str, tokens: torch.Tensor, grid: tuple[int, int],
                            side: int | None = None, stop_after_last: bool = False):
    """Within the block, transformer calls record the image->text maps of the chosen text positions (`tokens`, per
    row, -1: none) on the image token grid `grid`; yields the `AttentionMapStore`. `side` (cells across) may only be
    the grid's width: a transformer has one resolution. The original processors are put back on exit."""
    if side and side != grid[1]:
        raise ValueError(f"attention maps of this transformer are {grid[1]} cells across (its image token grid "
                         f"{grid[0]}x{grid[1]}); got {side}. Fix: use 0 (auto) or {grid[1]}.")
    modules = joint_attention_modules(transformer, family)
    store = AttentionMapStore(tokens, len(modules), grid, stop_after_last)
    with processors_installed([m for _, m in modules], lambda p: JointAttentionCaptureProcessor(p, store, family)):
        yield store


__all__ = ["JointAttentionCaptureProcessor", "capture_joint_attention", "image_text_probs", "joint_attention_modules"]
