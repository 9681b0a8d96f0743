"""Stable Diffusion 3 / 3.5 (Esser et al. 2024): an MMDiT (`SD3Transformer2DModel`, joint-attention blocks; 3.5 adds
QK-norm and dual attention in early blocks) on (B, 16, h, w) latents patchified inside the model, three text
encoders (CLIP-L, CLIP-G: pooled + tokens; T5-XXL: tokens), true classifier-free guidance, a flow-matching Euler
sampler."""

from __future__ import annotations

import torch

from loraloom.composition.conditioning import Conditioning

from .base import flow_scheduler, joint_block_stream, read_configs, vae_scale


class SD3Family:
    name = "sd3"
    denoiser = "transformer"
    distilled_guidance = False
    lora_targets = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                    "attn.add_v_proj", "attn.to_add_out", "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
                    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
    block_names = ("transformer_blocks",)
    max_sequence_length = 256  # StableDiffusion3Pipeline's default (T5 tokens)

    @property
    def text_tokens(self) -> int:
        """Text tokens the transformer's context stream carries (CLIP's 77, then T5's), for `composition.fuse_cost`."""
        return 77 + self.max_sequence_length

    default_steps = 28
    default_scheduler = "default"  # the model's own FlowMatchEulerDiscreteScheduler

    @property
    def sd35(self) -> bool:
        """SD 3.5 (Large, Large Turbo, Medium) normalises queries and keys (`qk_norm`); SD 3 Medium does not."""
        return bool(self.pipe.transformer.config.get("qk_norm"))

    @property
    def default_guidance(self) -> float:
        """Steps 28 for both. CFG: SD 3 Medium 7.0 (StableDiffusion3Pipeline's default, its model card's example);
        SD 3.5 3.5, the SD 3.5 Large model card's example (28 steps, guidance 3.5). The config cannot tell 3.5 Large
        from Large Turbo (same architecture; its card: 4 steps, CFG 0) and 3.5 Medium's card says 40 steps, CFG 4.5;
        28 / 3.5 is the one setting used here for every 3.5 model: pass steps and CFG for Turbo or Medium's own."""
        return 3.5 if self.sd35 else 7.0

    def __init__(self, pipe, name: str | None = None):
        self.pipe = pipe
        self.text_components = tuple(c for c in ("text_encoder", "text_encoder_2", "text_encoder_3")
                                     if getattr(pipe, c, None) is not None)

    @property
    def default_size(self) -> int:
        return int(self.pipe.default_sample_size * self.pipe.vae_scale_factor)

    @property
    def size_multiple(self) -> int:
        return self.pipe.vae_scale_factor * self.pipe.transformer.config.patch_size

    @staticmethod
    def config_geometry(folder):
        configs = read_configs(folder, "transformer", "vae")
        if configs is None:
            return None
        transformer, vae = configs
        scale = vae_scale(vae)
        return int(transformer.get("sample_size", 128)) * scale, scale * int(transformer.get("patch_size", 2))

    def latent_shape(self, height, width):
        vsf = self.pipe.vae_scale_factor
        return (1, self.pipe.transformer.config.in_channels, int(height) // vsf, int(width) // vsf)

    def make_scheduler(self, name, num_inference_steps, height, width, device):
        """StableDiffusion3Pipeline's schedule: N steps, shifted by mu of the token count when the scheduler asks."""
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift, retrieve_timesteps

        sched = flow_scheduler(self.pipe, name, "Stable Diffusion 3")
        if num_inference_steps is not None:
            kwargs = {}
            if sched.config.get("use_dynamic_shifting", None):
                p, vsf = self.pipe.transformer.config.patch_size, self.pipe.vae_scale_factor
                cfg = sched.config
                kwargs["mu"] = calculate_shift((height // vsf // p) * (width // vsf // p), cfg.get("base_image_seq_len", 256),
                                               cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5),
                                               cfg.get("max_shift", 1.16))
            retrieve_timesteps(sched, num_inference_steps, device, **kwargs)
        return sched

    def init_noise_sigma(self, scheduler) -> float:
        return 1.0

    def initial_latents(self, height, width, generator, device, dtype) -> torch.Tensor:
        noise = torch.randn(self.latent_shape(height, width), generator=generator, device=generator.device, dtype=torch.float32)
        return noise.to(device, dtype)

    def encode(self, prompts, negatives, height, width):
        pos, neg, pooled, neg_pooled = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.pipe.transformer.device, num_images_per_prompt=1,
            do_classifier_free_guidance=True, negative_prompt=negatives, max_sequence_length=self.max_sequence_length)
        return Conditioning(neg, neg_pooled), Conditioning(pos, pooled)

    def model_input(self, scheduler, latents, timestep):
        return latents

    def predict(self, x, timestep, conditioning, guidance_scale):
        b = x.shape[0]
        t = timestep.expand(b) if torch.is_tensor(timestep) else torch.full([b], float(timestep), device=x.device)
        return self.pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=conditioning.hidden,
                                     pooled_projections=conditioning.pooled, return_dict=False)[0]

    def attention_grid(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        """The image token grid the joint attention's maps are over: the latent in p x p patches."""
        p = self.pipe.transformer.config.patch_size
        return latent_hw[0] // p, latent_hw[1] // p

    def token_positions(self, prompt: str, words) -> list[list[int]]:
        """Positions of each word's tokens among the text tokens the transformer attends to: the 77 CLIP positions
        (CLIP-L and CLIP-G side by side in each; CLIP-L's tokenizer, BOS = 0), then T5's tokens from position 77, a
        word counted in both (with no T5 encoder those positions hold zeros: CLIP's only)."""
        from ..attention import token_positions

        clip_len = self.pipe.tokenizer_max_length
        clip = token_positions(self.pipe.tokenizer, prompt, words, clip_len)
        if getattr(self.pipe, "text_encoder_3", None) is None:
            return clip
        t5 = token_positions(self.pipe.tokenizer_3, prompt, words, self.max_sequence_length)
        return [c + [clip_len + i for i in t] for c, t in zip(clip, t5, strict=True)]

    @staticmethod
    def token_stream(path: str) -> str | None:
        """Which tokens the transformer layer at `path` sees (for masked LoRAs, `composition.routing.SpatialGate`):
        'image' (the p x p patch tokens, on `attention_grid`: the joint blocks' image-side projections and `ff`, SD 3.5's
        `attn2`, the final `proj_out`) or 'text' (the context side: `attn.add_*`, `attn.to_add_out`, `ff_context`,
        `context_embedder`); None for the modulations and embedders without positions. The patch embedding
        (`pos_embed.proj`, a convolution) sees the latent as a feature map, which the gate resizes to as on a UNet."""
        block, _, rest = path.partition(".")
        if block == "transformer_blocks":
            return joint_block_stream(rest.partition(".")[2])
        return {"proj_out": "image", "context_embedder": "text"}.get(path)

    def decode(self, latents, output_type="pil"):
        vae = self.pipe.vae
        z = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(z, return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image, output_type=output_type)
