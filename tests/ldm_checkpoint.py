"""Write a diffusers SD 1.x pipeline as an original (CompVis / LDM) single-file checkpoint, for loader tests.

The original Stable Diffusion checkpoints hold one flat state dict with three sub-models:

* `model.diffusion_model.*`: the UNet (`openaimodel.UNetModel`). Its encoder path is one flat list,
  `input_blocks.N`, where N=0 is the stem conv and each later entry is a `[ResBlock, SpatialTransformer?]` pair
  or a lone `Downsample` (`.0.op`); the decoder path is `output_blocks.N` (`[ResBlock, SpatialTransformer?,
  Upsample?]`); the bottleneck is `middle_block.{0,1,2}` = ResBlock, SpatialTransformer, ResBlock.
  ResBlocks call their layers `in_layers.{0 norm, 2 conv}`, `emb_layers.1`, `out_layers.{0 norm, 3 conv}` and
  `skip_connection`; the SpatialTransformer already uses the names diffusers kept (`proj_in`, `transformer_blocks`,
  `attn1.to_q`, `ff.net.0.proj`, ...).
* `first_stage_model.*`: the KL autoencoder (`ldm.modules.diffusionmodules.model`). Levels are `down.I` / `up.I`
  with resnets `block.J` (`nin_shortcut` for the channel-changing 1x1 conv), `downsample.conv` / `upsample.conv`;
  the decoder's `up.I` is numbered by resolution (I=0 is the full-resolution level, built last), the reverse of
  diffusers' `up_blocks`. The bottleneck is `mid.block_1`, `mid.attn_1`, `mid.block_2`; `attn_1` is a
  GroupNorm `norm` plus four 1x1 **convolutions** `q`, `k`, `v`, `proj_out` (diffusers: Linear layers).
* `cond_stage_model.transformer.*`: the Hugging Face `CLIPTextModel` as it was pickled in 2022, i.e. with the
  `text_model.` level that newer transformers versions no longer have.

Real files also carry the DDPM schedule buffers (`betas`, `alphas_cumprod`, ...) and the text model's
`position_ids` buffer; `ldm_state_dict(..., extras=True)` adds those so the loader must ignore them.

Every diffusers key is mapped; an unknown key raises, so a layout this helper does not cover fails loudly.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
SCHEDULE_KEYS = ("betas", "alphas_cumprod", "alphas_cumprod_prev")

# UNet ResBlock: diffusers layer name -> LDM layer name.
_UNET_RES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
# VAE mid-block attention: diffusers layer -> LDM layer.
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _unet_res(rest: str) -> str:
    layer, param = rest.split(".", 1)
    return f"{_UNET_RES[layer]}.{param}"


def unet_key_to_ldm(key: str, layers_per_block: int, up_has_attention: list[bool]) -> str:
    """One diffusers UNet2DConditionModel key -> its `openaimodel.UNetModel` key (without the prefix)."""
    per_level = layers_per_block + 1  # input_blocks per level: the resnets plus one down-sampler
    layer, _, param = key.rpartition(".")
    if layer in _UNET_TOP:
        return f"{_UNET_TOP[layer]}.{param}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        slot = 1 + level * per_level + j
        return f"input_blocks.{slot}.0.{_unet_res(rest)}" if kind == "resnets" else f"input_blocks.{slot}.1.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * per_level}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.([01])\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_unet_res(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        slot = level * per_level + j
        return f"output_blocks.{slot}.0.{_unet_res(rest)}" if kind == "resnets" else f"output_blocks.{slot}.1.{rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key):
        level = int(m[1])
        # The up-sampler closes the level's last entry, after its transformer when the level has one.
        position = 2 if up_has_attention[level] else 1
        return f"output_blocks.{level * per_level + layers_per_block}.{position}.conv.{m[2]}"
    raise KeyError(f"no LDM name for UNet key {key!r}")


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    cfg = unet.config
    if not isinstance(cfg.layers_per_block, int):
        raise NotImplementedError("per-level layers_per_block is not an SD 1.x layout")
    if cfg.get("addition_embed_type") or cfg.get("class_embed_type"):
        raise NotImplementedError("only the SD 1.x/2.x UNet (no label embedding) is written")
    up_has_attention = [hasattr(block, "attentions") for block in unet.up_blocks]
    return {
        UNET_PREFIX + unet_key_to_ldm(k, cfg.layers_per_block, up_has_attention): v
        for k, v in unet.state_dict().items()
    }


def vae_key_to_ldm(key: str, num_levels: int) -> tuple[str, bool]:
    """One diffusers AutoencoderKL key -> (LDM key without prefix, whether a Linear weight must become a 1x1 conv)."""
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(\w+)", key):
        layer = "nin_shortcut" if m[3] == "conv_shortcut" else m[3]
        return f"encoder.down.{m[1]}.block.{m[2]}.{layer}.{m[4]}", False
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}", False
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(\w+)", key):
        layer = "nin_shortcut" if m[3] == "conv_shortcut" else m[3]
        return f"decoder.up.{num_levels - 1 - int(m[1])}.block.{m[2]}.{layer}.{m[4]}", False
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key):
        return f"decoder.up.{num_levels - 1 - int(m[1])}.upsample.conv.{m[2]}", False
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.([01])\.(\w+)\.(\w+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}.{m[4]}", False
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(\w+)", key):
        layer = _VAE_ATTN[m[2]]
        return f"{m[1]}.mid.attn_1.{layer}.{m[3]}", layer != "norm" and m[3] == "weight"
    if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(\w+)", key):
        return f"{m[1]}.norm_out.{m[2]}", False
    if re.fullmatch(r"(encoder\.|decoder\.)?(conv_in|conv_out|quant_conv|post_quant_conv)\.(\w+)", key):
        return key, False
    raise KeyError(f"no LDM name for VAE key {key!r}")


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    num_levels = len(vae.config.block_out_channels)
    out = {}
    for key, value in vae.state_dict().items():
        name, linear_to_conv = vae_key_to_ldm(key, num_levels)
        out[VAE_PREFIX + name] = value[:, :, None, None] if linear_to_conv else value
    return out


def clip_to_ldm(text_encoder, extras: bool = False) -> dict[str, torch.Tensor]:
    """CLIPTextModel -> `cond_stage_model.transformer.text_model.*` (old transformers kept a `text_model.` level)."""
    out = {CLIP_PREFIX + k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    if extras:
        positions = text_encoder.config.max_position_embeddings
        out[CLIP_PREFIX + "embeddings.position_ids"] = torch.arange(positions, dtype=torch.int64)[None]
    return out


def ldm_state_dict(pipe, *, extras: bool = True) -> dict[str, torch.Tensor]:
    """The whole SD 1.x pipeline (UNet, VAE, CLIP text encoder) in the original single-file layout."""
    parts = [unet_to_ldm(pipe.unet), vae_to_ldm(pipe.vae), clip_to_ldm(pipe.text_encoder, extras)]
    expected = sum(len(p) for p in parts)
    out = {k: v for part in parts for k, v in part.items()}
    if len(out) != expected:
        raise AssertionError(f"{expected - len(out)} LDM key collisions")
    if extras:
        sched = pipe.scheduler
        alphas_cumprod = sched.alphas_cumprod.float()
        out["betas"] = sched.betas.float()
        out["alphas_cumprod"] = alphas_cumprod
        out["alphas_cumprod_prev"] = torch.cat([torch.ones(1), alphas_cumprod[:-1]])
    return out


def save_ldm_checkpoint(pipe, path, *, extras: bool = True, dtype: torch.dtype | None = None) -> Path:
    """Write `pipe` as one original-layout `.safetensors` file (what civitai-style SD 1.x checkpoints look like)."""
    from safetensors.torch import save_file

    state = ldm_state_dict(pipe, extras=extras)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})
    return path
