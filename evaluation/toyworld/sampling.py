"""Batched DDIM sampling straight on the model parts (for training-time evaluation; one UNet call per step for
a whole batch), through loraloom's one denoising loop (`pipelines.denoise`). Initial latents are drawn exactly as
`ComposedPipeline` draws them (one CPU generator per seed), so a seed means the same image in both."""

from __future__ import annotations

import torch

from loraloom.pipelines.denoise import denoise, guided
from loraloom.pipelines.vae import to_vae_latents

from .models import SCHEDULER_CONFIG


def encode_text(text_encoder, tokenizer, prompts: list[str]) -> torch.Tensor:
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids)[0]


def initial_latents(seeds, channels: int, size: int) -> torch.Tensor:
    return torch.cat([torch.randn((1, channels, size, size), generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds])


@torch.no_grad()
def sample(unet, text_encoder, tokenizer, vae, prompts: list[str], seeds: list[int], steps: int = 25,
           guidance_scale: float = 4.0, negative_prompt: str = "", batch_size: int = 128) -> torch.Tensor:
    """Images in [-1, 1], NCHW, one per (prompt, seed) pair."""
    from diffusers import DDIMScheduler

    outs = []
    for lo in range(0, len(prompts), batch_size):
        ps, ss = prompts[lo : lo + batch_size], seeds[lo : lo + batch_size]
        sched = DDIMScheduler(**SCHEDULER_CONFIG)
        sched.set_timesteps(steps)
        cond = encode_text(text_encoder, tokenizer, list(ps))
        uncond = encode_text(text_encoder, tokenizer, [negative_prompt]).expand_as(cond)
        ctx = torch.cat([uncond, cond])
        lat = initial_latents(ss, unet.config.in_channels, unet.config.sample_size) * sched.init_noise_sigma

        def pair(x, step, sched=sched, ctx=ctx):
            return unet(sched.scale_model_input(x, step.timestep), step.timestep, ctx, return_dict=False)[0]

        lat, _ = denoise(sched, lat, guided(pair, guidance_scale))
        outs.append(vae.decode(to_vae_latents(vae, lat), return_dict=False)[0].clamp(-1, 1))
    return torch.cat(outs)


def to_uint8(images: torch.Tensor):
    """[-1, 1] NCHW -> uint8 NHWC numpy (as the diffusers image processor rounds)."""
    x = ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()
