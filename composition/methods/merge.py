"""LoRA Merge: all LoRAs active at once in every layer (the ComposLoRA baseline, Zhong et al. 2024, sec. 3.1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..routing import Routing
from .base import DenoiseContext, Method, Step, cfg_pair, param, register
from .guidance import classifier_free_guidance


@dataclass
class MergeParams:
    lora_scale: float = param(0.8, "Global LoRA scale (ComposLoRA: 0.8); each LoRA's own weight multiplies it. "
                                   "Merge applies every LoRA at this scale, not divided by their number.")
    fuse: bool = param(True, "Add the LoRA updates into the UNet weights for the run (as fast as the base model); "
                             "the original weights are restored bit-exactly afterwards. On FLUX.1/SD3 only the layers "
                             "where fusing costs less than routing over the run are fused (composition.fuse_cost).")


@register
class Merge(Method):
    """W' = W + lambda * sum_i w_i * (alpha_i / r_i) B_i A_i in every adapted layer; one UNet call per step."""

    name = "merge"
    Params = MergeParams
    supports_regions = True
    description = "All LoRAs summed into the weights (baseline)."

    def gates(self, ctx: DenoiseContext) -> dict[str, float]:
        return {l.name: l.weight * self.params.lora_scale for l in ctx.loras}

    def fused_gates(self, ctx: DenoiseContext) -> dict[str, float] | None:
        # a schedule or a mask changes the LoRAs per step or place: unfused
        return self.gates(ctx) if self.params.fuse and ctx.can_fuse else None

    def prepare(self, ctx: DenoiseContext) -> None:
        gates = self.gates(ctx)
        # The text encoder sees every LoRA too, as in the reference implementation.
        self.cond = cfg_pair(ctx.encode([gates])[0])
        self.layer_gates = None
        if self.fused_gates(ctx) is None:
            self.routing = Routing.uniform(gates)
            return
        # On a diffusion transformer only the layers where fusing costs less than routing are fused
        # (`composition.fuse_cost`); the adapters stay routed on the others (their fused layers gated to 0).
        paths = ctx.fuse_paths(gates)
        ctx.enter(ctx.unet_router.fused(gates, paths))
        adapted = {p for p, layer in ctx.unet_router.layers.items() if any(n in layer.factors for n in gates)}
        if paths is None or adapted <= paths:
            self.routing = Routing.none()
        else:
            self.routing = Routing.uniform(gates)
            self.layer_gates = {p: dict.fromkeys(gates, 0.0) for p in paths}

    def denoise(self, ctx: DenoiseContext, latents: torch.Tensor, step: Step) -> torch.Tensor:
        eps_u, eps_c = ctx.predict(torch.cat([latents, latents]), step, self.cond, self.routing,
                                   layer_gates=self.layer_gates).chunk(2)
        return classifier_free_guidance(eps_u, eps_c, ctx.guidance_scale)
