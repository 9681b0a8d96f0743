"""FLUX.1 LoRA layouts diffusers' converter misreads or drops, read by loraloom: BFL module paths with PEFT factor
names (fal's Kontext LoRAs, ComfyUI's `diffusion_model.…lora_A`), PEFT's own `save_pretrained` folders
(`adapter_model.safetensors` + `adapter_config.json`), and T5-XXL text-encoder layers (sd-scripts `lora_te3_`,
OneTrainer `lora_te2_`, ComfyUI `text_encoders.t5xxl.`).

Each is checked against something loraloom did not produce: the same factors in a layout diffusers reads (its own
`load_lora_weights`), diffusers' own fal converter at FLUX.1's size, PEFT's own LoRA forward, or the T5 weights
changed by hand."""

from __future__ import annotations

import json

import pytest
import torch
from dit_references import _clip_modules, _pairs, diffusers_latents, our_latents, write_comfyui_flux_lora, write_kohya_flux_lora
from safetensors.torch import load_file, save_file

from loraloom.composition.errors import LoRAFileError
from loraloom.composition.transformer_loras import _to_diffusers, respell_peft_names, t5_module
from loraloom.pipelines import ComposedPipeline
from loraloom.pipelines.tiny_dit import build_tiny_flux

PROMPT, STEPS, GUIDANCE, TOL = "a red cat, ink wash", 2, 3.5, 1e-5


def ours(cp, loras, method="merge", **params):
    params.setdefault("lora_scale", 1.0)  # diffusers' references apply the LoRAs at 1 (loraloom's default is 0.8)
    return our_latents(cp, loras, PROMPT, STEPS, GUIDANCE, method, **params)


def _bfl(sd: dict, prefix: str) -> dict:
    """ComfyUI's `diffusion_model.…lora_down` keys respelled as BFL paths with PEFT factor names under `prefix`."""
    return {prefix + k.removeprefix("diffusion_model.").replace(".lora_down.", ".lora_A.").replace(".lora_up.", ".lora_B."): v
            for k, v in sd.items() if k.startswith("diffusion_model.") and not k.endswith(".alpha")}


@pytest.mark.parametrize("prefix,layout", [("diffusion_model.", "bfl"), ("", "bfl"), ("base_model.model.", "fal-kontext")])
@pytest.mark.parametrize("fuse", [False, True])
def test_bfl_paths_with_peft_factors_equal_their_comfyui_twin(tmp_path, prefix, layout, fuse):
    twin = write_comfyui_flux_lora(tmp_path, "twin", seed=5, alpha=None, attention=False)
    sd = load_file(str(twin))
    save_file({k: v for k, v in sd.items() if k.startswith("diffusion_model.")}, str(twin))  # the transformer part
    save_file(_bfl(sd, prefix), str(tmp_path / "bfl.safetensors"))
    ref_pipe = build_tiny_flux(0)
    ref_pipe.load_lora_weights(str(twin))  # diffusers' own reading of the ComfyUI spelling
    ref = diffusers_latents(ref_pipe, PROMPT, STEPS, GUIDANCE)
    cp = ComposedPipeline(build_tiny_flux(0))
    lora = cp.load_lora(tmp_path / "bfl.safetensors")
    assert lora.info.layout == layout and lora.info.family == "flux"
    assert {"transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_v_proj", "single_transformer_blocks.0.proj_out"} \
        <= set(lora.layers["transformer"])
    lat = ours(cp, ["bfl"], fuse=fuse)
    assert (lat - ours(cp, [])).abs().max() > 1e-3
    assert (lat - ref).abs().max() <= TOL


