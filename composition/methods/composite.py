"""LoRA Composite: every LoRA guides every step; per-LoRA CFG outputs are averaged (Zhong et al. 2024, sec. 3.3)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..conditioning import Conditioning
from ..routing import Routing
from .base import DenoiseContext, Method, Step, param, register
from .guidance import composite_guidance


@dataclass
class CompositeParams:
    lora_scale: float = param(0.8, "Global LoRA scale (ComposLoRA: 0.8); each LoRA's own weight multiplies it.")
    max_batch: int = param(0, "Most batch rows per UNet call (each LoRA adds 2 rows); 0 = all branches in one call. "
                              "Lower it when memory is short.", min=0)
    reference_text_encoding: bool = param(False, "Reproduce the reference code's prompt encoding: one encoding with all "
                                                 "LoRAs in the text encoder, shared by every branch. Default: each "
                                                 "branch uses the prompt encoded with its own text-encoder LoRA.")


@register
class Composite(Method):
    """Rows [neg_1, pos_1, ..., neg_k, pos_k] run in one batched UNet call, row pair i routed to LoRA i only."""

    name = "composite"
    Params = CompositeParams
    supports_regions = True
    description = "Each LoRA guides every step; guidance averaged."

    def prepare(self, ctx: DenoiseContext) -> None:
        p = self.params
        gates = [{l.name: l.weight * p.lora_scale} for l in ctx.loras]
        if p.reference_text_encoding:
            shared = ctx.encode([{k: v for g in gates for k, v in g.items()}])[0]
            conds = [shared] * len(gates)
        else:
            conds = ctx.encode(gates)
        self.k = len(gates)
        self.cond = Conditioning.cat([part for pair in conds for part in pair])
        self.routing = Routing.from_blocks([(2, g) for g in gates])

    def denoise(self, ctx: DenoiseContext, latents: torch.Tensor, step: Step) -> torch.Tensor:
        b = latents.shape[0]
        rows = latents.repeat(2 * self.k, *([1] * (latents.ndim - 1)))
        eps = ctx.predict(rows, step, self.cond, self.routing, max_batch=self.params.max_batch or None)
        eps = eps.reshape(self.k, 2, b, *latents.shape[1:])
        return composite_guidance(eps[:, 0], eps[:, 1], ctx.guidance_scale)
