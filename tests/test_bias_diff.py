"""LoRAs with a bias diff (`<module>.diff_b` beside `lora_down`/`lora_up`/`alpha`: ComfyUI's "Extract and Save Lora"
with bias_diff, trainers that train biases beside a LoRA) load and apply as ComfyUI applies them:
W += s · (alpha/r) · up @ down and b += s · diff_b (diff_b not scaled by alpha/r) at strength s.

The references are the tiny models with their weights AND biases changed by hand: on FLUX.1 the fused BFL modules
split by rows into diffusers' modules (`img_attn.qkv` rows [0:inner] -> attn.to_q, [inner:2·inner] -> to_k,
[2·inner:3·inner] -> to_v; `single_blocks.0.linear1` rows -> to_q, to_k, to_v, proj_mlp) and run through diffusers'
own FluxPipeline; on SD 1.x the kohya modules' layers (a 1x1 conv, a 3x3 LoCon, two Linears), run without any LoRA.
Our generations (Merge, fused and unfused, at two strengths) equal them within 1e-5 (FLUX) and 1e-4 (SD 1.x)."""

from __future__ import annotations

import copy

import pytest
import torch
from dit_references import diffusers_latents, our_latents
from safetensors.torch import save_file

from loraloom.composition.adapters import LoRABias, build_adapter
from loraloom.composition.errors import LoRAFileError, LoraloomError
from loraloom.composition.merging import as_lora_layer, column_merged_layer, lora_state_dict
from loraloom.pipelines import ComposedPipeline
from loraloom.pipelines.tiny import build_tiny_sd
from loraloom.pipelines.tiny_dit import build_tiny_flux

PROMPT, STEPS, GUIDANCE = "a red cat, ink wash", 2, 3.5
TOL = 1e-5
SD_TOL = 1e-4  # SD 1.x latents are ~5 in size: float32 reordering of the unfused forward gives ~1e-5 (as tests/test_lycoris.py)
INNER, MLP, RANK, ALPHA = 32, 128, 4, 2.0

# ComfyUI module (BFL path) -> (in, out, [(diffusers module, rows of the fused weight it takes)])
FLUX_MODULES = {
    "double_blocks.0.img_attn.qkv": (INNER, 3 * INNER, [(f"transformer_blocks.0.attn.to_{p}", slice(i * INNER, (i + 1) * INNER))
                                                        for i, p in enumerate("qkv")]),
    "double_blocks.0.img_attn.proj": (INNER, INNER, [("transformer_blocks.0.attn.to_out.0", slice(None))]),
    "single_blocks.0.linear1": (INNER, 3 * INNER + MLP, [*((f"single_transformer_blocks.0.attn.to_{p}", slice(i * INNER, (i + 1) * INNER))
                                                          for i, p in enumerate("qkv")),
                                                        ("single_transformer_blocks.0.proj_mlp", slice(3 * INNER, 3 * INNER + MLP))]),
}
# kohya SD 1.x module -> diffusers UNet path (a 1x1 conv, a 3x3 LoCon, two Linears; all with a bias, none followed by a
# per-channel norm that would cancel a bias change)
SD_MODULES = {
    "lora_unet_down_blocks_1_attentions_0_proj_in": "down_blocks.1.attentions.0.proj_in",
    "lora_unet_down_blocks_0_resnets_0_conv2": "down_blocks.0.resnets.0.conv2",
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_out_0": "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0",
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj": "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
}
SD_GEN = dict(num_inference_steps=2, seed=0, scheduler="ddim", output_type="latent", progress_bar=False, guidance_scale=5.0)


def _r(g, *shape, std=0.2):
    return torch.randn(*shape, generator=g) * std


def _factors(g, shape, zero_up=False):
    """(down, up, diff_b) for a Linear (out, in) or a Conv2d (out, in, kh, kw) weight shape."""
    out, n_in, *kernel = shape
    down = _r(g, RANK, n_in, *kernel)
    up = torch.zeros(out, RANK, *([1, 1] if kernel else [])) if zero_up else _r(g, out, RANK, *([1, 1] if kernel else []))
    return down, up, _r(g, out, std=0.3)


