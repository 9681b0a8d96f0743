"""Block weights (`lbw`) and the te/unet strengths on FLUX.1 and SD3 (`composition.controls`: `dit_block_ids`,
`dit_block_of`, `flux_block_vector`, `sd3_block_vector`; `pipelines.run.Run._apply_controls`).

Each generation is compared with the same LoRA file rewritten by hand: the blocks a vector zeroes removed from the
file, the blocks it halves with their lora_B halved, the transformer part (`unet: 0`) or the text-encoder part
(`te: 0`) removed."""

from __future__ import annotations

import pytest
import torch
from dit_references import SD3_TARGETS, write_peft_lora
from safetensors import safe_open
from safetensors.torch import save_file

from loraloom.composition.controls import (
    DIT_PRESETS,
    ControlError,
    dit_block_ids,
    dit_block_of,
    flux_block_vector,
    layer_block_weights,
    sd3_block_vector,
    use_from,
)
from loraloom.composition.errors import GenerationError
from loraloom.pipelines import ComposedPipeline
from loraloom.pipelines.prompt_tags import parse_tags
from loraloom.pipelines.spec import LoRARef
from loraloom.pipelines.tiny_dit import build_tiny_flux, build_tiny_sd3

PROMPT, STEPS = "a red cat, ink wash", 2
TOL = 1e-5


def ours(cp, loras, guidance, fuse=True):
    out = cp(PROMPT, loras=list(loras), method="merge", method_params={"lora_scale": 1.0, "fuse": fuse},
             num_inference_steps=STEPS, height=32, width=32, guidance_scale=guidance, seed=0, output_type="latent",
             progress_bar=False)
    return out.latents


