"""CMLoRA: refresh schedule, dominant rotation, weights, caching that skips UNet work, interval 1 == uncached,
the shallow UNet pass, the frequency statistic and its cache."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from loraloom.composition.conditioning import Conditioning
from loraloom.composition.frequency import high_frequency_score, partition_by_score, radial_profile
from loraloom.composition.methods import Method, Step, make_method
from loraloom.composition.methods.cmlora import (
    LATE_PHASE_START,
    dominant_ratio,
    is_late,
    last_early_step,
    lora_weights,
    refresh_steps,
)
from loraloom.composition.methods.guidance import composite_guidance
from loraloom.composition.routing import Routing
from loraloom.pipelines import Run

pytestmark = pytest.mark.usefixtures("one_thread")


# --- schedules -----------------------------------------------------------------------------------------------------
def test_refresh_steps_non_uniform_scaled_to_any_length():
    r = refresh_steps(220)  # the reference's T = 220 listing (docs/methods/cmlora.md#refresh-schedule)
    assert len(r) == 92 and r[:3] == [0, 2, 4] and r[40:44] == [80, 82, 85, 88] and r[-16:-13] == [187, 190, 192] and r[-1] == 218
    assert refresh_steps(10) == [0, 2, 3, 6, 8]  # boundaries int(3.75) = 3, int(8.75) = 8
    assert refresh_steps(20) == [0, 2, 4, 6, 7, 10, 13, 16, 17, 19]
    assert refresh_steps(50) == [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 21, 24, 27, 30, 33, 36, 39, 42, 43, 45, 47, 49]
    assert refresh_steps(7, 1) == list(range(7)) and refresh_steps(7, 3) == [0, 3, 6]
    assert refresh_steps(1) == [0] and refresh_steps(3) == [0, 1, 2] and refresh_steps(4) == [0, 1, 3]


def _drive(steps, k, h, **params):
    """Drive CMLoRA's per-step plan without a model; returns [(dominant, full LoRAs, weights)] per step."""
    m = make_method("cmlora", {"order": "given", **params})
    m.k, m.h, m.order = k, h, list(range(k))
    m.cache, m.refresh, m.refreshes = [None] * k, None, 0
    out = []
    for i in range(steps):
        d, full, w = m.plan(Step(i, steps, torch.tensor(0)))
        assert sum(w) == pytest.approx(k) and w[d] >= max(w)
        for j in full:
            m.cache[j] = "cached"
        out.append((d, full, w))
    return out


def _plan(steps, k, h, **params):
    """[(dominant, full LoRAs)] per step."""
    return [(d, full) for d, full, _ in _drive(steps, k, h, **params)]


def reference_offline(k: int, h: int, cache_interval: int, steps: int = 220) -> list[tuple[int, list[int], list[float]]]:
    """The reference's per-step choices, transcribed literally from pipeline_offline.py as docs/methods/cmlora.md
    (#reference-code, #refresh-schedule) describes it — its absolute `i <= 120`, its `int(0.375 * T)` boundaries, its
    slice-copy no-op and its weights computed once; independent of loraloom's code. LoRAs 0..h-1 are H
    (`real_list`), h..k-1 the background (`abs_list`). Returns [(dominant, LoRAs running the full UNet, weights)]."""
    dom_lora_coeff = k - 0.5
    nondom_lora_weight = k / (dom_lora_coeff + k - 1)
    dom_lora_weight = nondom_lora_weight * dom_lora_coeff
    prv_features_list = [None] * k
    if cache_interval == 0:
        interval_seq = (list(range(0, int(0.375 * steps), 2)) + list(range(int(0.375 * steps), int(0.875 * steps), 3))
                        + list(range(int(0.875 * steps), steps, 2)))
    elif cache_interval == 1:
        interval_seq = list(range(steps))
    else:
        interval_seq = list(range(0, steps, cache_interval))
    real, abs_list = list(range(h)), list(range(h, k))
    indicator = 0
    out = []
    for i in range(steps):
        if i in interval_seq:
            dom_lora_coeff -= 0.5 ** indicator  # never used again: the weights above are not recomputed
            if len(abs_list) == 0:
                prv_features_list[indicator % len(real)] = None
                indicator += 1
            elif i <= 120:
                prv_features_list[indicator % len(real)] = None
                indicator += 1
            else:
                prv_features_list[1:][indicator % len(real)] = None  # assigns into a copy: nothing happens
                indicator += 1
        full, weights = [], []
        for itr in range(k):
            if not (cache_interval > 1 and prv_features_list[itr] is not None):  # quick_replicate on a cache: shallow
                full.append(itr)
                prv_features_list[itr] = "features"
            if len(abs_list) == 0 or i <= 120:
                dominant = (indicator - 1) % len(real) == itr
            else:
                dominant = ((indicator - 1) % len(real)) + 1 == itr
            weights.append(dom_lora_weight if dominant else nondom_lora_weight)
        out.append((weights.index(dom_lora_weight), full, weights))
    return out


