"""Stable Diffusion 1.x, 2.x and XL: a UNet on (B, 4, h, w) latents, CLIP text encoders (SDXL: two, with pooled
embeddings and time ids), classifier-free guidance, the Karras-compatible diffusers samplers."""

from __future__ import annotations

import torch

from loraloom.composition.conditioning import Conditioning

from ..defaults import DEFAULTS
from ..schedulers import make_scheduler
from ..vae import to_vae_latents
from .base import read_configs, vae_scale


def sd_family_name(pipe) -> str:
    """'sdxl', 'sd2' or 'sd1' from the loaded components (SD 2.x has 1024-wide text context)."""
    if getattr(pipe, "text_encoder_2", None) is not None or pipe.unet.config.get("addition_embed_type") == "text_time":
        return "sdxl"
    return "sd2" if pipe.unet.config.cross_attention_dim == 1024 else "sd1"


class SDFamily:
    denoiser = "unet"
    distilled_guidance = False
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2")
    block_names = ("down_blocks", "mid_block", "up_blocks")

    default_steps = DEFAULTS.steps
    default_guidance = DEFAULTS.guidance_scale
    default_scheduler = DEFAULTS.scheduler

    def __init__(self, pipe, name: str | None = None):
        self.pipe = pipe
        self.name = name if name in ("sd1", "sd2", "sdxl") else sd_family_name(pipe)  # a given SD family is trusted (sd2 v-models)
        self.text_components = tuple(c for c in ("text_encoder", "text_encoder_2") if getattr(pipe, c, None) is not None)

    @property
    def default_size(self) -> int:
        return int(self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor)

    @property
    def size_multiple(self) -> int:
        """VAE factor x the UNet's downsampling."""
        return self.pipe.vae_scale_factor * 2 ** (len(self.pipe.unet.config.block_out_channels) - 1)

    @staticmethod
    def config_geometry(folder):
        configs = read_configs(folder, "unet", "vae")
        if configs is None:
            return None
        unet, vae = configs
        scale = vae_scale(vae)
        return int(unet["sample_size"]) * scale, scale * 2 ** (len(unet["block_out_channels"]) - 1)

    def latent_shape(self, height, width):
        vsf = self.pipe.vae_scale_factor
        return (1, self.pipe.unet.config.in_channels, int(height) // vsf, int(width) // vsf)

    def make_scheduler(self, name, num_inference_steps, height, width, device):
        sched = make_scheduler(name or DEFAULTS.scheduler, self.pipe.scheduler.config, type(self.pipe.scheduler))
        if num_inference_steps is not None:
            sched.set_timesteps(num_inference_steps, device=device)
        return sched

    def init_noise_sigma(self, scheduler) -> float:
        return scheduler.init_noise_sigma

    def initial_latents(self, height, width, generator, device, dtype) -> torch.Tensor:
        noise = torch.randn(self.latent_shape(height, width), generator=generator, device=generator.device, dtype=torch.float32)
        return noise.to(device, dtype)

    def encode(self, prompts, negatives, height, width):
        pipe, device = self.pipe, self.pipe.unet.device
        if self.name == "sdxl":
            # An empty negative prompt is passed as None so SDXL's force_zeros_for_empty_prompt applies, as in diffusers.
            pos, neg, pooled, neg_pooled = pipe.encode_prompt(
                prompt=prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True,
                negative_prompt=None if not any(negatives) else negatives,
            )
            proj = pipe.text_encoder_2.config.projection_dim
            ids = pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=pos.dtype, text_encoder_projection_dim=proj)
            ids = ids.to(device).repeat(len(prompts), 1)
            return Conditioning(neg, neg_pooled, ids), Conditioning(pos, pooled, ids)
        pos, neg = pipe.encode_prompt(prompts, device, 1, True, negative_prompt=negatives)
        return Conditioning(neg), Conditioning(pos)

    def model_input(self, scheduler, latents, timestep):
        return scheduler.scale_model_input(latents, timestep)

    def predict(self, x, timestep, conditioning, guidance_scale):
        return self.pipe.unet(x, timestep, **conditioning.unet_kwargs(), return_dict=False)[0]

    def decode(self, latents, output_type="pil"):
        vae = self.pipe.vae
        upcast = vae.dtype == torch.float16 and vae.config.get("force_upcast", False)
        z = latents.to(torch.float32 if upcast else vae.dtype)
        if upcast:
            vae.to(torch.float32)
        try:
            z = to_vae_latents(vae, z)
            image = vae.decode(z, return_dict=False)[0]
        finally:
            if upcast:
                vae.to(torch.float16)
        return self.pipe.image_processor.postprocess(image, output_type=output_type)