def _fal_file(g, rank=1, n_in=4, inner=3072, mlp=12288):
    """A complete FLUX.1-sized fal Kontext key set (19 double, 38 single blocks, the final layer) at rank 1 and a
    narrow input, as diffusers' fal converter expects: it pops every one of these keys."""
    modules = {}
    for i in range(19):
        for s in ("img", "txt"):
            modules.update({f"double_blocks.{i}.{s}_mod.lin": 6 * inner, f"double_blocks.{i}.{s}_attn.qkv": 3 * inner,
                            f"double_blocks.{i}.{s}_attn.proj": inner, f"double_blocks.{i}.{s}_mlp.0": mlp,
                            f"double_blocks.{i}.{s}_mlp.2": inner})
    for i in range(38):
        modules.update({f"single_blocks.{i}.modulation.lin": 3 * inner, f"single_blocks.{i}.linear1": 3 * inner + mlp,
                        f"single_blocks.{i}.linear2": inner})
    modules["final_layer.linear"] = 64
    sd = {}
    for m, n_out in modules.items():
        sd[f"base_model.model.{m}.lora_A.weight"] = torch.randn(rank, n_in, generator=g)
        sd[f"base_model.model.{m}.lora_B.weight"] = torch.randn(n_out, rank, generator=g)
    return sd


def test_fal_kontext_reading_equals_diffusers_fal_converter_at_flux_size():
    from diffusers.loaders.lora_conversion_utils import _convert_fal_kontext_lora_to_diffusers

    sd = _fal_file(torch.Generator().manual_seed(0))
    theirs = _convert_fal_kontext_lora_to_diffusers(dict(sd))
    mine, alphas = _to_diffusers(respell_peft_names(sd), "flux", "fal.safetensors")
    assert alphas == {} or all(float(a) == 1.0 for a in alphas.values())
    # the kohya converter names the final layer without `transformer.` (loraloom reads a bare path as the transformer's)
    mine = {k if k.startswith("transformer.") else f"transformer.{k}": v for k, v in mine.items()}
    assert set(mine) == set(theirs) and len(mine) == len(theirs) > 19 * 2 * 10
    for k, v in theirs.items():
        assert torch.equal(mine[k], v), k


