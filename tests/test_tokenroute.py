"""Token-routed fusion (FreeFuse-style): contrastive scores, position distributions and masks by hand; subject and
global roles and the words' token positions; with all masks 1 it is unfused Merge (in-run and with the reference's
restart, on DDIM and Euler); the mask of each subject LoRA follows the attention of its own tokens (injected maps);
per-LoRA controls keep working."""

from __future__ import annotations

import math

import pytest
import torch

from loraloom.composition.errors import MethodError
from loraloom.composition.methods import Step, make_method
from loraloom.composition.methods.tokenroute import TokenRoute
from loraloom.composition.spatial_weights import (
    contrastive_scores,
    masks_to_latent,
    position_distributions,
    route_masks,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# --- the equations on tiny tensors ----------------------------------------------------------------------------------
def _softmax(xs):
    e = [math.exp(x) for x in xs]
    return [v / sum(e) for v in e]


def test_contrastive_scores_and_distributions_by_hand():
    a = torch.tensor([[[0.6, 0.2, 0.1]], [[0.1, 0.3, 0.5]]])  # two subjects' maps over a 1 x 3 image
    c = contrastive_scores(a)
    assert c.flatten(1).tolist() == [pytest.approx([1.1, 0.1, -0.3]), pytest.approx([-0.4, 0.4, 0.9])]  # 2 A_i - A_j
    three = contrastive_scores(torch.tensor([1.0, 2.0, 4.0]).reshape(3, 1, 1))
    assert three.flatten().tolist() == pytest.approx([3 * 1 - 6, 3 * 2 - 5, 3 * 4 - 3])  # n A_i - sum of the others

    s = position_distributions(c, temperature=0.5)
    assert s[0].flatten().tolist() == pytest.approx(_softmax([2.2, 0.2, -0.6]), rel=1e-5)
    assert s[1].flatten().tolist() == pytest.approx(_softmax([-0.8, 0.8, 1.8]), rel=1e-5)
    auto = position_distributions(c)  # T_i = the population standard deviation of C_i over the positions
    std0 = math.sqrt(((1.1 - 0.3) ** 2 + (0.1 - 0.3) ** 2 + (-0.3 - 0.3) ** 2) / 3)
    assert auto[0].flatten().tolist() == pytest.approx(_softmax([v / std0 for v in (1.1, 0.1, -0.3)]), rel=1e-5)
    assert position_distributions(torch.full((1, 2, 2), 0.3)).flatten().tolist() == pytest.approx([0.25] * 4)

    # hard: position 0 -> subject 0, positions 1 and 2 -> subject 1 (S_1 > S_0 there); soft: the shares
    s0, s1 = _softmax([2.2, 0.2, -0.6]), _softmax([-0.8, 0.8, 1.8])
    assert route_masks(s).flatten(1).tolist() == [[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]
    soft = route_masks(s, "soft").flatten(1).tolist()
    assert soft[0] == pytest.approx([x / (x + y) for x, y in zip(s0, s1, strict=True)], rel=1e-5)
    assert [x + y for x, y in zip(*soft, strict=True)] == pytest.approx([1.0] * 3)
    one = position_distributions(contrastive_scores(torch.rand(1, 3, 3)))
    assert route_masks(one).eq(1).all() and route_masks(one, "soft").allclose(torch.ones(1, 3, 3))
    with pytest.raises(MethodError, match="mask mode"):
        route_masks(s, "blur")


def test_masks_to_latent_keeps_the_partition():
    hard = route_masks(torch.rand(3, 4, 4))
    big = masks_to_latent(hard, 8, 8)
    assert big.shape == (3, 8, 8)
    torch.testing.assert_close(big.sum(0), torch.ones(8, 8))
    assert masks_to_latent(torch.ones(1, 4, 4), 16, 16).eq(1).all()


# --- the method on the tiny model -----------------------------------------------------------------------------------
PROMPT = "ohwx and zorp, inkwash"  # byte-level tiny tokenizer: ohwx at 1..4, and 5..7, zorp 8..11
KW = dict(num_inference_steps=4, guidance_scale=5.0, height=32, width=32, seed=0, output_type="latent",
          progress_bar=False, negative_prompt="ugly")


@pytest.fixture
def loaded(tiny_sd, tmp_path):
    from loraloom.pipelines.tiny import write_random_lora

    for i, (name, cat, trig) in enumerate([("cat", "character", "ohwx"), ("dog", "object", "zorp"),
                                           ("ink", "style", "inkwash")]):
        tiny_sd.load_lora(write_random_lora(tiny_sd.pipe, tmp_path / f"{name}.safetensors", seed=i + 1, triggers=(trig,),
                                            category=cat, std=0.15), name)
    return tiny_sd


def _prepared(cp, names, params=None, prompt=PROMPT):
    run = cp.run(names, prompt, "ugly", 5.0, 32, 32, scheduler="ddim", num_inference_steps=4)
    m = make_method("tokenroute", params or {})
    try:
        m.prepare(run)
    except Exception:
        run.close()
        raise
    return run, m


def test_roles_and_token_positions(loaded):
    run, m = _prepared(loaded, ["cat", "dog", "ink"])
    with run:
        assert [l.name for l in m.subjects] == ["cat", "dog"] and m.globals == ["ink"]
        assert m.positions == {"cat": [1, 2, 3, 4], "dog": [8, 9, 10, 11]}
        assert m.tokens.tolist() == [[1, 2, 3, 4, 8, 9, 10, 11]]  # captured in the positive row
        assert m.columns == {"cat": [0, 1, 2, 3], "dog": [4, 5, 6, 7]}
    # roles override the category; concepts override the trigger words; a shared word counts for neither
    run, m = _prepared(loaded, ["cat", "dog", "ink"], {"roles": {"ink": "subject", "dog": "global"},
                                                       "concepts": {"cat": "ohwx, and", "ink": "inkwash, and"}})
    with run:
        assert [l.name for l in m.subjects] == ["cat", "ink"] and m.globals == ["dog"]
        assert m.positions["cat"] == [1, 2, 3, 4] and m.positions["ink"] == list(range(13, 20))
    for params, match in [({"roles": {"cow": "global"}}, "unknown LoRA"), ({"roles": {"cat": "main"}}, "'subject' or 'global'"),
                          ({"concepts": {"ink": "inkwash"}}, "not subject LoRAs"), ({"concepts": {"cat": "meow"}}, "not in the prompt"),
                          ({"concepts": {"cat": "zorp"}}, "shared with another")]:
        with pytest.raises(MethodError, match=match):
            _prepared(loaded, ["cat", "dog", "ink"], params)


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
@pytest.mark.parametrize("restart", [False, True])
def test_all_masks_one_is_unfused_merge(loaded, restart, scheduler):
    """One subject LoRA (its mask is 1 everywhere) and a global one: the same latents as unfused Merge, whether the
    masks come from the run's own first steps or from the reference's phase 1 (which must leave the run's own
    scheduler where it was: Euler keeps a step index)."""
    kw = {**KW, "scheduler": scheduler}
    ours = loaded(PROMPT, loras=["cat", "ink"], method="tokenroute", method_params={"restart": restart, "lora_scale": 0.8}, **kw)
    merge = loaded(PROMPT, loras=["cat", "ink"], method="merge", method_params={"fuse": False}, **kw)
    assert (ours.latents - merge.latents).abs().max().item() < 1e-5
    assert ours.extras["masks"]["cat"].eq(1).all() and ours.extras["mask_step"] == 0  # round(4 / 3) = 1 step
    assert ours.unet_calls == 4 + 1  # the capture: its own pass of the positive row, stopped after the captured layers


def test_two_subjects_with_masks_of_ones_are_unfused_merge(loaded, monkeypatch):
    kw = {**KW, "scheduler": "ddim"}
    merge = loaded(PROMPT, loras=["cat", "dog", "ink"], method="merge", method_params={"fuse": False}, **kw)
    real = loaded(PROMPT, loras=["cat", "dog", "ink"], method="tokenroute", method_params={"lora_scale": 0.8}, **kw)
    assert (real.latents - merge.latents).abs().max().item() > 1e-2  # the real masks split the image between them
    monkeypatch.setattr(TokenRoute, "masks", lambda self, maps, h, w: {l.name: torch.ones(h, w) for l in self.subjects})
    ours = loaded(PROMPT, loras=["cat", "dog", "ink"], method="tokenroute", method_params={"lora_scale": 0.8}, **kw)
    assert (ours.latents - merge.latents).abs().max().item() < 1e-5


def test_masks_of_ones_through_the_spatial_gates(loaded, monkeypatch):
    """Masks of ones that do reach the routing layer's gates (ones but for one cell far from 1e-6) change nothing
    but rounding: the gated delta is a separate multiply-add, not Merge's fused one."""
    kw = {**KW, "scheduler": "ddim"}

    def almost_ones(self, maps, h, w):
        m = torch.ones(h, w)
        m[0, 0] = 0.999
        return {l.name: m for l in self.subjects}

    merge = loaded(PROMPT, loras=["cat", "ink"], method="merge", method_params={"fuse": False}, **kw)
    monkeypatch.setattr(TokenRoute, "masks", almost_ones)
    ours = loaded(PROMPT, loras=["cat", "ink"], method="tokenroute", method_params={"lora_scale": 0.8, "restart": True}, **kw)
    torch.testing.assert_close(ours.latents, merge.latents, atol=2e-3, rtol=1e-4)  # the one 0.999 cell, and rounding
    assert (ours.latents - merge.latents).abs().max().item() > 0


class InjectedMaps:
    """A run context whose captured maps are given: a token at position t attends where `hot(t)` (h, w) is 1."""

    def __init__(self, run, hot):
        self.run, self.hot, self.masks_set = run, hot, []

    def __getattr__(self, name):
        return getattr(self.run, name)

    def predict_with_attention(self, latents, step, conditioning, routing, tokens, map_side=None, output=True):
        out, real = self.run.predict_with_attention(latents, step, conditioning, routing, tokens, map_side, output)
        fake = torch.zeros_like(real)
        for r, row in enumerate(tokens.tolist()):
            for col, t in enumerate(row):
                if t >= 0:
                    fake[r, ..., col] = self.hot(t, real.shape[1:3])
        return out, fake

    def set_masks(self, masks):
        self.masks_set.append(masks)
        self.run.set_masks(masks)


def _halves(left_positions):
    def hot(t, hw):
        m = torch.zeros(hw)
        half = hw[1] // 2
        if t in left_positions:
            m[:, :half] = 1.0
        else:
            m[:, half:] = 1.0
        return m
    return hot


@pytest.mark.parametrize("prompt, left", [(PROMPT, "cat"), ("zorp and ohwx, inkwash", "dog")])
@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_masks_follow_their_own_tokens(loaded, prompt, left, mode):
    """Tokens at positions 1..4 attend to the left half, every other token to the right: whichever LoRA's words sit
    at 1..4 gets the left half, the other the right (the LoRAs' order does not matter); the global LoRA gets none."""
    run, m = _prepared(loaded, ["cat", "dog", "ink"], {"mask_mode": mode, "temperature": 0.1}, prompt=prompt)
    with torch.no_grad(), run:
        ctx = InjectedMaps(run, _halves({1, 2, 3, 4}))
        latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        m.denoise(ctx, latents, Step(0, 4, run.scheduler.timesteps[0]))  # the collection step: round(4 / 3) = 1
        right = "dog" if left == "cat" else "cat"
        small = m.extras["masks"]
        h, w = small[left].shape
        if mode == "hard":
            assert small[left][:, : w // 2].eq(1).all() and small[left][:, w // 2:].eq(0).all()
        else:
            assert (small[left][:, : w // 2] > 0.99).all() and (small[left][:, w // 2:] < 0.01).all()
        torch.testing.assert_close(small[left] + small[right], torch.ones(h, w))
        (masks,) = ctx.masks_set
        assert set(masks) == {"cat", "dog"}  # the style LoRA is never masked
        assert masks[left].shape == (16, 16) and (masks[left][:, :7] > 0.99).all() and (masks[left][:, 9:] < 0.01).all()
        torch.testing.assert_close(masks["cat"] + masks["dog"], torch.ones(16, 16))
        assert set(run.unet_router.gates) == {"cat", "dog"}
        # later steps neither capture nor move the masks
        m.denoise(ctx, latents, Step(1, 4, run.scheduler.timesteps[1]))
        assert len(ctx.masks_set) == 1


def test_only_global_loras_is_unfused_merge(loaded):
    ours = loaded(PROMPT, loras=["ink"], method="tokenroute", method_params={"lora_scale": 0.8}, **{**KW, "scheduler": "ddim"})
    merge = loaded(PROMPT, loras=["ink"], method="merge", method_params={"fuse": False}, **{**KW, "scheduler": "ddim"})
    assert (ours.latents - merge.latents).abs().max().item() < 1e-5 and ours.extras["mask_step"] is None


def test_controls_keep_working(loaded):
    """A strength and a schedule on the subject LoRA act as they do in Merge (its mask is 1 here)."""
    entry = {"name": "cat", "te": 0.5, "unet": 0.7, "start": 0.5}
    kw = {**KW, "scheduler": "ddim"}
    ours = loaded(PROMPT, loras=[entry, "ink"], method="tokenroute", method_params={"lora_scale": 0.8}, **kw)
    merge = loaded(PROMPT, loras=[entry, "ink"], method="merge", method_params={"fuse": False}, **kw)
    plain = loaded(PROMPT, loras=["cat", "ink"], method="merge", method_params={"fuse": False}, **kw)
    assert (ours.latents - merge.latents).abs().max().item() < 1e-5
    assert (ours.latents - plain.latents).abs().max().item() > 1e-4


class Recording:
    """A run context that records the UNet input of each attention capture, as the UNet receives it."""

    def __init__(self, run):
        self.run, self.inputs = run, []

    def __getattr__(self, name):
        return getattr(self.run, name)

    def predict_with_attention(self, latents, step, conditioning, routing, tokens, map_side=None, output=True):
        self.inputs.append(self.run.scheduler.scale_model_input(latents, step.timestep))
        return self.run.predict_with_attention(latents, step, conditioning, routing, tokens, map_side, output)


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpmsolver++"])
def test_restart_phase_one_is_a_plain_run_without_unet_loras(loaded, scheduler):
    """restart=True: the maps come from step 3 of 6 of a plain-CFG run without UNet LoRAs from the same initial
    latents (the reference's phase 1), stepped on a copy of the scheduler; the run's own scheduler stays at step 0."""
    names, kw = ["cat", "dog", "ink"], dict(scheduler=scheduler, num_inference_steps=6)
    latents0 = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), loaded.run(names, PROMPT, "ugly", 5.0, 32, 32, **kw) as run:
        m = make_method("tokenroute", {"restart": True, "collect_fraction": 0.5})
        m.prepare(run)
        ctx = Recording(run)
        z = latents0 * run.scheduler.init_noise_sigma
        m.denoise(ctx, z, Step(0, 6, run.scheduler.timesteps[0]))
        (captured,) = ctx.inputs
        assert m.extras["mask_step"] == 2 and set(run.unet_router.gates) == {"cat", "dog"}
        assert getattr(run.scheduler, "step_index", 0) in (0, None)
    with torch.no_grad(), loaded.run(names, PROMPT, "ugly", 5.0, 32, 32, **kw) as ref:
        from loraloom.composition.methods.base import cfg_pair
        from loraloom.composition.routing import Routing

        cond = cfg_pair(ref.encode([{n: 1.0 for n in names}])[0])  # tokenroute's text encoding (lora_scale 1.0)
        z = latents0 * ref.scheduler.init_noise_sigma
        for i in range(2):
            t = ref.scheduler.timesteps[i]
            u, c = ref.predict(torch.cat([z, z]), Step(i, 6, t), cond, Routing.none()).chunk(2)
            z = ref.scheduler.step(u + 5.0 * (c - u), t, z, return_dict=False)[0]
        expected = ref.scheduler.scale_model_input(z, ref.scheduler.timesteps[2])
    # Euler: the input reaches the UNet as (its scaling / the run's scaling at step 0) x the run's scaling, a float
    # round trip of one ulp, grown to ~2e-5 by two steps at CFG 5; a wrong sigma would be off by tens of percent
    torch.testing.assert_close(captured, expected, atol=1e-4, rtol=1e-4)


def test_sdxl_tiny(tiny_sdxl, tmp_path):
    """On the SDXL-shaped tiny model (two text encoders): one subject LoRA is unfused Merge; two split the image."""
    from loraloom.pipelines.tiny import write_random_lora

    for i, (name, cat, trig) in enumerate([("cat", "character", "ohwx"), ("dog", "object", "zorp")]):
        tiny_sdxl.load_lora(write_random_lora(tiny_sdxl.pipe, tmp_path / f"{name}.safetensors", seed=i + 1, triggers=(trig,),
                                              category=cat, std=0.15), name)
    kw = {**KW, "scheduler": "euler", "num_inference_steps": 3}
    ours = tiny_sdxl(PROMPT, loras=["cat"], method="tokenroute", method_params={"lora_scale": 0.8}, **kw)
    merge = tiny_sdxl(PROMPT, loras=["cat"], method="merge", method_params={"fuse": False}, **kw)
    assert (ours.latents - merge.latents).abs().max().item() < 1e-5
    two = tiny_sdxl(PROMPT, loras=["cat", "dog"], method="tokenroute", **kw)
    masks = two.extras["masks"]
    assert set(masks) == {"cat", "dog"} and torch.isfinite(two.latents).all()
    torch.testing.assert_close(masks["cat"] + masks["dog"], torch.ones_like(masks["cat"]))
