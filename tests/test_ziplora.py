"""ZipLoRA: the column merge as an exact rank-(r_c + r_s) LoRA, merged files that loraloom and diffusers both load,
the objective and its optimisation, coefficient files."""

from __future__ import annotations

import pytest
import torch

from loraloom.composition import load_lora
from loraloom.composition.errors import LoraloomError
from loraloom.composition.files import WritePolicy
from loraloom.composition.lora import LoRALayer
from loraloom.composition.merging import column_merged_layer, merged_lora, save_lora_file, subject_and_style

pytestmark = pytest.mark.usefixtures("one_thread")

KW = dict(num_inference_steps=2, seed=1, scheduler="ddim", output_type="latent", progress_bar=False, height=32, width=32)
FAST = {"steps": 4, "reference_images": 1, "reference_steps": 2, "progress": False}


def test_column_merge_is_exact_rank_sum_lora():
    g = torch.Generator().manual_seed(0)
    c = LoRALayer(torch.randn(2, 6, generator=g), torch.randn(5, 2, generator=g), alpha=1.0)  # scale 0.5
    s = LoRALayer(torch.randn(3, 6, generator=g), torch.randn(5, 3, generator=g), alpha=12.0)  # scale 4
    m_c, m_s = torch.rand(6, generator=g), torch.rand(6, generator=g)
    merged = column_merged_layer(c, s, m_c, m_s, w_c=0.7, w_s=1.3)
    assert merged.rank == 5 and merged.scale == 1.0
    dense = m_c[None, :] * (0.7 * c.delta()) + m_s[None, :] * (1.3 * s.delta())  # column j times m[j]
    torch.testing.assert_close(merged.delta(), dense)
    torch.testing.assert_close(column_merged_layer(c, None).delta(), c.delta())
    torch.testing.assert_close(column_merged_layer(c, s).delta(), c.delta() + s.delta())


class _L:
    def __init__(self, name, category):
        self.name, self.category = name, category


@pytest.mark.parametrize("cats,expected", [
    (("character", "style"), ("a", "b")), (("style", "character"), ("b", "a")), (("background", None), ("b", "a")),
    ((None, "object"), ("b", "a")), (("style", "style"), ("a", "b")), ((None, None), ("a", "b")),
])
def test_subject_and_style_roles(cats, expected):
    a, b = _L("a", cats[0]), _L("b", cats[1])
    assert tuple(x.name for x in subject_and_style([a, b])) == expected
    assert tuple(x.name for x in subject_and_style([a, b], "given")) == ("a", "b")
    with pytest.raises(LoraloomError, match="exactly two"):
        subject_and_style([a])


@pytest.fixture
def pair(tiny_sd, tmp_path):
    """Subject (rank 2, alpha 1, also adapts ff.net.2) and style (rank 4, alpha 8), UNet + text encoder."""
    from loraloom.pipelines.tiny import write_random_lora

    sty = write_random_lora(tiny_sd.pipe, tmp_path / "sty.safetensors", seed=2, rank=4, alpha=8.0, category="style",
                            triggers=("inkwash",), std=0.15)
    subj = write_random_lora(tiny_sd.pipe, tmp_path / "subj.safetensors", seed=1, rank=2, alpha=1.0, category="character",
                             triggers=("ohwx",), std=0.15, targets=("to_q", "to_k", "to_v", "to_out.0", "ff.net.2"))
    tiny_sd.load_lora(sty, "sty")
    tiny_sd.load_lora(subj, "subj")
    return tiny_sd, {"sty": sty, "subj": subj}


def test_merged_file_loads_in_loraloom_and_diffusers(pair, tmp_path):
    """A merged LoRA (random coefficients, mixed ranks 2+4 and 2, alpha != rank) saved as a diffusers-layout file:
    loraloom's loader gives the same factors' deltas, and diffusers' load_lora_weights the same image."""
    from loraloom.pipelines import ComposedPipeline
    from loraloom.pipelines.tiny import build_tiny_sd

    cp, _ = pair
    subj, sty = cp.loras["subj"], cp.loras["sty"]
    g = torch.Generator().manual_seed(5)
    coefs = {"unet": {p: (torch.rand(l.down.shape[1], generator=g) + 0.5, torch.rand(l.down.shape[1], generator=g) + 0.5)
                      for p, l in subj.layers["unet"].items() if p in sty.layers["unet"]}}
    merged = merged_lora("zipped", subj, sty, coefs, w_c=0.9, w_s=0.6)
    path = save_lora_file(merged, tmp_path / "zipped.safetensors", WritePolicy.at(tmp_path))
    loaded = load_lora(path)
    assert loaded.info.family == "sd1" and loaded.info.ranks["unet"] == [2, 6]
    for comp, mods in merged.layers.items():
        for p, layer in mods.items():
            torch.testing.assert_close(loaded.layers[comp][p].delta(), layer.delta(), atol=1e-6, rtol=1e-5)

    ours = ComposedPipeline(build_tiny_sd())
    ours.load_lora(path, "zipped")
    got = ours("a red star", loras=["zipped"], method="merge", method_params={"lora_scale": 1.0, "fuse": False},
               guidance_scale=5.0, **{**KW, "scheduler": "default"}).latents
    ref = build_tiny_sd()
    ref.set_progress_bar_config(disable=True)
    ref.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="zipped")
    want = ref("a red star", num_inference_steps=2, guidance_scale=5.0, height=32, width=32,
               generator=torch.Generator().manual_seed(1), output_type="latent").images
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    base = ref("a red star", num_inference_steps=2, guidance_scale=5.0, height=32, width=32,
               generator=torch.Generator().manual_seed(1), output_type="latent", cross_attention_kwargs={"scale": 0.0}).images
    assert (want - base).abs().max() > 1e-3  # the LoRA was really applied


