"""CLoRA: InfoNCE and masks by hand, token binding, the update schedule, updated-vs-stale predictions, a whole run."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from loraloom.composition.attention_masks import (
    binary_token_mask,
    branch_masks,
    fuse_predictions,
    info_nce_loss,
    minmax_normalise,
)
from loraloom.composition.methods import Step, make_method
from loraloom.composition.methods.guidance import classifier_free_guidance

pytestmark = pytest.mark.usefixtures("one_thread")


# --- pure math ---------------------------------------------------------------------------------------------------
def test_info_nce_matches_a_hand_computation():
    emb = torch.tensor([[1.0, 0.0, 0.2], [0.9, 0.1, 0.0], [0.0, 1.0, 0.3], [0.1, 0.8, 0.9], [0.5, 0.5, 0.0]])
    labels = [0, 0, 1, 1, 0]
    tau = 0.5
    cos = lambda a, b: float(F.cosine_similarity(emb[a], emb[b], dim=0))  # noqa: E731
    losses = []
    for a in range(5):
        for p in range(5):
            if a == p or labels[a] != labels[p]:
                continue
            num = math.exp(cos(a, p) / tau)
            den = num + sum(math.exp(cos(a, n) / tau) for n in range(5) if labels[n] != labels[a])
            losses.append(-math.log(num / den))
    got = info_nce_loss(emb, labels, tau)
    assert got.item() == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    # separating the concepts lowers the loss
    apart = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 1.0, 0], [1.0, 0, 0]])
    assert info_nce_loss(apart, labels, tau) < got
    assert info_nce_loss(emb[:2], [0, 1], tau).item() == 0.0  # no positive pair


def test_minmax_and_threshold_masks_by_hand():
    m = torch.tensor([[2.0, 4.0, 6.0], [3.0, 3.0, 3.0]])
    torch.testing.assert_close(minmax_normalise(m), torch.tensor([[0.0, 0.5, 1.0], [0.0, 0.0, 0.0]]))
    maps = torch.zeros(2, 2, 2)  # (h, w, K)
    maps[..., 0] = torch.tensor([[1.0, 0.2], [0.35, 0.0]])  # > 0.3 * 1.0 at (0,0), (1,0)
    maps[..., 1] = torch.tensor([[0.0, 0.0], [0.0, 2.0]])  # > 0.6 at (1,1)
    assert binary_token_mask(maps, 0.3).tolist() == [[True, False], [True, True]]
    assert binary_token_mask(maps[..., :1], 0.4).tolist() == [[True, False], [False, False]]


def test_branch_masks_background_fill_and_fusion_by_hand():
    base = torch.zeros(2, 2, 0)
    a = torch.tensor([[1.0, 0.0], [0.0, 0.0]])[..., None]  # concept a: top-left
    b = torch.tensor([[1.0, 1.0], [0.0, 0.0]])[..., None]  # concept b: top row (overlaps a)
    masks = branch_masks([base, a, b], threshold=0.3)
    assert masks.tolist() == [[[False, False], [True, True]], [[True, False], [False, False]], [[True, True], [False, False]]]
    eps = torch.stack([torch.full((1, 1, 4, 4), v) for v in (10.0, 1.0, 3.0)])  # (3 branches, B, C, H, W)
    fused = fuse_predictions(eps, masks)[0, 0]  # masks are nearest-upsampled 2x2 -> 4x4
    expected = torch.tensor([[2.0, 2.0, 3.0, 3.0], [2.0, 2.0, 3.0, 3.0], [10.0] * 4, [10.0] * 4])  # overlap: mean(1, 3)
    torch.testing.assert_close(fused, expected)


# --- the method on the tiny model ---------------------------------------------------------------------------------
@pytest.fixture
def loaded(tiny_sd, lora_files):
    for name, path in lora_files.items():
        tiny_sd.load_lora(path, name)
    return tiny_sd


def _run(cp, names, prompt, steps=4):
    return cp.run(names, prompt, "ugly", 5.0, 32, 32, scheduler="ddim", num_inference_steps=steps)


def test_branches_tokens_and_schedule(loaded):
    """char (ohwx) and bg (forest) get branches bound to their trigger words; the style LoRA is global."""
    run = _run(loaded, ["char", "style", "bg"], "ohwx in forest, inkwash")
    m = make_method("clora")
    m.prepare(run)
    assert [b.name for b in m.branches] == [None, "char", "bg"]
    assert all(b.gates["style"] == 1.0 for b in m.branches) and "char" not in m.branches[0].gates
    ohwx, forest = [1, 2, 3, 4], [7, 8, 9, 10, 11, 12]  # byte-level tokenizer: one token per character
    assert m.positions == [[ohwx, forest]] * 3
    assert m.branch_tokens.tolist() == [ohwx + forest] * 3
    assert len(m.embedding_index) == 30 and {g for *_, g in m.embedding_index} == {0, 1}
    # paper schedule at T = 50: updates on steps 0..24, 20 extra iterations at steps 0, 10, 20
    its = [m.iterations(Step(i, 50, torch.tensor(0))) for i in range(50)]
    assert its[0] == its[10] == its[20] == 21 and its[1] == its[24] == 1 and its[25] == 0 and sum(its) == 25 + 60
    # custom branch prompts and concept words
    m = make_method("clora", {"base_prompt": "a dog and a cat", "prompts": ["a ohwx dog and a cat", "a dog and a forest cat"],
                              "concepts": ["ohwx, dog", "cat"]})
    m.prepare(run)
    assert [b.prompt for b in m.branches] == ["a dog and a cat", "a ohwx dog and a cat", "a dog and a forest cat"]
    assert m.positions[1][0] == [2, 3, 4, 5, 6, 7, 8] and m.positions[0][0] == [2, 3, 4]
    with pytest.raises(ValueError, match="concept words of LoRA 'bg'"):
        make_method("clora", {"prompts": ["ohwx", "ohwx"]}).prepare(run)


@pytest.fixture
def cat_dog(tiny_sd, tmp_path):
    """The reference notebook's setup: a cat LoRA and a dog LoRA both trained on the trigger 's' (the notebook's
    'sks'). With the tiny byte-level tokenizer each one-letter word is one token, so 'a s c n a d' ('a sks cat and a
    dog') puts s, c at positions 2, 3 and d at 6 (BOS = 0), the notebook's cat [2, 3] / dog [6] layout."""
    from loraloom.pipelines.tiny import write_random_lora

    for name, seed in (("cat", 1), ("dog", 2)):
        tiny_sd.load_lora(write_random_lora(tiny_sd.pipe, tmp_path / f"{name}.safetensors", seed=seed, triggers=("s",),
                                            category="character", std=0.15), name)
    return tiny_sd


NOTEBOOK = {"base_prompt": "a c n a d", "prompts": ["a s c n a d", "a c n a s d"]}  # a cat and a dog / a sks cat and a dog / a cat and a sks dog


def _labels(m):
    """(branch, token position, concept) of every embedding of the loss."""
    return [(j, m.columns[j][c], g) for j, c, g in m.embedding_index]


def test_shared_trigger_is_labelled_by_its_own_branch(cat_dog):
    """Both LoRAs' concept words contain 's': in the cat branch it is the cat, in the dog branch the dog, in the base
    branch nobody. (Matching every concept's words in every prompt labelled the cat branch's 's' dog as well.)"""
    run = _run(cat_dog, ["cat", "dog"], "a c n a d")
    m = make_method("clora", {**NOTEBOOK, "concepts": ["s, c", "s, d"]})
    m.prepare(run)
    assert m.positions == [[[2], [5]], [[2, 3], [6]], [[2], [5, 6]]]  # base, cat branch, dog branch
    assert _labels(m) == [(0, 2, 0), (0, 5, 1), (1, 2, 0), (1, 3, 0), (1, 6, 1), (2, 2, 0), (2, 5, 1), (2, 6, 1)]
    assert m.extras["concept_positions"] == {"cat": {"base": [2], "cat": [2, 3], "dog": [2]},
                                             "dog": {"base": [5], "cat": [6], "dog": [5, 6]}}
    # per branch, as the reference's token lists (positions) or as words: the same labels
    per_branch = [{"base": [2], "cat": [2, 3], "dog": [2]}, {"base": [5], "cat": [6], "dog": [5, 6]}]
    words = [{"base": "c", "cat": "s, c", "dog": ["c"]}, {"base": "d", "cat": "d", "dog": "s, d"}]
    for concepts in (per_branch, words):
        other = make_method("clora", {**NOTEBOOK, "concepts": concepts})
        other.prepare(run)
        assert other.positions == m.positions and _labels(other) == _labels(m)
    # only the branches named: the cat concept given in its own branch alone; its tokens win over the dog's 's'
    only = make_method("clora", {**NOTEBOOK, "concepts": [{"cat": [2, 3]}, "s, d"]})
    only.prepare(run)
    assert only.positions == [[[], [5]], [[2, 3], [6]], [[], [5, 6]]]
    # the triggers alone (the default): 's' names the concept of each branch's own LoRA only
    trig = make_method("clora", NOTEBOOK)
    trig.prepare(run)
    assert trig.positions == [[[], []], [[2], []], [[], [5]]]
    # one step of the update phase runs with these labels
    step = Step(0, 4, run.scheduler.timesteps[0])
    m.params.refine_iterations = 0
    m.denoise(run, torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)), step)
    assert len(m.extras["loss"]) == 1 and math.isfinite(m.extras["loss"][0][1])


def test_concept_tokens_are_checked(cat_dog):
    run = _run(cat_dog, ["cat", "dog"], "a c n a d")

    def prepare(concepts):
        make_method("clora", {**NOTEBOOK, "concepts": concepts}).prepare(run)

    with pytest.raises(ValueError, match=r"position 3 of branch 'cat'.*given to both 'cat' and 'dog'"):
        prepare([{"cat": [2, 3]}, {"cat": [3, 6], "dog": [6]}])
    with pytest.raises(ValueError, match=r"unknown branch\(es\) \['cow'\]"):
        prepare([{"cat": [2], "cow": [1]}, "d"])
    with pytest.raises(ValueError, match="BOS = 0"):
        prepare([{"cat": [0, 2]}, "d"])
    with pytest.raises(ValueError, match=r"past the text encoder's 77 tokens"):
        prepare([{"cat": [2, 80]}, "d"])
    with pytest.raises(ValueError, match="concept words of LoRA 'dog'"):
        prepare(["c", {"cat": [6]}])


def test_fused_noise_comes_from_the_updated_latents(loaded):
    """Default: the fused prediction is that of the latents after the gradient step (the scheduler steps from
    those); reference_mode fuses the predictions of the latents before the update (stale)."""
    lat = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    for ref in (False, True):
        run = _run(loaded, ["char", "bg"], "ohwx in forest")
        m = make_method("clora", {"refine_iterations": 0, "step_size": 200.0, "reference_mode": ref})
        m.prepare(run)
        step = Step(0, 4, run.scheduler.timesteps[0])
        eps = m.denoise(run, lat, step)
        z = run.new_latents
        assert z is not None and (z - lat).abs().max() > 1e-4  # the latents moved
        masks = m.extras["masks"][-1]

        def fused(x):
            e = run.predict(x.repeat(6, 1, 1, 1), step, m.cond_all, m.routing_all).reshape(3, 2, *lat.shape)
            return classifier_free_guidance(fuse_predictions(e[:, 0], masks), fuse_predictions(e[:, 1], masks), 5.0)

        with torch.no_grad():
            at_new, at_old = fused(z), fused(lat)
        assert (at_new - at_old).abs().max() > 1e-4
        torch.testing.assert_close(eps, at_old if ref else at_new, atol=1e-5, rtol=1e-4)


def test_masks_come_from_the_concept_words_maps(loaded):
    """Each concept branch's mask is thresholded from its own words' maps at the updated latents; the base fills
    the rest."""
    run = _run(loaded, ["char", "bg"], "ohwx in forest")
    m = make_method("clora", {"update_fraction": 0.0, "mask_threshold": 0.5})
    m.prepare(run)
    lat = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    step = Step(2, 4, run.scheduler.timesteps[2])
    m.denoise(run, lat, step)
    masks = m.extras["masks"][-1]
    assert masks.shape == (3, 8, 8)
    with torch.no_grad():
        _, maps = run.predict_with_attention(lat.repeat(3, 1, 1, 1), step, m.cond_pos, m.routing_pos, m.branch_tokens)
    own = [maps[1][..., [m.columns[1].index(i) for i in m.positions[1][0]]],
           maps[2][..., [m.columns[2].index(i) for i in m.positions[2][1]]]]
    for j in (1, 2):
        torch.testing.assert_close(masks[j], binary_token_mask(own[j - 1], 0.5))
    assert torch.equal(masks[0], ~(masks[1] | masks[2]))


def test_whole_generation_saves_masks_and_differs_from_no_update(loaded, tmp_path):
    kw = dict(loras=["char", "bg"], num_inference_steps=4, seed=1, output_type="latent", progress_bar=False,
              scheduler="ddim", height=32, width=32)
    params = {"refine_iterations": 1, "mask_dir": str(tmp_path / "masks"), "refine_at": [0.0]}
    out = loaded("ohwx in forest", method="clora", method_params=params, **kw)
    pngs = sorted(p.name for p in (tmp_path / "masks").iterdir())
    assert pngs == [f"clora_masks_step{i:03d}.png" for i in range(4)]
    from PIL import Image

    assert Image.open(tmp_path / "masks" / pngs[0]).size == (3 * 8 * 8 + 2 * 4, 8 * 8)
    # steps 0 (1 + 1 refinement) and 1 update: 3 grad passes (3 rows, stopped early) + 4 fused passes (6 rows)
    assert out.unet_calls == 7 and out.unet_rows == 3 * 3 + 4 * 6
    assert len(out.extras["masks"]) == 4 and len(out.extras["loss"]) == 3
    still = loaded("ohwx in forest", method="clora", method_params={**params, "step_size": 0.0}, **kw)
    assert (out.latents - still.latents).abs().max() > 1e-4
    again = loaded("ohwx in forest", method="clora", method_params=params, **kw)
    assert torch.equal(out.latents, again.latents)