@pytest.mark.parametrize("cache_interval", [0, 1, 2, 3])
@pytest.mark.parametrize("background", [False, True])
@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_reference_mode_equals_the_reference_at_220_steps(k, background, cache_interval):
    """Every step of T = 220 (the code's own step count): dominant LoRA, who runs the full UNet, and the weights."""
    h = k - 1 if background else k
    got = _drive(220, k, h, reference_mode=True, cache_interval=cache_interval)
    want = reference_offline(k, h, cache_interval)
    for i, ((d, full, w), (d_ref, full_ref, w_ref)) in enumerate(zip(got, want)):
        assert (i, d, full) == (i, d_ref, full_ref)
        assert w == pytest.approx(w_ref, rel=1e-15, abs=0)
    if background and cache_interval:  # 120 is a refresh step, still early: the newly dominant LoRA recomputes
        assert got[120][0] < h and got[120][1] == ([got[120][0]] if cache_interval >= 2 else list(range(k)))


def test_late_phase_boundary_is_an_integer_step():
    """120/220 * 220 is 119.99999999999999 in floating point: compared as floats, step 120 was late."""
    assert 120 > LATE_PHASE_START * 220  # the old comparison's error
    assert last_early_step(220) == 120 and not is_late(120, 220) and is_late(121, 220)
    assert last_early_step(20) == 10 and last_early_step(25) == 13 and last_early_step(50) == 27
    assert [last_early_step(t, 0.5) for t in (1, 2, 3, 10)] == [0, 1, 1, 5]


@pytest.mark.parametrize("steps,k,h,dominant", [
    (10, 3, 3, [0, 0, 1, 2, 2, 2, 0, 0, 1, 1]),  # all H: rotation over H at refreshes 0, 2, 3, 6, 8
    (10, 2, 2, [0, 0, 1, 0, 0, 0, 1, 1, 0, 0]),
    # one L LoRA (index 2): it joins the rotation only in the late phase (steps > 0.545 T)
    (20, 3, 2, [0, 0, 1, 1, 0, 0, 1, 0, 0, 0, 1, 2, 2, 0, 0, 0, 1, 2, 2, 0]),
    (10, 4, 0, [0, 0, 1, 2, 2, 2, 3, 3, 0, 0]),  # no H: every LoRA rotates
])
def test_dominant_rotation_and_full_passes_paper(steps, k, h, dominant):
    plan = _plan(steps, k, h, refresh_policy="all")
    assert [d for d, _ in plan] == dominant
    refresh = set(refresh_steps(steps))
    for i, (d, full) in enumerate(plan):
        assert full == (list(range(k)) if i in refresh else [d])  # refresh: all; between: the dominant LoRA only
    assert all(full == list(range(k)) for _, full in _plan(steps, k, h, cache_interval=1))
    assert _plan(steps, k, h) == plan  # the default policy is "all"
    rotating = _plan(steps, k, h, refresh_policy="dominant")  # only the newly dominant LoRA refreshes
    assert [d for d, _ in rotating] == dominant
    assert rotating[0][1] == list(range(k)) and all(full == [d] for d, full in rotating[1:])


