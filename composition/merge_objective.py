"""The ZipLoRA objective (Shah et al. 2024, eq. 4), shared by ZipLoRA's per-pair optimisation and the LoRA.rar
hypernetwork training:

    L = || eps_merged(x_c^t, p_c) - eps_Lc(x_c^t, p_c) ||^2 + || eps_merged(x_s^t, p_s) - eps_Ls(x_s^t, p_s) ||^2
        + lambda * sum_layers |sim(m_c, m_s)|

x_c^t, x_s^t: the subject's and the style's reference latents noised with the same noise at the same random t
(as both reference codes do); p_c, p_s: each LoRA's own prompt; the targets are each LoRA's own prediction
(no grad), not the true noise. The merged model is a LoRA resident in the UNet router whose factors are rebuilt
from the current coefficients before each forward, so gradients reach the coefficients (or the hypernetwork
that predicts them) through the ordinary routed forward. Works on a diffusers UNet and a `LoRARouter`; the
pipeline itself is duck-typed (no import of `pipelines`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .conditioning import Conditioning
from .lora import LoRA
from .merging import coefficient_similarity, column_merged_layer, merged_lora
from .routing import LoRARouter, Routing


@dataclass
class PairBatchData:
    """What the objective needs for one (subject, style) pair; conditionings are single rows (positive prompts)."""

    subject: str
    style: str
    w_c: float
    w_s: float
    x_c: torch.Tensor  # (n_c, C, h, w) reference latents of the subject (scaled, as the UNet sees them)
    x_s: torch.Tensor  # (n_s, C, h, w)
    cond_c: Conditioning  # p_c encoded with the subject's own text-encoder part
    cond_s: Conditioning  # p_s encoded with the style's own text-encoder part
    cond_mc: Conditioning  # p_c encoded with both text-encoder parts (the merged model's)
    cond_ms: Conditioning


class TrainableMerge:
    """A merged subject+style adapter in the UNet router whose column coefficients may carry gradients.

    Layers without coefficients stay a plain sum; `set_coefficients` rebuilds the coefficient layers' factors.
    Use as a context manager (the adapter is removed on exit).
    """

    def __init__(self, router: LoRARouter, name: str, subject: LoRA, style: LoRA, paths, w_c: float = 1.0, w_s: float = 1.0):
        self.router, self.name = router, name
        self.w_c, self.w_s = w_c, w_s
        comp = router.component
        self.sources = {p: (subject.layers[comp][p], style.layers[comp][p]) for p in paths}
        self.lora = merged_lora(name, subject, style, None, w_c, w_s)
        self.lora.layers = {comp: self.lora.layers.get(comp, {})}  # this router's part only
        router.add(self.lora)
        weight = next(iter(router.layers.values())).module.weight
        self.dtype = weight.dtype

    def set_coefficients(self, coefficients: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        comp = self.router.component
        for path, (m_c, m_s) in coefficients.items():
            c, s = self.sources[path]
            new = column_merged_layer(c, s, m_c, m_s, self.w_c, self.w_s)
            layer = self.lora.layers[comp][path]
            layer.down, layer.up = new.down.to(self.dtype), new.up.to(self.dtype)
        self.router.invalidate()

    def close(self) -> None:
        self.router.remove(self.name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def own_prompt(lora: LoRA, template: str = "", fallback: str = "") -> str:
    """A LoRA's own prompt p_c / p_s: `template` with {trigger} / {triggers} = its trigger words; else its sidecar's
    "prompt"; else its trigger words; else `fallback`."""
    triggers = ", ".join(lora.triggers)
    if template:
        return template.replace("{triggers}", triggers).replace("{trigger}", triggers)
    side = lora.info.sidecar or {}
    prompt = str(side.get("prompt") or triggers or fallback)
    if not prompt:
        raise ValueError(f"{lora.path or lora.name}: no trigger words and no sidecar 'prompt' to build its own prompt from. "
                         "Fix: add a sidecar .json with \"triggers\" or \"prompt\", or pass a prompt template.")
    return prompt


def training_scheduler(pipe):
    """A DDPM scheduler with the model's own noise schedule (add_noise at random training timesteps)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config)


def noised_pair(scheduler, x_c: torch.Tensor, x_s: torch.Tensor, generator: torch.Generator):
    """x_c^t, x_s^t with the same noise and the same t ~ U[0, T) (both reference codes), and t."""
    noise = torch.randn(x_c.shape, generator=generator, device=generator.device).to(x_c)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=generator, device=generator.device)
    t = t.to(x_c.device)
    return scheduler.add_noise(x_c, noise, t), scheduler.add_noise(x_s, noise.to(x_s), t), t


def _unet(unet, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    return unet(x, t.expand(x.shape[0]), **cond.unet_kwargs(), return_dict=False)[0]


@torch.no_grad()
def own_predictions(unet, router: LoRARouter, data: PairBatchData, xt_c: torch.Tensor, xt_s: torch.Tensor, t) -> torch.Tensor:
    """[eps_Lc(x_c^t, p_c); eps_Ls(x_s^t, p_s)] in one routed call (row 0 subject alone, row 1 style alone)."""
    router.set_routing(Routing.from_blocks([(1, {data.subject: data.w_c}), (1, {data.style: data.w_s})]))
    try:
        return _unet(unet, torch.cat([xt_c, xt_s]), t, Conditioning.cat([data.cond_c, data.cond_s]))
    finally:
        router.set_routing(None)


def merged_predictions(unet, router: LoRARouter, merged: TrainableMerge, data: PairBatchData, xt_c, xt_s, t) -> torch.Tensor:
    """[eps_merged(x_c^t, p_c); eps_merged(x_s^t, p_s)] in one call (with grad when enabled)."""
    router.set_routing(Routing.uniform({merged.name: 1.0}))
    try:
        return _unet(unet, torch.cat([xt_c, xt_s]), t, Conditioning.cat([data.cond_mc, data.cond_ms]))
    finally:
        router.set_routing(None)


def similarity_penalty(coefficients: Mapping[str, tuple[torch.Tensor, torch.Tensor]], kind: str = "cosine") -> torch.Tensor:
    """sum over layers of |sim(m_c, m_s)| (eq. 4's last term)."""
    return torch.stack([coefficient_similarity(m_c.float(), m_s.float(), kind) for m_c, m_s in coefficients.values()]).sum()


def objective(unet, router, merged: TrainableMerge, data: PairBatchData, coefficients, scheduler, generator,
              lam: float = 0.01, similarity: str = "cosine", index: tuple[int, int] = (0, 0)) -> dict[str, torch.Tensor]:
    """One evaluation of the ZipLoRA loss on reference image index[0] of the subject and index[1] of the style."""
    x_c = data.x_c[index[0] % len(data.x_c)][None]
    x_s = data.x_s[index[1] % len(data.x_s)][None]
    xt_c, xt_s, t = noised_pair(scheduler, x_c, x_s, generator)
    target = own_predictions(unet, router, data, xt_c, xt_s, t).float()
    merged.set_coefficients(coefficients)
    pred = merged_predictions(unet, router, merged, data, xt_c, xt_s, t).float()
    mse_c = F.mse_loss(pred[0], target[0])
    mse_s = F.mse_loss(pred[1], target[1])
    sim = similarity_penalty(coefficients, similarity) if coefficients else pred.new_zeros(())
    return {"loss": mse_c + mse_s + lam * sim, "mse_subject": mse_c, "mse_style": mse_s, "similarity": sim}
