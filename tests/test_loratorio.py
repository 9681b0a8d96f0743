"""LoRAtorio: patch cosine, SoftMin weights, dynamic selection and re-centred guidance by hand; one LoRA is that
LoRA alone (plain CFG with recenter=0, the re-centred formula otherwise); the dynamic two-call path computes the
same as the formula on every branch; per-LoRA controls keep working."""

from __future__ import annotations

import math

import pytest
import torch

from loraloom.composition.conditioning import Conditioning
from loraloom.composition.errors import MethodError
from loraloom.composition.methods import Step, make_method
from loraloom.composition.methods.guidance import classifier_free_guidance
from loraloom.composition.routing import Routing
from loraloom.composition.spatial_weights import (
    loratorio_guidance,
    patch_cosine,
    patches_to_latent,
    softmin_weights,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# --- the equations on tiny tensors ----------------------------------------------------------------------------------
def _cos(a, b):
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_patch_cosine_by_hand():
    # one image, 2 channels, a 2 x 3 latent, patches of 2: one full 2x2 patch and one 2x1 edge patch
    ref = torch.tensor([[[1.0, 0.0, 2.0], [0.0, 1.0, 1.0]],
                        [[0.0, 1.0, 0.0], [1.0, 0.0, -1.0]]])[None]  # (B=1, C=2, H=2, W=3)
    a = torch.tensor([[[1.0, 0.0, -2.0], [0.0, 1.0, 3.0]],
                      [[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]]])[None]  # equal to ref on the first patch
    b = torch.tensor([[[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]],
                      [[1.0, 0.0, 5.0], [0.0, 1.0, 0.0]]])[None]
    sim = patch_cosine(torch.stack([a, b]), ref, 2)
    assert sim.shape == (2, 1, 1, 2)

    def cells(t, cols):  # every channel and cell of a patch, flattened
        return [float(t[0, c, y, x]) for c in range(2) for y in range(2) for x in cols]

    for i, t in enumerate((a, b)):
        for j, cols in enumerate(([0, 1], [2])):
            assert float(sim[i, 0, 0, j]) == pytest.approx(_cos(cells(t, cols), cells(ref, cols)), abs=1e-6)
    assert float(sim[0, 0, 0, 0]) == pytest.approx(1.0)  # a equals ref there
    assert float(sim[1, 0, 0, 0]) == pytest.approx(0.0, abs=1e-6)  # b is orthogonal to ref there
    # a patch larger than the latent is the whole latent; a zero prediction has similarity 0
    whole = patch_cosine(torch.stack([a]), ref, 8)
    assert whole.shape == (1, 1, 1, 1)
    assert float(whole) == pytest.approx(_cos(a.flatten().tolist(), ref.flatten().tolist()), abs=1e-6)
    assert float(patch_cosine(torch.zeros(1, 1, 2, 2, 3), ref, 2).abs().max()) == 0.0


def test_softmin_weights_and_selection_by_hand():
    sim = torch.tensor([0.9, 0.5, 0.7]).reshape(3, 1, 1, 1)
    w = softmin_weights(sim, temperature=1.0)
    e = [math.exp(-0.9), math.exp(-0.5), math.exp(-0.7)]
    assert w.flatten().tolist() == pytest.approx([x / sum(e) for x in e], rel=1e-6)
    w = softmin_weights(sim, temperature=0.1)
    e = [math.exp(-9.0), math.exp(-5.0), math.exp(-7.0)]
    assert w.flatten().tolist() == pytest.approx([x / sum(e) for x in e], rel=1e-5)
    # the least similar LoRA (1) leads; one LoRA alone weighs 1 everywhere
    assert int(w.flatten().argmax()) == 1
    assert softmin_weights(torch.rand(1, 1, 3, 3)).eq(1.0).all()
    # two patches: LoRA 0 least similar in patch 0, LoRA 2 in patch 1; mean similarity: 0.6, 0.65, 0.55
    sim = torch.tensor([[0.2, 1.0], [0.5, 0.8], [0.9, 0.2]]).reshape(3, 1, 1, 2)
    step = softmin_weights(sim, 1.0, top_k=1, selection="step")  # one LoRA for the image: LoRA 2 (lowest mean)
    assert step[:, 0, 0].tolist() == [[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]]
    patch = softmin_weights(sim, 1.0, top_k=1, selection="patch")  # one LoRA per patch
    assert patch[:, 0, 0].tolist() == [[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]]
    two = softmin_weights(sim, 1.0, top_k=2, selection="patch")  # patch 0: LoRAs 0 and 1; patch 1: 2 and 1
    z0 = math.exp(-0.2) + math.exp(-0.5)
    z1 = math.exp(-0.2) + math.exp(-0.8)
    assert two[:, 0, 0, 0].tolist() == pytest.approx([math.exp(-0.2) / z0, math.exp(-0.5) / z0, 0.0])
    assert two[:, 0, 0, 1].tolist() == pytest.approx([0.0, math.exp(-0.8) / z1, math.exp(-0.2) / z1])
    assert softmin_weights(sim, 1.0, top_k=3).allclose(softmin_weights(sim, 1.0))  # k >= N: the static weights
    with pytest.raises(MethodError, match="temperature"):
        softmin_weights(sim, 0.0)


def test_patches_to_latent_and_guidance_by_hand():
    w = torch.tensor([[0.25, 1.0], [0.75, 0.0]]).reshape(2, 1, 1, 2)  # two LoRAs, patches of 2 on a 2 x 3 latent
    cells = patches_to_latent(w, 2, 3, 2)
    assert cells.shape == (2, 1, 1, 2, 3)
    assert cells[0, 0, 0].tolist() == [[0.25, 0.25, 1.0], [0.25, 0.25, 1.0]]
    # guidance at one cell: eps_c = .25*2 + .75*6 = 5; eps_u^L = .25*1 + .75*3 = 2.5; eps_u = .5*0.5 + .5*2.5 = 1.5;
    # eps = 1.5 + 7 (5 - 1.5) = 26
    base_u = torch.full((1, 1, 1, 1), 0.5)
    lora_u = torch.tensor([1.0, 3.0]).reshape(2, 1, 1, 1, 1)
    lora_c = torch.tensor([2.0, 6.0]).reshape(2, 1, 1, 1, 1)
    omega = torch.tensor([0.25, 0.75]).reshape(2, 1, 1, 1, 1)
    assert float(loratorio_guidance(base_u, lora_u, lora_c, omega, 7.0, 0.5)) == pytest.approx(26.0)
    # recenter = 1: the unconditional is the base model's alone: 0.5 + 7 (5 - 0.5) = 32
    assert float(loratorio_guidance(base_u, lora_u, lora_c, omega, 7.0, 1.0)) == pytest.approx(32.0)
    # one LoRA, recenter = 0: that LoRA's plain CFG
    one = loratorio_guidance(base_u, lora_u[:1], lora_c[:1], torch.ones(1, 1, 1, 1, 1), 7.0, 0.0)
    assert float(one) == pytest.approx(float(classifier_free_guidance(lora_u[0], lora_c[0], 7.0)))


def test_params_and_registration():
    m = make_method("loratorio")
    p = m.params
    assert (p.lora_scale, p.patch_size, p.temperature, p.recenter, p.top_k, p.selection) == (0.8, 8, 1.0, 0.5, 0, "step")
    with pytest.raises(MethodError, match="selection"):
        make_method("loratorio", {"selection": "layer"})
    with pytest.raises(MethodError, match="recenter"):
        make_method("loratorio", {"recenter": 1.5})


# --- the method on the tiny model -----------------------------------------------------------------------------------
KW = dict(num_inference_steps=4, guidance_scale=5.0, height=32, width=32, seed=0, output_type="latent",
          progress_bar=False, scheduler="ddim", negative_prompt="ugly")
PROMPT = "ohwx in forest, inkwash"


@pytest.fixture
def loaded(tiny_sd, lora_files):
    for name, path in lora_files.items():
        tiny_sd.load_lora(path, name)
    return tiny_sd


def test_one_lora_with_recenter_0_is_that_lora_alone(loaded):
    """One LoRA: Omega = 1 everywhere, so without re-centring LoRAtorio is the LoRA's plain CFG (= unfused Merge)."""
    # max_batch=2: the LoRA's pair runs in a call of its own, as Merge's does (a batch of 4 rows rounds differently:
    # ~1e-5 after 4 steps at CFG 5)
    ours = loaded(PROMPT, loras=["char"], method="loratorio", method_params={"recenter": 0.0, "max_batch": 2}, **KW)
    alone = loaded(PROMPT, loras=["char"], method="merge", method_params={"fuse": False}, **KW)
    assert (ours.latents - alone.latents).abs().max().item() < 1e-5
    assert ours.unet_rows == 4 * KW["num_inference_steps"]  # the base pair runs too (its weight is 0 here)
    # the default re-centring changes the result
    recentred = loaded(PROMPT, loras=["char"], method="loratorio", **KW)
    assert (recentred.latents - alone.latents).abs().max().item() > 1e-4


def _predictions(run, latents, step, gates_list):
    """[(eps(n), eps(c))] of each branch, each alone: gates {} is the base model."""
    out = []
    for gates in gates_list:
        neg, pos = run.encode([gates])[0]
        u, c = run.predict(torch.cat([latents, latents]), step, Conditioning.cat([neg, pos]),
                           Routing.uniform(gates) if gates else Routing.none()).chunk(2)
        out.append((u, c))
    return out


def test_one_lora_is_its_recentred_cfg(loaded):
    """The CFG change alone: eps = eps_u + s (eps_1(c) - eps_u), eps_u = .5 eps_0(n) + .5 eps_1(n)."""
    with torch.no_grad(), loaded.run(["char"], PROMPT, "ugly", 5.0, 32, 32, scheduler="ddim", num_inference_steps=4) as run:
        m = make_method("loratorio")
        m.prepare(run)
        latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
        step = Step(1, 4, run.scheduler.timesteps[1])
        got = m.denoise(run, latents, step)
        (u0, _), (u1, c1) = _predictions(run, latents, step, [{}, {"char": 0.8}])
        uncond = 0.5 * u0 + 0.5 * u1
        torch.testing.assert_close(got, uncond + 5.0 * (c1 - uncond), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("params", [{"patch_size": 4}, {"patch_size": 2, "top_k": 1},
                                    {"patch_size": 4, "top_k": 2, "selection": "patch", "temperature": 0.05}])
def test_three_loras_match_the_equations(loaded, params):
    """Every branch computed alone, then the equations: the method's batched call (and, with top_k, its two calls
    with the unchosen LoRAs' unconditional rows left out) gives the same prediction."""
    names = ["char", "style", "bg"]
    with torch.no_grad(), loaded.run(names, PROMPT, "ugly", 5.0, 32, 32, scheduler="ddim", num_inference_steps=4) as run:
        m = make_method("loratorio", params)
        m.prepare(run)
        latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4))
        step = Step(2, 4, run.scheduler.timesteps[2])
        rows_before = run.unet_rows
        got = m.denoise(run, latents, step)
        rows = run.unet_rows - rows_before
        preds = _predictions(run, latents, step, [{}] + [{n: 0.8} for n in names])
        (u0, c0), lora = preds[0], preds[1:]
        lora_u = torch.stack([u for u, _ in lora])
        lora_c = torch.stack([c for _, c in lora])
        p = m.params
        sim = patch_cosine(lora_c, c0, p.patch_size)
        omega = patches_to_latent(softmin_weights(sim, p.temperature, p.top_k, p.selection), 16, 16, p.patch_size)
        torch.testing.assert_close(got, loratorio_guidance(u0, lora_u, lora_c, omega, 5.0, 0.5), atol=1e-5, rtol=1e-5)
        chosen = int((omega.flatten(1) > 0).any(1).sum())
        assert rows == (8 if not p.top_k else 2 + 3 + chosen)  # dynamic: the unchosen LoRAs' unconditional rows are skipped
        if p.top_k == 1:
            assert chosen == 1 and m.extras["selected"][-1] == [names[int(omega.flatten(1).sum(1).argmax())]]


