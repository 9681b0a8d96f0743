"""Which layers are worth fusing for one run: Merge's per-layer choice between adding the LoRAs into the weight
and routing their factors, on the diffusion transformers (FLUX.1, SD 3/3.5).

Fusing a layer (out × in) with its LoRAs' factors stacked to total rank r writes one product (out × r)(r × in) into
a new weight: about out·in·(2r + κ) operations, κ standing for what the product does not count: making, filling and
later dropping a weight-sized tensor (page faults, memory traffic) and the routed path's better use of the machine
(its small products run at full speed). κ = 160 is fitted on the CPU machine this project is developed on: fusing
3 rank-16 LoRAs into FLUX.1's widths (1.02 B weights) took 3.0 CPU-s against 57 s for a 256², 4-step generation, and
at those runs Merge with every layer fused was slower than with every layer routed (sd35-shape, medians of 3: 1.052
against 1.024 of the base model's time); κ = 160 makes the model say the same for both shapes, while a full-size
generation still fuses everything that sees tokens. Routing the factors instead costs 2r·(in + out) operations per
token row, for every token row of the run: T = model calls × rows per call × the tokens the layer sees. Fusing wins
when T·2r·(in + out) > out·in·(2r + κ). At FLUX.1's widths (out·in/(in + out) ≈ 1500–2500) that takes about four to
seven thousand token rows at r = 48: a full-size generation (4096 image tokens, 28 steps) fuses every layer that sees
tokens, a 256² 4-step one routes them all, and the modulation linears (`norm1.linear`, `norm.linear`: one vector per row, a third of
FLUX.1's adapted weights) are never worth fusing. The choice changes no value beyond float rounding (fused and
routed layers compute the same W x + ΔW x).

On a UNet every adapted layer is fused as before (its layers see thousands of positions at every resolution).
"""

from __future__ import annotations

KAPPA = 160.0


def fusing_pays(out_features: int, in_features: int, rank: int, token_rows: int, kappa: float = KAPPA) -> bool:
    """True when fusing a rank-`rank` update into an (out × in) weight costs less than routing it over `token_rows`
    token rows (the module docstring's inequality)."""
    return token_rows * 2.0 * rank * (in_features + out_features) > out_features * in_features * (2.0 * rank + kappa)


def token_rows(stream: str | None, image_tokens: int, text_tokens: int, calls: int, rows: int) -> int:
    """Token rows a transformer layer processes over a run: its stream's tokens ('image', 'text', 'joint' = both;
    None = one vector per row, the modulations and embedders) × rows per call × calls."""
    tokens = {"image": image_tokens, "text": text_tokens, "joint": image_tokens + text_tokens}.get(stream, 1)
    return tokens * rows * calls