def rewrite(src, dst, scale):
    """A copy of a diffusers/PEFT LoRA file with each module's lora_B times `scale(key)` (0: the module left out)."""
    with safe_open(str(src), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    out = {}
    for key, t in tensors.items():
        module = key.rsplit(".lora_", 1)[0]
        s = scale(module)
        if s == 0.0:
            continue
        out[key] = t * s if ".lora_B." in key else t
    save_file(out, str(dst), metadata=meta)
    return dst


def in_double(module):  # FLUX's double-stream blocks / SD3's joint blocks, not FLUX's single-stream ones
    return module.startswith("transformer.transformer_blocks.")


def in_single(module):
    return module.startswith("transformer.single_transformer_blocks.")


def is_text(module):
    return module.startswith("text_encoder")


@pytest.fixture(scope="module")
def flux_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flux-lbw")
    full = write_peft_lora(build_tiny_flux(0), folder, "full", seed=1)
    return {
        "full": full,
        "no_double": rewrite(full, folder / "no_double.safetensors", lambda m: 0.0 if in_double(m) else 1.0),
        "scaled": rewrite(full, folder / "scaled.safetensors",
                          lambda m: 0.5 if in_double(m) else 0.25 if in_single(m) else 1.0),
        "base_half": rewrite(full, folder / "base_half.safetensors", lambda m: 0.5 if is_text(m) else 1.0),
        "te_only": rewrite(full, folder / "te_only.safetensors", lambda m: 1.0 if is_text(m) else 0.0),
        "transformer_only": rewrite(full, folder / "transformer_only.safetensors", lambda m: 0.0 if is_text(m) else 1.0),
    }


@pytest.fixture(scope="module")
def flux():
    return ComposedPipeline(build_tiny_flux(0))


def loaded(cp, files, *names):
    for n in names:
        if n not in cp.loras:
            cp.load_lora(files[n])
    return cp


# --- the vector parser --------------------------------------------------------------------------------------------
def test_flux_vectors_lengths_and_presets():
    ids = dit_block_ids("flux", 19, 38)
    assert len(ids) == 58 and ids[:2] == ["BASE", "D00"] and ids[19:21] == ["D18", "S00"] and ids[-1] == "S37"
    values = [i / 100 for i in range(58)]
    assert list(flux_block_vector(values).values()) == values and list(flux_block_vector(values)) == ids
    text = ",".join(f"{v:g}" for v in values)
    assert flux_block_vector(text) == flux_block_vector(values)  # the string form, as in a tag
    short = flux_block_vector([0.5] * 57)
    assert short["BASE"] == 1.0 and short["D00"] == short["S37"] == 0.5  # 57 values: the blocks, BASE at 1
    for name, value in DIT_PRESETS.items():
        assert set(flux_block_vector(name.lower()).values()) == {value} and len(flux_block_vector(name)) == 58
    # tiny models: the counts of their config
    assert flux_block_vector("0,1,0.5", 1, 1) == {"BASE": 0.0, "D00": 1.0, "S00": 0.5}
    assert flux_block_vector([0, 2], 1, 1) == {"BASE": 1.0, "D00": 0.0, "S00": 2.0}


def test_sd3_vectors_lengths_and_presets():
    assert dit_block_ids("sd3", 24) == ["BASE", *(f"J{i:02d}" for i in range(24))]
    assert len(sd3_block_vector([1] * 25)) == 25 and sd3_block_vector([0] * 24)["BASE"] == 1.0
    assert len(sd3_block_vector([1] * 39, 38)) == 39  # SD 3.5 Large: 38 joint blocks
    assert sd3_block_vector("ALL0.5", 2) == {"BASE": 0.5, "J00": 0.5, "J01": 0.5}
    assert sd3_block_vector("1,0,0.5", 2) == {"BASE": 1.0, "J00": 0.0, "J01": 0.5}


@pytest.mark.parametrize("spec,message", [
    ("OUTD", r"block weights OUTD: a preset of the SD UNet's blocks .*FLUX.1 has BASE, D00–D18, S00–S37\. Fix: .*ALL, "
             r"NONE, ALL0.5.*58 values \(BASE, D00–D18, S00–S37\) or 57"),
    ("INS", r"preset of the SD UNet's blocks"),
    ("1,0,1", r"FLUX.1 takes a vector of 58 values \(BASE, D00–D18, S00–S37\) or 57 \(D00–D18, S00–S37; BASE, the text "
              r"encoders, at 1\), got 3 values"),
    ([1.0] * 17, r"got 17 values"),
    ("MOSTLY", r"'MOSTLY': not a preset \(ALL, NONE, ALL0.5 on FLUX.1\) nor a list of numbers; FLUX.1 takes .* 58"),
])
def test_flux_vector_errors_say_what_works(spec, message):
    with pytest.raises(ControlError, match=message):
        flux_block_vector(spec)


def test_sd3_vector_errors_say_what_works():
    with pytest.raises(ControlError, match=r"SD3 takes a vector of 25 values \(BASE, J00–J23\) or 24 \(J00–J23; .*got 58"):
        sd3_block_vector([1] * 58)
    with pytest.raises(ControlError, match=r"OUTS: a preset of the SD UNet's blocks .*SD3 has BASE, J00–J01"):
        sd3_block_vector("OUTS", 2)
    with pytest.raises(ControlError, match="no block ids"):
        dit_block_ids("sdxl", 3)


def test_entries_specs_and_tags_pass_dit_vectors_through():
    vector = ",".join(["1"] + ["0"] * 19 + ["1"] * 38)
    assert use_from({"name": "x", "lbw": vector})[2].blocks == vector
    assert use_from({"name": "x", "lbw": [1, 0, 1]})[2].blocks == (1.0, 0.0, 1.0)  # the length is the model's to check
    assert LoRARef("/l/x.safetensors", lbw=vector).lbw == [float(v) for v in vector.split(",")]
    assert LoRARef("/l/x.safetensors", lbw="all0.5").lbw == "ALL0.5"
    assert parse_tags("a cat <lora:x:1:lbw=1,0,0.5>")[1][0].lbw == [1.0, 0.0, 0.5]
    with pytest.raises(ControlError, match="not a preset"):
        use_from({"name": "x", "lbw": "MOSTLY"})


# --- block ids of diffusers paths -----------------------------------------------------------------------------------
@pytest.mark.parametrize("path,flux_id,sd3_id", [
    ("transformer_blocks.0.attn.to_q", "D00", "J00"),
    ("transformer_blocks.18.ff_context.net.2", "D18", "J18"),
    ("transformer_blocks.37.attn.add_k_proj", "D37", "J37"),
    ("single_transformer_blocks.0.proj_mlp", "S00", None),
    ("single_transformer_blocks.37.attn.to_v", "S37", None),
    ("x_embedder", None, None),
    ("context_embedder", None, None),
    ("time_text_embed.timestep_embedder.linear_1", None, None),
    ("pos_embed.proj", None, None),
    ("norm_out.linear", None, None),
    ("proj_out", None, None),
])
def test_block_of_diffusers_transformer_paths(path, flux_id, sd3_id):
    assert dit_block_of("transformer", path, "flux") == flux_id
    assert dit_block_of("transformer", path, "sd3") == sd3_id
    for te in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        assert dit_block_of(te, "text_model.encoder.layers.0.self_attn.q_proj", "flux") == "BASE"
    assert layer_block_weights({"D00": 0.5}, "transformer", [path], dit="flux")[path] == (
        1.0 if flux_id is None else 0.5 if flux_id == "D00" else 0.0)


@pytest.mark.parametrize("build,family", [(build_tiny_flux, "flux"), (build_tiny_sd3, "sd3")])
def test_every_block_layer_of_the_tiny_transformers_has_its_block(build, family):
    transformer = build(0).transformer
    ids = set(dit_block_ids(family, transformer.config.num_layers, getattr(transformer.config, "num_single_layers", 0)))
    seen = set()
    for path, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear):
            block = dit_block_of("transformer", path, family)
            assert (block is None) == (not path.split(".")[0].endswith("transformer_blocks")), path
            seen.add(block)
    assert seen - {None} == ids - {"BASE"}