def test_reference_mode_plan_reproduces_the_code():
    """docs/methods/cmlora.md#reference-code with c = 2, T = 20, one background (index 2): only the newly dominant LoRA is recomputed at a refresh
    step, nothing after the (rescaled) step 120 — the late refresh is a no-op in the code — and the dominant index
    shifts by one in the late phase."""
    plan = _plan(20, 3, 2, reference_mode=True, cache_interval=2)
    assert [d for d, _ in plan] == [0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 2, 1, 1, 2, 2, 1, 1, 2, 2]
    assert [full for _, full in plan][:12] == [[0, 1, 2], [], [1], [], [0], [], [1], [], [0], [], [1], []]
    assert all(full == [] for _, full in plan[11:])
    # the non-uniform schedule (0) and interval 1 never use the cache in the code
    assert all(full == [0, 1, 2] for _, full in _plan(20, 3, 2, reference_mode=True))


def test_weights_and_decay():
    for k, dom, other in ((2, 0.6, 0.4), (3, 0.5556, 0.2222), (4, 0.5385, 0.1538), (5, 0.5294, 0.1176)):
        w = lora_weights(k, 0, dominant_ratio(k, 0, decay=False))
        assert w[0] / k == pytest.approx(dom, abs=1e-4) and w[1] / k == pytest.approx(other, abs=1e-4)
    assert [dominant_ratio(4, n, True) for n in (0, 1, 2)] == [3.5, 2.5, 2.0]
    assert dominant_ratio(4, 60, True) == pytest.approx(1.5)
    assert [dominant_ratio(2, n, True) for n in (0, 1, 5)] == [1.5, 1.0, 1.0]  # clamped: never below the others
    assert dominant_ratio(3, 9, False) == 2.5
    assert [dominant_ratio(3, n, True) for n in (0, 1, 2, 3)] == [2.5, 1.5, 1.0, 1.0]  # uniform from the 3rd refresh
    assert dominant_ratio(5, 60, True) == pytest.approx(2.5)


def test_defaults_keep_the_dominant_lora_and_refresh_every_cache():
    """docs/methods/cmlora.md#defaults: no decay (c_dom = k - 0.5 at every step, as the code computes it) and every
    LoRA refreshed at a refresh step: at T = 20, k = 4 a LoRA never reuses features older than 2 steps; with
    'dominant', 9 (all four in H) or 15 (one in L: its cache is step 0's until it is dominant late)."""
    p = make_method("cmlora").params
    assert p.dominant_decay is False and p.refresh_policy == "all"
    for k in (2, 3, 4, 5):
        ws = [w for _, _, w in _drive(20, k, k)]
        assert all(max(w) / min(w) == pytest.approx(k - 0.5) for w in ws)

    def oldest_cache(h, policy):
        age, last = 0, [0] * 4
        for i, (_, full) in enumerate(_plan(20, 4, h, refresh_policy=policy)):
            last = [i if j in full else t for j, t in enumerate(last)]
            age = max(age, i - min(last))
        return age

    assert oldest_cache(4, "all") == oldest_cache(3, "all") == 2
    assert oldest_cache(4, "dominant") == 9 and oldest_cache(3, "dominant") == 15


