"""Regional prompts in the joint attention of the diffusion transformers (FLUX.1, SD 3/3.5): the "attention couple"
of `pipelines.regions` where text and image tokens attend as one sequence.

The conditioning of a regional run is the base prompt and every region's prompt, each encoded on its own and
concatenated along the token axis (`spans`: FLUX `max_sequence_length` T5 tokens per prompt, SD3 77 CLIP + T5's
`max_sequence_length` = `text_tokens`); the pooled embedding is the base prompt's. A joint attention layer computes,
per prompt span s, one attention whose keys and values are [that span's text tokens; all image tokens] (in the
model's own order: FLUX text first, SD3 image first):

    out_s = softmax(q K_s^T / sqrt(d)) V_s,    K_s = [k_text[s]; k_image],  V_s likewise.

The span's text queries take their output from this attention (a prompt's tokens never see another prompt's); an
image query gets out_s of every span and keeps the blend Σ_s w_s(pos) · out_s(pos), with w_s the regions' weights
(`RegionLayout.weights`: region r weighs its mask, the base prompt what the regions leave) resized to the image token
grid (`attention_grid`: FLUX's 2x2-packed tokens, SD3's patches). Image queries where a span's weight is 0 are not
computed for it (its term is zero there), as `RegionalCrossAttention` does on the UNet. The image-image part of the
attention is thus evaluated once per span over the image queries that span weighs in at: regions that tile the image
cost about one joint attention over the image, plus each span's text queries. With one span (weight 1 everywhere)
this is exactly the layer's own joint attention.

Layers: FLUX's double-stream blocks (text in `encoder_hidden_states`), its single-stream blocks (text first inside
`hidden_states`, `encoder_hidden_states` None: the processor knows the total text length) and SD3's joint blocks
(`attn`; its last block is `context_pre_only`: its text output is not used, so its text queries are skipped; SD 3.5's
image-only `attn2` is left as it is). The projections, QK-norms, FLUX's rotary embedding and the output projections
are diffusers' own (`_get_qkv_projections`, `norm_q`/`norm_k`/`norm_added_*`, `apply_rotary_emb`, `to_out`,
`to_add_out`), so routed LoRAs act on them as in the plain forward. The attention itself is torch's
`scaled_dot_product_attention` (diffusers' default backend).

Related work and where this differs. "Training-free Regional Prompting for Diffusion Transformers" (Chen et al.
2024, arXiv 2411.02395) builds one attention mask over FLUX's [all prompts; image] sequence (each region's image
tokens see only their prompt's tokens and each other, each prompt only itself and its region) and mixes that
regional output with an ordinary pass of the base prompt by a `base_ratio`, for the first steps and blocks only.
Regional Prompter's attention couple (A1111) computes one cross-attention per prompt on a UNet and blends the outputs
by the masks. Ours is the attention couple carried to the joint attention: every image query attends to all image
tokens plus one prompt at a time, and the per-span outputs are blended by the regions' weights in every layer at
every step, as the UNet path does (`base_weight` mixes the base prompt into the regions, Regional Prompter's base
ratio); no attention mask and no second pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from loraloom.composition.spatial import resize_mask

from .attention import processors_installed


def _attend(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)


class RegionalJointAttention:
    """Attention processor for the joint attention of FLUX.1 (`family="flux"`: double and single-stream blocks) and
    SD 3/3.5 (`family="sd3"`: the joint blocks' `attn`) over a conditioning of concatenated prompts (module doc).

    `spans`: each prompt's text token positions (contiguous, from 0); `weights`: (h, w) blend weights per prompt at the
    latent's size, summing to 1 per position; `grid`: the image token grid of the layers."""

    def __init__(self, family: str, spans: Sequence[slice], weights: Sequence[torch.Tensor], grid: tuple[int, int]):
        if family not in ("flux", "sd3"):
            raise ValueError(f"no regional joint attention for model family {family!r}")
        if len(spans) != len(weights):
            raise ValueError(f"{len(spans)} prompt spans but {len(weights)} region weight maps")
        self.family = family
        self.spans = list(spans)
        self.text_tokens = self.spans[-1].stop
        self.grid = (int(grid[0]), int(grid[1]))
        self.weights = [resize_mask(w.float(), *self.grid).reshape(-1) for w in weights]  # per image token
        self._cache: dict[tuple, list[tuple]] = {}

    def _image_weights(self, like: torch.Tensor) -> list[tuple]:
        """Per span: (weights (1, 1, n, 1), None, None) where it weighs in at every image query, else (None, the
        positions where its weight is above zero, the weights there (1, 1, k, 1))."""
        key = (like.device, like.dtype)
        if key not in self._cache:
            out = []
            for w in self.weights:
                where = torch.nonzero(w > 0).reshape(-1)
                if where.numel() == w.numel():
                    out.append((w.view(1, 1, -1, 1).to(like.device, like.dtype), None, None))
                else:
                    out.append((None, where.to(like.device), w[where].view(1, 1, -1, 1).to(like.device, like.dtype)))
            self._cache[key] = out
        return self._cache[key]

    def _check(self, text: int, image: int) -> None:
        n = self.grid[0] * self.grid[1]
        if text != self.text_tokens or image != n:
            raise ValueError(f"regional joint attention was set up for {self.text_tokens} text tokens and a "
                             f"{self.grid[0]}x{self.grid[1]} image token grid ({n}); this layer has {text} text and "
                             f"{image} image tokens")

    def blend(self, q_txt, k_txt, v_txt, q_img, k_img, v_img, image_first: bool, text_out: bool = True):
        """(text output (b, heads, T, d) or None, image output (b, heads, N, d)) of the per-span attentions, all
        inputs (b, heads, tokens, d) after norms and rotary (module doc)."""
        out_txt = torch.empty_like(q_txt) if text_out else None
        out_img = None
        for span, (weight, where, weight_there) in zip(self.spans, self._image_weights(q_img), strict=True):
            kt, vt = k_txt[:, :, span], v_txt[:, :, span]
            keys = torch.cat([k_img, kt] if image_first else [kt, k_img], dim=2)
            values = torch.cat([v_img, vt] if image_first else [vt, v_img], dim=2)
            qi = q_img if where is None else q_img.index_select(2, where)
            qt = q_txt[:, :, span] if text_out else q_txt[:, :, :0]
            queries = torch.cat([qi, qt] if image_first else [qt, qi], dim=2)
            if queries.shape[2] == 0:
                continue
            part = _attend(queries, keys, values)
            pi, pt = (part[:, :, :qi.shape[2]], part[:, :, qi.shape[2]:]) if image_first else \
                (part[:, :, qt.shape[2]:], part[:, :, :qt.shape[2]])
            if text_out:
                out_txt[:, :, span] = pt
            if where is None:
                out_img = pi * weight if out_img is None else out_img + pi * weight
            elif where.numel():
                out_img = torch.zeros_like(q_img) if out_img is None else out_img
                out_img.index_add_(2, where, pi * weight_there)
        if out_img is None:  # no span weighs in anywhere (the weights sum to 1 per position, so never in a run)
            out_img = torch.zeros_like(q_img)
        return out_txt, out_img

    # Explicit parameters: diffusers drops keyword arguments a processor's signature does not name.
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if attention_mask is not None:
            raise ValueError("regional joint attention takes no attention mask")
        if self.family == "flux":
            return self._flux(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        return self._sd3(attn, hidden_states, encoder_hidden_states)

    def _flux(self, attn, hidden_states, encoder_hidden_states, image_rotary_emb):
        """diffusers' `FluxAttnProcessor` with the attention replaced by `blend`."""
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        double = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        if double:
            encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
            encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        elif encoder_hidden_states is not None:
            raise ValueError("regional joint attention: a FLUX layer with text tokens but no text projections")
        if image_rotary_emb is not None:  # over [text; image] positions
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        text = self.text_tokens
        self._check(encoder_hidden_states.shape[1] if double else text, query.shape[1] - text)
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # (b, heads, seq, d)
        out_txt, out_img = self.blend(q[:, :, :text], k[:, :, :text], v[:, :, :text], q[:, :, text:], k[:, :, text:],
                                      v[:, :, text:], image_first=False)
        out = torch.cat([out_txt, out_img], dim=2).transpose(1, 2).flatten(2, 3).to(query.dtype)
        if not double:
            return out
        encoder_out, out = out[:, :text], out[:, text:]
        out = attn.to_out[1](attn.to_out[0](out.contiguous()))
        return out, attn.to_add_out(encoder_out.contiguous())

    def _sd3(self, attn, hidden_states, encoder_hidden_states):
        """diffusers' `JointAttnProcessor2_0` with the attention replaced by `blend`."""
        if encoder_hidden_states is None:
            raise ValueError("regional joint attention: an SD3 joint layer called without text tokens")
        batch = hidden_states.shape[0]
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (x.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        text_out = not attn.context_pre_only  # the last block's text output is not used: its text queries are skipped
        ek = attn.add_k_proj(encoder_hidden_states).view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        ev = attn.add_v_proj(encoder_hidden_states).view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if text_out:
            eq = attn.add_q_proj(encoder_hidden_states).view(batch, -1, attn.heads, head_dim).transpose(1, 2)
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
        else:
            eq = ek[:, :, :0]
        if attn.norm_added_k is not None:
            ek = attn.norm_added_k(ek)
        self._check(ek.shape[2], query.shape[2])
        out_txt, out_img = self.blend(eq, ek, ev, query, key, value, image_first=True, text_out=text_out)
        out = out_img.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if not text_out:
            return out, None
        encoder_out = attn.to_add_out(out_txt.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype))
        return out, encoder_out


def regional_joint_modules(transformer, family: str) -> list:
    """The attention modules that attend over text and image tokens: FLUX's double- and single-stream blocks' `attn`,
    SD3's joint blocks' `attn` (not SD 3.5's image-only `attn2`)."""
    if family == "flux":
        return [b.attn for b in transformer.transformer_blocks] + [b.attn for b in transformer.single_transformer_blocks]
    if family == "sd3":
        return [b.attn for b in transformer.transformer_blocks]
    raise ValueError(f"no regional joint attention for model family {family!r}")


@contextmanager
def regional_joint_attention(transformer, family: str, spans: Sequence[slice], weights: Sequence[torch.Tensor],
                             grid: tuple[int, int]):
    """Within the block, the transformer's joint attention blends per-prompt attention by region (processors restored
    after); yields the processor."""
    processor = RegionalJointAttention(family, spans, weights, grid)
    with processors_installed(regional_joint_modules(transformer, family), lambda _: processor):
        yield processor


__all__ = ["RegionalJointAttention", "regional_joint_attention", "regional_joint_modules"]