# --- generation: te/unet strengths ------------------------------------------------------------------------------------
def test_flux_unet_strength_is_the_transformers(flux, flux_files):
    cp = loaded(flux, flux_files, "full", "te_only", "transformer_only")
    full = ours(cp, ["full"], 3.5)
    no_transformer = ours(cp, [{"name": "full", "unet": 0.0}], 3.5)
    assert (no_transformer - full).abs().max() > 1e-3
    assert (no_transformer - ours(cp, ["te_only"], 3.5)).abs().max() <= TOL
    assert (ours(cp, [{"name": "full", "te": 0.0}], 3.5) - ours(cp, ["transformer_only"], 3.5)).abs().max() <= TOL


def test_sd3_unet_strength_is_the_transformers(tmp_path):
    pipe = build_tiny_sd3(0)
    full = write_peft_lora(pipe, tmp_path, "full", seed=1, targets=SD3_TARGETS)
    te_only = rewrite(full, tmp_path / "te_only.safetensors", lambda m: 1.0 if is_text(m) else 0.0)
    scaled = rewrite(full, tmp_path / "scaled.safetensors",
                     lambda m: 0.5 if m.startswith("transformer.transformer_blocks.0.") else
                     0.0 if m.startswith("transformer.transformer_blocks.1.") else 1.0)
    cp = ComposedPipeline(pipe)
    for f in (full, te_only, scaled):
        cp.load_lora(f)
    assert cp.loras["full"].layers.get("text_encoder")  # the CLIP-L part is routed too
    no_transformer = ours(cp, [{"name": "full", "unet": 0.0}], 5.0)
    assert (no_transformer - ours(cp, ["full"], 5.0)).abs().max() > 1e-3
    assert (no_transformer - ours(cp, ["te_only"], 5.0)).abs().max() <= TOL
    # block weights on the joint blocks: BASE 1, J00 half, J01 off
    got = ours(cp, [{"name": "full", "lbw": "1,0.5,0"}], 5.0)
    assert (got - ours(cp, ["scaled"], 5.0)).abs().max() <= TOL


# --- generation: block weights ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("lbw", ["1,0,1", [0.0, 1.0]], ids=["with-base", "without-base"])
def test_flux_double_blocks_off_equals_the_file_without_them(flux, flux_files, fuse, lbw):
    cp = loaded(flux, flux_files, "full", "no_double")
    got = ours(cp, [{"name": "full", "lbw": lbw}], 3.5, fuse)
    assert (got - ours(cp, ["full"], 3.5, fuse)).abs().max() > 1e-3
    assert (got - ours(cp, ["no_double"], 3.5, fuse)).abs().max() <= TOL


@pytest.mark.parametrize("fuse", [True, False])
def test_flux_partial_weights_equal_a_hand_scaled_file(flux, flux_files, fuse):
    cp = loaded(flux, flux_files, "full", "scaled", "base_half")
    assert (ours(cp, [{"name": "full", "lbw": [1.0, 0.5, 0.25]}], 3.5, fuse)
            - ours(cp, ["scaled"], 3.5, fuse)).abs().max() <= TOL
    # BASE weighs the text encoder part (and a preset the same in every block)
    assert (ours(cp, [{"name": "full", "lbw": "0.5,1,1"}], 3.5, fuse) - ours(cp, ["base_half"], 3.5, fuse)).abs().max() <= TOL
    assert (ours(cp, [{"name": "full", "lbw": "ALL"}], 3.5, fuse) - ours(cp, ["full"], 3.5, fuse)).abs().max() <= TOL


def test_flux_block_weights_the_model_cannot_take_are_refused(flux, flux_files):
    cp = loaded(flux, flux_files, "full")
    with pytest.raises(GenerationError, match=r"LoRA 'full': block weights OUTD: a preset of the SD UNet's blocks .*FLUX.1 "
                                              r"has BASE, D00, S00\. Fix: .*ALL, NONE, ALL0.5.*3 values"):
        ours(cp, [{"name": "full", "lbw": "OUTD"}], 3.5)
    with pytest.raises(GenerationError, match=r"FLUX.1 takes a vector of 3 values \(BASE, D00, S00\) or 2 .*got 17"):
        ours(cp, [{"name": "full", "lbw": [1.0] * 17}], 3.5)


def test_sd_vector_lengths_are_checked_when_the_model_is_known(tmp_path):
    """Specs and tags leave the length to the model (a DiT's depends on its config); on SD the UNet's lengths."""
    from loraloom.pipelines.tiny import build_tiny_sd, write_random_lora

    pipe = build_tiny_sd(0)
    path = write_random_lora(pipe, tmp_path / "sd.safetensors", seed=1)
    cp = ComposedPipeline(pipe)
    cp.load_lora(path)
    with pytest.raises(GenerationError, match=r"LoRA 'sd': block weights need 12, 17, 20 or 26 values .*got 3"):
        cp(PROMPT, loras=[{"name": "sd", "lbw": "1,0,1"}], num_inference_steps=1, height=64, width=64, seed=0,
           output_type="latent", progress_bar=False)
