"""Merge, Switch, Composite: the combining math, the switch schedule, text-encoder LoRA handling."""

from __future__ import annotations

import pytest
import torch

from loraloom.composition import Conditioning, Routing
from loraloom.composition.methods import Step, available_methods, describe_params, make_method
from loraloom.composition.methods.guidance import classifier_free_guidance, composite_guidance, switch_active_index
from loraloom.pipelines import Run


def _run(cp, names, prompt="a red star", guidance=6.0, steps=4):
    return cp.run(names, prompt, "ugly", guidance, 64, 64, scheduler="ddim", num_inference_steps=steps)


@pytest.fixture
def loaded(tiny_sd, lora_files):
    for name, path in lora_files.items():
        tiny_sd.load_lora(path, name)
    return tiny_sd


def test_registry_and_params():
    assert {"merge", "switch", "composite"} <= set(available_methods())
    defaults = {p["name"]: p["default"] for p in describe_params(make_method("switch").__class__)}
    assert defaults["lora_scale"] == 0.8 and defaults["switch_interval"] == 5 and defaults["order"] == "category"
    assert all(p["help"] for p in describe_params(make_method("composite").__class__))
    with pytest.raises(ValueError, match="no parameter"):
        make_method("composite", {"maxbatch": 2})
    with pytest.raises(ValueError, match="unknown method"):
        make_method("nope")


def test_composite_guidance_by_hand():
    eu = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.0, 0.5]])
    ec = torch.tensor([[2.0, 2.0], [1.0, 1.0], [1.0, 0.0]])
    s = 3.0
    by_hand = torch.stack([eu[i] + s * (ec[i] - eu[i]) for i in range(3)]).sum(0) / 3
    torch.testing.assert_close(composite_guidance(eu, ec, s), by_hand)
    # equals CFG of the averaged predictions (the form the reference code computes)
    torch.testing.assert_close(composite_guidance(eu, ec, s), classifier_free_guidance(eu.mean(0), ec.mean(0), s))
    w = [1.5, 1.0, 0.5]
    torch.testing.assert_close(composite_guidance(eu, ec, s, w), sum(w[i] * (eu[i] + s * (ec[i] - eu[i])) for i in range(3)) / 3)


def test_composite_step_equals_per_lora_unet_runs(loaded):
    """One batched Composite step == k separate UNet runs, each with its LoRA and own-LoRA prompt encoding."""
    names = [("char", 1.0), ("style", 0.7), ("bg", 1.2)]
    run = _run(loaded, names)
    method = make_method("composite", {"lora_scale": 0.8})
    method.prepare(run)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    t = run.scheduler.timesteps[1]
    step = Step(1, 4, t)
    got = method.denoise(run, latents, step)
    assert run.unet_calls == 1 and run.unet_rows == 6
    unet = loaded.pipe.unet
    guided = []
    for name, w in names:
        neg, pos = loaded.encode_prompt_rows(["a red star"], ["ugly"], [{name: 0.8 * w}], 64, 64)
        loaded.routers["unet"].set_routing(Routing.uniform({name: 0.8 * w}))
        e_n = unet(latents, t, encoder_hidden_states=neg.hidden).sample
        e_c = unet(latents, t, encoder_hidden_states=pos.hidden).sample
        guided.append(e_n + 6.0 * (e_c - e_n))
    loaded.routers["unet"].set_routing(None)
    torch.testing.assert_close(got, torch.stack(guided).mean(0), atol=1e-5, rtol=1e-5)


def test_composite_max_batch_chunks_without_changing_result(loaded):
    names = [("char", 1.0), ("style", 1.0), ("bg", 1.0)]
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    outs = []
    for max_batch in (0, 4, 1):
        run = _run(loaded, names)
        m = make_method("composite", {"max_batch": max_batch})
        m.prepare(run)
        outs.append(m.denoise(run, latents, Step(0, 4, run.scheduler.timesteps[0])))
        assert run.unet_calls == {0: 1, 4: 2, 1: 6}[max_batch]
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(outs[0], outs[2], atol=1e-5, rtol=0)


