"""FLUX.1 on a tiny pipeline built from config: the family module against diffusers' FluxPipeline (no LoRA, one LoRA
of each layout through diffusers' own `load_lora_weights`), Switch and Composite against reference loops built on
`set_adapters`, and the refusals (other families' LoRAs, methods and samplers that do not run here)."""

from __future__ import annotations

import pytest
import torch
from dit_references import (
    FLUX_TARGETS,
    composite_reference,
    diffusers_latents,
    flux_predict,
    switch_reference,
    write_comfyui_flux_lora,
    write_kohya_flux_lora,
    write_kohya_te_flux_lora,
    write_lora_transformer_flux_lora,
    write_onetrainer_flux_lora,
    write_peft_down_flux_lora,
    write_peft_lora,
    write_xlabs_flux_lora,
)

from loraloom.composition.controls import Region
from loraloom.composition.errors import GenerationError, IncompatibleLoRA, SpecError
from loraloom.pipelines import ComposedPipeline
from loraloom.pipelines.tiny_dit import build_tiny_flux

PROMPT, STEPS, GUIDANCE = "a red cat, ink wash", 2, 3.5
TOL = 1e-5


def ours(cp, loras=(), method="merge", steps=STEPS, **params):
    out = cp(PROMPT, loras=list(loras), method=method, method_params=params, num_inference_steps=steps, height=32, width=32,
             guidance_scale=GUIDANCE, seed=0, output_type="latent", progress_bar=False)
    return out.latents, out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flux-loras")
    pipe = build_tiny_flux(0)
    return {
        "peft": write_peft_lora(pipe, folder, "peft", seed=1, metadata={"modelspec.architecture": "flux-1-dev/lora"}),
        "kohya": write_kohya_flux_lora(folder, "kohya", seed=2),
        "xlabs": write_xlabs_flux_lora(folder, "xlabs", seed=6),
        "lora_transformer": write_lora_transformer_flux_lora(folder, "lora_transformer", seed=7),
        "kohya_te": write_kohya_te_flux_lora(folder, "kohya_te", seed=8, attention=False),
        "comfyui": write_comfyui_flux_lora(folder, "comfyui", seed=9, attention=False),
        "onetrainer": write_onetrainer_flux_lora(folder, "onetrainer", seed=10),
        "peft_down": write_peft_down_flux_lora(pipe, folder, "peft_down", seed=11),
        "a": write_peft_lora(pipe, folder, "a", seed=3, text_encoder=False),
        "b": write_peft_lora(pipe, folder, "b", seed=4, text_encoder=False, targets=FLUX_TARGETS[:8]),
    }


def test_base_model_equals_diffusers_and_saved_folder(tmp_path):
    pipe = build_tiny_flux(0)
    ref = diffusers_latents(build_tiny_flux(0), PROMPT, STEPS, GUIDANCE)
    cp = ComposedPipeline(pipe)
    assert cp.family == "flux" and cp.arch.distilled_guidance and set(cp.routers) == {"transformer", "text_encoder", "text_encoder_2"}
    lat, out = ours(cp)
    assert lat.shape == (1, 4, 16, 16) and (lat - ref).abs().max() <= TOL
    assert (out.unet_calls, out.unet_rows) == (STEPS, STEPS)  # no unconditional rows: guidance is an input of the model
    pipe.save_pretrained(tmp_path / "flux")
    loaded = ComposedPipeline.from_pretrained(str(tmp_path / "flux"))
    assert loaded.family == "flux" and (ours(loaded)[0] - lat).abs().max() <= TOL  # same weights; BLAS may round apart


LAYOUT_NAMES = {"peft": "diffusers-peft", "peft_down": "diffusers-peft", "lora_transformer": "kohya", "kohya_te": "kohya",
                "onetrainer": "kohya"}
HEADER_FAMILY = {"peft": "modelspec.architecture", "kohya": "ss_base_model_version", "kohya_te": "ss_base_model_version"}


