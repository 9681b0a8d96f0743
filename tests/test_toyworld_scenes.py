"""The toy-world scene generator: labels match the pixels, captions and vocabulary are what the models see."""

from __future__ import annotations

import numpy as np
import pytest

from loraloom.evaluation.toyworld import scenes as S
from loraloom.evaluation.toyworld.manifest import benchmark_sets, composition_sets


def px(img, x, y):
    return tuple(int(v) for v in img[int(y), int(x)])


def close(a, b, tol=6):
    return all(abs(int(u) - int(v)) <= tol for u, v in zip(a, b))


def test_plain_shape_colour_and_background_pixels():
    for colour in S.BASE_COLOURS:
        for bg in S.BASE_BACKGROUNDS:
            scene = S.Scene("square", colour, bg, cx=16, cy=17, r=7)
            img = S.render(scene)
            assert img.shape == (32, 32, 3) and img.dtype == np.uint8
            assert close(px(img, 16, 17), S.RGB[colour])
            assert close(px(img, 1, 1), S.RGB[bg]) and close(px(img, 30, 30), S.RGB[bg])


def test_each_shape_has_its_own_silhouette():
    masks = {s: S.shape_mask(s, 16, 17, 7) for s in S.ATTRIBUTES["shape"]}
    for a in masks:
        for b in masks:
            if a < b:
                inter = (masks[a] & masks[b]).sum()
                union = (masks[a] | masks[b]).sum()
                assert inter / union < 0.85, (a, b, inter / union)
    # a star's centre is filled but the gaps between its points are not
    star = S.render(S.Scene("star", "red", "white", cx=16, cy=17, r=8))
    assert close(px(star, 16, 17), S.RGB["red"])
    a = -np.pi / 2 + np.pi / 5  # direction of an inner vertex: between two points
    assert close(px(star, 16 + 0.85 * 8 * np.cos(a), 17.4 + 0.85 * 8 * np.sin(a)), S.RGB["white"])
    assert close(px(star, 16, 17.4 - 0.6 * 8), S.RGB["red"], 40)  # the top point
    cross = S.render(S.Scene("cross", "blue", "white", cx=16, cy=17, r=8))
    assert close(px(cross, 16 + 6, 17 - 6), S.RGB["white"])  # the corner between two arms
    assert close(px(cross, 16 + 6, 17), S.RGB["blue"])  # an arm


@pytest.mark.parametrize("bg", ["sunset", "checkerboard"])
def test_pattern_backgrounds(bg):
    img = S.render(S.Scene("circle", "red", bg, cx=16, cy=17, r=6, phase=0.0))
    if bg == "sunset":
        assert close(px(img, 1, 0), S.RGB["sunset_top"], 12)
        assert close(px(img, 1, 31), S.RGB["sunset_bottom"], 12)
    else:
        assert close(px(img, 3, 3), S.RGB["checker_dark"]) and close(px(img, 11, 3), S.RGB["checker_light"])


def test_clothing_style_and_objects_are_where_the_labels_say():
    base = S.Scene("circle", "blue", "white", cx=16, cy=18, r=7)
    hat = S.render(base.with_(clothing="hat"))
    assert close(px(hat, 16, 18 - 7 - 3), S.RGB["hat"])
    assert close(px(S.render(base), 16, 18 - 7 - 3), S.RGB["white"])
    halo = S.render(base.with_(clothing="halo"))
    assert close(px(halo, 16 + 1.25 * 7, 18), S.RGB["halo"], 40)
    striped = S.render(base.with_(style="striped"))
    inside = striped[14:22, 12:20].reshape(-1, 3)
    dark = np.round(np.array(S.RGB["blue"]) * S.DARK_SHADE)
    assert any(close(p, S.RGB["blue"]) for p in inside) and any(close(p, dark) for p in inside)
    shaded = S.render(base.with_(style="shaded"))
    assert close(px(shaded, 16 - 3, 18), S.RGB["blue"]) and close(px(shaded, 16 + 3, 18), dark)
    moon = S.render(base.with_(object="moon"))
    assert close(px(moon, 25, 6), S.RGB["moon"]) and close(px(S.render(base), 25, 6), S.RGB["white"])
    box = S.render(base.with_(object="box"))
    assert close(px(box, 5, 27), S.RGB["box"])


def test_base_sampling_never_shows_a_concept_and_lora_scenes_always_do():
    rng = np.random.default_rng(0)
    for _ in range(200):
        s = S.sample_scene(rng)
        assert s.shape in S.BASE_SHAPES and s.background in S.BASE_BACKGROUNDS
        assert (s.clothing, s.style, s.object) == ("none", "plain", "none")
        assert not any(l.trigger in S.caption(s).split() for l in S.LORAS)
    for spec in S.LORAS:
        s = S.lora_scene(rng, spec)
        assert getattr(s, spec.attribute) == spec.value
        assert spec.trigger in S.caption(s).replace(",", " ").split()


