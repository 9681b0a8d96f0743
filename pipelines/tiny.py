"""Tiny random-weight SD 1.x and SDXL pipelines built offline from config (as diffusers' own tests do); FLUX.1 and
SD 3 in `tiny_dit.py`.

Used by the tests, by `benchmarks/` and by the `tiny:sd1` / `tiny:sdxl` model names. Their images are noise:
they exercise every code path in seconds, nothing more.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from transformers.convert_slow_tokenizer import bytes_to_unicode


def write_clip_tokenizer_files(folder: str | Path, words: list[str] = ()) -> tuple[Path, Path]:
    """A CLIP BPE vocabulary: special tokens, byte symbols, `c</w>` word ends, plus one token per given word.

    Merges are built so that each given word becomes a single token (left-to-right merges of its pieces).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())  # the GPT-2/CLIP byte-level alphabet
    tokens = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    merges: list[str] = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            rule = f"{pieces[0]} {pieces[1]}"
            if rule not in merges:
                merges.append(rule)
                tokens.append(merged)
            pieces = [merged] + pieces[2:]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + ("\n" if merges else ""), encoding="utf-8")
    return vocab_file, merges_file


def tiny_clip_tokenizer(folder: str | Path | None = None, pad_token: str = "<|endoftext|>", max_length: int = 77):
    from transformers import CLIPTokenizer

    folder = Path(folder or tempfile.mkdtemp(prefix="loraloom-tok-"))
    vocab, merges = write_clip_tokenizer_files(folder)
    return CLIPTokenizer(vocab=str(vocab), merges=str(merges), pad_token=pad_token, model_max_length=max_length)


def tiny_text_encoder(tokenizer, with_projection: bool = False, hidden: int = 32, layers: int = 2, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=hidden,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=layers,
        vocab_size=len(tokenizer),
        max_position_embeddings=77,
        projection_dim=hidden,
    )
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
    )


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def build_tiny_sd(seed: int = 0):
    """SD 1.x-shaped pipeline: UNet (32, 64), cross-attention 32, one CLIP text encoder (~1.5 M parameters)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    tok = tiny_clip_tokenizer()
    return StableDiffusionPipeline(
        vae=tiny_vae(seed), text_encoder=tiny_text_encoder(tok, seed=seed), tokenizer=tok, unet=unet,
        scheduler=_scheduler(), safety_checker=None, feature_extractor=None, image_encoder=None,
        requires_safety_checker=False,
    )


def build_tiny_sdxl(seed: int = 0):
    """SDXL-shaped pipeline: text_time conditioning, two text encoders (the second with projection)."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 * 8 time ids + 32 pooled text
        cross_attention_dim=64,  # 32 + 32 from the two text encoders
        norm_num_groups=1,
    )
    tok1 = tiny_clip_tokenizer()
    tok2 = tiny_clip_tokenizer(pad_token="!")
    return StableDiffusionXLPipeline(
        vae=tiny_vae(seed), text_encoder=tiny_text_encoder(tok1, seed=seed), text_encoder_2=tiny_text_encoder(tok2, True, seed=seed + 1),
        tokenizer=tok1, tokenizer_2=tok2, unet=unet, scheduler=_scheduler(), image_encoder=None, feature_extractor=None,
    )


def _tiny_flux(seed: int = 0):
    from .tiny_dit import build_tiny_flux

    return build_tiny_flux(seed)


def _tiny_sd3(seed: int = 0):
    from .tiny_dit import build_tiny_sd3

    return build_tiny_sd3(seed)


TINY_BUILDERS = {"tiny:sd1": build_tiny_sd, "tiny:sdxl": build_tiny_sdxl, "tiny:flux": _tiny_flux, "tiny:sd3": _tiny_sd3}


def random_lora_state_dict(unet_or_te, rank: int = 4, alpha: float | None = None, seed: int = 0,
                           targets=("to_q", "to_k", "to_v", "to_out.0"), std: float = 0.1) -> dict[str, torch.Tensor]:
    """PEFT-named factors (`<module>.lora_A.weight`, `.lora_B.weight`) with random values for matching modules."""
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, module in unet_or_te.named_modules():
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        if isinstance(module, nn.Linear):
            a = torch.randn(rank, module.in_features, generator=g) * std
            b = torch.randn(module.out_features, rank, generator=g) * std
        elif isinstance(module, nn.Conv2d):
            a = torch.randn(rank, module.in_channels, *module.kernel_size, generator=g) * std
            b = torch.randn(module.out_channels, rank, 1, 1, generator=g) * std
        else:
            continue
        out[f"{name}.lora_A.weight"] = a
        out[f"{name}.lora_B.weight"] = b
    return out


def write_random_lora(pipe, path, *, seed: int = 0, rank: int = 4, alpha: float | None = None, text_encoder: bool = True,
                      triggers: tuple[str, ...] = (), category: str | None = None, metadata: dict | None = None,
                      targets=("to_q", "to_k", "to_v", "to_out.0"), std: float = 0.1):
    """Save a random LoRA for `pipe` in the diffusers/PEFT layout (plus a sidecar when category/triggers are given)."""
    import json as _json
    from pathlib import Path as _Path

    from safetensors.torch import save_file

    sd = {f"unet.{k}": v for k, v in random_lora_state_dict(pipe.unet, rank, alpha, seed, targets, std).items()}
    if text_encoder:
        te = random_lora_state_dict(pipe.text_encoder, rank, alpha, seed + 1000, ("q_proj", "k_proj", "v_proj", "out_proj"), std)
        sd.update({f"text_encoder.{k}": v for k, v in te.items()})
    meta = {"modelspec.architecture": "stable-diffusion-xl-v1-base/lora" if getattr(pipe, "text_encoder_2", None) is not None
            else "stable-diffusion-v1/lora"}
    if triggers:
        meta["modelspec.trigger_phrase"] = ", ".join(triggers)
    if alpha is not None:
        # The LoraConfig per component, as diffusers' save_lora_weights writes it (diffusers needs target_modules).
        te_targets = ["q_proj", "k_proj", "v_proj", "out_proj"]
        cfg = {"unet.lora_alpha": alpha, "unet.r": rank, "unet.target_modules": list(targets)}
        if text_encoder:
            cfg.update({"text_encoder.lora_alpha": alpha, "text_encoder.r": rank, "text_encoder.target_modules": te_targets})
        meta["lora_adapter_metadata"] = _json.dumps(cfg)
    meta.update(metadata or {})
    path = _Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=meta)
    if category or triggers:
        side = {"category": category, "triggers": list(triggers)}
        path.with_suffix(".json").write_text(_json.dumps({k: v for k, v in side.items() if v}, indent=2) + "\n")
    return path
