"""K-LoRA: the selection on hand-built LoRAs, the switch table against a brute-force per-step evaluation,
step-count invariance, alpha/rank scaling, and end-to-end equivalences with Merge."""

from __future__ import annotations

import pytest
import torch

from loraloom.composition.errors import LoraloomError
from loraloom.composition.lora import LoRALayer
from loraloom.composition.merging import is_attention_projection
from loraloom.composition.methods import make_method
from loraloom.composition.methods.klora import balance_factor, klora_table, time_pieces, time_scale, topk_abs_sum
from loraloom.pipelines import Run

pytestmark = pytest.mark.usefixtures("one_thread")


def _layer(up, down, alpha=None):
    up, down = torch.tensor(up, dtype=torch.float32), torch.tensor(down, dtype=torch.float32)
    return LoRALayer(down, up, float(down.shape[0]) if alpha is None else alpha)


# Rank-1 layers on 4x4 weights, so K = 1 and each Top-K sum is the largest |element|; L1 = 8 everywhere.
CONCENTRATED = ([[8.0], [0], [0], [0]], [[1.0, 0, 0, 0]])  # one element of 8
SPREAD = ([[1.0], [1], [0], [0]], [[1.0, 1, 1, 1]])  # eight elements of 1
HALF = ([[2.0], [2], [0], [0]], [[1.0, 1, 0, 0]])  # four elements of 2
MIXED = ([[1.5], [0.5], [0], [0]], [[1.0, 1, 1, 1]])  # four of 1.5, four of 0.5


def hand_built(subject_alpha_p3=None):
    subject = {"p1": [_layer(*CONCENTRATED)], "p2": [_layer(*SPREAD)], "p3": [_layer(*HALF, alpha=subject_alpha_p3)]}
    style = {"p1": [_layer(*SPREAD)], "p2": [_layer(*CONCENTRATED)], "p3": [_layer(*MIXED)]}
    return {p: (subject[p], style[p]) for p in subject}


def test_topk_sum_and_gamma_by_hand():
    d = torch.tensor([[3.0, -5.0], [0.5, 1.0]])
    assert topk_abs_sum(d, 1) == 5.0 and topk_abs_sum(d, 2) == 8.0 and topk_abs_sum(d, 99) == 9.5
    assert balance_factor([2.0, 2.0], [1.0, 3.0], "paper") == pytest.approx(1.0)
    # code: per-layer ratios [1, 1, 1, 1, 20]; 20 >= 3 * mean(4.8) is dropped -> gamma 1; paper: 24 / 5
    l1_c, l1_s = [1.0, 1, 1, 1, 20], [1.0, 1, 1, 1, 1]
    assert balance_factor(l1_c, l1_s, "code") == pytest.approx(1.0)
    assert balance_factor(l1_c, l1_s, "paper") == pytest.approx(24 / 5)


def test_fast_topk_equals_plain_topk():
    g = torch.Generator().manual_seed(0)
    for shape, rank in (((50, 40), 30), ((8, 3), 2), ((40, 40), 1)):
        d = torch.randn(shape[0], rank, generator=g) @ torch.randn(rank, shape[1], generator=g)
        d[0, :5] = d.abs().max()  # ties in one row
        for k in (1, 7, shape[0] - 1, shape[0], shape[0] + 1, 200, d.numel(), d.numel() + 5):
            plain = torch.topk(d.abs().flatten(), min(k, d.numel())).values.sum().item()
            assert topk_abs_sum(d, k) == pytest.approx(plain, rel=1e-6)


def test_scores_are_remembered_until_a_factor_changes():
    from loraloom.composition.methods.klora import layer_scores

    g = torch.Generator().manual_seed(1)
    c = LoRALayer(torch.randn(2, 16, generator=g), torch.randn(16, 2, generator=g), 2.0)
    s = LoRALayer(torch.randn(2, 16, generator=g), torch.randn(16, 2, generator=g), 2.0)
    first = layer_scores([c], [s])
    assert layer_scores([c], [s]) is first
    with torch.no_grad():
        c.up.mul_(2.0)  # in place: the version counter moves, the remembered numbers are not reused
    again = layer_scores([c], [s])
    assert again is not first and again[0] == pytest.approx(2 * first[0])


