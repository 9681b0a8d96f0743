"""Every composition method with LyCORIS adapter types (files made by lycoris-lora itself, see test_lycoris.py).

- Composite and Switch of a LoHa + a LoKr + a LoRA equal the per-LoRA reference loop, one UNet per file with that
  file's LyCORIS ΔW merged in turn (1e-4 on latents);
- spatial gates (masks, regions) and per-step gates act on every adapter type's delta: outside a mask each routed
  layer gives the base output exactly, inside the unmasked output; a gate g scales the delta by g;
- K-LoRA's Top-K table uses each type's dense ΔW; CLoRA, CMLoRA and regional generations run with them;
- ZipLoRA merges LoHa exactly, refuses LoKr/OFT without `svd_rank` and merges their rank-r SVD with it.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_lycoris import CONFIGS, lycoris_network, merged_into, reference_deltas

from loraloom.composition import LoraloomError, Routing
from loraloom.composition.controls import Region
from loraloom.composition.methods.guidance import switch_active_index
from loraloom.composition.methods.klora import topk_abs_sum
from loraloom.composition.routing import SpatialGate
from loraloom.composition.spatial import box_mask
from loraloom.pipelines import ComposedPipeline

KW = dict(num_inference_steps=4, seed=0, scheduler="ddim", output_type="latent", progress_bar=False, guidance_scale=5.0)
PROMPT, NEGATIVE = "a red star", "ugly"
TYPES = ["locon", "locon-tucker", "loha", "loha-tucker", "lokr", "lokr-tucker", "dora", "dora-input", "oft-rescaled",
         "boft", "full", "norm"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny SD 1.x pipeline with one UNet-only LyCORIS file of each type resident (named by type), and their
    reference ΔW."""
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("lycoris")
    cp = ComposedPipeline.from_pretrained("tiny:sd1")
    deltas = {}
    for i, config in enumerate(TYPES):
        path, net, _, _ = lycoris_network(cp, folder, config, seed=10 + i, text_encoder=False)
        deltas[config] = reference_deltas(cp, net)
        cp.load_lora(path, config)
    cp.loras["locon"].info.category = "character"
    cp.loras["loha"].info.category = "character"
    cp.loras["lokr"].info.category = "style"
    return cp, deltas


def _unet_with(cp, deltas, weight=1.0):
    unet = copy.deepcopy(cp.pipe.unet)
    with torch.no_grad():
        for (_, path), (dw, db) in deltas.items():
            m = unet.get_submodule(path)
            m.weight.data += weight * dw.reshape(m.weight.shape)
            if db is not None:
                m.bias.data += weight * db
    return unet


def _reference_loop(cp, unets_per_step, guidance=5.0, steps=4):
    """The per-LoRA reference: plain CFG per UNet, the guided predictions averaged; `unets_per_step(i)` gives the
    UNets (with their file's ΔW merged) of step i. The text encoder is the base's (the files are UNet-only)."""
    run = cp.run([], PROMPT, NEGATIVE, guidance, 64, 64, scheduler="ddim", num_inference_steps=steps)
    neg, pos = cp.encode_prompt_rows([PROMPT], [NEGATIVE], [{}], 64, 64)
    latents = cp.initial_latents(64, 64, torch.Generator("cpu").manual_seed(0)) * run.scheduler.init_noise_sigma
    with torch.no_grad():
        for i, t in enumerate(run.scheduler.timesteps):
            guided = []
            for unet in unets_per_step(i):
                e_n = unet(latents, t, encoder_hidden_states=neg.hidden).sample
                e_c = unet(latents, t, encoder_hidden_states=pos.hidden).sample
                guided.append(e_n + guidance * (e_c - e_n))
            latents = run.scheduler.step(torch.stack(guided).mean(0), t, latents, return_dict=False)[0]
    return latents


def test_composite_and_switch_of_loha_lokr_lora_equal_the_per_lora_reference(world):
    cp, deltas = world
    names = ["loha", "lokr", "locon"]
    unets = [_unet_with(cp, deltas[n]) for n in names]
    expected = _reference_loop(cp, lambda i: unets)
    got = cp(PROMPT, negative_prompt=NEGATIVE, loras=names, method="composite", method_params={"lora_scale": 1.0}, **KW).latents
    assert float((got - expected).abs().max()) <= 1e-4
    expected = _reference_loop(cp, lambda i: [unets[switch_active_index(i, 1, 3)]])
    got = cp(PROMPT, negative_prompt=NEGATIVE, loras=names, method="switch",
             method_params={"lora_scale": 1.0, "switch_interval": 1, "order": "given"}, **KW).latents
    assert float((got - expected).abs().max()) <= 1e-4


