"""Recipe overrides from the command line (`--set key=value`) are parsed as each field's type."""

from __future__ import annotations

import pytest

from evaluation.toyworld.recipe import Recipe


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
