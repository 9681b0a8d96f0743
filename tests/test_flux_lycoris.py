"""LyCORIS on FLUX.1 (composition/fused_lycoris.py): LoKr and LoHa files in kohya module names, written here from
factors. The reference is lycoris-lora's own computation of each module's ΔW (`lycoris.functional`), added by hand to
the BFL-layout fused weight and split by rows into diffusers' modules (q/k/v of `img_attn.qkv`; q/k/v and `proj_mlp`
of `linear1`; the final modulation's halves swapped into `norm_out.linear`); generations through loraloom (fused and
unfused, at two strengths) equal the hand-modified model's within 1e-5."""

from __future__ import annotations

import pytest
import torch
from dit_references import diffusers_latents, our_latents, write_kohya_lycoris_flux_lora

from loraloom.composition.adapters import FullDiff, LoHa, LoKr
from loraloom.composition.errors import UnsupportedLoRAFormat
from loraloom.pipelines import ComposedPipeline
from loraloom.pipelines.tiny_dit import build_tiny_flux

lycoris = pytest.importorskip("lycoris", reason="lycoris-lora (the dev extra) is the reference these tests compare with")
from lycoris.functional import loha as ly_loha  # noqa: E402
from lycoris.functional import lokr as ly_lokr  # noqa: E402

PROMPT, STEPS, GUIDANCE = "a red cat, ink wash", 2, 3.5
TOL = 1e-5
INNER, MLP = 32, 128
# BFL module (kohya spelling) -> (diffusers modules, rows of the fused weight each takes), for the tiny FLUX
SPLITS = {
    "double_blocks_0_img_attn_qkv": [(f"transformer_blocks.0.attn.to_{p}", slice(i * INNER, (i + 1) * INNER)) for i, p in enumerate("qkv")],
    "double_blocks_0_txt_attn_qkv": [(f"transformer_blocks.0.attn.add_{p}_proj", slice(i * INNER, (i + 1) * INNER)) for i, p in enumerate("qkv")],
    "single_blocks_0_linear1": [*((f"single_transformer_blocks.0.attn.to_{p}", slice(i * INNER, (i + 1) * INNER)) for i, p in enumerate("qkv")),
                                ("single_transformer_blocks.0.proj_mlp", slice(3 * INNER, 3 * INNER + MLP))],
    "single_blocks_0_linear2": [("single_transformer_blocks.0.proj_out", slice(None))],
    "double_blocks_0_img_mlp_0": [("transformer_blocks.0.ff.net.0.proj", slice(None))],
    # BFL's final modulation is (shift, scale), diffusers' norm_out (scale, shift): the halves swap
    "final_layer_adaLN_modulation_1": [("norm_out.linear", torch.cat([torch.arange(INNER, 2 * INNER), torch.arange(INNER)]))],
}


def _r(g, *shape):
    return torch.randn(*shape, generator=g) * 0.2


def lokr_modules(g):
    """{module: (parts, ΔW by lycoris-lora)}: w2 factorised with alpha (scale alpha/r), both sides full (scale 1).
    qkv: w2 has 16 rows, so q/k/v (32 rows each) are whole blocks of w1 (split as LoKr); linear1: 28 rows, not a
    divisor of 32 (split as dense rows); the final layer: two blocks of 32, swapped."""
    out = {}
    for module, (a, b), (c, d), r, alpha in (("double_blocks_0_img_attn_qkv", (6, 2), (16, 16), 4, 2.0),
                                             ("single_blocks_0_linear1", (8, 4), (28, 8), 2, 1.0),
                                             ("double_blocks_0_img_mlp_0", (4, 4), (32, 8), None, None),
                                             ("final_layer_adaLN_modulation_1", (2, 2), (32, 16), 3, 6.0)):
        w1 = _r(g, a, b)
        if r is None:
            w2 = _r(g, c, d)
            parts = {"lokr_w1": w1, "lokr_w2": w2}
            delta = ly_lokr.kron_weight(w1, None, None, w2, None, None, None, scale=1.0, backend="torch")
        else:
            w2a, w2b = _r(g, c, r), _r(g, r, d)
            parts = {"lokr_w1": w1, "lokr_w2_a": w2a, "lokr_w2_b": w2b, "alpha": torch.tensor(alpha)}
            delta = ly_lokr.kron_weight(w1, None, None, None, w2a, w2b, None, scale=alpha / r, backend="torch")
        out[module] = (parts, delta)
    return out