def _probe_layers(router, name):
    """A conv, a token and a norm layer the adapter acts on (those it has), with inputs at half the latent's size."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for path, routed in router.layers.items():
        if name not in routed.factors:
            continue
        m = routed.module
        if isinstance(m, torch.nn.Conv2d) and m.stride == (1, 1) and "conv" not in out:
            out["conv"] = (path, torch.randn(2, m.in_channels, 8, 8, generator=g))
        elif isinstance(m, torch.nn.Linear) and path.endswith("attn1.to_q") and "tokens" not in out:
            out["tokens"] = (path, torch.randn(2, 64, m.in_features, generator=g))
        elif isinstance(m, torch.nn.GroupNorm) and "norm" not in out:
            out["norm"] = (path, torch.randn(2, m.num_channels, 8, 8, generator=g))
        elif isinstance(m, torch.nn.LayerNorm) and "tokens_norm" not in out:
            out["tokens_norm"] = (path, torch.randn(2, 64, m.normalized_shape[0], generator=g))
    return out


@pytest.mark.parametrize("name", TYPES)
def test_masks_and_gates_act_on_every_adapter_type(world, name):
    cp, _ = world
    router = cp.routers["unet"]
    probes = _probe_layers(router, name)
    assert probes
    mask = box_mask((0.0, 0.0, 0.5, 1.0), 16, 16)

    def outputs(routing, gates=None):
        router.set_controls(gates=gates)
        router.set_routing(routing)
        with torch.no_grad():
            return {k: router.layers[p].module(x) for k, (p, x) in probes.items()}

    try:
        base = outputs(None)
        full = outputs(Routing.uniform({name: 1.0}))
        half = outputs(Routing.uniform({name: 0.5}))
        masked = outputs(Routing.uniform({name: 1.0}), {name: SpatialGate(mask)})
    finally:
        router.set_controls()
        router.set_routing(None)
    for kind in probes:
        b, f, h, m = base[kind], full[kind], half[kind], masked[kind]
        assert (f - b).abs().max() > 1e-4, kind
        torch.testing.assert_close(h - b, 0.5 * (f - b), atol=2e-6, rtol=1e-4)  # a gate scales the delta
        if b.ndim == 3:  # 8x8 tokens
            b, f, m = (t.reshape(2, 8, 8, -1).movedim(-1, 1) for t in (b, f, m))
        assert torch.equal(m[..., 4:], b[..., 4:]), kind  # outside the mask: the base output exactly
        torch.testing.assert_close(m[..., :4], f[..., :4], atol=1e-6, rtol=0)


def test_regions_and_schedules_with_lycoris_types(world):
    cp, _ = world
    base = cp(PROMPT, loras=[], **KW).latents
    loras = [{"name": "loha", "mask": "left"}, {"name": "oft-rescaled", "mask": "right"}]
    for method in ("merge", "switch", "composite"):
        out = cp(PROMPT, loras=loras, method=method, **KW).latents
        assert torch.isfinite(out).all() and (out - base).abs().max() > 1e-3, method
    plain = cp(PROMPT, loras=["dora"], method="merge", method_params={"fuse": False, "lora_scale": 1.0}, **KW).latents
    region = cp("unused", loras=["dora"], method="merge", method_params={"lora_scale": 1.0},
                regions=[Region("full", prompt=PROMPT, loras=("dora",))], **KW).latents
    torch.testing.assert_close(region, plain, atol=1e-5, rtol=0)
    late = cp(PROMPT, loras=[{"name": "lokr", "start": 0.5}], method="merge", **KW).latents
    always = cp(PROMPT, loras=["lokr"], method="merge", **KW).latents
    assert (late - always).abs().max() > 1e-4 and (late - base).abs().max() > 1e-4


def test_klora_uses_each_types_dense_delta(world):
    cp, deltas = world
    run_kw = dict(method_params={"n_loras": "pair", "roles": "given"}, **KW)
    out = cp(PROMPT, loras=["loha", "lokr"], method="klora", **run_kw)
    assert torch.isfinite(out.latents).all() and out.extras["klora"]["layers"] > 0
    # the table's Top-K sums are those of LyCORIS' ΔW
    from loraloom.composition.methods.klora import layer_scores

    router = cp.routers["unet"]
    path = next(p for p, r in router.layers.items() if "loha" in r.factors and "lokr" in r.factors and p.endswith("attn1.to_q"))
    a, b = router.layers[path].factors["loha"], router.layers[path].factors["lokr"]
    s_c, s_s, _, _, k = layer_scores([a], [b])
    ref_c, ref_s = deltas["loha"][("unet", path)][0], deltas["lokr"][("unet", path)][0]
    assert k == a.rank * b.rank
    assert s_c == pytest.approx(topk_abs_sum(ref_c, k), rel=1e-5) and s_s == pytest.approx(topk_abs_sum(ref_s, k), rel=1e-5)
    oft = cp(PROMPT, loras=["locon", "oft-rescaled"], method="klora", **run_kw)
    assert torch.isfinite(oft.latents).all()


def test_clora_and_cmlora_run_with_lycoris_types(world, tmp_path):
    cp, _ = world
    base = cp(PROMPT, loras=[], **KW).latents
    out = cp("a red star and a blue moon", loras=["loha", "lokr"], method="clora",
             method_params={"refine_iterations": 1, "concepts": [["star"]]}, **KW).latents
    assert torch.isfinite(out).all() and (out - base).abs().max() > 1e-3
    out = cp(PROMPT, loras=["loha", "dora", "lokr"], method="cmlora",
             method_params={"profile_seeds": [0], "profile_steps": 2, "profile_cache": str(tmp_path / "p.json")}, **KW).latents
    assert torch.isfinite(out).all() and (out - base).abs().max() > 1e-3


def test_ziplora_merges_loha_exactly_and_lokr_oft_by_svd_or_refuses(world):
    cp, deltas = world
    params = {"steps": 0, "roles": "given", "fuse": False, "lora_scale": 1.0}
    # LoHa + LoCon with coefficients at their initial value (ones): the direct merge, exactly the sum of the ΔWs
    out = cp(PROMPT, negative_prompt=NEGATIVE, loras=["loha", "locon"], method="ziplora", method_params=params, **KW)
    expected_unet = _unet_with(cp, {**deltas["loha"]})
    with torch.no_grad():
        for (_, path), (dw, _) in deltas["locon"].items():
            m = expected_unet.get_submodule(path)
            m.weight.data += dw.reshape(m.weight.shape)
    expected = _reference_loop(cp, lambda i: [expected_unet])
    assert float((out.latents - expected).abs().max()) <= 1e-4
    assert out.extras["ziplora"]["plain_factors"]["loha"]["svd"] == 0
    for other in ("lokr", "oft-rescaled"):
        with pytest.raises(LoraloomError, match="svd_rank"):
            cp(PROMPT, loras=["locon", other], method="ziplora", method_params=params, **KW)
    out = cp(PROMPT, loras=["locon", "lokr"], method="ziplora", method_params={**params, "svd_rank": 64}, **KW)
    report = out.extras["ziplora"]["plain_factors"]["lokr"]
    assert report["svd"] > 0 and report["max_relative_error"] < 1e-5  # rank 64 covers the tiny layers' full rank
    with pytest.raises(LoraloomError, match="norm-layer or bias diffs"):
        cp(PROMPT, loras=["locon", "norm"], method="ziplora", method_params={**params, "svd_rank": 8}, **KW)
    with pytest.raises(LoraloomError, match="svd_rank"):
        cp(PROMPT, loras=["locon", "boft"], method="hypernet", method_params={"roles": "given"}, **KW)


def test_fused_merge_restores_every_type_bit_exactly(world):
    from conftest import weights_hash

    cp, _ = world
    before = weights_hash(cp.pipe.unet)
    cp(PROMPT, loras=[(n, 0.7) for n in TYPES], method="merge", **KW)
    assert weights_hash(cp.pipe.unet) == before
    assert set(CONFIGS) >= set(TYPES)


def test_merged_reference_helper_restores(world):
    cp, deltas = world
    ref = ComposedPipeline(copy.deepcopy(cp.pipe))
    before = [p.detach().clone() for p in ref.pipe.unet.parameters()]
    with merged_into(ref, deltas["full"]):
        pass
    assert all(torch.equal(a, b) for a, b in zip(before, ref.pipe.unet.parameters()))