def test_time_scales():
    assert time_scale(0.0) == 0.5 and time_scale(1.0) == pytest.approx(2.0)
    assert time_scale(0.0, "s*") == pytest.approx(1.3)
    assert time_scale(0.1, "s*") == pytest.approx(1.45)
    assert time_scale(0.2, "s*") == pytest.approx(0.1)  # wrapped: 1.6 mod 1.5
    assert time_scale(0.0, "s*", beta_star=1.275) == pytest.approx(1.275)  # the code's beta'
    pieces, first = time_pieces("s*")
    assert first == 0 and pieces == [(1.5, 1.3), (1.5, pytest.approx(-0.2))]


def test_selection_on_hand_built_loras():
    """p1: subject concentrated, style spread -> subject always; p2 the reverse -> style always;
    p3: rho = 2 / 1.5 = 4/3 -> subject until tau = (4/3 - 0.5) / 1.5 = 0.556, then style."""
    table = klora_table(hand_built())
    assert table.gamma == pytest.approx(1.0) and table.k == [1, 1, 1]
    torch.testing.assert_close(table.rho, torch.tensor([8.0, 1 / 8, 4 / 3], dtype=torch.float64))
    assert table.switch_times[2, 0].item() == pytest.approx((4 / 3 - 0.5) / 1.5)
    seq = [table.subject_mask(i / 10).tolist() for i in range(10)]
    assert [s[0] for s in seq] == [True] * 10
    assert [s[1] for s in seq] == [False] * 10
    assert [s[2] for s in seq] == [True] * 6 + [False] * 4
    # s*: 1.3 -> 1.5 over tau < 0.133 (style boosted at the start), wraps to ~0, then 1.5 tau - 0.2
    star = klora_table(hand_built(), pattern="s*")
    assert [star.subject_mask(i / 10)[2].item() for i in range(10)] == [True, False] + [True] * 8
    torch.testing.assert_close(star.switch_times[2], torch.tensor([(4 / 3 - 1.3) / 1.5, (4 / 3 + 0.2) / 1.5], dtype=torch.float64))


def test_alpha_over_rank_is_applied():
    """Subject p3 with alpha = 2 at rank 1: its delta doubles (top-1 4, L1 16), gamma = 32 / 24, and
    rho_p3 = 4 / (4/3 * 1.5) = 2 -> switch at tau = 1 (subject throughout). Ignoring alpha (the reference code)
    would give rho 4/3 and a switch at 0.556."""
    table = klora_table(hand_built(subject_alpha_p3=2.0))
    assert table.gamma == pytest.approx(32 / 24)
    assert table.rho[2].item() == pytest.approx(2.0)
    assert table.switch_times[2, 0].item() == pytest.approx(1.0)


def test_one_alpha_per_file_changes_no_decision():
    """alpha/rank the same on every layer of a file scales S_c (or S_s) and gamma by the same factor: rho and every
    switch time stay as without it — the reference's unscaled comparison decides the same (docs/methods/klora.md#reference-code)."""
    plain = klora_table(hand_built())
    for subject_alpha in (0.25, 3.0):
        layers = {p: ([LoRALayer(l.down, l.up, subject_alpha) for l in c], s) for p, (c, s) in hand_built().items()}
        for gamma in ("paper", "code"):
            scaled = klora_table(layers, gamma=gamma)
            torch.testing.assert_close(scaled.rho, klora_table(hand_built(), gamma=gamma).rho)
            torch.testing.assert_close(scaled.switch_times, klora_table(hand_built(), gamma=gamma).switch_times)
        assert scaled.gamma == pytest.approx(plain.gamma * subject_alpha)


def test_top_k_is_rank_product():
    g = torch.Generator().manual_seed(0)
    c = LoRALayer(torch.randn(3, 16, generator=g), torch.randn(16, 3, generator=g), 3.0)
    s = LoRALayer(torch.randn(5, 16, generator=g), torch.randn(16, 5, generator=g), 5.0)
    table = klora_table({"p": ([c], [s])})
    assert table.k == [15]
    expected = topk_abs_sum(c.delta(), 15) / topk_abs_sum(s.delta(), 15) / (c.delta().abs().sum() / s.delta().abs().sum())
    assert table.rho[0].item() == pytest.approx(float(expected), rel=1e-5)


