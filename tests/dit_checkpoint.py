"""Write a diffusers FLUX.1 or SD 3 transformer as its original single-file checkpoint, for loader tests.

Each mapping is diffusers' own converter (`diffusers.loaders.single_file_utils`) read backwards, key by key:

* FLUX.1, Black Forest Labs' layout (`flux1-dev.safetensors`; ComfyUI saves put `model.diffusion_model.` in front):
  `convert_flux_transformer_checkpoint_to_diffusers`. Double-stream blocks are `double_blocks.N` with one fused
  `img_attn.qkv` / `txt_attn.qkv` (q, k, v stacked on dim 0), the q/k RMSNorms as `*.norm.query_norm.scale` /
  `key_norm.scale`, modulations `img_mod.lin` / `txt_mod.lin`, MLPs `img_mlp.{0,2}` / `txt_mlp.{0,2}`. Single-stream
  blocks are `single_blocks.N` with q, k, v and the MLP input fused into `linear1` (in that order) and the output
  projection + MLP output as `linear2`. The final layer's adaLN linear stores (shift, scale) where diffusers' norm_out
  has (scale, shift): the two halves swap.
* SD 3/3.5 (`sd3.5_large.safetensors`): `convert_sd3_transformer_checkpoint_to_diffusers`. Blocks are
  `model.diffusion_model.joint_blocks.N` with an `x_block` (image) and a `context_block` (text), each with a fused
  `attn.qkv`, `attn.proj`, `adaLN_modulation.1`, `mlp.fc1/fc2`. The last block's context side is "pre-only" (no
  proj, no MLP) and its adaLN, like the final layer's, stores (shift, scale): swapped.

Every diffusers key is mapped; an unknown key raises, so a layout this helper does not cover fails loudly.
"""

from __future__ import annotations

from pathlib import Path

import torch

DIT_PREFIX = "model.diffusion_model."


def swap_halves(weight: torch.Tensor) -> torch.Tensor:
    """(scale, shift) <-> (shift, scale) on dim 0: diffusers' `swap_scale_shift`, its own inverse."""
    first, second = weight.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _fuse(sd: dict, out: dict, target: str, sources: list[str]) -> None:
    """`target`.weight/.bias = the `sources`' weights/biases stacked on dim 0 (the converter's chunk/split, inverted)."""
    for param in ("weight", "bias"):
        out[f"{target}.{param}"] = torch.cat([sd.pop(f"{s}.{param}") for s in sources], dim=0)


_FLUX_TOP = {
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "context_embedder": "txt_in",
    "x_embedder": "img_in",
    "proj_out": "final_layer.linear",
}
_FLUX_DOUBLE = {
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    "attn.norm_q": "img_attn.norm.query_norm",
    "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm",
    "attn.norm_added_k": "txt_attn.norm.key_norm",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
}
_FLUX_SINGLE = {
    "norm.linear": "modulation.lin",
    "attn.norm_q": "norm.query_norm",
    "attn.norm_k": "norm.key_norm",
    "proj_out": "linear2",
}


def _rename(sd: dict, out: dict, table: dict, src: str, dst: str) -> None:
    """Move every `src + layer + .param` key whose layer is in `table` to `dst + table[layer] + .param`; RMSNorm
    weights become `.scale` as in the original code."""
    for key in [k for k in sd if k.startswith(src)]:
        layer, param = key[len(src):].rsplit(".", 1)
        if layer in table:
            new = table[layer]
            param = "scale" if new.endswith(("query_norm", "key_norm")) else param
            out[f"{dst}{new}.{param}"] = sd.pop(key)