def save_peft_folder(model, folder, std=0.1, **config):
    """PEFT's own files for `model` (a diffusers transformer or UNet): `get_peft_model` with LoraConfig(r=4, **config),
    random factors, `save_pretrained(folder)` (adapter_model.safetensors + adapter_config.json). The model keeps the
    adapter, so the pipeline around it runs PEFT's LoRA forward."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, **config))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    peft_model.save_pretrained(str(folder))
    return folder / "adapter_model.safetensors"


def test_peft_save_pretrained_folder_reads_alpha_from_adapter_config(tmp_path):
    pipe = build_tiny_flux(0)
    folder = tmp_path / "my-style"
    save_peft_folder(pipe.transformer, folder, lora_alpha=12, alpha_pattern={"proj_mlp": 2},
                     target_modules=["attn.to_q", "attn.to_v", "attn.add_k_proj", "ff.net.2", "proj_mlp"])
    keys = list(load_file(str(folder / "adapter_model.safetensors")))
    assert all(k.startswith("base_model.model.") for k in keys) and json.loads((folder / "adapter_config.json").read_text())["lora_alpha"] == 12
    ref = diffusers_latents(pipe, PROMPT, STEPS, GUIDANCE)  # the pipeline runs PEFT's LoRA forward
    cp = ComposedPipeline(build_tiny_flux(0))
    lora = cp.load_lora(folder / "adapter_model.safetensors")
    assert lora.name == "my-style" and lora.info.layout == "peft-adapter"
    layers = lora.layers["transformer"]
    assert layers["transformer_blocks.0.attn.to_q"].scale == 3.0 and layers["single_transformer_blocks.0.proj_mlp"].scale == 0.5
    assert (ours(cp, ["my-style"]) - ref).abs().max() <= TOL
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(LoRAFileError, match="adapter_config.json: cannot be read as PEFT's adapter config"):
        ComposedPipeline(build_tiny_flux(0)).load_lora(folder / "adapter_model.safetensors")


T5_MODULES = {"encoder.block.0.layer.0.SelfAttention.q": (32, 32), "encoder.block.0.layer.0.SelfAttention.o": (32, 32),
              "encoder.block.1.layer.1.DenseReluDense.wi": (32, 37), "encoder.block.1.layer.1.DenseReluDense.wo": (37, 32)}


def _t5_name(module: str, style: str) -> str:
    if style == "comfyui":
        return "text_encoders.t5xxl.transformer." + module
    return ("lora_te3_" if style == "kohya" else "lora_te2_") + module.replace(".", "_")


@pytest.mark.parametrize("style", ["kohya", "onetrainer", "comfyui"])
def test_t5_layers_apply_to_the_t5_encoder(tmp_path, style):
    path = write_kohya_flux_lora(tmp_path, "x", seed=2) if style != "comfyui" else \
        write_comfyui_flux_lora(tmp_path, "x", seed=2, attention=False)
    transformer_part = load_file(str(path))
    transformer_part = {k: v for k, v in transformer_part.items() if not k.startswith("text_encoders.")}
    save_file(transformer_part, str(tmp_path / "no_t5.safetensors"))
    sd = dict(transformer_part)
    alpha = 2.0
    _pairs(sd, torch.Generator().manual_seed(7), 4, alpha, {_t5_name(m, style): shape for m, shape in T5_MODULES.items()})
    save_file(sd, str(tmp_path / "t5.safetensors"))
    # reference: diffusers loads the transformer part; the T5 weights are changed by hand (W += alpha/r · up @ down)
    ref_pipe = build_tiny_flux(0)
    ref_pipe.load_lora_weights(str(tmp_path / "no_t5.safetensors"))
    with torch.no_grad():
        for module in T5_MODULES:
            key = _t5_name(module, style)
            delta = alpha / 4 * sd[f"{key}.lora_up.weight"] @ sd[f"{key}.lora_down.weight"]
            ref_pipe.text_encoder_2.get_submodule(module).weight += delta
    ref = diffusers_latents(ref_pipe, PROMPT, STEPS, GUIDANCE)
    cp = ComposedPipeline(build_tiny_flux(0))
    lora = cp.load_lora(tmp_path / "t5.safetensors")
    cp.load_lora(tmp_path / "no_t5.safetensors")
    assert set(lora.layers["text_encoder_2"]) == set(T5_MODULES)
    lat = ours(cp, ["t5"])
    assert (lat - ours(cp, ["no_t5"])).abs().max() > 1e-4  # the T5 part changes the image
    assert (lat - ref).abs().max() <= TOL
    assert (ours(cp, ["t5"], fuse=True) - ref).abs().max() <= TOL


def test_t5_module_names():
    assert t5_module("lora_te3_encoder_block_23_layer_1_DenseReluDense_wi_0") == "encoder.block.23.layer.1.DenseReluDense.wi_0"
    assert t5_module("lora_te2_encoder_block_0_layer_0_SelfAttention_o") == "encoder.block.0.layer.0.SelfAttention.o"
    assert t5_module("text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.k") == "encoder.block.0.layer.0.SelfAttention.k"
    assert t5_module("lora_te3_shared") is None and t5_module("lora_te1_text_model_encoder_layers_0_mlp_fc1") is None


def test_unknown_t5_keys_are_refused_by_name(tmp_path):
    sd = load_file(str(write_kohya_flux_lora(tmp_path, "x", seed=2)))
    _pairs(sd, torch.Generator().manual_seed(1), 4, 2.0, {"lora_te3_encoder_final_layer_norm": (32, 32)})
    save_file(sd, str(tmp_path / "bad.safetensors"))
    cp = ComposedPipeline(build_tiny_flux(0))
    with pytest.raises(LoRAFileError, match="has a T5 text-encoder key loraloom does not read: 'lora_te3_encoder_final_layer_norm"):
        cp.load_lora(tmp_path / "bad.safetensors")
    assert cp.loras == {}


def test_clip_and_t5_parts_together(tmp_path):
    """A file with all three parts (sd-scripts with --network_train_unet_only off and T5 training on)."""
    sd = load_file(str(write_kohya_flux_lora(tmp_path, "x", seed=2)))
    _pairs(sd, torch.Generator().manual_seed(4), 4, 2.0, _clip_modules("lora_te1_", "_", attention=False))
    _pairs(sd, torch.Generator().manual_seed(5), 4, 2.0, {_t5_name(m, "kohya"): s for m, s in T5_MODULES.items()})
    save_file(sd, str(tmp_path / "all.safetensors"))
    lora = ComposedPipeline(build_tiny_flux(0)).load_lora(tmp_path / "all.safetensors")
    assert {c for c, layers in lora.layers.items() if layers} == {"transformer", "text_encoder", "text_encoder_2"}


def test_final_layer_is_applied_at_its_alpha(tmp_path):
    """diffusers 0.42 drops a kohya/ComfyUI file's final layer (its converter names it without `transformer.` and
    leaves out its alpha); loraloom applies it at alpha/rank as sd-scripts and ComfyUI do (adaLN's halves swapped)."""
    sd = load_file(str(write_kohya_flux_lora(tmp_path, "k", seed=1)))
    _pairs(sd, torch.Generator().manual_seed(2), 4, 2.0, {"lora_unet_final_layer_linear": (32, 16),
                                                          "lora_unet_final_layer_adaLN_modulation_1": (32, 64)})
    save_file(sd, str(tmp_path / "f.safetensors"))
    layers = ComposedPipeline(build_tiny_flux(0)).load_lora(tmp_path / "f.safetensors").layers["transformer"]
    up, down = sd["lora_unet_final_layer_linear.lora_up.weight"], sd["lora_unet_final_layer_linear.lora_down.weight"]
    assert torch.allclose(layers["proj_out"].delta(), 0.5 * up @ down, atol=1e-7)
    up, down = sd["lora_unet_final_layer_adaLN_modulation_1.lora_up.weight"], sd["lora_unet_final_layer_adaLN_modulation_1.lora_down.weight"]
    shift, scale = up.chunk(2)  # BFL: (shift, scale); diffusers' norm_out.linear: (scale, shift)
    assert torch.allclose(layers["norm_out.linear"].delta(), 0.5 * torch.cat([scale, shift]) @ down, atol=1e-7)


def test_sd3_peft_save_pretrained_folder(tmp_path):
    from loraloom.pipelines.tiny_dit import build_tiny_sd3

    pipe = build_tiny_sd3(0)
    save_peft_folder(pipe.transformer, tmp_path / "sd3-style", lora_alpha=12, target_modules=["attn.to_q", "attn.add_k_proj", "ff.net.2"])
    ref = diffusers_latents(pipe, PROMPT, STEPS, 5.0)
    cp = ComposedPipeline(build_tiny_sd3(0))
    lora = cp.load_lora(tmp_path / "sd3-style" / "adapter_model.safetensors")
    assert lora.info.layout == "peft-adapter" and lora.layers["transformer"]["transformer_blocks.0.attn.to_q"].scale == 3.0
    out = cp(PROMPT, loras=["sd3-style"], method="merge", method_params={"lora_scale": 1.0}, num_inference_steps=STEPS,
             height=32, width=32, guidance_scale=5.0, seed=0, output_type="latent", progress_bar=False)
    assert (out.latents - ref).abs().max() <= TOL


def test_sd_unet_peft_save_pretrained_folder(tmp_path):
    """The same PEFT folder for an SD UNet (SimpleTuner and PEFT scripts save these): alpha from adapter_config.json,
    named after its folder, equal to PEFT's own forward."""
    from loraloom.pipelines.tiny import build_tiny_sd

    pipe = build_tiny_sd(0)
    save_peft_folder(pipe.unet, tmp_path / "sd-style", std=0.3, lora_alpha=2, target_modules=["to_q", "to_v", "proj_out"])
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(PROMPT, num_inference_steps=STEPS, height=32, width=32, guidance_scale=5.0,
               generator=torch.Generator().manual_seed(0), output_type="latent").images
    cp = ComposedPipeline(build_tiny_sd(0))
    lora = cp.load_lora(tmp_path / "sd-style" / "adapter_model.safetensors")
    assert lora.name == "sd-style" and next(iter(lora.layers["unet"].values())).scale == 0.5
    out = cp(PROMPT, loras=["sd-style"], method="merge", method_params={"lora_scale": 1.0}, num_inference_steps=STEPS,
             height=32, width=32, guidance_scale=5.0, seed=0, output_type="latent", progress_bar=False, scheduler="ddim")
    assert (out.latents - ref).abs().max() <= 1e-4