# --- on the tiny pipeline ----------------------------------------------------------------------------------
@pytest.fixture
def pair(tiny_sd, tmp_path):
    """A subject (character) and a style LoRA with different alpha/rank, UNet only; loaded style first."""
    from loraloom.pipelines.tiny import write_random_lora

    style = write_random_lora(tiny_sd.pipe, tmp_path / "sty.safetensors", seed=2, rank=4, alpha=8.0, category="style",
                              text_encoder=False, std=0.15)
    subj = write_random_lora(tiny_sd.pipe, tmp_path / "subj.safetensors", seed=1, rank=2, alpha=1.0, category="character",
                             text_encoder=False, std=0.15)
    tiny_sd.load_lora(style, "sty")
    tiny_sd.load_lora(subj, "subj")
    return tiny_sd


def _record_gates(monkeypatch):
    """Record the layer gates of every UNet call; the UNet itself is skipped (these tests are about the gates)."""
    seen = []

    def spy(self, latents, step, cond, routing, layer_gates=None, max_batch=None):
        seen.append((step.index, step.count, layer_gates))
        return torch.zeros_like(latents)

    monkeypatch.setattr(Run, "predict", spy)
    return seen


def brute_force_selection(cp, steps, pattern, gamma_mode="paper", **scale_kw):
    """Per step and layer, straight from the paper's rule with dense deltas recomputed every step (as the
    reference does, but with tau = i / N): subject iff S_c >= gamma * S_s * s(tau)."""
    subj, sty = cp.loras["subj"].layers["unet"], cp.loras["sty"].layers["unet"]
    paths = [p for p in subj if p in sty and is_attention_projection(p)]
    out = []
    for i in range(steps):
        tau = i / steps
        s = time_scale(tau, pattern, **scale_kw)
        sums, l1 = {}, ([], [])
        for p in paths:
            dc, ds = subj[p].delta(torch.float32), sty[p].delta(torch.float32)
            k = subj[p].rank * sty[p].rank
            sums[p] = (dc.abs().flatten().topk(k).values.sum().item(), ds.abs().flatten().topk(k).values.sum().item())
            l1[0].append(dc.abs().sum().item())
            l1[1].append(ds.abs().sum().item())
        gamma = balance_factor(*l1, gamma_mode)
        out.append({p: sums[p][0] >= gamma * sums[p][1] * s for p in paths})
    return out


@pytest.mark.parametrize("steps,pattern,gamma", [(7, "s", "paper"), (20, "s", "code"), (15, "s*", "paper")])
def test_gates_match_brute_force_every_step(pair, monkeypatch, steps, pattern, gamma):
    seen = _record_gates(monkeypatch)
    pair("a red star", loras=["sty", "subj"], method="klora", method_params={"time_pattern": pattern, "gamma": gamma},
         num_inference_steps=steps, scheduler="ddim", output_type="latent", progress_bar=False)
    expected = brute_force_selection(pair, steps, pattern, gamma)
    assert [s[:2] for s in seen] == [(i, steps) for i in range(steps)]
    for (_, _, gates), want in zip(seen, expected):
        got = {p: gates[p] == {"subj": 1.0, "sty": 0.0} for p in want}
        assert all(gates[p] in ({"subj": 1.0, "sty": 0.0}, {"subj": 0.0, "sty": 1.0}) for p in want)
        assert got == want
    flips = sum(a != b for prev, cur in zip(expected, expected[1:]) for a, b in zip(prev.values(), cur.values()))
    assert flips > 0  # the test exercises switching, not a constant selection
    assert len(expected[0]) == 12 * 4  # 6 transformer blocks x (attn1, attn2) x 4 projections in the tiny UNet


