"""FLUX.1 (dev, schnell; Black Forest Labs 2024): an MMDiT (`FluxTransformer2DModel`: double-stream blocks with joint
attention, then single-stream blocks) on 2x2-packed latent tokens, CLIP-L (pooled) + T5-XXL text encoders, a
flow-matching Euler sampler with resolution-dependent shift, and guidance distillation: dev takes the guidance scale
as an embedding input, schnell none. Neither has an unconditional branch, so here a method's negative rows are
null (`Conditioning.null`) and methods combine with CFG scale 1; Composite is then the mean of the per-LoRA
predictions (docs/methods/composlora.md). The negative prompt is not used.

Latents stay (B, 16, h, w) in the loop; `predict` packs them into (B, h w / 4, 64) tokens with diffusers' own
`FluxPipeline._pack_latents` and unpacks the output, so the scheduler step, masks and methods see image-shaped
tensors (the flow-matching step is elementwise, so this equals stepping the packed tokens).
"""

from __future__ import annotations

import numpy as np
import torch

from loraloom.composition.conditioning import Conditioning

from .base import flow_scheduler, joint_block_stream, read_configs, vae_scale


class FluxFamily:
    name = "flux"
    denoiser = "transformer"
    distilled_guidance = True
    # diffusers' module names (the kohya/BFL names, double_blocks/single_blocks, are converted to these)
    lora_targets = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                    "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                    "ff_context.net.2", "norm1.linear", "norm1_context.linear", "proj_mlp", "proj_out", "norm.linear")
    block_names = ("transformer_blocks", "single_transformer_blocks")
    max_sequence_length = 512  # FluxPipeline's default (T5 tokens)

    @property
    def text_tokens(self) -> int:
        """Text tokens the transformer's text stream carries (T5's), for `composition.fuse_cost`."""
        return self.max_sequence_length

    default_scheduler = "default"  # the model's own FlowMatchEulerDiscreteScheduler

    @property
    def schnell(self) -> bool:
        """FLUX.1-schnell has no guidance embedding (`transformer.config.guidance_embeds` False); dev has one."""
        return not self.pipe.transformer.config.guidance_embeds

    @property
    def default_steps(self) -> int:
        """dev: 28 (FluxPipeline's default and the FLUX.1-dev model card); schnell: 4 (its model card: a 4-step
        timestep-distilled model)."""
        return 4 if self.schnell else 28

    @property
    def default_guidance(self) -> float:
        """dev: 3.5 (FluxPipeline's default, the model card's example); schnell: 0 (the card's `guidance_scale=0.0`:
        it takes no guidance input, so any value is ignored)."""
        return 0.0 if self.schnell else 3.5

    def __init__(self, pipe, name: str | None = None):
        self.pipe = pipe
        self.text_components = tuple(c for c in ("text_encoder", "text_encoder_2") if getattr(pipe, c, None) is not None)

    @property
    def default_size(self) -> int:
        return int(self.pipe.default_sample_size * self.pipe.vae_scale_factor)

    @property
    def size_multiple(self) -> int:
        return self.pipe.vae_scale_factor * 2  # VAE factor x the 2x2 packing

    @staticmethod
    def config_geometry(folder):
        configs = read_configs(folder, "transformer", "vae")
        if configs is None:
            return None
        scale = vae_scale(configs[1])
        return 128 * scale, 2 * scale  # FluxPipeline.default_sample_size is 128 whatever the config says

    def latent_shape(self, height, width):
        h, w = self._latent_hw(height, width)
        return (1, self.pipe.transformer.config.in_channels // 4, h, w)

    def _latent_hw(self, height: int, width: int) -> tuple[int, int]:
        vsf = self.pipe.vae_scale_factor
        return 2 * (int(height) // (vsf * 2)), 2 * (int(width) // (vsf * 2))

    def make_scheduler(self, name, num_inference_steps, height, width, device):
        """FluxPipeline's schedule: sigmas linspace(1, 1/N, N), shifted by mu of the image's token count."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

        sched = flow_scheduler(self.pipe, name, "FLUX.1")
        if num_inference_steps is not None:
            h, w = self._latent_hw(height, width)
            sigmas = None if sched.config.get("use_flow_sigmas") else np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
            cfg = sched.config
            mu = calculate_shift((h // 2) * (w // 2), cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                                 cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
            retrieve_timesteps(sched, num_inference_steps, device, sigmas=sigmas, mu=mu)
            sched.set_begin_index(0)
        return sched

    def init_noise_sigma(self, scheduler) -> float:
        return 1.0  # flow matching starts from the noise itself

    def initial_latents(self, height, width, generator, device, dtype) -> torch.Tensor:
        noise = torch.randn(self.latent_shape(height, width), generator=generator, device=generator.device, dtype=torch.float32)
        return noise.to(device, dtype)

    def encode(self, prompts, negatives, height, width):
        """CLIP's pooled embedding and T5's token embeddings of each prompt; the negative rows are null."""
        embeds, pooled, _ = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, device=self.pipe.transformer.device,
                                                    num_images_per_prompt=1, max_sequence_length=self.max_sequence_length)
        pos = Conditioning(embeds, pooled)
        return Conditioning(embeds, pooled, null=torch.ones(len(prompts), dtype=torch.bool)), pos

    def model_input(self, scheduler, latents, timestep):
        return latents

    def predict(self, x, timestep, conditioning, guidance_scale):
        from diffusers import FluxPipeline

        b, c, h, w = x.shape
        transformer = self.pipe.transformer
        tokens = FluxPipeline._pack_latents(x, b, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype)
        txt_ids = torch.zeros(conditioning.hidden.shape[1], 3, device=x.device, dtype=conditioning.hidden.dtype)
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.full([b], float(guidance_scale), device=x.device, dtype=torch.float32)
        t = timestep.expand(b).to(x.dtype) if torch.is_tensor(timestep) else torch.full([b], float(timestep), dtype=x.dtype, device=x.device)
        out = transformer(hidden_states=tokens, timestep=t / 1000, guidance=guidance, pooled_projections=conditioning.pooled,
                          encoder_hidden_states=conditioning.hidden, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        vsf = self.pipe.vae_scale_factor
        return FluxPipeline._unpack_latents(out, h * vsf, w * vsf, vsf)

    def attention_grid(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        """The image token grid the joint attention's maps are over: the latent packed into 2x2 patches."""
        return latent_hw[0] // 2, latent_hw[1] // 2

    def token_positions(self, prompt: str, words) -> list[list[int]]:
        """Positions of each word's tokens among the text tokens the transformer attends to: T5's (its first token is
        position 0; CLIP gives FLUX only its pooled vector)."""
        from ..attention import token_positions

        return token_positions(self.pipe.tokenizer_2, prompt, words, self.max_sequence_length)

    @staticmethod
    def token_stream(path: str) -> str | None:
        """Which tokens the transformer layer at `path` sees (for masked LoRAs, `composition.routing.SpatialGate`):
        'image' (the packed 2x2-patch tokens, on `attention_grid`), 'text' (T5's tokens) or 'joint' (the single-stream
        blocks' `attn.to_q/k/v`, `proj_mlp`, `proj_out`: the text tokens, then the image tokens); None for layers
        without positions (the modulations `norm1.linear`, `norm.linear`, `norm_out.linear`, the time/guidance/pooled
        embedders)."""
        block, _, rest = path.partition(".")
        if block == "transformer_blocks":
            return joint_block_stream(rest.partition(".")[2])
        if block == "single_transformer_blocks":
            leaf = rest.partition(".")[2]
            return "joint" if leaf.startswith(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out")) else None
        return {"x_embedder": "image", "proj_out": "image", "context_embedder": "text"}.get(path)

    def decode(self, latents, output_type="pil"):
        vae = self.pipe.vae
        z = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(z, return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image, output_type=output_type)
