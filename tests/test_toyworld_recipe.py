"""Recipe overrides from the command line (`--set key=value`) are parsed as each field's type."""

from __future__ import annotations

import json

import pytest

from loraloom.evaluation.toyworld.recipe import Recipe


def test_settings_parse_as_the_field_type_and_booleans_are_not_truthy_strings():
    r = Recipe().with_settings([("lora_text_encoder", "false"), ("lora_steps", "400"), ("lora_lr", "1e-3"),
                                ("lora_targets", "to_q, to_k"), ("lora_prior_kind", "random")])
    assert r.lora_text_encoder is False  # bool("false") would be True
    assert (r.lora_steps, r.lora_lr, r.lora_targets, r.lora_prior_kind) == (400, 1e-3, ("to_q", "to_k"), "random")
    assert Recipe().with_settings([("lora_text_encoder", "on")]).lora_text_encoder is True
    assert Recipe() == Recipe().with_settings([])


def test_bad_settings_are_refused_by_name():
    with pytest.raises(KeyError, match="no 'lora_stepz'"):
        Recipe().with_settings([("lora_stepz", "1")])
    with pytest.raises(ValueError, match="lora_text_encoder"):
        Recipe().with_settings([("lora_text_encoder", "maybe")])
    with pytest.raises(ValueError):
        Recipe().with_settings([("lora_steps", "many")])


def test_default_lora_recipe_binds_the_trigger():
    r = Recipe()
    assert r.lora_text_encoder and r.lora_prior_kind == "paired" and r.lora_prior == 0.5


def test_per_lora_overrides_apply_to_that_lora_only_and_survive_the_json_round_trip():
    r = Recipe(lora_overrides={"style_2": {"lora_steps": 900, "lora_targets": ["to_q", "conv1"]}})
    s2 = r.for_lora("style_2")
    assert (s2.lora_steps, s2.lora_targets) == (900, ("to_q", "conv1"))  # lists (from JSON) become tuples
    assert r.for_lora("style_1") == r
    assert Recipe.from_dict(r.to_dict()).for_lora("style_2") == s2
    with pytest.raises(KeyError, match="vae_steps"):
        Recipe(lora_overrides={"style_2": {"vae_steps": 1}}).for_lora("style_2")
    # the command line can only empty them (the hypernetwork's training LoRAs use the shared settings)
    assert Recipe().with_settings([("lora_overrides", "none")]).lora_overrides == {}
    with pytest.raises(ValueError, match="lora_overrides"):
        Recipe().with_settings([("lora_overrides", "style_2")])


def test_shipped_overrides_name_real_loras():
    from loraloom.evaluation.toyworld import scenes as S

    r = Recipe()
    assert set(r.lora_overrides) <= set(S.LORA_BY_ID)
    assert all(r.for_lora(i) != r for i in r.lora_overrides)


def test_a_resumed_run_sees_no_change_in_the_saved_recipe_but_names_a_real_one():
    saved = json.loads(json.dumps(Recipe().to_dict()))  # what run.py writes to <work>/recipe.json
    assert Recipe().changed_from(saved) == []  # nested override tuples equal their saved lists
    assert Recipe(lora_steps=700).changed_from(saved) == ["lora_steps"]
    assert Recipe(lora_overrides={}).changed_from(saved) == ["lora_overrides"]
