"""Latent scaling between the VAE and the UNet, in one place (diffusers' pipelines do this inline each time).

The UNet works on `scaling_factor * z` (SD 1.x/2.x, SDXL), or on `(z - mean) * scaling_factor / std` when the
VAE's config carries per-channel `latents_mean` / `latents_std`; these two functions are exact inverses.
"""

from __future__ import annotations

import torch


def _mean_std(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    mean, std = vae.config.get("latents_mean"), vae.config.get("latents_std")
    if mean is None or std is None:
        return None
    return torch.tensor(mean).view(1, -1, 1, 1).to(like), torch.tensor(std).view(1, -1, 1, 1).to(like)


def to_unet_latents(vae, z: torch.Tensor) -> torch.Tensor:
    """VAE latents (e.g. `vae.encode(x).latent_dist.mean`) -> the latents the UNet denoises."""
    stats = _mean_std(vae, z)
    if stats is None:
        return z * vae.config.scaling_factor
    mean, std = stats
    return (z - mean) * vae.config.scaling_factor / std


def to_vae_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """The UNet's latents -> what `vae.decode` takes."""
    stats = _mean_std(vae, latents)
    if stats is None:
        return latents / vae.config.scaling_factor
    mean, std = stats
    return latents * std / vae.config.scaling_factor + mean
