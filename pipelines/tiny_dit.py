"""Tiny random-weight FLUX.1 and SD 3 pipelines built offline from config, as diffusers' own pipeline tests build
theirs (tests/pipelines/flux, tests/pipelines/stable_diffusion_3): a transformer of two blocks (FLUX: one
double-stream + one single-stream; SD3: two joint blocks), tiny CLIP text encoders and a tiny T5 encoder from
`T5Config`. The T5 tokenizer is a character-level Unigram model made with `tokenizers` (no download).

Used by the tests, benchmarks and the `tiny:flux` / `tiny:sd3` model names. Their images are noise.
"""

from __future__ import annotations

import string

import torch

from .tiny import tiny_clip_tokenizer, tiny_text_encoder


def tiny_t5_tokenizer():
    """A T5 tokenizer (`T5TokenizerFast`, transformers' fast T5 class) over single characters: <pad> 0, </s> 1, <unk> 2."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in "▁" + string.ascii_lowercase + string.digits + ",.!?-'"]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0)


def tiny_t5_encoder(tokenizer, d_model: int = 32, seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                      dropout_rate=0.0)
    return T5EncoderModel(config).eval()  # built from config a model is in training mode (dropout would draw noise)


def tiny_flow_vae(seed: int = 0):
    """A 2x VAE with 4 latent channels and SD3/FLUX's shift and scale."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=32,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         sample_size=32, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
                         scaling_factor=1.5035)


def build_tiny_flux(seed: int = 0, guidance_embeds: bool = True):
    """FLUX.1-shaped pipeline (dev: guidance embedding; `guidance_embeds=False`: schnell's shape)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                         num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                         axes_dims_rope=[4, 4, 8], guidance_embeds=guidance_embeds)
    tok = tiny_clip_tokenizer()
    tok2 = tiny_t5_tokenizer()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
                                                max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
    return _eval(FluxPipeline(scheduler=scheduler, vae=tiny_flow_vae(seed), text_encoder=tiny_text_encoder(tok, seed=seed),
                              tokenizer=tok, text_encoder_2=tiny_t5_encoder(tok2, 32, seed + 1), tokenizer_2=tok2,
                              transformer=transformer, image_encoder=None, feature_extractor=None))


def build_tiny_sd3(seed: int = 0):
    """SD3-shaped pipeline: two joint-attention blocks, CLIP-L/G-like encoders with projection, a T5 encoder."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8,
                                        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=64,
                                        pooled_projection_dim=64, out_channels=4)
    tok, tok2, tok3 = tiny_clip_tokenizer(), tiny_clip_tokenizer(pad_token="!"), tiny_t5_tokenizer()
    return _eval(StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=tiny_flow_vae(seed),
        text_encoder=tiny_text_encoder(tok, True, seed=seed), tokenizer=tok,
        text_encoder_2=tiny_text_encoder(tok2, True, seed=seed + 1), tokenizer_2=tok2,
        text_encoder_3=tiny_t5_encoder(tok3, 64, seed + 2), tokenizer_3=tok3, transformer=transformer,
        image_encoder=None, feature_extractor=None))


def _eval(pipe):
    """Inference mode for every model (built from config they are in training mode, as from_pretrained's are not)."""
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    return pipe
