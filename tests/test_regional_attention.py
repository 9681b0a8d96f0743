"""The regional cross-attention processor (pipelines/regions.py) computes a prompt's attention only where its region
weighs in: the same output as attending every query to every prompt and blending by the weights, with fewer query
rows through the attention (the cost of masked LoRAs and regional prompts, bench lines masked_merge_vs_single and
regional_prompt_vs_single)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from loraloom.composition.spatial import mask_from, region_weights
from loraloom.pipelines.regions import RegionalCrossAttention


def blended(attn, hidden, text, spans, weights):
    """Every query attends to every prompt; the outputs are blended by the weights at the query's position."""
    q = attn.to_q(hidden)
    k, v = attn.to_k(text), attn.to_v(text)
    b, n, _ = q.shape
    d = k.shape[-1] // attn.heads
    q, k, v = (t.view(b, -1, attn.heads, d).transpose(1, 2) for t in (q, k, v))
    out = 0
    for span, w in zip(spans, weights, strict=True):
        part = F.scaled_dot_product_attention(q, k[:, :, span], v[:, :, span])
        out = out + part * F.adaptive_avg_pool2d(w[None, None], (8, 8)).reshape(1, 1, n, 1)
    return attn.to_out[0](out.transpose(1, 2).reshape(b, n, -1))


@pytest.mark.parametrize("masks,feather", [(("left", "right", "top"), 0.0), (("left", [0.5, 0.0, 1.0, 0.5]), 0.0),
                                           (("left", "right"), 0.2), (("center",), 0.0)])
def test_output_equals_the_full_blend_with_fewer_query_rows(masks, feather, monkeypatch):
    torch.manual_seed(0)
    attn = Attention(32, cross_attention_dim=24, heads=2, dim_head=16).eval()
    hidden, text_len = torch.randn(2, 64, 32), 5
    spans = [slice(i * text_len, (i + 1) * text_len) for i in range(len(masks) + 1)]
    text = torch.randn(2, text_len * len(spans), 24)
    base, parts = region_weights([mask_from(m, 16, 16, feather=feather) for m in masks])
    weights = [base, *parts]
    rows = []
    real = F.scaled_dot_product_attention

    def counting(q, *a, **kw):
        rows.append(q.shape[2])
        return real(q, *a, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    with torch.no_grad():
        got = RegionalCrossAttention(spans, weights)(attn, hidden, text)
        monkeypatch.setattr(F, "scaled_dot_product_attention", real)
        want = blended(attn, hidden, text, spans, weights)
    assert torch.allclose(got, want, atol=1e-6), float((got - want).abs().max())
    cells = [int((F.adaptive_avg_pool2d(w[None, None], (8, 8)) > 0).sum()) for w in weights]
    assert rows == [c for c in cells if c]  # each prompt: exactly the queries where it weighs in, none where it never does
    assert sum(rows) < 64 * len(spans)
