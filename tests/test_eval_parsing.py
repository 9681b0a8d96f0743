"""Parsing judges' answers: JSON, then ComposLoRA's strict lines, else a failure. Never a guessed score."""

import pytest

from loraloom.evaluation.errors import EvaluationError
from loraloom.evaluation.parsing import parse_pairwise, parse_yes_no
from loraloom.evaluation.prompts import load_template

BOTH = {1: {"composition": 7.5, "image_quality": 6.0}, 2: {"composition": 5.0, "image_quality": 8.0}}


@pytest.mark.parametrize("text", [
    '{"image_1": {"composition_quality": 7.5, "image_quality": 6}, "image_2": {"composition_quality": 5, "image_quality": 8}}',
    'Thinking…\n```json\n{"image_1": {"explanation": "ok", "composition_quality": "7.5/10", "image_quality": "6"},'
    ' "image_2": {"explanation": "meh", "composition_quality": 5.0, "image_quality": 8}}\n```',
    'Sure! {"Image 1": {"Composition Quality": 7.5, "Image Quality": 6}, "Image 2": {"Composition Quality": 5, "Image Quality": 8}} Done.',
    'Criteria: {composition, quality}. Result: {"image_1": {"composition_quality": 7.5, "image_quality": 6}, '
    '"image_2": {"composition_quality": 5, "image_quality": 8}} (scores out of {10}).',
])
def test_pairwise_json(text):
    got = parse_pairwise(text)
    assert got.ok and got.method == "json" and got.value == BOTH


def test_pairwise_composlora_lines():
    text = ("Image 1 shows both elements …\nScores:\nImage 1: Composition Quality: 7.5/10, Image Quality: 6/10\n"
            "image 2: composition quality: 5/10, image quality: 8/10\n")
    got = parse_pairwise(text)
    assert got.ok and got.method == "pattern" and got.value == BOTH


@pytest.mark.parametrize("text, why", [
    ("", "empty"),
    ("Image 1 is better than image 2.", "no JSON scores"),
    ('{"image_1": {"composition_quality": 7}, "image_2": {"composition_quality": 5, "image_quality": 8}}', "no image_quality"),
    ('{"image_1": {"composition_quality": 11, "image_quality": 6}, "image_2": {"composition_quality": 5, "image_quality": 8}}',
     "not a score"),
    ('{"image_1": {"composition_quality": true, "image_quality": 6}, "image_2": {"composition_quality": 5, "image_quality": 8}}',
     "not a score"),
    ("Image 1: Composition Quality: 7/10, Image Quality: 6/10", "need exactly one"),
    ("Image 1: Composition Quality: 7/10, Image Quality: 6/10\nImage 1: Composition Quality: 5/10, Image Quality: 8/10",
     "need exactly one"),
    ("Image 1: Composition Quality: 12/10, Image Quality: 6/10\nImage 2: Composition Quality: 5/10, Image Quality: 8/10",
     "out of"),
])
def test_pairwise_failures_say_why(text, why):
    got = parse_pairwise(text)
    assert not got.ok and got.value is None and why in got.error


@pytest.mark.parametrize("text, value", [
    ('{"answer": "yes"}', True), ('{"answer": "No."}', False), ('{"answer": true}', True),
    ('Checked {"colour": "red"} then: {"answer": "no"}', False),
    ("Yes", True), ("yes.", True), ("**No**, the colours differ.", False), ("Yes, it is the same dog, not a cat.", True),
])
def test_yes_no(text, value):
    got = parse_yes_no(text)
    assert got.ok and got.value is value


@pytest.mark.parametrize("text", ["", "Maybe.", "No. Yes, the style matches.", "The answer is yes", '{"answer": "perhaps"}'])
def test_yes_no_failures(text):
    got = parse_yes_no(text)
    assert not got.ok and got.value is None


def test_templates_are_versioned_files_with_declared_fields():
    tpl = load_template("composlora_pairwise")
    assert tpl.id == "composlora_pairwise@1" and tpl.fields == ("elements",)
    text = tpl.render(elements="1. character (Nezuko): nezuko")
    assert "1. character (Nezuko): nezuko" in text and "$" not in text and '"image_1"' in text
    with pytest.raises(EvaluationError, match="expected fields"):
        tpl.render()
    assert load_template("lorarar_style").render(style="watercolor").count('"watercolor"') == 2
    with pytest.raises(EvaluationError, match="not found"):
        load_template("no_such_template")


def test_user_template_must_declare_its_placeholders(tmp_path):
    bad = tmp_path / "mine.yaml"
    bad.write_text("name: mine\nversion: 1\nfields: []\ntext: 'Rate $thing'\n")
    with pytest.raises(EvaluationError, match="fields"):
        load_template(str(bad))