def _delta(down, up):
    """(alpha / r) · up @ down in the weight's layout."""
    if down.ndim == 4:
        return ALPHA / RANK * torch.einsum("or,rikl->oikl", up.flatten(1), down)
    return ALPHA / RANK * (up @ down)


# --- FLUX.1 (ComfyUI names, fused modules split by rows) ------------------------------------------------------------
def flux_file(folder, name, seed=0, zero_up=False):
    """A ComfyUI-named FLUX LoRA with a bias diff on every module: {module: (down, up, diff_b)} and the path."""
    g = torch.Generator().manual_seed(seed)
    sd, modules = {}, {}
    for module, (n_in, n_out, _) in FLUX_MODULES.items():
        down, up, diff_b = _factors(g, (n_out, n_in), zero_up)
        modules[module] = (down, up, diff_b)
        key = f"diffusion_model.{module}"
        sd.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(ALPHA),
                   f"{key}.diff_b": diff_b})
    path = folder / f"{name}.safetensors"
    save_file(sd, str(path))
    return path, modules


def flux_reference(modules, scale):
    """The tiny FLUX with each module's ΔW and Δb added by hand into diffusers' modules, split by rows."""
    pipe = build_tiny_flux(0)
    named = dict(pipe.transformer.named_modules())
    with torch.no_grad():
        for module, (down, up, diff_b) in modules.items():
            dw = _delta(down, up)
            for target, rows in FLUX_MODULES[module][2]:
                named[target].weight += scale * dw[rows]
                named[target].bias += scale * diff_b[rows]
    return pipe


def flux_ours(cp, loras, **params):
    return our_latents(cp, loras, PROMPT, STEPS, GUIDANCE, **params)


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("flux-diff-b")
    path, modules = flux_file(folder, "biased", seed=3)
    cp = ComposedPipeline(build_tiny_flux(0))
    lora = cp.load_lora(path)
    return cp, lora, modules, folder


def test_flux_comfyui_bias_diff_loads_split_by_rows(flux):
    _, lora, modules, _ = flux
    layers = lora.layers["transformer"]
    assert set(layers) == {t for m in FLUX_MODULES.values() for t, _ in m[2]}
    assert all(isinstance(a, LoRABias) and a.kind == "LoRA+bias" for a in layers.values())
    down, up, diff_b = modules["double_blocks.0.img_attn.qkv"]
    k = layers["transformer_blocks.0.attn.to_k"]
    torch.testing.assert_close(k.bias_delta(), diff_b[INNER:2 * INNER])  # diff_b is not scaled by alpha/r
    torch.testing.assert_close(k.delta(), _delta(down, up)[INNER:2 * INNER])
    assert k.lowrank() is None  # the low-rank fast paths would skip the bias
    mlp = layers["single_transformer_blocks.0.proj_mlp"]
    torch.testing.assert_close(mlp.bias_delta(), modules["single_blocks.0.linear1"][2][3 * INNER:])


@pytest.mark.parametrize(("fuse", "scale"), [(False, 1.0), (True, 1.0), (False, 0.7), (True, 0.7)])
def test_flux_bias_diff_equals_hand_modified_weights_and_biases(flux, fuse, scale):
    cp, _, modules, _ = flux
    ref = diffusers_latents(flux_reference(modules, scale), PROMPT, STEPS, GUIDANCE)
    lat = flux_ours(cp, ["biased"], lora_scale=scale, fuse=fuse)
    assert (lat - flux_ours(cp, [])).abs().max() > 1e-3
    assert (lat - ref).abs().max() <= TOL


