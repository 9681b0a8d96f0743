"""The probes of `loraloom toyworld check`'s composition-regime lines: what each asks for, what it expects, and that
it is judged as the line says (no model is run here: the checker's predictions are written by hand)."""

from __future__ import annotations

import collections

import pytest

from loraloom.evaluation.toyworld import quality as Q
from loraloom.evaluation.toyworld import scenes as S


def words(prompt: str) -> list[str]:
    return prompt.replace(",", " ").split()


def all_probes() -> list[Q.Probe]:
    out = Q.base_probes() + Q.foreign_base_probes()
    for spec in S.LORAS:
        out += Q.lora_probes(spec, 48) + Q.leak_probes(spec, 48) + Q.other_trigger_probes(spec) + Q.order_probes(spec)
        if spec.category == "character":
            out += Q.class_probes(spec)
    return out + Q.merge_probes(2, 4) + Q.merge_probes(4, 2, 48)


def test_every_check_image_has_its_own_seed_and_every_prompt_fits_the_text_encoder(tmp_path):
    from loraloom.evaluation.toyworld.vocab import write_tokenizer

    probes = all_probes()
    seeds = collections.Counter(p.seed for p in probes)
    assert max(seeds.values()) == 1
    tok = write_tokenizer(tmp_path, S.vocabulary_words())
    longest = max(len(tok(p.prompt).input_ids) for p in probes)
    assert longest <= tok.model_max_length, longest  # nothing is cut off


def test_class_probes_are_benchmark_prompts_without_any_lora_judged_by_kind():
    from loraloom.evaluation.toyworld.manifest import benchmark_sets

    prompts = {s["prompt"]: s for s in benchmark_sets()}
    for spec in [l for l in S.LORAS if l.category == "character"]:
        probes = Q.class_probes(spec)
        assert len(probes) == 24 and {p.loras for p in probes} == {()}
        assert {p.kind for p in probes} == {S.CHARACTER_KIND[spec.value]}
        assert all(p.prompt in prompts and spec.id in prompts[p.prompt]["loras"] for p in probes)
        assert len({prompts[p.prompt]["id"][:2] for p in probes}) == 4  # sets of every size
    probe = Q.class_probes(S.LORA_BY_ID["character_2"])[0]
    plain = {"shape": "cross", "colour": "blue", "background": "white", "clothing": "none", "style": "plain", "object": "none"}
    assert Q.judge([probe] * 3, [plain, {**plain, "shape": "crux"}, {**plain, "shape": "square"}]) == [True, True, False]


def test_other_trigger_probes_add_one_to_three_absent_loras_and_expect_the_rest_unchanged():
    for spec in S.LORAS:
        probes = Q.other_trigger_probes(spec)
        counts = collections.Counter()
        for p in probes:
            assert p.loras == (spec.id,) and p.expect[spec.attribute] == spec.value
            foreign = [l for l in S.LORAS if l.id != spec.id and l.trigger in words(p.prompt)]
            assert 1 <= len(foreign) <= 3 and len({l.category for l in foreign}) == len(foreign)
            assert spec.category not in {l.category for l in foreign}
            counts[len(foreign)] += 1
            for l in foreign:  # an absent LoRA's concept is not expected; a foreign character's kind is
                if l.category == "character":
                    assert p.expect["shape"] == S.CHARACTER_KIND[l.value] and l.phrase in p.prompt
                else:
                    assert p.expect[l.attribute] == S.ATTRIBUTES[l.attribute][0] if l.attribute != "background" else True
            if "background" in p.expect and spec.category != "background":
                assert f"{p.expect['background']} background" in p.prompt
            assert "colour" in p.expect and "style" in p.expect and "object" in p.expect
        assert set(counts) == {1, 2, 3}