@pytest.mark.parametrize("layout", ["peft", "kohya", "xlabs", "lora_transformer", "kohya_te", "comfyui", "onetrainer", "peft_down"])
@pytest.mark.parametrize("fuse", [False, True])
def test_one_lora_equals_diffusers_load_lora_weights(files, layout, fuse):
    ref_pipe = build_tiny_flux(0)
    ref_pipe.load_lora_weights(str(files[layout]))
    ref = diffusers_latents(ref_pipe, PROMPT, STEPS, GUIDANCE)
    cp = ComposedPipeline(build_tiny_flux(0))
    lora = cp.load_lora(files[layout])
    assert lora.info.layout == LAYOUT_NAMES.get(layout, layout)
    # files without a header: the family comes from the key names
    assert lora.info.family == "flux" and lora.info.family_source == HEADER_FAMILY.get(layout, "keys: FLUX double/single-stream block names")
    base = ours(cp)[0]
    lat = ours(cp, [layout], lora_scale=1.0, fuse=fuse)[0]
    assert (lat - base).abs().max() > 1e-3  # the LoRA does something
    assert (lat - ref).abs().max() <= TOL
    if layout in ("peft", "kohya_te", "comfyui", "onetrainer"):  # the CLIP text encoder's part is loaded and routed too
        assert lora.layers.get("text_encoder")
    if layout in ("peft", "peft_down"):
        assert "single_transformer_blocks.0.proj_mlp" in lora.layers["transformer"]
    else:  # the fused q/k/v became the three projections (joint: add_q/k/v_proj); kohya's alpha folded in by diffusers
        assert {"transformer_blocks.0.attn.add_k_proj", "transformer_blocks.0.attn.to_add_out"} <= set(lora.layers["transformer"])


def test_switch_and_composite_equal_set_adapters_references(files):
    ref_pipe = build_tiny_flux(0)
    for n in ("a", "b"):
        ref_pipe.load_lora_weights(str(files[n]), adapter_name=n)
    cp = ComposedPipeline(build_tiny_flux(0))
    cp.load_lora(files["a"])
    cp.load_lora(files["b"])
    switch = switch_reference(ref_pipe, ["a", "b"], 0.8, PROMPT, 3, GUIDANCE)
    lat, out = ours(cp, ["a", "b"], "switch", steps=3, switch_interval=1)
    assert (lat - switch).abs().max() <= TOL and out.unet_rows == 3
    comp = composite_reference(ref_pipe, ["a", "b"], 0.8, PROMPT, 3, GUIDANCE, flux_predict(ref_pipe, PROMPT, GUIDANCE))
    lat, out = ours(cp, ["a", "b"], "composite", steps=3)
    assert (lat - comp).abs().max() <= TOL
    assert (out.unet_calls, out.unet_rows) == (3, 6)  # one call per step, one row per LoRA (the mean of their predictions)
    merge = ours(cp, ["a", "b"], "merge", steps=3)[0]
    ref_pipe.set_adapters(["a", "b"], [0.8, 0.8])
    assert (merge - diffusers_latents(ref_pipe, PROMPT, 3, GUIDANCE)).abs().max() <= TOL


def test_other_families_methods_and_samplers_are_refused(tmp_path, files):
    from loraloom.pipelines.tiny import build_tiny_sd, write_random_lora

    cp = ComposedPipeline(build_tiny_flux(0))
    sd_lora = write_random_lora(build_tiny_sd(), tmp_path / "sd.safetensors")
    with pytest.raises(IncompatibleLoRA, match="Stable Diffusion.*loaded model is FLUX.1"):
        cp.load_lora(sd_lora)
    sd3 = write_peft_lora(build_tiny_flux(0), tmp_path, "sd3like", seed=5, text_encoder=False,
                          metadata={"modelspec.architecture": "stable-diffusion-v3-medium/lora"})
    with pytest.raises(IncompatibleLoRA, match="was made for Stable Diffusion 3/3.5 \\(header modelspec.architecture\\), but the loaded model is FLUX.1"):
        cp.load_lora(sd3)
    assert cp.loras == {}
    cp.load_lora(files["a"])
    with pytest.raises(GenerationError, match="'ziplora' does not run on FLUX.1 models.*Fix: use one of merge, switch, composite, klora, loratorio, cmlora, clora"):
        ours(cp, ["a"], "ziplora")
    with pytest.raises(SpecError, match="does not sample FLUX.1 models"):
        cp(PROMPT, loras=["a"], scheduler="dpmsolver++", num_inference_steps=1, height=32, width=32)
    with pytest.raises(GenerationError, match="method 'klora' has no meaning for regions"):  # regions: tests/test_dit_regions.py
        cp(PROMPT, loras=["a"], method="klora", regions=[Region("left", prompt="a dog", loras=("a",))], num_inference_steps=1,
           height=32, width=32)
    sd_cp = ComposedPipeline(build_tiny_sd())
    with pytest.raises(IncompatibleLoRA, match="was made for FLUX.1 \\(header ss_base_model_version\\), but the loaded model is Stable Diffusion 1.x"):
        sd_cp.load_lora(files["kohya"])