def test_step_count_and_scheduler_invariance(pair, monkeypatch):
    """The selection is a function of tau = i / N only: step i of 10 == step 2i of 20 == step 3i of 30, whatever
    the scheduler; and a second generation does not continue any clock (the reference's global counter)."""
    seen = _record_gates(monkeypatch)
    runs = {}
    for steps, sched in ((10, "ddim"), (20, "euler"), (30, "dpmsolver++"), (10, "ddim")):
        seen.clear()
        pair("a red star", loras=["subj", "sty"], method="klora", num_inference_steps=steps, scheduler=sched,
             output_type="latent", progress_bar=False)
        runs.setdefault(steps, []).append([g for _, _, g in seen])
    assert runs[10][0] == runs[10][1]
    for i in range(10):
        assert runs[10][0][i] == runs[20][0][2 * i] == runs[30][0][3 * i]


@pytest.mark.parametrize("beta,alone", [(-100.0, "subj"), (100.0, "sty")])
def test_extreme_time_scale_equals_merge_of_one_lora(pair, beta, alone):
    """s(tau) always below every rho -> every layer uses the subject: K-LoRA == Merge of the subject alone."""
    kw = dict(num_inference_steps=3, seed=3, scheduler="ddim", output_type="latent", progress_bar=False, height=32, width=32)
    got = pair("a red star", loras=[("subj", 0.9), ("sty", 0.7)], method="klora", method_params={"beta": beta}, **kw).latents
    weight = {"subj": 0.9, "sty": 0.7}[alone]
    want = pair("a red star", loras=[(alone, weight)], method="merge", method_params={"lora_scale": 1.0, "fuse": False}, **kw).latents
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_roles_from_category_not_order(pair):
    kw = dict(output_type="latent", progress_bar=False, height=32, width=32)
    a = pair("x", loras=["sty", "subj"], method="klora", num_inference_steps=4, **kw)
    assert a.extras["klora"]["subject"] == ["subj"] and a.extras["klora"]["style"] == ["sty"]
    b = pair("x", loras=["sty", "subj"], method="klora", method_params={"roles": "given"}, num_inference_steps=1, **kw)
    assert b.extras["klora"]["subject"] == ["sty"]
    assert a.extras["klora"]["subject_layers_per_step"][0] > a.extras["klora"]["subject_layers_per_step"][-1]


def test_lora_count_errors_and_groups(pair, tmp_path):
    from loraloom.pipelines.tiny import write_random_lora

    kw = dict(num_inference_steps=1, output_type="latent", progress_bar=False, height=32, width=32)
    with pytest.raises(LoraloomError, match="exactly two LoRAs"):
        pair("x", loras=["subj"], method="klora", **kw)
    pair.load_lora(write_random_lora(pair.pipe, tmp_path / "bg.safetensors", seed=5, category="background", text_encoder=False), "bg")
    with pytest.raises(LoraloomError, match="exactly two LoRAs"):
        pair("x", loras=["subj", "sty", "bg"], method="klora", **kw)
    out = pair("x", loras=["subj", "sty", "bg"], method="klora", method_params={"n_loras": "groups"}, **kw)
    assert out.extras["klora"]["subject"] == ["subj"] and out.extras["klora"]["style"] == ["sty", "bg"]


def test_other_layers_and_scope(tiny_sd, tmp_path):
    """A LoRA adapting a feed-forward layer too: outside the attention scope it is merged (default) or dropped."""
    from loraloom.pipelines.tiny import write_random_lora

    targets = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.2")
    for name, cat, seed in (("subj", "character", 1), ("sty", "style", 2)):
        tiny_sd.load_lora(write_random_lora(tiny_sd.pipe, tmp_path / f"{name}.safetensors", seed=seed, category=cat,
                                            text_encoder=False, targets=targets), name)
    run = tiny_sd.run(["subj", "sty"], "x", "", 5.0, 64, 64)
    m = make_method("klora")
    m.prepare(run)
    ff = [p for p in tiny_sd.routers["unet"].layers if p.endswith("ff.net.2")]
    assert ff and not set(ff) & set(m.table.paths) and all(p not in m.layer_gates(0.0) for p in ff)
    m = make_method("klora", {"other_layers": "off"})
    m.prepare(run)
    assert all(m.layer_gates(0.0)[p] == {"subj": 0.0, "sty": 0.0} for p in ff)
    m = make_method("klora", {"scope": "all"})
    m.prepare(run)
    assert set(ff) <= set(m.table.paths)


