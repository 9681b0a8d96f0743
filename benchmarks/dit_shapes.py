"""FLUX.1- and SD 3.5-shaped pipelines from config, random weights, no download (benchmarks and the GPU check).

`flux-shape`: FLUX.1's real widths and head counts (24 heads x 128, joint width 4096, pooled 768, 64 packed latent
channels, guidance embedding as in dev), 2 double-stream + 4 single-stream blocks. `sd35-shape`: SD 3.5 Large's
widths (38 heads x 64, caption projection 2432, joint width 4096, pooled 2048, patch 2, QK RMS-norm), 4 joint blocks.
The text encoders have their real widths (CLIP-L 768, CLIP-G 1280, T5-XXL 4096) but 2 layers each, unless
`full=True`: then every block count is the real model's (FLUX.1: 19 + 38 blocks; SD 3.5 Large: 38; CLIP-L 12,
CLIP-G 32, T5-XXL 24 layers). Tokenizers are the offline tiny ones (`pipelines/tiny.py`, `tiny_dit.py`): the token
counts (77 CLIP, 512/256 T5) are the real ones, the vocabularies are not. Models are built directly on `device` in
`dtype` (a full FLUX.1 in float32 on a CPU would need 48 GB).
"""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def _building(device, dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def _clip(tok, hidden, layers, heads, projection):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=77, projection_dim=projection, hidden_act="gelu",
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).eval()


def _t5(tok, layers):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tok), d_model=4096, d_kv=64, d_ff=10240, num_layers=layers, num_heads=64,
                                   feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
                                   decoder_start_token_id=0)).eval()


def _vae(shift, scale):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         use_quant_conv=False, use_post_quant_conv=False, shift_factor=shift, scaling_factor=scale).eval()


def build_flux_shape(seed: int = 0, full: bool = False, device="cpu", dtype=torch.float32):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from loraloom.pipelines.tiny import tiny_clip_tokenizer
    from loraloom.pipelines.tiny_dit import tiny_t5_tokenizer

    torch.manual_seed(seed)
    tok, tok2 = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    with _building(device, dtype):
        transformer = FluxTransformer2DModel(num_layers=19 if full else 2, num_single_layers=38 if full else 4,
                                             guidance_embeds=True).eval()  # the other defaults are FLUX.1's
        clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=768, intermediate_size=3072,
                                            num_hidden_layers=12 if full else 2, num_attention_heads=12,
                                            max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).eval()
        t5, vae = _t5(tok2, 24 if full else 2), _vae(0.1159, 0.3611)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
                                                max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tok, text_encoder_2=t5, tokenizer_2=tok2,
                        transformer=transformer, image_encoder=None, feature_extractor=None)


def build_sd35_shape(seed: int = 0, full: bool = False, device="cpu", dtype=torch.float32):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    from loraloom.pipelines.tiny import tiny_clip_tokenizer
    from loraloom.pipelines.tiny_dit import tiny_t5_tokenizer

    torch.manual_seed(seed)
    tok, tok2, tok3 = tiny_clip_tokenizer(), tiny_clip_tokenizer(pad_token="!"), tiny_t5_tokenizer()
    with _building(device, dtype):
        transformer = SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, num_layers=38 if full else 4,
                                            attention_head_dim=64, num_attention_heads=38, joint_attention_dim=4096,
                                            caption_projection_dim=2432, pooled_projection_dim=2048, out_channels=16,
                                            pos_embed_max_size=192, qk_norm="rms_norm").eval()
        clip_l = _clip(tok, 768, 12 if full else 2, 12, 768)
        clip_g = _clip(tok2, 1280, 32 if full else 2, 20, 1280)
        t5, vae = _t5(tok3, 24 if full else 2), _vae(0.0609, 1.5305)
    return StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=clip_l,
                                    tokenizer=tok, text_encoder_2=clip_g, tokenizer_2=tok2, text_encoder_3=t5, tokenizer_3=tok3,
                                    transformer=transformer, image_encoder=None, feature_extractor=None)
