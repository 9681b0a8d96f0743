"""The routing layer: equivalence with diffusers' set_adapters, per-row routing, bit-exact restoration."""

from __future__ import annotations

import pytest
import torch
from conftest import weights_hash

from loraloom.composition import Routing
from loraloom.pipelines import ComposedPipeline
from loraloom.pipelines.tiny import build_tiny_sd, build_tiny_sdxl


def _diffusers_latents(pipe, names, weights, prompt="a red star", steps=4, guidance=7.5, seed=0):
    pipe.set_adapters(names, weights)
    g = torch.Generator("cpu").manual_seed(seed)
    return pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, generator=g, output_type="latent").images


@pytest.mark.parametrize("builder", [build_tiny_sd, build_tiny_sdxl], ids=["sd1", "sdxl"])
@pytest.mark.parametrize("fuse", [False, True], ids=["unfused", "fused"])
def test_static_gates_equal_diffusers_set_adapters(tmp_path, builder, fuse):
    """Merge with static gates == diffusers `load_lora_weights` + `set_adapters(names, weights)`.

    Tolerance: atol 1e-4 on final latents (fp32; fusing reorders the sums, so it is not bit-identical)."""
    from loraloom.pipelines.tiny import write_random_lora

    reference = builder()
    reference.set_progress_bar_config(disable=True)
    paths = [write_random_lora(reference, tmp_path / f"l{i}.safetensors", seed=i + 1, alpha=2.0, std=0.2) for i in range(2)]
    for i, p in enumerate(paths):
        reference.load_lora_weights(str(p.parent), weight_name=p.name, adapter_name=f"l{i}")
    expected = _diffusers_latents(reference, ["l0", "l1"], [0.7, 0.5])

    ours = ComposedPipeline(builder())
    for i, p in enumerate(paths):
        ours.load_lora(p, f"l{i}")
    got = ours("a red star", loras=[("l0", 0.7), ("l1", 0.5)], method="merge", method_params={"lora_scale": 1.0, "fuse": fuse},
               num_inference_steps=4, guidance_scale=7.5, seed=0, scheduler="default", output_type="latent", progress_bar=False)
    assert (expected - got.latents).abs().max().item() < 1e-4
    no_lora = _diffusers_latents(reference, ["l0", "l1"], [0.0, 0.0])
    assert (no_lora - got.latents).abs().max().item() > 1e-2  # the LoRAs matter at all


def test_rows_with_different_loras_equal_rows_one_by_one(tiny_sd, lora_files):
    for name, path in lora_files.items():
        tiny_sd.load_lora(path, name)
    unet, router = tiny_sd.pipe.unet, tiny_sd.routers["unet"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, 8, 8, generator=g)
    ctx = torch.randn(5, 77, 32, generator=g)
    t = torch.tensor(500)
    plan = [(2, {"char": 0.8}), (1, {"style": 1.0, "bg": 0.5}), (1, {}), (1, {"bg": -0.7})]
    with torch.no_grad():
        router.set_routing(Routing.from_blocks(plan))
        batched = unet(x, t, encoder_hidden_states=ctx).sample
        singles = []
        row = 0
        for n, gates in plan:
            for _ in range(n):
                router.set_routing(Routing.uniform(gates))
                singles.append(unet(x[row:row + 1], t, encoder_hidden_states=ctx[row:row + 1]).sample)
                row += 1
        router.set_routing(None)
        base = unet(x, t, encoder_hidden_states=ctx).sample
    torch.testing.assert_close(batched, torch.cat(singles), atol=1e-5, rtol=0)
    assert (batched[:2] - base[:2]).abs().max() > 1e-3 and torch.allclose(batched[3], base[3], atol=1e-6)