def test_no_lora_is_the_base_model(loaded):
    ours = loaded(PROMPT, loras=[], method="loratorio", **KW)
    base = loaded(PROMPT, loras=[], method="merge", **KW)
    assert (ours.latents - base.latents).abs().max().item() < 1e-5


def test_controls_keep_working(loaded):
    """Strengths (text encoder and UNet) and a schedule act on LoRAtorio's branch as on Merge's."""
    entry = {"name": "char", "te": 0.5, "unet": 0.7, "start": 0.5}
    ours = loaded(PROMPT, loras=[entry], method="loratorio", method_params={"recenter": 0.0, "max_batch": 2}, **KW)
    alone = loaded(PROMPT, loras=[entry], method="merge", method_params={"fuse": False}, **KW)
    plain = loaded(PROMPT, loras=["char"], method="merge", method_params={"fuse": False}, **KW)
    # 3e-5: LoRAtorio's branch runs in another batch than Merge's, whose kernels round differently (1.26e-5 once in a
    # full run under load); the controls' own effect is over 1e-4
    assert (ours.latents - alone.latents).abs().max().item() < 3e-5
    assert (ours.latents - plain.latents).abs().max().item() > 1e-4


def test_sdxl_tiny(tiny_sdxl, tmp_path):
    """On the SDXL-shaped tiny model: one LoRA without re-centring is unfused Merge; three run, with top_k too."""
    from loraloom.pipelines.tiny import write_random_lora

    names = []
    for i in range(3):
        path = write_random_lora(tiny_sdxl.pipe, tmp_path / f"l{i}.safetensors", seed=i + 1, std=0.15)
        names.append(tiny_sdxl.load_lora(path, f"l{i}").name)
    kw = {**KW, "scheduler": "euler", "num_inference_steps": 3}
    ours = tiny_sdxl(PROMPT, loras=names[:1], method="loratorio", method_params={"recenter": 0.0, "max_batch": 2}, **kw)
    alone = tiny_sdxl(PROMPT, loras=names[:1], method="merge", method_params={"fuse": False}, **kw)
    # the base branch's prompt is encoded in the same text-encoder batch: SDXL's pooled embedding then differs by one
    # ulp (2e-7), ~5e-5 in the latents after 3 Euler steps
    torch.testing.assert_close(ours.latents, alone.latents, atol=2e-4, rtol=1e-5)
    for params in ({}, {"top_k": 2, "patch_size": 4}):
        out = tiny_sdxl(PROMPT, loras=names, method="loratorio", method_params=params, **kw)
        assert torch.isfinite(out.latents).all() and len(out.extras["mean_weights"]) == 3