def flux_original_state_dict(transformer, prefix: str = "") -> dict[str, torch.Tensor]:
    """The BFL layout of a `FluxTransformer2DModel`'s weights (`prefix` 'model.diffusion_model.': ComfyUI's)."""
    sd = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    out["final_layer.adaLN_modulation.1.weight"] = swap_halves(sd.pop("norm_out.linear.weight"))
    out["final_layer.adaLN_modulation.1.bias"] = swap_halves(sd.pop("norm_out.linear.bias"))
    _rename(sd, out, _FLUX_TOP, "", "")
    for i in range(len(transformer.transformer_blocks)):
        src, dst = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        _fuse(sd, out, dst + "img_attn.qkv", [f"{src}attn.to_{p}" for p in "qkv"])
        _fuse(sd, out, dst + "txt_attn.qkv", [f"{src}attn.add_{p}_proj" for p in "qkv"])
        _rename(sd, out, _FLUX_DOUBLE, src, dst)
    for i in range(len(transformer.single_transformer_blocks)):
        src, dst = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        _fuse(sd, out, dst + "linear1", [f"{src}attn.to_{p}" for p in "qkv"] + [f"{src}proj_mlp"])
        _rename(sd, out, _FLUX_SINGLE, src, dst)
    if sd:
        raise KeyError(f"FLUX keys this helper does not map: {sorted(sd)[:5]}")
    return {prefix + k: v.contiguous() for k, v in out.items()}


_SD3_TOP = {
    "pos_embed.proj": "x_embedder.proj",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "context_embedder": "context_embedder",
    "proj_out": "final_layer.linear",
}
_SD3_BLOCK = {
    "attn.norm_q": "x_block.attn.ln_q",
    "attn.norm_k": "x_block.attn.ln_k",
    "attn.norm_added_q": "context_block.attn.ln_q",
    "attn.norm_added_k": "context_block.attn.ln_k",
    "attn.to_out.0": "x_block.attn.proj",
    "attn.to_add_out": "context_block.attn.proj",
    "attn2.norm_q": "x_block.attn2.ln_q",
    "attn2.norm_k": "x_block.attn2.ln_k",
    "attn2.to_out.0": "x_block.attn2.proj",
    "norm1.linear": "x_block.adaLN_modulation.1",
    "norm1_context.linear": "context_block.adaLN_modulation.1",
    "ff.net.0.proj": "x_block.mlp.fc1",
    "ff.net.2": "x_block.mlp.fc2",
    "ff_context.net.0.proj": "context_block.mlp.fc1",
    "ff_context.net.2": "context_block.mlp.fc2",
}


def sd3_original_state_dict(transformer, prefix: str = DIT_PREFIX) -> dict[str, torch.Tensor]:
    """The original (Stability AI) layout of an `SD3Transformer2DModel`'s weights, under `prefix`."""
    sd = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
    out: dict[str, torch.Tensor] = {"pos_embed": sd.pop("pos_embed.pos_embed")}
    out["final_layer.adaLN_modulation.1.weight"] = swap_halves(sd.pop("norm_out.linear.weight"))
    out["final_layer.adaLN_modulation.1.bias"] = swap_halves(sd.pop("norm_out.linear.bias"))
    _rename(sd, out, _SD3_TOP, "", "")
    last = len(transformer.transformer_blocks) - 1
    for i in range(last + 1):
        src, dst = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        _fuse(sd, out, dst + "x_block.attn.qkv", [f"{src}attn.to_{p}" for p in "qkv"])
        _fuse(sd, out, dst + "context_block.attn.qkv", [f"{src}attn.add_{p}_proj" for p in "qkv"])
        if f"{src}attn2.to_q.weight" in sd:
            _fuse(sd, out, dst + "x_block.attn2.qkv", [f"{src}attn2.to_{p}" for p in "qkv"])
        if i == last:  # the pre-only context block's AdaLayerNormContinuous: (scale, shift) in diffusers
            for param in ("weight", "bias"):
                out[f"{dst}context_block.adaLN_modulation.1.{param}"] = swap_halves(sd.pop(f"{src}norm1_context.linear.{param}"))
        for key in [k for k in sd if k.startswith(src)]:  # ln_q/ln_k keep `.weight` in SD3's original code
            layer, param = key[len(src):].rsplit(".", 1)
            if layer in _SD3_BLOCK:
                out[f"{dst}{_SD3_BLOCK[layer]}.{param}"] = sd.pop(key)
    if sd:
        raise KeyError(f"SD3 keys this helper does not map: {sorted(sd)[:5]}")
    return {prefix + k: v.contiguous() for k, v in out.items()}


def save_original(state_dict: dict, path: str | Path) -> Path:
    from safetensors.torch import save_file

    save_file(state_dict, str(path))
    return Path(path)

