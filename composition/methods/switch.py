"""LoRA Switch: one LoRA active at a time, rotating every tau steps (Zhong et al. 2024, sec. 3.2)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import MethodError
from ..routing import Routing
from .base import ActiveLoRA, DenoiseContext, Method, Step, cfg_pair, param, register
from .guidance import category_rank, classifier_free_guidance, switch_active_index


@dataclass
class SwitchParams:
    lora_scale: float = param(0.8, "Global LoRA scale (ComposLoRA: 0.8); each LoRA's own weight multiplies it.")
    switch_interval: int = param(5, "tau: steps each LoRA stays active before the next takes over (paper's best: 5).", min=1)
    order: str = param("category", "Activation order: 'category' (character, clothing, style, background, object, "
                                   "as ComposLoRA) or 'given' (the order the LoRAs were listed).", choices=["category", "given"])
    reference_timing: bool = param(False, "Reproduce the reference code's timing, whose first LoRA runs tau+1 steps "
                                          "(its switch callback fires after step tau).")
    reference_text_encoding: bool = param(False, "Reproduce the reference code's prompt encoding: once, with only the "
                                                 "first LoRA in the text encoder. Default: each LoRA uses the prompt "
                                                 "encoded with its own text-encoder LoRA while it is active.")


def ordered(loras, order: str) -> list[ActiveLoRA]:
    if order == "given":
        return list(loras)
    if order == "category":
        return sorted(loras, key=lambda l: category_rank(l.category))  # stable: ties keep the given order
    raise MethodError(f"unknown order {order!r}; use 'category' or 'given'")


@register
class Switch(Method):
    name = "switch"
    Params = SwitchParams
    supports_regions = True
    description = "One LoRA at a time, switching every tau steps."

    def prepare(self, ctx: DenoiseContext) -> None:
        p = self.params
        self.order = ordered(ctx.loras, p.order)
        self.gates = [{l.name: l.weight * p.lora_scale} for l in self.order]
        if p.reference_text_encoding:
            self.conds = [cfg_pair(ctx.encode(self.gates[:1])[0])] * len(self.order)
        else:
            self.conds = [cfg_pair(c) for c in ctx.encode(self.gates)]

    def active_index(self, step: Step) -> int:
        return switch_active_index(step.index, self.params.switch_interval, len(self.order), self.params.reference_timing)

    def denoise(self, ctx: DenoiseContext, latents: torch.Tensor, step: Step) -> torch.Tensor:
        a = self.active_index(step)
        eps_u, eps_c = ctx.predict(torch.cat([latents, latents]), step, self.conds[a], Routing.uniform(self.gates[a])).chunk(2)
        return classifier_free_guidance(eps_u, eps_c, ctx.guidance_scale)