def test_spec_file_generates_and_from_png_remakes_identically(tmp_path, files, capsys):
    import shutil

    import yaml

    from loraloom.app.cli import main

    shutil.copy(files["kohya"], tmp_path / "style.safetensors")
    spec = {"model": "tiny:flux", "loras": [{"path": "style.safetensors"}], "prompts": ["a red cat"], "methods": ["composite"],
            "steps": 2, "guidance_scale": 3.5, "scheduler": "default", "height": 32, "width": 32, "seeds": [0], "out": "out"}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    assert main(["generate", str(tmp_path / "spec.yaml"), "--out", str(tmp_path / "out")]) == 0
    png = next((tmp_path / "out").glob("composite_*.png"))
    capsys.readouterr()
    assert main(["generate", "--from-png", str(png), "--out", str(tmp_path / "again")]) == 0
    assert "identical to the source" in capsys.readouterr().out


def test_klora_routes_the_transformers_attention_projections(tmp_path):
    """K-LoRA's table on FLUX's joint and single-stream attention: a time scale that always favours the subject gives
    the subject LoRA alone, one that always favours the style gives the style alone; the paper's s(tau) hands the
    layers over from subject to style as denoising proceeds."""
    pipe = build_tiny_flux(0)
    attention = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")
    for n, seed in (("subject", 3), ("style", 4)):
        write_peft_lora(pipe, tmp_path, n, seed=seed, targets=attention, text_encoder=False)
    cp = ComposedPipeline(pipe)
    for n in ("subject", "style"):
        cp.load_lora(tmp_path / f"{n}.safetensors")
    for beta, alone in ((1e-9, "subject"), (1e9, "style")):
        lat, out = ours(cp, ["subject", "style"], "klora", steps=3, roles="given", alpha=0.0, beta=beta)
        assert (lat - ours(cp, [alone], steps=3, lora_scale=1.0, fuse=False)[0]).abs().max() <= TOL
    out = ours(cp, ["subject", "style"], "klora", steps=3, roles="given")[1]
    table = out.extras["klora"]
    assert table["layers"] == 7  # double block: to_q/k/v, to_out.0; single block: to_q/k/v
    per_step = table["subject_layers_per_step"]
    assert per_step[0] == 7 and per_step[-1] == 0 and per_step == sorted(per_step, reverse=True)