def test_text_encoder_lora_per_branch_vs_reference(loaded):
    names = [("char", 1.0), ("style", 1.0)]
    enc = {n: loaded.encode_prompt_rows(["a red star"], ["ugly"], [{n: 0.8}], 64, 64)[1].hidden for n, _ in names}
    both = loaded.encode_prompt_rows(["a red star"], ["ugly"], [{"char": 0.8, "style": 0.8}], 64, 64)[1].hidden
    assert (enc["char"] - enc["style"]).abs().max() > 1e-3  # the text-encoder LoRAs matter

    run = _run(loaded, names)
    m = make_method("composite")
    m.prepare(run)
    torch.testing.assert_close(m.cond.hidden[1:2], enc["char"])
    torch.testing.assert_close(m.cond.hidden[3:4], enc["style"])
    m = make_method("composite", {"reference_text_encoding": True})
    m.prepare(run)
    torch.testing.assert_close(m.cond.hidden[1:2], both)
    torch.testing.assert_close(m.cond.hidden[3:4], both)

    m = make_method("switch")
    m.prepare(run)
    torch.testing.assert_close(m.conds[0].hidden[1:2], enc["char"])
    torch.testing.assert_close(m.conds[1].hidden[1:2], enc["style"])
    m = make_method("switch", {"reference_text_encoding": True})
    m.prepare(run)
    torch.testing.assert_close(m.conds[1].hidden[1:2], enc["char"])


@pytest.mark.parametrize("steps,tau,n,expected", [
    (12, 5, 2, [0] * 5 + [1] * 5 + [0] * 2),
    (7, 2, 3, [0, 0, 1, 1, 2, 2, 0]),
    (4, 1, 4, [0, 1, 2, 3]),
    (6, 10, 3, [0] * 6),
])
def test_switch_schedule_paper(steps, tau, n, expected):
    assert [switch_active_index(s, tau, n) for s in range(steps)] == expected


@pytest.mark.parametrize("steps,tau,n,expected", [
    (13, 5, 2, [0] * 6 + [1] * 5 + [0] * 2),  # the reference's first LoRA runs tau + 1 steps
    (7, 2, 3, [0, 0, 0, 1, 1, 2, 2]),
])
def test_switch_schedule_reference(steps, tau, n, expected):
    assert [switch_active_index(s, tau, n, reference_timing=True) for s in range(steps)] == expected


@pytest.mark.parametrize("steps,tau,reference", [(9, 2, False), (11, 3, True), (5, 1, False)])
def test_switch_active_lora_at_every_step_of_a_generation(loaded, steps, tau, reference, monkeypatch):
    """Record the routing the UNet actually ran with at each step, in category order (char, style, bg)."""
    seen = []
    real = Run.predict

    def spy(self, latents, step, cond, routing, *a, **k):
        seen.append([name for b in routing.blocks for name, g in b.gates if g])
        return real(self, latents, step, cond, routing, *a, **k)

    monkeypatch.setattr(Run, "predict", spy)
    # given in scrambled order; the default 'category' order is character, style, background
    loaded("x", loras=["bg", "char", "style"], method="switch", num_inference_steps=steps,
           method_params={"switch_interval": tau, "reference_timing": reference}, scheduler="ddim", output_type="latent", progress_bar=False)
    order = ["char", "style", "bg"]
    assert seen == [[order[switch_active_index(s, tau, 3, reference)]] for s in range(steps)]


def test_switch_given_order(loaded):
    run = _run(loaded, [("bg", 1.0), ("char", 1.0)])
    m = make_method("switch", {"order": "given"})
    m.prepare(run)
    assert [l.name for l in m.order] == ["bg", "char"]
    m = make_method("switch")
    m.prepare(run)
    assert [l.name for l in m.order] == ["char", "bg"]


def test_merge_scale_applies_to_each_lora_not_divided(loaded):
    run = _run(loaded, [("char", 1.0), ("style", 0.5)])
    m = make_method("merge", {"fuse": False, "lora_scale": 0.8})
    m.prepare(run)
    assert m.routing == Routing.uniform({"char": 0.8, "style": 0.4})


def test_each_method_changes_the_image_and_is_deterministic(loaded):
    kw = dict(num_inference_steps=3, seed=4, output_type="latent", progress_bar=False)
    base = loaded("a red star", **kw).latents
    for method in ("merge", "switch", "composite"):
        a = loaded("a red star", loras=["char", "style"], method=method, **kw).latents
        b = loaded("a red star", loras=["char", "style"], method=method, **kw).latents
        assert torch.equal(a, b)
        assert (a - base).abs().max() > 1e-3


def test_composite_of_one_lora_equals_merge_of_one(loaded):
    kw = dict(loras=["char"], num_inference_steps=3, seed=2, output_type="latent", progress_bar=False)
    a = loaded("a star", method="composite", **kw).latents
    b = loaded("a star", method="merge", method_params={"fuse": False}, **kw).latents
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_conditioning_rows_roundtrip():
    c = Conditioning(torch.arange(6.0).view(3, 1, 2), torch.arange(3.0).view(3, 1), torch.zeros(3, 6))
    assert len(Conditioning.cat([c.rows(0, 1), c.rows(1, 3)])) == 3
    assert c.unet_kwargs()["added_cond_kwargs"]["text_embeds"].shape == (3, 1)
