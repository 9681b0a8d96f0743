"""The denoising loop, once: every image loraloom samples goes through `denoise` (a composed generation, a
method's profiling or reference images, the toy world's training-time samples).

What differs between them is only how the noise prediction of a step is made, so that is the one argument
that varies (`predict`); the loop itself is diffusers' (`scheduler.step` on each of `scheduler.timesteps`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from loraloom.composition.errors import GenerationError
from loraloom.composition.methods import Step
from loraloom.composition.methods.guidance import classifier_free_guidance

from .schedulers import step_kwargs

# (latents, step) -> (noise prediction, latents to step from): a latent-optimising method (CLoRA) may move them.
Predict = Callable[[torch.Tensor, Step], tuple[torch.Tensor, torch.Tensor]]


def denoise(
    scheduler,
    latents: torch.Tensor,
    predict: Predict,
    *,
    generator: torch.Generator | None = None,
    on_step: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    stop: Callable[[], bool] | None = None,
    progress_bar: bool = False,
    desc: str | None = None,
) -> tuple[torch.Tensor, bool]:
    """Run `scheduler` (timesteps already set) from `latents`; returns (final latents, stopped early).

    `on_step(index, timestep, latents)` sees the latents after each step and returns them (or replacements, as
    diffusers' `callback_on_step_end` may); `stop()` is asked before each step; stochastic schedulers draw from
    `generator`.
    """
    extra = step_kwargs(scheduler, generator)
    timesteps = scheduler.timesteps
    for i, t in enumerate(tqdm(timesteps, desc=desc, disable=not progress_bar, leave=False)):
        if stop is not None and stop():
            return latents, True
        eps, latents = predict(latents, Step(i, len(timesteps), t))
        latents = scheduler.step(eps, t, latents, **extra, return_dict=False)[0]
        if not bool(torch.isfinite(latents).all()):
            raise GenerationError(f"step {i + 1} of {len(timesteps)} gave NaN/Inf latents; no image was made. Fix: lower the "
                                  "LoRA weights or the guidance scale, or run in float32 (--dtype float32).")
        if on_step is not None:
            latents = on_step(i, t, latents)
    return latents, False


def guided(predict_pair: Callable[[torch.Tensor, Step], torch.Tensor], guidance_scale: float) -> Predict:
    """A `predict` for plain classifier-free guidance: `predict_pair` gives the UNet output of [latents; latents]
    under [negative; positive] conditioning."""

    def predict(latents: torch.Tensor, step: Step) -> tuple[torch.Tensor, torch.Tensor]:
        u, c = predict_pair(torch.cat([latents, latents]), step).chunk(2)
        return classifier_free_guidance(u, c, guidance_scale), latents

    return predict
