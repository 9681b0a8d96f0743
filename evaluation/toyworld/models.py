"""Configs and builders of the toy-world model parts (diffusers/transformers classes, so the saved folder is a
plain `StableDiffusionPipeline`)."""

from __future__ import annotations

import torch

from .scenes import SIZE

VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
    sample_size=SIZE, mid_block_add_attention=False,
)
LATENT = SIZE // 2  # the VAE halves the resolution: 32x32x3 -> 16x16x4

UNET_CONFIG = dict(
    sample_size=LATENT, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    # Text reaches the full 16x16 latent grid too (cross-attention only there: self-attention over 256 positions
    # would cost more than it brings), so a LoRA can place fine texture where the prompt asks for it.
    only_cross_attention=(True, False, False),
    block_out_channels=(32, 64, 64), layers_per_block=1, cross_attention_dim=64,
    attention_head_dim=4, norm_num_groups=16,
)

TEXT_CONFIG = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
    max_position_embeddings=16, projection_dim=64, hidden_act="quick_gelu",
)

# Training and sampling schedule: v-prediction on zero-terminal-SNR betas (Lin et al. 2024, "Common diffusion
# noise schedules and sample steps are flawed"), so the prompt, not the noise, decides the background.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
    rescale_betas_zero_snr=True, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    timestep_spacing="trailing",
)  # steps_offset only shifts "leading" spacing; 1 is what StableDiffusionPipeline expects (it warned on 0 and saved 1)


def build_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**VAE_CONFIG)


def build_unet(seed: int = 0, **overrides):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**{**UNET_CONFIG, **overrides})


def build_text_encoder(tokenizer, seed: int = 0, **overrides):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **{**TEXT_CONFIG, **overrides},
    )
    return CLIPTextModel(config)


def train_scheduler():
    from diffusers import DDPMScheduler

    cfg = {k: v for k, v in SCHEDULER_CONFIG.items() if k not in ("set_alpha_to_one", "steps_offset")}
    return DDPMScheduler(**cfg)


def sample_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULER_CONFIG)


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
