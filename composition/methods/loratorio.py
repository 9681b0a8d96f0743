"""LoRAtorio: spatially weighted multi-LoRA composition from the model's own predictions (Foteinopoulou, Budvytis,
Liwicki, "LoRAtorio: An intrinsic approach to LoRA Skill Composition", arXiv 2508.11624, 2025). Spec:
docs/methods/loratorio.md.

Every step runs the base model and each LoRA alone, each as a CFG pair, in one batched UNet call (N + 1 pairs;
Composite runs N). Per patch of the latent, each LoRA's conditional prediction is compared with the base model's
by cosine similarity; a SoftMin over the LoRAs makes the weights Omega (a LoRA that departs from the base model in
a patch is taken to be in its own domain there, so it leads there). The conditional and unconditional predictions
of the LoRAs are averaged under Omega, and the unconditional one is re-centred on the base model's before
classifier-free guidance (`composition/spatial_weights.py`). Dynamic selection (`top_k`): only the k most
relevant LoRAs of a larger pool take part at each step (or in each patch); the unconditional rows of the others are
then not run at all.

No reference code is public (the project page lists the code as "coming soon"); the equations follow the paper
and the authors' project page (docs/methods/loratorio.md#sources).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..conditioning import Conditioning
from ..routing import Routing
from ..spatial_weights import loratorio_guidance, patch_cosine, patches_to_latent, softmin_weights
from .base import DenoiseContext, Method, Step, param, register
from .guidance import classifier_free_guidance


@dataclass
class LoRAtorioParams:
    lora_scale: float = param(0.8, "Weight of each LoRA in its branch (the ComposLoRA testbed's 0.8, on which the paper "
                                   "evaluates); each LoRA's own weight multiplies it.")
    patch_size: int = param(8, "Side of the square patches, in latent cells, over which each LoRA's prediction is "
                               "compared with the base model's (8 = 64 pixels with an 8x VAE; a patch larger than the "
                               "latent is the whole latent).", min=1)
    temperature: float = param(1.0, "SoftMin temperature T: Omega = softmax(-cos / T) over the LoRAs (1 = the plain "
                                    "SoftMin the paper names; lower is sharper).", min=1e-6)
    recenter: float = param(0.5, "Re-centring weight lambda: the unconditional prediction is lambda x the base "
                                 "model's + (1 - lambda) x the LoRAs' weighted one (paper: 0.5; 0 = plain CFG on "
                                 "the weighted LoRA predictions).", min=0.0, max=1.0)
    top_k: int = param(0, "Dynamic selection: only the k LoRAs least similar to the base model take part (0 = all, "
                          "the static setting).", min=0)
    selection: str = param("step", "With top_k: choose the k LoRAs once per step for the whole image ('step', by "
                                   "their mean similarity) or in every patch ('patch').", choices=["step", "patch"])
    max_batch: int = param(0, "Most batch rows per UNet call (N + 1 CFG pairs per step); 0 = all in one call.", min=0)


@register
class LoRAtorio(Method):
    """Rows [neg_0, pos_0, neg_1, pos_1, ..., neg_N, pos_N]: pair 0 the base model (no LoRA), pair i LoRA i alone."""

    name = "loratorio"
    Params = LoRAtorioParams
    description = "Each LoRA weighted per patch by how far it departs from the base model; guidance re-centred on the base."

    def prepare(self, ctx: DenoiseContext) -> None:
        p = self.params
        gates = [{l.name: l.weight * p.lora_scale} for l in ctx.loras]
        self.names = [l.name for l in ctx.loras]
        self.k = len(gates)
        conds = ctx.encode([{}] + gates)  # branch 0: the base model, its prompt encoded without LoRAs
        self.neg = [pair[0] for pair in conds]
        self.pos = [pair[1] for pair in conds]
        self.gates = [{}] + gates
        self.cond = Conditioning.cat([part for pair in conds for part in pair])
        self.routing = Routing.from_blocks([(2, g) for g in self.gates])
        # dynamic selection: first the base pair and every LoRA's conditional row, then the chosen LoRAs' unconditional
        self.dynamic = 0 < p.top_k < self.k
        if self.dynamic:
            self.cond_first = Conditioning.cat([self.neg[0], self.pos[0], *self.pos[1:]])
            self.routing_first = Routing.from_blocks([(2, {})] + [(1, g) for g in gates])
        self.extras = {"loras": list(self.names), "mean_weights": [], "selected": []}

    def weights(self, lora_cond: torch.Tensor, base_cond: torch.Tensor) -> torch.Tensor:
        """Omega at the latent's cells, (k, B, 1, H, W), from the conditional predictions (k, B, C, H, W) and (B, C, H, W)."""
        p = self.params
        sim = patch_cosine(lora_cond, base_cond, p.patch_size)
        omega = softmin_weights(sim, p.temperature, p.top_k, p.selection)
        return patches_to_latent(omega, *lora_cond.shape[-2:], p.patch_size)

    def denoise(self, ctx: DenoiseContext, latents: torch.Tensor, step: Step) -> torch.Tensor:
        b, shape = latents.shape[0], latents.shape[1:]
        rep = [1] * (latents.ndim - 1)
        max_batch = self.params.max_batch or None
        if self.k == 0:  # no LoRA: the base model's plain CFG
            u, c = ctx.predict(torch.cat([latents, latents]), step, self.cond, self.routing, max_batch=max_batch).chunk(2)
            return classifier_free_guidance(u, c, ctx.guidance_scale)
        if not self.dynamic:
            eps = ctx.predict(latents.repeat(2 * (self.k + 1), *rep), step, self.cond, self.routing, max_batch=max_batch)
            eps = eps.reshape(self.k + 1, 2, b, *shape)
            base_u, base_c, lora_u, lora_c = eps[0, 0], eps[0, 1], eps[1:, 0], eps[1:, 1]
            omega = self.weights(lora_c, base_c)
        else:
            first = ctx.predict(latents.repeat(self.k + 2, *rep), step, self.cond_first, self.routing_first, max_batch=max_batch)
            first = first.reshape(self.k + 2, b, *shape)
            base_u, base_c, lora_c = first[0], first[1], first[2:]
            omega = self.weights(lora_c, base_c)
            chosen = [i for i in range(self.k) if bool((omega[i] > 0).any())]
            rows = Conditioning.cat([self.neg[i + 1] for i in chosen])
            routing = Routing.from_blocks([(1, self.gates[i + 1]) for i in chosen])
            second = ctx.predict(latents.repeat(len(chosen), *rep), step, rows, routing, max_batch=max_batch)
            lora_u = torch.zeros_like(lora_c)  # a LoRA left out has Omega = 0 everywhere: its row is not needed
            lora_u[chosen] = second.reshape(len(chosen), b, *shape)
            self.extras["selected"].append([self.names[i] for i in chosen])
        self.extras["mean_weights"].append([round(float(w), 4) for w in omega.detach().mean(dim=(1, 2, 3, 4))])
        return loratorio_guidance(base_u, lora_u, lora_c, omega, ctx.guidance_scale, self.params.recenter)