def reference_gamma(content_file, style_file, mode: str) -> float:
    """The reference's get_ratio_between_content_and_style (utils.py), transcribed: every non-alpha key of each file
    in key order, consecutive (down, up) pairs, ratio of the L1 norms of up @ down (unscaled), content key i against
    style key i; 'code' = its mean of the ratios after dropping those >= 3x the mean, 'paper' = sum over sum of the
    same pairs (eq. 9)."""
    from safetensors.torch import load_file

    content, style = load_file(str(content_file)), load_file(str(style_file))
    names_c = sorted(k for k in content if "alpha" not in k)
    names_s = sorted(k for k in style if "alpha" not in k)
    assert len(names_c) == len(names_s)
    l1_c, l1_s = [], []
    for i in range(0, len(names_c), 2):  # PEFT layout: lora_A (down) sorts before lora_B (up)
        l1_c.append(float((content[names_c[i + 1]] @ content[names_c[i]]).abs().sum()))
        l1_s.append(float((style[names_s[i + 1]] @ style[names_s[i]]).abs().sum()))
    if mode == "paper":
        return sum(l1_c) / sum(l1_s)
    ratios = [c / s for c, s in zip(l1_c, l1_s)]
    mean = sum(ratios) / len(ratios)
    kept = [r for r in ratios if r < 3 * mean]
    return sum(kept) / len(kept)


def test_gamma_over_the_reference_key_set(tiny_sd, tmp_path):
    """Default gamma_layers='file': every key pair of the two files — text encoder and the feed-forward layer
    included — as the reference; our deltas carry alpha/rank (subject 1/2, style 8/4), so gamma is the reference's
    times (1/2) / 2. 'selected': the attention projections K-LoRA selects in only (the subject's text-encoder part is
    made 3x stronger so that the two sets give clearly different gammas)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from loraloom.pipelines.tiny import write_random_lora

    targets = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.2")
    files = {}
    for name, cat, seed, rank, alpha in (("subj", "character", 1, 2, 1.0), ("sty", "style", 2, 4, 8.0)):
        files[name] = write_random_lora(tiny_sd.pipe, tmp_path / f"{name}.safetensors", seed=seed, rank=rank, alpha=alpha,
                                        category=cat, targets=targets, std=0.15)
    with safe_open(str(files["subj"]), "pt") as f:  # the subject's text-encoder part 3x as strong
        meta, sd = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    assert any(k.startswith("text_encoder.") for k in sd) and any(".ff.net.2." in k for k in sd)
    save_file({k: v * 3 if k.startswith("text_encoder.") and "lora_B" in k else v for k, v in sd.items()},
              str(files["subj"]), metadata=meta)
    for name, path in files.items():
        tiny_sd.load_lora(path, name)
    run = tiny_sd.run(["subj", "sty"], "x", "", 5.0, 64, 64)
    for mode in ("paper", "code"):
        m = make_method("klora", {"gamma": mode})
        m.prepare(run)
        want = reference_gamma(files["subj"], files["sty"], mode) * (1.0 / 2) / (8.0 / 4)
        assert m.table.gamma == pytest.approx(want, rel=1e-6)
        n_keys = len(tiny_sd.loras["subj"].layers["unet"]) + len(tiny_sd.loras["subj"].layers["text_encoder"])
        assert m.extras["klora"]["gamma_layers"] == n_keys > len(m.table.paths)
        selected = make_method("klora", {"gamma": mode, "gamma_layers": "selected"})
        selected.prepare(run)
        subj, sty = tiny_sd.loras["subj"].layers["unet"], tiny_sd.loras["sty"].layers["unet"]
        l1 = [[float(side[p].delta().abs().sum()) for p in selected.table.paths] for side in (subj, sty)]
        assert selected.table.gamma == pytest.approx(balance_factor(*l1, mode), rel=1e-6)
        assert selected.table.gamma < m.table.gamma / 1.05, (selected.table.gamma, m.table.gamma)


def _active(cp, name, weight=1.0):
    from loraloom.composition.methods import ActiveLoRA

    return ActiveLoRA(name, weight, cp.loras[name])