def test_layer_gates_scale_single_layers(tiny_sd, lora_files):
    tiny_sd.load_lora(lora_files["char"], "char")
    router = tiny_sd.routers["unet"]
    path = next(iter(router.layers))
    layer = router.layers[path]
    x = torch.randn(1, 3, layer.module.in_features)
    with torch.no_grad():
        base = layer.module(x) if False else torch.nn.functional.linear(x, layer.module.weight, layer.module.bias)
        router.set_routing(Routing.uniform({"char": 1.0}), layer_gates={path: {"char": 0.0}})
        off = layer.module(x)
        router.set_routing(Routing.uniform({"char": 1.0}), layer_gates={path: {"char": 2.0}})
        double = layer.module(x)
        router.set_routing(Routing.uniform({"char": 1.0}))
        single = layer.module(x)
    f = layer.factors["char"]
    expected = base + f.scale * (x @ f.down.T @ f.up.T)
    torch.testing.assert_close(off, base)
    torch.testing.assert_close(single, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(double - base, 2 * (single - base), atol=1e-6, rtol=1e-5)


def test_conv_lora_equals_dense_update(tmp_path, tiny_sd):
    from safetensors.torch import save_file

    from loraloom.pipelines.tiny import random_lora_state_dict

    sd = {f"unet.{k}": v for k, v in random_lora_state_dict(tiny_sd.pipe.unet, 3, seed=9, targets=("conv1",)).items()}
    save_file(sd, str(tmp_path / "locon.safetensors"))
    lora = tiny_sd.load_lora(tmp_path / "locon.safetensors", "c")
    router = tiny_sd.routers["unet"]
    path = "down_blocks.0.resnets.0.conv1"
    conv = router.layers[path].module
    x = torch.randn(2, conv.in_channels, 8, 8)
    with torch.no_grad():
        router.set_routing(Routing.uniform({"c": 0.6}))
        got = conv(x)
        dense = conv.weight + 0.6 * lora.layers["unet"][path].delta()
        want = torch.nn.functional.conv2d(x, dense, conv.bias, conv.stride, conv.padding)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method,params", [("merge", {"fuse": True}), ("merge", {"fuse": False}), ("switch", {}), ("composite", {"max_batch": 2})])
def test_base_weights_bit_identical_after_generation(tiny_sd, lora_files, method, params):
    for name, path in lora_files.items():
        tiny_sd.load_lora(path, name)
    before = {c: weights_hash(getattr(tiny_sd.pipe, c)) for c in ("unet", "text_encoder", "vae")}
    tiny_sd("a star", loras=list(lora_files), method=method, method_params=params, num_inference_steps=3, seed=1,
            output_type="latent", progress_bar=False)
    assert {c: weights_hash(getattr(tiny_sd.pipe, c)) for c in before} == before
    assert all(not r.routing.blocks for r in tiny_sd.routers.values())


def test_fused_weights_restored_when_generation_fails(tiny_sd, lora_files):
    for name, path in lora_files.items():
        tiny_sd.load_lora(path, name)
    before = weights_hash(tiny_sd.pipe.unet)

    def boom(*_):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        tiny_sd("a star", loras=list(lora_files), method="merge", num_inference_steps=3, callback_on_step_end=boom, progress_bar=False)
    assert weights_hash(tiny_sd.pipe.unet) == before


def test_remove_lora_restores_modules(tiny_sd, lora_files):
    tiny_sd.load_lora(lora_files["char"], "char")
    router = tiny_sd.routers["unet"]
    # The routed forward is installed only on modules where an adapter is active.
    assert not any("forward" in m.__dict__ for m in tiny_sd.pipe.unet.modules())
    router.set_routing(Routing.uniform({"char": 1.0}))
    patched = [m for m in tiny_sd.pipe.unet.modules() if "forward" in m.__dict__]
    assert len(patched) == len(router.layers) > 0
    tiny_sd.remove_lora("char")
    assert not any("forward" in m.__dict__ for m in tiny_sd.pipe.unet.modules())
    assert not any("forward" in m.__dict__ for m in tiny_sd.pipe.text_encoder.modules())
    assert "char" not in tiny_sd.loras


def test_state_dict_keys_unchanged_by_routing(tiny_sd, lora_files):
    keys = list(tiny_sd.pipe.unet.state_dict())
    tiny_sd.load_lora(lora_files["char"], "char")
    assert list(tiny_sd.pipe.unet.state_dict()) == keys


def test_switching_gates_costs_no_module_walk(tiny_sd, lora_files, monkeypatch):
    """Switching every step must not walk the model (diffusers' set_adapters does, once per call)."""
    for name, path in lora_files.items():
        tiny_sd.load_lora(path, name)
    calls = []
    real = torch.nn.Module.named_modules

    def counting(self, *a, **k):
        calls.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(torch.nn.Module, "named_modules", counting)
    walks = []
    for steps in (2, 8):
        calls.clear()
        tiny_sd("a star", loras=list(lora_files), method="switch", method_params={"switch_interval": 1},
                num_inference_steps=steps, output_type="latent", progress_bar=False)
        walks.append(len(calls))
    assert walks[0] == walks[1]


def test_grouped_branches_equal_per_branch_loop(tiny_sd, lora_files):
    """Equal-sized one-adapter row blocks (Composite) take the batched-matmul path; it equals the plain loop."""
    for name, path in lora_files.items():
        tiny_sd.load_lora(path, name)
    router = tiny_sd.routers["unet"]
    names = list(lora_files)
    routing = Routing.from_blocks([(2, {n: 0.7 + 0.1 * i}) for i, n in enumerate(names)])
    unet = tiny_sd.pipe.unet
    x = torch.randn(2 * len(names), unet.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    ctx = torch.randn(x.shape[0], 7, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        router.set_routing(routing)
        assert sum(r.grouped is not None for r in router.layers.values()) > 0
        grouped = unet(x, 5, encoder_hidden_states=ctx).sample
        for r in router.layers.values():
            r.grouped = None  # force the per-term loop on the same routing
        looped = unet(x, 5, encoder_hidden_states=ctx).sample
        router.set_routing(None)
    torch.testing.assert_close(grouped, looped, atol=1e-5, rtol=1e-5)


def test_same_routing_again_is_not_rebuilt(tiny_sd, lora_files):
    tiny_sd.load_lora(lora_files["char"], "char")
    router = tiny_sd.routers["unet"]
    routing = Routing.uniform({"char": 1.0})
    router.set_routing(routing)
    first = {p: r.active for p, r in router.layers.items()}
    router.set_routing(Routing.uniform({"char": 1.0}))  # equal routing: the same term lists are kept
    assert all(router.layers[p].active is a for p, a in first.items())
    router.set_routing(Routing.uniform({"char": 0.5}))
    assert all(router.layers[p].active is not a for p, a in first.items())


def test_stacked_terms_equal_per_term_loop(tmp_path, tiny_sd, lora_files):
    """Several LoRAs on the same rows of a layer (Merge unfused, masked LoRAs) run as one stacked low-rank term, on
    Linear and 1x1-up Conv layers, with and without spatial gates; it equals the per-term loop, and a closed gate
    still leaves the base output exactly."""
    from safetensors.torch import save_file

    from loraloom.composition.routing import SpatialGate
    from loraloom.composition.spatial import mask_from
    from loraloom.pipelines.tiny import random_lora_state_dict

    for name, path in lora_files.items():
        tiny_sd.load_lora(path, name)
    for i in range(2):
        sd = {f"unet.{k}": v for k, v in random_lora_state_dict(tiny_sd.pipe.unet, 3 + i, seed=20 + i, targets=("conv1",)).items()}
        save_file(sd, str(tmp_path / f"locon{i}.safetensors"))
        tiny_sd.load_lora(tmp_path / f"locon{i}.safetensors", f"c{i}")
    router = tiny_sd.routers["unet"]
    names = [*lora_files, "c0", "c1"]
    unet = tiny_sd.pipe.unet
    x = torch.randn(2, unet.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    ctx = torch.randn(2, 7, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    gates = {"char": SpatialGate(mask_from("left", 8, 8)), "c0": SpatialGate(mask_from("top", 8, 8)),
             "style": SpatialGate(mask_from("right", 8, 8), [slice(0, 3)])}
    routing = Routing.uniform({n: 0.5 + 0.1 * i for i, n in enumerate(names)})
    with torch.no_grad():
        outs = {}
        for label, controls in (("plain", {}), ("gated", gates)):
            router.set_controls(gates=controls)
            router.set_routing(routing)
            stacked = [r for r in router.layers.values() if r.stacked is not None]
            assert any(r.is_conv for r in stacked) and any(not r.is_conv for r in stacked)
            outs[label] = unet(x, 5, encoder_hidden_states=ctx).sample
            for r in stacked:  # the same terms through the per-term loop
                r.active, r.stacked = r.active + r.stacked.terms, None
            torch.testing.assert_close(unet(x, 5, encoder_hidden_states=ctx).sample, outs[label], atol=1e-5, rtol=1e-5)
            router.set_routing(None)
        assert not torch.allclose(outs["plain"], outs["gated"])
        # A closed gate everywhere: the stacked term adds exactly nothing.
        closed = {n: SpatialGate(torch.zeros(8, 8), [slice(0, 0)]) for n in names}
        router.set_controls(gates=closed)
        router.set_routing(routing)
        layer = next(r for r in router.layers.values() if r.stacked is not None and not r.reads_text)
        inp = torch.randn(2, 16, layer.module.in_features) if not layer.is_conv else torch.randn(2, layer.module.in_channels, 8, 8)
        assert torch.equal(layer(inp), layer.base_forward(inp))
        router.set_routing(None)
        router.set_controls()


def test_keep_fused_reuses_the_same_merge_and_restores_for_anything_else(tiny_sd, lora_files, monkeypatch):
    """In `keep_fused` (a batch), Merge fuses once for consecutive generations with the same LoRAs and gates and
    gives what fusing afresh gives; another method, other gates, a LoRA loaded or a failure restore the base weights
    first; the block's end leaves them bit-identical."""
    from loraloom.composition.routing import LoRARouter

    for name, path in lora_files.items():
        tiny_sd.load_lora(path, name)
    names = list(lora_files)
    kw = dict(num_inference_steps=3, output_type="latent", progress_bar=False)
    before = weights_hash(tiny_sd.pipe.unet)
    fresh = {s: tiny_sd("a star", loras=names, method="merge", seed=s, **kw).latents for s in (1, 2)}
    other = tiny_sd("a star", loras=[(names[0], 0.5), *names[1:]], method="merge", seed=1, **kw).latents
    switch = tiny_sd("a star", loras=names, method="switch", seed=1, **kw).latents
    fusings = []
    real = LoRARouter._fuse_into_weights
    monkeypatch.setattr(LoRARouter, "_fuse_into_weights", lambda self, *a: fusings.append(1) or real(self, *a))
    router = tiny_sd.routers["unet"]
    with tiny_sd.keep_fused():
        for s in (1, 2):
            assert torch.equal(tiny_sd("a star", loras=names, method="merge", seed=s, **kw).latents, fresh[s])
        assert len(fusings) == 1 and router.kept_fused and weights_hash(tiny_sd.pipe.unet) != before
        assert torch.equal(tiny_sd("a star", loras=names, method="switch", seed=1, **kw).latents, switch)
        assert not router.kept_fused  # the switch run routed the adapters over the base weights
        tiny_sd("a star", loras=names, method="merge", seed=1, **kw)
        assert torch.equal(tiny_sd("a star", loras=[(names[0], 0.5), *names[1:]], method="merge", seed=1, **kw).latents, other)
        assert len(fusings) == 3
        with pytest.raises(RuntimeError, match="stop"):
            tiny_sd("a star", loras=names, method="merge", seed=1, callback_on_step_end=lambda *_: (_ for _ in ()).throw(RuntimeError("stop")), **kw)
        assert not router.kept_fused and weights_hash(tiny_sd.pipe.unet) == before
        tiny_sd("a star", loras=names, method="merge", seed=1, **kw)
        tiny_sd.load_lora(lora_files[names[0]], "again")  # a LoRA added: checked and bound against the base weights
        assert not router.kept_fused and weights_hash(tiny_sd.pipe.unet) == before
        tiny_sd("a star", loras=names, method="merge", seed=1, **kw)
    assert not router.kept_fused and weights_hash(tiny_sd.pipe.unet) == before
    # outside the block nothing is kept
    tiny_sd("a star", loras=names, method="merge", seed=1, **kw)
    assert not router.kept_fused and weights_hash(tiny_sd.pipe.unet) == before


def test_large_layers_stack_up_to_a_share_of_their_weight():
    """On a wide layer the stacking limit grows with the layer (`Stacked.MAX_SHARE` of its weight): three rank-16
    LoRAs on a 2048-wide linear are stacked (196 K factor elements, above the fixed 131 K) and equal the per-term
    loop; three rank-64 ones (786 K, above a sixteenth of the 4.2 M weight) are not stacked, so no large copy."""
    from torch import nn

    from loraloom.composition.routing import RoutedLayer, Stacked

    g = torch.Generator().manual_seed(0)
    module = nn.Linear(2048, 2048)
    x = torch.randn(2, 5, 2048, generator=g)
    for rank, stacks in ((16, True), (64, False)):
        terms = [(torch.randn(rank, 2048, generator=g) / 40, torch.randn(2048, rank, generator=g) / 40, 0.3 + 0.2 * i,
                  None, None) for i in range(3)]
        assert sum(t[0].numel() + t[1].numel() for t in terms) > Stacked.MAX_ELEMENTS
        layer = RoutedLayer(module, "proj")
        with torch.no_grad():
            layer.set_terms(terms)
            assert (layer.stacked is not None) == stacks
            out = layer(x)
            expected = layer.base_forward(x) + sum(w * (x @ d.t()) @ u.t() for d, u, w, _, _ in terms)
            torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
            layer.set_terms([])