def test_paired_prior_scene_differs_only_in_the_concept_and_its_trigger():
    rng = np.random.default_rng(1)
    for spec in S.LORAS:
        s = S.lora_scene(rng, spec)
        p = S.without_concept(s, spec, rng)
        assert getattr(p, spec.attribute) in S.BASE_VALUES[spec.attribute]
        changed = {k for k, v in s.to_dict().items() if p.to_dict()[k] != v}
        assert changed == {spec.attribute}
        assert spec.trigger not in S.caption(p).replace(",", " ").split()


def test_captions_follow_the_composlora_order():
    s = S.Scene("star", "red", "sunset", clothing="hat", style="striped", object="moon")
    assert S.caption(s) == "a red stellu, topha, stripo, sunseta, moona"
    assert S.trigger_text(s) == "stellu, topha, stripo, sunseta, moona"
    assert S.caption(S.Scene("circle", "green", "black")) == "a green circle, black background"
    assert S.caption(S.Scene("circle", "green", "black"), background=False) == "a green circle"


def test_every_word_is_one_token(tmp_path):
    from loraloom.evaluation.toyworld.vocab import write_tokenizer

    words = S.vocabulary_words()
    tok = write_tokenizer(tmp_path, words)
    for w in words:
        assert len(tok.tokenize(w)) == 1, w
    ids = tok("a red stellu, topha, stripo, sunseta, moona").input_ids
    assert len(ids) == 11 + 2 <= tok.model_max_length


def test_naive_merge_chains_would_split_words_but_ours_do_not():
    from loraloom.evaluation.toyworld.vocab import bpe, build_bpe

    vocab, merges = build_bpe(["red", "green", "triangle", "yellow", "shado"])
    ranks = {tuple(m.split()): i for i, m in enumerate(merges)}
    for w in ["red", "green", "triangle", "yellow", "shado"]:
        assert bpe(w, ranks) == [w + "</w>"]
        assert w + "</w>" in vocab


def test_composlora_sets():
    sizes = {n: len(composition_sets(n)) for n in (2, 3, 4, 5)}
    assert sizes == {2: 24, 3: 72, 4: 96, 5: 48}
    order = {c: i for i, c in enumerate(S.CATEGORY_ORDER)}
    for n in (2, 3, 4, 5):
        for combo in composition_sets(n):
            cats = [l.category for l in combo]
            assert cats[0] == "character" and len(set(cats)) == n
            assert [order[c] for c in cats] == sorted(order[c] for c in cats)
    sets = benchmark_sets()
    assert sets[0]["id"] == "n2-000" and sets[0]["loras"] == ["character_1", "clothing_1"]
    assert sets[0]["prompt"] == "a red stellu, topha" and sets[0]["scoring_text"] == "stellu, topha"
    assert sets[0]["expected"] == {"colour": "red", "shape": "star", "clothing": "hat"}


def test_sampler_defaults_come_from_the_worlds_manifest(tmp_path):
    from loraloom.evaluation.toyworld.manifest import sampler_defaults, write_manifest
    from loraloom.evaluation.toyworld.recipe import Recipe

    r = Recipe()
    assert sampler_defaults(tmp_path) == {"steps": r.sample_steps, "guidance_scale": r.guidance_scale}  # no manifest
    write_manifest(tmp_path / "benchmark.yaml", Recipe(sample_steps=30, guidance_scale=5.5))
    assert sampler_defaults(tmp_path) == {"steps": 30, "guidance_scale": 5.5}
    assert sampler_defaults(tmp_path, guidance_scale=3) == {"steps": 30, "guidance_scale": 3.0}  # given values win
    assert sampler_defaults(tmp_path, 12, None) == {"steps": 12, "guidance_scale": 5.5}


def test_scene_pool_bar_follows_no_progress(capsys):
    from loraloom.evaluation.toyworld.trainers import scene_pool

    scene_pool(3, 0, progress=False)
    assert "render scenes" not in capsys.readouterr().err  # `toyworld train --no-progress` printed this bar
    scene_pool(3, 0, progress=True)
    assert "render scenes" in capsys.readouterr().err


def test_train_manifest_stage_alone_and_no_progress_quiets_the_libraries(tmp_path, library_bars_restored):
    import os

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from loraloom.evaluation.toyworld.manifest import sampler_defaults
    from loraloom.evaluation.toyworld.recipe import Recipe
    from loraloom.evaluation.toyworld.run import train

    train(["manifest"], work=tmp_path / "work", assets=tmp_path / "assets", recipe=Recipe(guidance_scale=3.5),
          progress=False)
    assert os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") == "1"  # the stage workers spawned later inherit it
    assert not transformers_logging.is_progress_bar_enabled() and not diffusers_logging.is_progress_bar_enabled()
    assert sampler_defaults(tmp_path / "assets")["guidance_scale"] == 3.5
    assert (tmp_path / "work" / "tokenizer").is_dir()
