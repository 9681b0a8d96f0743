"""SD 3/3.5 on a tiny pipeline built from config: the family module against diffusers' StableDiffusion3Pipeline (no
LoRA, one diffusers/PEFT LoRA through diffusers' own `load_lora_weights`), Switch and Composite against reference
loops built on `set_adapters` (true classifier-free guidance, as in the paper)."""

from __future__ import annotations

import pytest
from dit_references import (
    SD3_TARGETS,
    composite_reference,
    diffusers_latents,
    sd3_predict,
    switch_reference,
    write_peft_lora,
)

from loraloom.composition.errors import GenerationError
from loraloom.pipelines import ComposedPipeline
from loraloom.pipelines.tiny_dit import build_tiny_sd3

PROMPT, STEPS, GUIDANCE = "a red cat, ink wash", 2, 5.0
TOL = 1e-5


def ours(cp, loras=(), method="merge", steps=STEPS, **params):
    out = cp(PROMPT, loras=list(loras), method=method, method_params=params, num_inference_steps=steps, height=32, width=32,
             guidance_scale=GUIDANCE, seed=0, output_type="latent", progress_bar=False)
    return out.latents, out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd3-loras")
    pipe = build_tiny_sd3(0)
    meta = {"modelspec.architecture": "stable-diffusion-v3-medium/lora"}
    return {
        "peft": write_peft_lora(pipe, folder, "peft", seed=1, targets=SD3_TARGETS, metadata=meta),
        "a": write_peft_lora(pipe, folder, "a", seed=3, targets=SD3_TARGETS, text_encoder=False),
        "b": write_peft_lora(pipe, folder, "b", seed=4, targets=SD3_TARGETS[:4], text_encoder=False),
    }


def test_base_model_equals_diffusers_and_saved_folder(tmp_path):
    pipe = build_tiny_sd3(0)
    ref = diffusers_latents(build_tiny_sd3(0), PROMPT, STEPS, GUIDANCE)
    cp = ComposedPipeline(pipe)
    assert cp.family == "sd3" and not cp.arch.distilled_guidance
    assert set(cp.routers) == {"transformer", "text_encoder", "text_encoder_2", "text_encoder_3"}
    lat, out = ours(cp)
    assert lat.shape == (1, 4, 16, 16) and (lat - ref).abs().max() <= TOL
    assert (out.unet_calls, out.unet_rows) == (STEPS, 2 * STEPS)  # true CFG: a negative and a positive row per step
    pipe.save_pretrained(tmp_path / "sd3")
    loaded = ComposedPipeline.from_pretrained(str(tmp_path / "sd3"))
    assert loaded.family == "sd3" and (ours(loaded)[0] - lat).abs().max() <= TOL


@pytest.mark.parametrize("fuse", [False, True])
def test_one_lora_equals_diffusers_load_lora_weights(files, fuse):
    ref_pipe = build_tiny_sd3(0)
    ref_pipe.load_lora_weights(str(files["peft"]))
    ref = diffusers_latents(ref_pipe, PROMPT, STEPS, GUIDANCE)
    cp = ComposedPipeline(build_tiny_sd3(0))
    lora = cp.load_lora(files["peft"])
    assert lora.info.family == "sd3" and lora.layers.get("text_encoder")
    assert {"transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.attn.to_add_out"} <= set(lora.layers["transformer"])
    lat = ours(cp, ["peft"], lora_scale=1.0, fuse=fuse)[0]
    assert (lat - ours(cp)[0]).abs().max() > 1e-3
    assert (lat - ref).abs().max() <= TOL


def test_switch_and_composite_equal_set_adapters_references(files):
    ref_pipe = build_tiny_sd3(0)
    for n in ("a", "b"):
        ref_pipe.load_lora_weights(str(files[n]), adapter_name=n)
    cp = ComposedPipeline(build_tiny_sd3(0))
    cp.load_lora(files["a"])
    cp.load_lora(files["b"])
    switch = switch_reference(ref_pipe, ["a", "b"], 0.8, PROMPT, 3, GUIDANCE)
    lat, out = ours(cp, ["a", "b"], "switch", steps=3, switch_interval=1)
    assert (lat - switch).abs().max() <= TOL
    comp = composite_reference(ref_pipe, ["a", "b"], 0.8, PROMPT, 3, GUIDANCE, sd3_predict(ref_pipe, PROMPT, GUIDANCE))
    lat, out = ours(cp, ["a", "b"], "composite", steps=3)
    assert (lat - comp).abs().max() <= TOL and (out.unet_calls, out.unet_rows) == (3, 12)
    with pytest.raises(GenerationError, match="'ziplora' does not run on Stable Diffusion 3/3.5 models"):
        ours(cp, ["a", "b"], "ziplora")
    # K-LoRA: b adapts only the attention projections K-LoRA chooses in, so with the subject (a) winning every one of
    # them, and a's other layers merged, the result is a alone
    lat, out = ours(cp, ["a", "b"], "klora", roles="given", alpha=0.0, beta=1e-9)
    assert out.extras["klora"]["layers"] == 8 and (lat - ours(cp, ["a"], lora_scale=1.0, fuse=False)[0]).abs().max() <= TOL
    # LoRAtorio with one LoRA and no re-centring is that LoRA's plain CFG (true CFG: 2 rows per branch, base and LoRA)
    lat, out = ours(cp, ["a"], "loratorio", recenter=0.0)
    assert (lat - ours(cp, ["a"], fuse=False)[0]).abs().max() <= TOL and out.unet_rows == 4 * STEPS


@pytest.mark.parametrize("layout", ["kohya", "onetrainer", "comfyui"])
def test_sd3_layouts_diffusers_does_not_convert_are_refused_by_name(tmp_path, layout):
    """SD3LoraLoaderMixin converts no key layout but diffusers/PEFT: kohya/sd-scripts (`lora_unet_joint_blocks_…`),
    OneTrainer (`lora_transformer_…`) and ComfyUI (`diffusion_model.joint_blocks.…`) SD3 files are refused by name."""
    import torch
    from safetensors.torch import save_file

    from loraloom.composition.errors import LoRAFileError

    module = {"kohya": "lora_unet_joint_blocks_0_x_block_attn_qkv", "onetrainer": "lora_transformer_transformer_blocks_0_attn_to_q",
              "comfyui": "diffusion_model.joint_blocks.0.x_block.attn.qkv"}[layout]
    save_file({f"{module}.lora_down.weight": torch.zeros(4, 32), f"{module}.lora_up.weight": torch.zeros(96, 4)},
              str(tmp_path / "k.safetensors"))
    cp = ComposedPipeline(build_tiny_sd3(0))
    shown = "comfyui" if layout == "comfyui" else "kohya"
    with pytest.raises(LoRAFileError, match=rf"k\.safetensors: is an SD3 LoRA in the {shown} layout .*diffusers has no converter"):
        cp.load_lora(tmp_path / "k.safetensors")
    assert cp.loras == {}