# --- the shallow pass -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_shallow_pass_with_fresh_features_equals_full_pass(family, request):
    from loraloom.pipelines.unet_cache import full_pass, shallow_pass

    unet = request.getfixturevalue("tiny_sd" if family == "sd1" else "tiny_sdxl").pipe.unet
    g = torch.Generator().manual_seed(0)
    x, hidden = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    added = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.randn(2, 6, generator=g)} if family == "sdxl" else None
    with torch.no_grad():
        out, feats = full_pass(unet, x, torch.tensor(400), hidden, added)
        ref = unet(x, torch.tensor(400), encoder_hidden_states=hidden, added_cond_kwargs=added).sample
        same = shallow_pass(unet, x, torch.tensor(400), hidden, feats, added)
        _, old = full_pass(unet, x, torch.tensor(900), hidden, added)
        stale = shallow_pass(unet, x, torch.tensor(400), hidden, old, added)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(same, out)
    assert (stale - out).abs().max() > 1e-4


# --- whole runs on the tiny model ----------------------------------------------------------------------------------
@pytest.fixture
def loaded(tiny_sd, lora_files):
    for name, path in lora_files.items():
        tiny_sd.load_lora(path, name)
    return tiny_sd


KW = dict(num_inference_steps=6, seed=3, output_type="latent", progress_bar=False, scheduler="ddim", height=32, width=32)
LORAS = ["char", "style", "bg"]


def test_cached_steps_skip_unet_work(loaded, monkeypatch):
    """T = 6, k = 3, refreshes at 0, 2, 5: Composite runs 36 full rows; CMLoRA 3 x 6 + 3 x 2 = 24 full rows and
    12 shallow rows (features) or none at all (noise)."""
    shallow = []
    real = Run.predict_features
    monkeypatch.setattr(Run, "predict_features", lambda self, *a, **k: shallow.append(k.get("features", a[4] if len(a) > 4 else None) is not None) or real(self, *a, **k))
    comp = loaded("x", loras=LORAS, method="composite", **KW)
    every = {"order": "given", "refresh_policy": "all"}
    feat = loaded("x", loras=LORAS, method="cmlora", method_params=every, **KW)
    noise = loaded("x", loras=LORAS, method="cmlora", method_params={**every, "cache_mode": "noise"}, **KW)
    assert comp.unet_rows == 36
    assert feat.unet_rows == 24 and feat.extras["full_rows"] == 24 and feat.extras["cached_rows"] == 12
    assert shallow.count(True) == 3  # one batched shallow call on each of steps 1, 3, 4
    assert noise.unet_rows == 24 and noise.unet_calls == 6
    assert feat.extras["dominant"] == ["char", "char", "style", "style", "style", "bg"]
    default = loaded("x", loras=LORAS, method="cmlora", method_params={"order": "given"}, **KW)
    assert default.unet_rows == 24 and torch.equal(default.latents, feat.latents)  # "all" is the default
    dominant = loaded("x", loras=LORAS, method="cmlora", method_params={"order": "given", "refresh_policy": "dominant"}, **KW)
    # all three full on step 0 (empty caches), then only the dominant one: (3 + 5) x 2 full rows
    assert dominant.unet_rows == 16 and dominant.extras["cached_rows"] == 20
    uncached = loaded("x", loras=LORAS, method="cmlora", method_params={"order": "given", "cache_interval": 1}, **KW)
    assert 0 < (feat.latents - uncached.latents).abs().max() < (uncached.latents - comp.latents).abs().max() * 10


class _UncachedWeighted(Method):
    """The uncached computation by hand: every LoRA fully every step, dominant = step index mod k, weights with
    c_dom = k - 0.5 (or decaying with `decay`)."""

    name = "uncached-test"

    @dataclass
    class Params:
        decay: bool = False

    def prepare(self, ctx):
        self.gates = [{l.name: l.weight} for l in ctx.loras]
        conds = ctx.encode(self.gates)
        self.cond = Conditioning.cat([part for pair in conds for part in pair])

    def denoise(self, ctx, latents, step):
        k = len(self.gates)
        eps = ctx.predict(latents.repeat(2 * k, 1, 1, 1), step, self.cond, Routing.from_blocks([(2, g) for g in self.gates]))
        eps = eps.reshape(k, 2, *latents.shape)
        w = lora_weights(k, step.index % k, dominant_ratio(k, step.index, self.params.decay))
        return composite_guidance(eps[:, 0], eps[:, 1], ctx.guidance_scale, w)