def loha_modules(g):
    out = {}
    for module, (n_out, n_in), r, alpha in (("double_blocks_0_txt_attn_qkv", (3 * INNER, INNER), 4, 2.0),
                                            ("single_blocks_0_linear1", (3 * INNER + MLP, INNER), 3, 3.0),
                                            ("single_blocks_0_linear2", (INNER, INNER + MLP), 2, 1.0),
                                            ("final_layer_adaLN_modulation_1", (2 * INNER, INNER), 2, 4.0)):
        w1a, w1b, w2a, w2b = _r(g, n_out, r), _r(g, r, n_in), _r(g, n_out, r), _r(g, r, n_in)
        parts = {"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b, "alpha": torch.tensor(alpha)}
        out[module] = (parts, ly_loha.diff_weight(w1b, w1a, w2b, w2a, None, None, gamma=alpha / r, backend="torch"))
    return out


def reference(modules, scale):
    """The tiny FLUX with each fused ΔW added by hand, split by rows into diffusers' modules."""
    pipe = build_tiny_flux(0)
    named = dict(pipe.transformer.named_modules())
    with torch.no_grad():
        for module, (_, delta) in modules.items():
            for target, rows in SPLITS[module]:
                named[target].weight += scale * delta[rows]
    return pipe


def ours(cp, loras, **params):
    return our_latents(cp, loras, PROMPT, STEPS, GUIDANCE, **params)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flux-lycoris")
    g = torch.Generator().manual_seed(0)
    out = {}
    for algo, make in (("lokr", lokr_modules), ("loha", loha_modules)):
        modules = make(g)
        out[algo] = (write_kohya_lycoris_flux_lora(folder, algo, {m: p for m, (p, _) in modules.items()}), modules)
    return out


@pytest.mark.parametrize("algo", ["lokr", "loha"])
@pytest.mark.parametrize(("fuse", "scale"), [(False, 1.0), (True, 1.0), (False, 0.6)])
def test_lycoris_on_fused_modules_equals_the_split_delta(files, algo, fuse, scale):
    path, modules = files[algo]
    ref = diffusers_latents(reference(modules, scale), PROMPT, STEPS, GUIDANCE)
    cp = ComposedPipeline(build_tiny_flux(0))
    lora = cp.load_lora(path)
    assert lora.info.layout == "kohya" and lora.info.family == "flux"
    layers = lora.layers["transformer"]
    assert set(layers) == {t for m in modules for t, _ in SPLITS[m]}
    lat = ours(cp, [algo], lora_scale=scale, fuse=fuse)
    assert (lat - ours(cp, [])).abs().max() > 1e-3
    assert (lat - ref).abs().max() <= TOL
    if algo == "lokr":  # q/k/v and the swapped halves stay Kronecker products; linear1's pieces are dense rows
        assert isinstance(layers["transformer_blocks.0.attn.to_k"], LoKr) and isinstance(layers["norm_out.linear"], LoKr)
        assert isinstance(layers["single_transformer_blocks.0.proj_mlp"], FullDiff)
    else:
        assert all(isinstance(a, LoHa) for a in layers.values())


def test_dora_on_a_fused_module_is_refused_by_name(tmp_path):
    g = torch.Generator().manual_seed(1)
    path = write_kohya_lycoris_flux_lora(tmp_path, "dora", {"double_blocks_0_img_attn_qkv": {
        "lora_down.weight": _r(g, 4, INNER), "lora_up.weight": _r(g, 3 * INNER, 4), "dora_scale": _r(g, 3 * INNER, 1)}})
    cp = ComposedPipeline(build_tiny_flux(0))
    with pytest.raises(UnsupportedLoRAFormat, match="module lora_unet_double_blocks_0_img_attn_qkv is a DoRA adapter on a fused "
                                                    "BFL module that diffusers splits into transformer_blocks.0.attn.to_q"):
        cp.load_lora(path)


def test_comfyui_names_read_as_the_kohya_names(files, tmp_path):
    """The same LoHa under ComfyUI's `diffusion_model.` BFL paths gives the same layers."""
    from safetensors.torch import load_file, save_file

    from loraloom.composition.transformer_loras import load_transformer_lora

    path, _ = files["loha"]
    dotted = {"double_blocks_0_txt_attn_qkv": "double_blocks.0.txt_attn.qkv", "single_blocks_0_linear1": "single_blocks.0.linear1",
              "single_blocks_0_linear2": "single_blocks.0.linear2", "final_layer_adaLN_modulation_1": "final_layer.adaLN_modulation.1"}
    sd = {}
    for key, value in load_file(str(path)).items():
        module, _, part = key.removeprefix("lora_unet_").partition(".")
        sd[f"diffusion_model.{dotted[module]}.{part}"] = value
    save_file(sd, str(tmp_path / "comfy.safetensors"))
    kohya, comfy = load_transformer_lora(path, "flux"), load_transformer_lora(tmp_path / "comfy.safetensors", "flux")
    assert comfy.info.layout == "comfyui" and set(comfy.layers["transformer"]) == set(kohya.layers["transformer"])
    for module, adapter in kohya.layers["transformer"].items():
        assert torch.equal(comfy.layers["transformer"][module].delta(), adapter.delta())