def test_flux_bias_alone_changes_the_output(flux):
    """up = 0: the factors change nothing, so the output differs from the base only through diff_b (a loader that
    dropped the bias would give the base image)."""
    cp, _, _, folder = flux
    path, modules = flux_file(folder, "bias_only", seed=5, zero_up=True)
    cp.load_lora(path)
    try:
        base = flux_ours(cp, [])
        for fuse in (False, True):
            lat = flux_ours(cp, ["bias_only"], lora_scale=1.0, fuse=fuse)
            assert (lat - base).abs().max() > 1e-3
            assert (lat - diffusers_latents(flux_reference(modules, 1.0), PROMPT, STEPS, GUIDANCE)).abs().max() <= TOL
    finally:
        cp.remove_lora("bias_only")


# --- SD 1.x (kohya names) -----------------------------------------------------------------------------------------
def sd_file(folder, name, unet, seed=0, zero_up=False, modules=SD_MODULES):
    g = torch.Generator().manual_seed(seed)
    named = dict(unet.named_modules())
    sd, out = {}, {}
    for kohya, path in modules.items():
        down, up, diff_b = _factors(g, tuple(named[path].weight.shape), zero_up)
        out[path] = (down, up, diff_b)
        sd.update({f"{kohya}.lora_down.weight": down, f"{kohya}.lora_up.weight": up, f"{kohya}.alpha": torch.tensor(ALPHA),
                   f"{kohya}.diff_b": diff_b})
    file = folder / f"{name}.safetensors"
    save_file(sd, str(file))
    return file, out


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    torch.set_num_threads(1)
    cp = ComposedPipeline(build_tiny_sd(0))
    return cp, ComposedPipeline(copy.deepcopy(cp.pipe)), tmp_path_factory.mktemp("sd-diff-b")


def _sd_reference(ref, modules, scale):
    """Latents of the reference copy with ΔW and Δb added into its UNet by hand (restored after)."""
    named = dict(ref.pipe.unet.named_modules())
    saved = {p: (named[p].weight.data.clone(), named[p].bias.data.clone()) for p in modules}
    try:
        with torch.no_grad():
            for p, (down, up, diff_b) in modules.items():
                named[p].weight += scale * _delta(down, up).reshape(named[p].weight.shape)
                named[p].bias += scale * diff_b
        return ref(PROMPT, loras=[], method="merge", **SD_GEN).latents
    finally:
        for p, (w, b) in saved.items():
            named[p].weight.data, named[p].bias.data = w, b


@pytest.mark.parametrize("zero_up", [False, True])
def test_sd_kohya_bias_diff_equals_hand_modified_weights_and_biases(sd, zero_up):
    cp, ref, folder = sd
    name = f"kohya_b{int(zero_up)}"
    path, modules = sd_file(folder, name, cp.pipe.unet, seed=7, zero_up=zero_up)
    lora = cp.load_lora(path)
    try:
        assert set(lora.layers["unet"]) == set(SD_MODULES.values())
        assert all(isinstance(a, LoRABias) for a in lora.layers["unet"].values())
        base = cp(PROMPT, loras=[], method="merge", **SD_GEN).latents
        for scale in (1.0, 0.7):
            expected = _sd_reference(ref, modules, scale)
            for fuse in (False, True):
                got = cp(PROMPT, loras=[(name, 1.0)], method="merge", method_params={"lora_scale": scale, "fuse": fuse}, **SD_GEN).latents
                assert (got - base).abs().max() > 1e-3, f"scale={scale} fuse={fuse}"  # with up = 0: only the bias
                assert (got - expected).abs().max() <= SD_TOL, f"scale={scale} fuse={fuse}"
    finally:
        cp.remove_lora(name)


# --- refusals --------------------------------------------------------------------------------------------------------
def test_bias_diff_on_a_layer_without_bias_is_refused(sd):
    cp, _, folder = sd
    kohya = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"  # Linear(bias=False)
    path, _ = sd_file(folder, "no_bias", cp.pipe.unet, modules={kohya: "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"})
    before = dict(cp.loras)
    with pytest.raises(LoRAFileError) as err:
        cp.load_lora(path)
    msg = str(err.value)
    assert "mid_block.attentions.0.transformer_blocks.0.attn1.to_q" in msg
    assert "diff_b" in msg and "no bias" in msg and "re-export" in msg
    assert cp.loras == before and "no_bias" not in cp.loras