def test_family_sampler_defaults():
    """Left out, steps, guidance and sampler are the family's (FluxPipeline's 28 steps and guidance 3.5, the model's own
    flow-matching scheduler); SD keeps loraloom's DEFAULTS."""
    from loraloom.pipelines.defaults import DEFAULTS
    from loraloom.pipelines.tiny import build_tiny_sd

    cp = ComposedPipeline(build_tiny_flux(0))
    run = cp.run([], PROMPT, num_inference_steps=cp.arch.default_steps)
    assert (cp.arch.default_steps, run.model_guidance, run.guidance_scale) == (28, 3.5, 1.0)
    assert type(run.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and len(run.scheduler.timesteps) == 28
    sd = ComposedPipeline(build_tiny_sd())
    run = sd.run([], PROMPT, num_inference_steps=sd.arch.default_steps)
    assert (sd.arch.default_steps, run.guidance_scale) == (DEFAULTS.steps, DEFAULTS.guidance_scale)
    assert type(run.scheduler).__name__ == "DPMSolverMultistepScheduler"


def test_loratorio_on_flux_is_the_weighted_conditional(files):
    """LoRAtorio on a guidance-distilled model: the base model's and each LoRA's conditional rows only (N + 1 per step,
    the null unconditional rows never computed); one LoRA is that LoRA alone (its weights are all 1)."""
    cp = ComposedPipeline(build_tiny_flux(0))
    cp.load_lora(files["a"])
    cp.load_lora(files["b"])
    lat, out = ours(cp, ["a"], "loratorio", steps=3)
    assert (lat - ours(cp, ["a"], steps=3, fuse=False)[0]).abs().max() <= TOL and out.unet_rows == 2 * 3
    lat, out = ours(cp, ["a", "b"], "loratorio", steps=3)
    assert out.unet_rows == 3 * 3 and abs(sum(out.extras["mean_weights"][-1]) - 1) < 1e-3


def test_loras_without_text_encoder_layers_share_one_encoding(tmp_path):
    """Branches that differ only by LoRAs with no text-encoder layers are encoded once (FLUX's T5 is the costly part of
    a Switch or Composite setup); a LoRA with a CLIP part still gets its own encoding."""
    pipe = build_tiny_flux(0)
    write_peft_lora(pipe, tmp_path, "plain", seed=3, text_encoder=False)
    write_peft_lora(pipe, tmp_path, "with_te", seed=4, text_encoder=True)
    cp = ComposedPipeline(pipe)
    cp.load_lora(tmp_path / "plain.safetensors")
    cp.load_lora(tmp_path / "with_te.safetensors")
    batches = []
    encode = cp.arch.encode
    cp.arch.encode = lambda *a: batches.append(len(a[0])) or encode(*a)
    with cp.run(["plain", "with_te"], PROMPT, height=32, width=32) as run:
        out = run.encode([{"plain": 0.8}, {"with_te": 0.8}, {"plain": 0.8, "with_te": 0.8}, {}])
    assert batches == [2] and torch.equal(out[0][1].hidden, out[3][1].hidden) and torch.equal(out[1][1].hidden, out[2][1].hidden)
    assert not torch.equal(out[0][1].pooled, out[1][1].pooled)  # FLUX reads only CLIP's pooled output


def test_clip_attention_of_kohya_and_comfyui_files_is_loaded(tmp_path):
    """diffusers 0.42's FLUX loader drops the CLIP attention projections of kohya and ComfyUI files (its converter spells
    them `self_attn.to_q_lora`, which its text-encoder loader does not take); loraloom maps them to `q_proj`/`v_proj`
    with the file's alpha: ΔW = alpha/rank · up @ down."""
    from safetensors.torch import load_file

    from loraloom.composition.transformer_loras import load_transformer_lora

    for write, key in ((write_kohya_te_flux_lora, "lora_te1_text_model_encoder_layers_0_self_attn_v_proj"),
                       (write_comfyui_flux_lora, "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.v_proj")):
        path = write(tmp_path, key[:6], seed=1)
        sd = load_file(str(path))
        layers = load_transformer_lora(path, "flux").layers["text_encoder"]
        expected = sd[f"{key}.alpha"] / 4 * sd[f"{key}.lora_up.weight"] @ sd[f"{key}.lora_down.weight"]
        assert torch.allclose(layers["text_model.encoder.layers.0.self_attn.v_proj"].delta(torch.float32), expected, atol=1e-6)
        assert "text_model.encoder.layers.0.self_attn.q_proj" in layers


def _pair(module, n_in=32, n_out=32, value=0.1):
    return {f"{module}.lora_down.weight": torch.full((4, n_in), value), f"{module}.lora_up.weight": torch.full((n_out, 4), value)}


@pytest.mark.parametrize("case", ["bfl_control", "onetrainer_mlp"])
def test_layouts_diffusers_does_not_convert_are_refused_by_name(tmp_path, case):
    from safetensors.torch import save_file

    from loraloom.composition.errors import LoRAFileError

    sd, match = {
        "bfl_control": ({"double_blocks.0.img_attn.qkv.lora_A.weight": torch.ones(4, 32),
                         "double_blocks.0.img_attn.qkv.lora_B.weight": torch.ones(96, 4),
                         "double_blocks.0.img_attn.norm.query_norm.scale": torch.ones(16)}, "is a FLUX.1 Control LoRA"),
        "onetrainer_mlp": ({**_pair("lora_transformer_transformer_blocks_0_attn_to_q"),
                            **_pair("lora_transformer_single_transformer_blocks_0_proj_mlp", n_out=128)},
                           "is a OneTrainer-style .*no mapping for .*lora_transformer_single_transformer_blocks_0_proj_mlp"),
    }[case]
    save_file(sd, str(tmp_path / "x.safetensors"))
    cp = ComposedPipeline(build_tiny_flux(0))
    with pytest.raises(LoRAFileError, match=r"x\.safetensors: " + match):
        cp.load_lora(tmp_path / "x.safetensors")
    assert cp.loras == {}


def test_all_zero_t5_layers_are_dropped_as_diffusers_does(tmp_path):
    from safetensors.torch import save_file

    sd = {**_pair("lora_unet_double_blocks_0_img_attn_proj"), **_pair("lora_te3_encoder_block_0_layer_0_SelfAttention_q", value=0.0)}
    save_file(sd, str(tmp_path / "z.safetensors"))
    lora = ComposedPipeline(build_tiny_flux(0)).load_lora(tmp_path / "z.safetensors")
    assert set(lora.layers) == {"transformer"}