def test_order_probes_put_the_lora_phrase_first_between_and_last():
    hat = Q.order_probes(S.LORA_BY_ID["clothing_1"])
    firsts = [p.prompt.split(", ").index("topha") for p in hat]
    assert collections.Counter(firsts) == {0: 8, 1: 8, 2: 8}
    assert all(p.expect == {"clothing": "hat"} and len(p.prompt.split(", ")) == 3 for p in hat)
    star = Q.order_probes(S.LORA_BY_ID["character_1"])
    places = collections.Counter(p.prompt.split(", ").index(next(x for x in p.prompt.split(", ") if "stellu star" in x))
                                 for p in star)
    assert places == {0: 12, 1: 12}
    assert star[1].prompt.startswith(("white background, a ", "black background, a "))


def test_foreign_base_probes_add_one_to_four_triggers_and_expect_the_plain_scene():
    probes = Q.foreign_base_probes()
    n_foreign = collections.Counter()
    for p in probes:
        assert p.loras == ()
        foreign = [l for l in S.LORAS if l.trigger in words(p.prompt)]
        n_foreign[len(foreign)] += 1
        assert p.expect["shape"] in S.BASE_SHAPES
        assert (p.expect["clothing"], p.expect["style"], p.expect["object"]) == ("none", "plain", "none")
        assert ("background" in p.expect) == all(l.category != "background" for l in foreign)
    assert set(n_foreign) == {1, 2, 3, 4}


@pytest.mark.parametrize("line", ["class_agreement_min", "lora_with_other_triggers_min", "prompt_order_min",
                                  "base_foreign_triggers"])
def test_the_check_prints_the_composition_regime_lines(line, monkeypatch, tmp_path):
    """`run_check` end to end with the generator and the checker replaced: an image "drawn" exactly as each probe
    expects passes every line; breaking one group's images moves only its own line."""
    import numpy as np

    from loraloom.evaluation.toyworld import checker as C
    from loraloom.evaluation.toyworld import trainers as T

    class Perfect:  # the checker's stand-in: the labels `generate` drew, in probe order
        labels: list[dict] = []

        def predict(self, images):
            assert len(images) == len(self.labels)
            return [dict(x) for x in self.labels]

    perfect = Perfect()
    broken = {"class_agreement_min": "class:character_2", "lora_with_other_triggers_min": "others:style_1",
              "prompt_order_min": "order:object_2", "base_foreign_triggers": "foreign"}[line]

    def generate(assets, probes, *a, **k):
        perfect.labels = []
        for i, p in enumerate(probes):
            labels = {"shape": p.kind or "circle", "colour": "red", "background": "white", "clothing": "none",
                      "style": "plain", "object": "none", **p.expect}
            for a, v in p.absent.items():
                if labels[a] == v:
                    labels[a] = S.ATTRIBUTES[a][0]
            if p.group == broken and i % 2 == 0:
                labels["shape"] = "square" if p.kind else labels["shape"]
                for a, v in p.expect.items():
                    labels[a] = next(x for x in S.ATTRIBUTES[a] if x != v)
            perfect.labels.append(labels)
        return np.zeros((len(probes), S.SIZE, S.SIZE, 3), np.uint8)

    monkeypatch.setattr(Q, "generate_probes", generate)
    monkeypatch.setattr(C.Checker, "load", staticmethod(lambda *_: perfect))
    monkeypatch.setattr(T, "checker_accuracy", lambda *_: {"shape": 1.0})
    lines = []
    result = Q.run_check(tmp_path, Q.CheckSettings(merge4_sets=4), progress=False, printer=lines.append)
    assert lines[-len(result):] == [f"{k} {v:.3f}" for k, v in result.items()]
    for key in ("class_agreement_min", "lora_with_other_triggers_min", "prompt_order_min", "base_foreign_triggers",
                "lora_alone_min", "lora_leak_max", "base_prompt_accuracy"):
        want = 0.5 if key == line else (0.0 if key == "lora_leak_max" else 1.0)
        assert result[key] == pytest.approx(want), key