def test_bias_diff_beside_other_adapters_is_refused_by_name():
    g = torch.Generator().manual_seed(0)
    loha = {"hada_w1_a": _r(g, 8, 2), "hada_w1_b": _r(g, 2, 4), "hada_w2_a": _r(g, 8, 2), "hada_w2_b": _r(g, 2, 4),
            "diff_b": _r(g, 8)}
    with pytest.raises(ValueError, match="bias diff \\(diff_b\\) beside a LoHa") as err:
        build_adapter(loha, 1.0, "x")
    assert err.value.fix and "without bias diffs" in err.value.fix
    with pytest.raises(ValueError, match="beside a DoRA"):
        build_adapter({"down": _r(g, 2, 4), "up": _r(g, 8, 2), "diff_b": _r(g, 8), "dora_scale": _r(g, 8, 1)}, 1.0, "x")
    with pytest.raises(ValueError, match="8 output rows"):
        build_adapter({"down": _r(g, 2, 4), "up": _r(g, 8, 2), "diff_b": _r(g, 5)}, 1.0, "x")


def test_column_merges_and_the_diffusers_writer_refuse_the_bias():
    """Users of plain LoRA factors (ZipLoRA/hypernet column merges, the diffusers-layout writer) refuse a LoRA with a
    bias diff instead of dropping the bias."""
    from loraloom.composition.lora import LoRA

    g = torch.Generator().manual_seed(1)
    layer = build_adapter({"down": _r(g, 2, 4), "up": _r(g, 8, 2), "diff_b": _r(g, 8)}, 2.0, "m")
    assert isinstance(layer, LoRABias) and layer.nbytes == sum(t.numel() * 4 for t in layer.tensors) == (8 + 16 + 8) * 4
    with pytest.raises(LoraloomError, match="bias diff"):
        as_lora_layer(layer, svd_rank=8, where="x unet.m")
    with pytest.raises(ValueError, match="bias diff"):
        column_merged_layer(layer, None)
    lora = LoRA(name="x", layers={"unet": {"m": layer}}, info=None)
    with pytest.raises(LoraloomError, match="LoRA\\+bias"):
        lora_state_dict(lora)
    # the adapter's own forward without a module: the bias at the gate, unscaled by alpha/r
    x = torch.randn(3, 4)
    torch.testing.assert_close(layer.apply(x, weight=0.5), 0.5 * (x @ layer.delta().t() + layer.diff_b))
    moved = layer.to(dtype=torch.float64)
    assert moved.diff_b.dtype == torch.float64


def test_flux_norm_diffs_are_refused_by_name(flux):
    """ComfyUI saves 1-D `.diff` keys of norm scales beside LoRAs; FLUX.1's query/key norms are RMSNorms, which
    loraloom's norm adapter does not cover: refused by name with the fix (not as a damaged file), nothing loaded."""
    from safetensors.torch import load_file

    from loraloom.composition.errors import UnsupportedLoRAFormat

    cp, _, _, folder = flux
    path, _ = flux_file(folder, "with_norm", seed=9)
    sd = load_file(str(path))
    sd["diffusion_model.double_blocks.0.img_attn.norm.query_norm.diff"] = torch.randn(INNER // 2)
    save_file(sd, str(path))
    before = dict(cp.loras)
    with pytest.raises(UnsupportedLoRAFormat) as err:
        cp.load_lora(path)
    msg = str(err.value)
    assert "diffusion_model.double_blocks.0.img_attn.norm.query_norm.diff" in msg and "re-export" in msg
    assert "damaged" not in msg
    assert cp.loras == before