def test_zero_steps_is_direct_merge(pair):
    """Coefficients start at ones: without optimisation ZipLoRA == Merge of both at scale 1 (text encoder included)."""
    cp, _ = pair
    loras = [("sty", 0.8), ("subj", 1.1)]
    got = cp("a red star", loras=loras, method="ziplora", method_params={**FAST, "steps": 0}, **KW)
    want = cp("a red star", loras=loras, method="merge", method_params={"lora_scale": 1.0}, **KW).latents
    torch.testing.assert_close(got.latents, want, atol=1e-4, rtol=0)  # fused: summation order differs
    assert got.extras["ziplora"]["subject"] == "subj" and "ziplora:subj+sty" not in cp.loras  # removed after the run


def test_objective_gradients_and_optimisation(pair):
    """The loss has gradients for every layer's m_c and m_s; 6 steps lower the loss and the similarity; the
    reference latents are generations of each LoRA alone (same seed -> same latents)."""
    from loraloom.composition.grad import frozen
    from loraloom.composition.merge_objective import TrainableMerge, objective, training_scheduler
    from loraloom.composition.methods import ActiveLoRA
    from loraloom.composition.methods.ziplora import merge_layers, optimise_coefficients, pair_data, reference_latents

    cp, _ = pair
    subj, sty = ActiveLoRA("subj", 1.0, cp.loras["subj"]), ActiveLoRA("sty", 1.0, cp.loras["sty"])
    run = cp.run(["subj", "sty"], "x", "", 5.0, 32, 32)
    x_c = reference_latents(run, subj, "ohwx", 1, 2, seed=0)
    alone = cp("ohwx", loras=["subj"], method="merge", method_params={"lora_scale": 1.0, "fuse": False}, guidance_scale=5.0,
               num_inference_steps=2, seed=0, output_type="latent", progress_bar=False, height=32, width=32).latents
    torch.testing.assert_close(x_c, alone)
    x_s = reference_latents(run, sty, "inkwash", 1, 2, seed=1000)
    data = pair_data(run, subj, sty, "ohwx", "inkwash", x_c, x_s)
    router, unet = cp.routers["unet"], cp.pipe.unet
    paths = merge_layers(subj.lora, sty.lora, "unet", "attention")
    assert len(paths) == 48 and not any(p.endswith("ff.net.2") for p in paths)
    sched = training_scheduler(cp.pipe)
    with TrainableMerge(router, "t", subj.lora, sty.lora, paths) as merged:
        m = {p: (torch.ones(c.down.shape[1], requires_grad=True), torch.ones(s.down.shape[1], requires_grad=True))
             for p, (c, s) in merged.sources.items()}
        with frozen(unet), torch.enable_grad():
            parts = objective(unet, router, merged, data, m, sched, torch.Generator().manual_seed(0))
            parts["loss"].backward()
        assert all(a.grad is not None and b.grad is not None and a.grad.abs().sum() > 0 for a, b in m.values())
        assert all(not p.requires_grad or p.grad is None for p in unet.parameters())
        assert parts["similarity"].item() == pytest.approx(len(paths))  # cos(1, 1) = 1 per layer
        coefs, history = optimise_coefficients(unet, router, merged, data, sched, steps=6, progress=False)
    assert "t" not in router.adapters
    assert history[-1]["similarity"] < history[0]["similarity"] and history[-1]["loss"] < history[0]["loss"]
    assert all(not torch.equal(a, torch.ones_like(a)) for a, _ in coefs.values())


def test_coefficient_file_and_saved_merge(pair, tmp_path):
    cp, _ = pair
    coef, saved = tmp_path / "c.safetensors", tmp_path / "merged.safetensors"
    params = {**FAST, "coefficients": str(coef), "save_merged": str(saved)}
    first = cp("a red star", loras=["subj", "sty"], method="ziplora", method_params=params, **KW)
    assert coef.exists() and saved.exists() and first.extras["ziplora"]["optimised"]
    again = cp("a red star", loras=["subj", "sty"], method="ziplora", method_params={**params, "save_merged": ""}, **KW)
    assert not again.extras["ziplora"]["optimised"]
    torch.testing.assert_close(again.latents, first.latents)
    # the saved merged LoRA, run as a plain Merge at scale 1, gives the same image
    cp.load_lora(saved, "zipfile")
    plain = cp("a red star", loras=["zipfile"], method="merge", method_params={"lora_scale": 1.0}, **KW).latents
    torch.testing.assert_close(plain, first.latents, atol=1e-5, rtol=0)
    # the saved file is now a resident LoRA: writing it again is refused before any work, and it is left as it was
    before = saved.read_bytes()
    with pytest.raises(LoraloomError, match="a model or LoRA file or folder of this run"):
        cp("a red star", loras=["subj", "sty"], method="ziplora", method_params=params, **KW)
    assert saved.read_bytes() == before
    with pytest.raises(LoraloomError, match="another pair or weights"):
        cp("a red star", loras=[("subj", 0.5), "sty"], method="ziplora", method_params={**params, "save_merged": ""}, **KW)
    with pytest.raises(LoraloomError, match="exactly two"):
        cp("a red star", loras=["subj"], method="ziplora", method_params=params, **KW)
