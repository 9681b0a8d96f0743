"""Which layers are worth fusing for one run: Merge's per-layer choice between adding the LoRAs into the weight
and routing their factors, on the diffusion transformers (FLUX.1, SD 3/3.5).

Fusing a layer (out × in) with its LoRAs' factors stacked to total rank r writes one product (out × r)(r × in) into
a new weight: about out·in·(2r + κ) operations, κ standing for the memory traffic of making and reading a weight-sized
tensor (κ = 64: on this project's CPU machine a fresh 150 MB tensor costs about what a rank-32 product over it
does; `benchmarks/bench_dit.py` shows the effect). Routing the factors instead costs 2r·(in + out) operations per
token row, for every token row of the run: T = model calls × rows per call × the tokens the layer sees. Fusing wins
when T·2r·(in + out) > out·in·(2r + κ). At FLUX.1's widths (out·in/(in + out) ≈ 2300) that takes a few thousand
token rows: a full-size generation (4096 image tokens, 28 steps) fuses every layer that sees tokens, a 256² 4-step
one routes most of them, and the modulation linears (`norm1.linear`, `norm.linear`: one vector per row, a third of
FLUX.1's adapted weights) are never worth fusing. The choice changes no value beyond float rounding (fused and
routed layers compute the same W x + ΔW x).

On a UNet every adapted layer is fused as before (its layers see thousands of positions at every resolution).
"""

from __future__ import annotations

KAPPA = 64.0


def fusing_pays(out_features: int, in_features: int, rank: int, token_rows: int, kappa: float = KAPPA) -> bool:
    """True when fusing a rank-`rank` update into an (out × in) weight costs less than routing it over `token_rows`
    token rows (the module docstring's inequality)."""
    return token_rows * 2.0 * rank * (in_features + out_features) > out_features * in_features * (2.0 * rank + kappa)


def token_rows(stream: str | None, image_tokens: int, text_tokens: int, calls: int, rows: int) -> int:
    """Token rows a transformer layer processes over a run: its stream's tokens ('image', 'text', 'joint' = both;
    None = one vector per row, the modulations and embedders) × rows per call × calls."""
    tokens = {"image": image_tokens, "text": text_tokens, "joint": image_tokens + text_tokens}.get(stream, 1)
    return tokens * rows * calls