@pytest.mark.parametrize("decay", [False, True])
def test_interval_one_equals_the_uncached_computation(loaded, decay):
    params = {"order": "given", "cache_interval": 1, "dominant_decay": decay}
    got = loaded("x", loras=LORAS, method="cmlora", method_params=params, **KW)
    ref = loaded("x", loras=LORAS, method=_UncachedWeighted(decay=decay), **KW)
    torch.testing.assert_close(got.latents, ref.latents, atol=1e-5, rtol=1e-5)
    assert got.unet_rows == ref.unet_rows == 36


def test_reference_mode_runs_the_codes_caching(loaded):
    out = loaded("x", loras=LORAS, method="cmlora", method_params={"reference_mode": True, "cache_interval": 2}, **KW)
    assert out.extras["H"] == ["char", "style"] and out.extras["L"] == ["bg"]
    # R = 0, 2, 4; late from step 4 (> 0.545 * 6): all three at step 0, LoRA 1 at step 2, nothing after
    assert out.unet_rows == 6 + 2 and out.extras["cached_rows"] == 36 - 8
    plain = loaded("x", loras=LORAS, method="cmlora", method_params={"reference_mode": True}, **KW)
    assert plain.unet_rows == 36 and plain.extras["cached_rows"] == 0  # non-uniform schedule: no caching in the code


# --- frequency profiling ---------------------------------------------------------------------------------------------
def test_high_frequency_statistic():
    assert len(radial_profile(np.zeros((512, 512), np.uint8) + 1)) - 1 == 362  # cut-off int(0.2 * 362) = 72 px
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    ramp = np.repeat(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], 64, 0).repeat(3, 2)
    assert high_frequency_score(noise) > high_frequency_score(ramp)
    assert partition_by_score({"a": 0.01, "b": -0.2, "c": 0.3}) == (["c", "a"], ["b"])


def test_profiles_are_measured_once_and_cached(loaded, tmp_path, monkeypatch):
    calls = []
    real = Run.sample
    monkeypatch.setattr(Run, "sample", lambda self, *a, **k: calls.append(a[0]) or real(self, *a, **k))
    cache = tmp_path / "profiles.json"
    params = {"profile_cache": str(cache), "profile_steps": 2, "profile_seeds": [0]}
    first = loaded("x", loras=LORAS, method="cmlora", method_params=params, **KW)
    assert len(calls) == 6  # each LoRA alone and the base model, on each LoRA's trigger words
    deltas = first.extras["frequency_delta"]
    assert set(deltas) == set(LORAS)
    assert first.extras["order"] == sorted(LORAS, key=lambda n: -deltas[n])
    assert first.extras["H"] == [n for n in first.extras["order"] if deltas[n] > 0]
    assert len(json.loads(cache.read_text())["entries"]) == 6
    second = loaded("x", loras=LORAS, method="cmlora", method_params=params, **KW)
    assert len(calls) == 6 and second.extras["frequency_delta"] == deltas
    assert torch.equal(first.latents, second.latents)


def test_profile_cli_fills_the_cache(lora_files, tmp_path, capsys):
    from loraloom.app.cli import main

    cache = tmp_path / "p.json"
    argv = ["cmlora-profile", "tiny:sd1", str(lora_files["char"]), str(lora_files["bg"]), "--height", "32", "--width", "32",
            "--profile-steps", "2", "--profile-seeds", "0", "--cache", str(cache), "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["delta_h"]) == {"char", "bg"} and sorted(out["order"]) == ["bg", "char"]
    assert len(json.loads(cache.read_text())["entries"]) == 4
    assert main(argv) == 0 and json.loads(capsys.readouterr().out)["delta_h"] == out["delta_h"]
