"""LoRA tags in prompts (issue 23, point 6): A1111's <lora:name:w> / <lora:name:te:unet> and the LoRA Block Weight
extension's named forms, read with the extension's meaning; clear errors for everything else. No model here."""

from __future__ import annotations

import re

import pytest

from loraloom.composition.controls import LBW_PRESETS
from loraloom.composition.errors import SpecError
from loraloom.pipelines.prompt_tags import apply_tags, has_tags, parse_tag, parse_tags
from loraloom.pipelines.spec import GenerationSpec, LoRARef

VECTOR17 = "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0"


def _loras(**entries):
    return [LoRARef(f"/loras/{name}.safetensors", **fields) for name, fields in (entries or {"char": {}, "style": {}}).items()]


# --- the LoRA Block Weight extension's reading, transcribed (scripts/lora_block_weight.py, loradealer and the
# functions it calls; A1111 splits the tag's arguments at ':' into `items`) ----------------------------------------
def lbw_syntaxdealer(items, target, index):
    for item in items:
        if target in item:
            return item.replace(target, "")
    if index is None or index + 1 > len(items):
        return None
    if "=" in items[index]:
        return None
    return items[index] if "@" not in items[index] else 1


def lbw_multidealer(t, u):
    if t is None and u is None:
        return 1, 1
    elif t is None:
        return float(u), float(u)
    elif u is None:
        return float(t), float(t)
    else:
        return float(t), float(u)


def lbw_stepsdealer(step, start, stop):
    if step is None or "-" not in step:
        return start, stop
    return step.split("-")


def lbw_read(args: str):
    """(te, unet, block weights or None, start, stop) as loradealer takes them from <lora:ARGS>."""
    items = args.split(":")
    te = lbw_syntaxdealer(items, "te=", 1)
    unet = lbw_syntaxdealer(items, "unet=", 2)
    te, unet = lbw_multidealer(te, unet)
    weights = lbw_syntaxdealer(items, "lbw=", 2) if lbw_syntaxdealer(items, "lbw=", 2) is not None else lbw_syntaxdealer(items, "w=", 2)
    start = lbw_syntaxdealer(items, "start=", None)
    stop = lbw_syntaxdealer(items, "stop=", None)
    start, stop = lbw_stepsdealer(lbw_syntaxdealer(items, "step=", None), start, stop)
    if not (weights is not None and (weights in LBW_PRESETS or any(weights.count(",") == x - 1 for x in (12, 17, 20, 26)))):
        weights = None
    return te, unet, weights, None if start is None else int(start), None if stop is None else int(stop)


@pytest.mark.parametrize("args", [
    "char", "char:0.8", "char:0.8:0.4", "char:te=0.5", "char:unet=0.5", "char:0.8:unet=0.3", "char:0.8:te=0.5",
    "char:te=0.2:unet=0.9", "char:0.8:lbw=OUTD", f"char:1:lbw={VECTOR17}", "char:0.7:0.3:lbw=IND:start=2:stop=8",
    "char:1:step=3-9", "char:lbw=ALL:start=10", "char:0.8:w=INS", "char:1:stop=12", "char:-0.5",
])
def test_tags_mean_what_the_extension_reads(args):
    te, unet, weights, start, stop = lbw_read(args)
    tag = parse_tag(f"<lora:{args}>", args)
    assert (tag.name, tag.te, tag.unet) == ("char", te, unet)
    expected_lbw = None if weights is None else (weights if weights in LBW_PRESETS else [float(v) for v in weights.split(",")])
    assert tag.lbw == expected_lbw
    assert (tag.start, tag.stop) == (start, stop)
    assert tag.unit == ("steps" if start is not None or stop is not None else None)


def test_fractions_are_a_loraloom_addition():
    tag = parse_tag("<lora:char:1:start=0.25:stop=0.75>", "char:1:start=0.25:stop=0.75")
    assert (tag.start, tag.stop, tag.unit) == (0.25, 0.75, "fraction")
    assert parse_tag("<lora:c:1:step=0-0.5>", "c:1:step=0-0.5").unit == "fraction"  # 0 is the same in both units
    assert parse_tag("<lora:c:1:start=1>", "c:1:start=1").unit == "steps"  # as the extension: step 1, not the run's end


def test_tags_are_removed_and_merged_into_the_spec_entries_the_tag_winning():
    loras = _loras(char={"weight": 0.3, "mask": "left", "lbw": "INS"}, style={"weight": 0.9, "start": 0.5}, bg={"weight": 0.4})
    text, out = apply_tags("a cat, <lora:char:0.7:lbw=OUTD>  in a field <lora:style:1:0.5:stop=10>", loras)
    assert text == "a cat, in a field"
    char, style, bg = out
    # the strengths and the named controls are the tag's; what it does not name stays the entry's
    assert (char.weight, char.te, char.unet, char.lbw, char.mask) == (0.7, 1.0, 1.0, "OUTD", "left")
    assert (style.weight, style.te, style.unet, style.start, style.stop, style.unit) == (1.0, 1.0, 0.5, None, 10.0, "steps")
    assert bg == loras[2] and bg is not loras[2]  # untagged: as the spec says (a copy)
    assert loras[0].weight == 0.3  # the spec's own entries are not changed
    # a tag without a number means 1, as in A1111
    assert apply_tags("<lora:char>", loras)[1][0].weight == 1.0


def test_a_prompt_without_tags_comes_back_unchanged():
    loras = _loras()
    for prompt in ("a cat  in a field ", "<lora :x:1> as A1111 text writes a prompt's own tag", "x <3:love> y", ""):
        text, out = apply_tags(prompt, loras)
        assert text == prompt and out == loras


def test_removing_tags_changes_nothing_the_tokenizer_reads():
    from loraloom.pipelines.tiny import build_tiny_sd

    tokenizer = build_tiny_sd().tokenizer
    prompt = "a cat,<lora:char:1> in  a <lora:style:0.5:lbw=OUTD>\tfield, <lora:char:2>"
    stripped = re.sub(r"<lora:[^>]*>", "", prompt)  # what A1111 gives the text encoder
    text, _ = parse_tags(prompt)
    assert tokenizer(text).input_ids == tokenizer(stripped).input_ids


def test_names_resolve_by_adapter_name_or_as_a1111_text_writes_them():
    loras = [LoRARef("/l/a.safetensors", name="style,v2"), LoRARef("/l/b.safetensors", name="char")]
    _, out = apply_tags("x <lora:stylev2:0.5>", loras)  # a1111_name('style,v2') == 'stylev2'
    assert out[0].weight == 0.5
    _, out = apply_tags("x <lyco:char:0.25>", loras)  # <lyco:…> as the extension reads it
    assert out[1].weight == 0.25


@pytest.mark.parametrize("prompt,message", [
    ("<lora:chr:1>", r"no LoRA named 'chr'; its LoRAs: char, style\. Fix: add the LoRA to the spec's 'loras'"),
    ("<lora:Char:1>", r"did you mean 'char'\? names are case-sensitive"),
    ("<lora::1>", r"names no LoRA"),
    ("<lora:char:1> <lora:char:0.5>", r"LoRA char is already tagged \(<lora:char:1>\)"),
    ("<lora:char:1", r"tag <lora:char:1: has no closing '>'"),
    ("<LORA:char:1>", r"is not A1111's spelling"),
    ("<hypernet:x:1>", r"hypernetworks are not supported"),
    ("<lora:char:x>", r"weight 'x' is not a number"),
    ("<lora:char:nan>", r"out of range"),
    ("<lora:char:1000>", r"out of range. Fix: a number from -100 to 100"),
    ("<lora:char:1:IND>", r"UNet strength 'IND' is not a number.*Fix: write <lora:char:1:lbw=IND>"),
    (f"<lora:char:1:{VECTOR17}>", r"Fix: write <lora:char:1:lbw=1,0,0"),
    ("<lora:char:1:1:4>", r"a third value .*dynamic rank.* not supported"),
    ("<lora:char:1:dyn=4>", r"dyn= .* not supported"),
    ("<lora:char:1:lbwe=X>", r"elemental weights .* not supported"),
    ("<lora:char:1:foo=2>", r"unknown key foo=\. Fix: use te=, unet="),
    ("<lora:char:1:te=1:te=2>", r"te= is given twice"),
    ("<lora:char:1:lbw=INS:w=OUTD>", r"w= is given twice"),
    ("<lora:char:1:te=>", r"te= has no value"),
    ("<lora:char:1::0.5>", r"empty value"),
    ("<lora:char:lbw=OUTD:0.5>", r"the value '0.5' comes after a key=value"),
    ("<lora:char:1:lbw=MOSTLY>", r"lbw=MOSTLY is neither a preset \(NONE, ALL"),
    ("<lora:char:1:lbw=1,,3>", r"lbw value '' is not a number"),  # the length: the loaded model's to check
    ("<lora:char:1:lbw=R,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1>", r"'R' is not a number \(random R/U and X values"),
    ("<lora:char:1:start=5:stop=2>", r"stop=2 is not after start=5"),
    ("<lora:char:1:stop=0>", r"stop=0 is not after start=0"),
    ("<lora:char:1:start=1.5>", r"neither a step number .* nor a fraction"),
    ("<lora:char:1:start=-2>", r"not a step number nor a fraction"),
    ("<lora:char:1:start=0.2:stop=10>", r"different units"),
    ("<lora:char:1:step=3>", r"step=3 is not a range. Fix: step=a-b"),
    ("<lora:char:1:step=3-9:start=2>", r"step= and start=/stop= both"),
])
def test_malformed_tags_unknown_names_and_bad_values_are_clear_errors(prompt, message):
    with pytest.raises(SpecError, match=message) as err:
        apply_tags(f"a cat {prompt}", _loras(), "prompt 2")
    assert str(err.value).startswith("prompt 2: tag ")
    assert "Fix:" in str(err.value)


def test_a_tag_schedule_and_entry_keyframes_are_not_mixed():
    loras = _loras(char={"keyframes": [[0, 0], [0.5, 1]]})
    with pytest.raises(SpecError, match="set the schedule in one place"):
        apply_tags("<lora:char:1:start=2>", loras)
    assert apply_tags("<lora:char:0.5>", loras)[1][0].keyframes == [[0.0, 0.0], [0.5, 1.0]]  # strengths alone: fine


def test_has_tags():
    assert has_tags("x <lora:a:1>") and has_tags("x <LyCo:a") and not has_tags("x <lora :a:1>") and not has_tags(None)


# --- written into the A1111 text, read back ----------------------------------------------------------------------
@pytest.mark.parametrize("fields,method,written", [
    ({}, "merge", "<lora:char:0.8>"),
    ({"weight": 0.5}, "switch", "<lora:char:0.4>"),
    ({"te": 0.5, "unet": 0.5}, "merge", "<lora:char:0.4>"),
    ({"te": 1.0, "unet": 0.5}, "merge", "<lora:char:0.8:0.4>"),
    ({"lbw": "outd"}, "composite", "<lora:char:0.8:lbw=OUTD>"),
    ({"lbw": VECTOR17}, "merge", f"<lora:char:0.8:lbw={VECTOR17}>"),
    ({"start": 2, "stop": 8}, "merge", "<lora:char:0.8:start=2:stop=8>"),
    ({"start": 0.25, "stop": 0.5}, "merge", "<lora:char:0.8:start=5:stop=10>"),  # fractions of 20 steps, as steps
    ({"start": 0.0, "stop": 1.0}, "merge", "<lora:char:0.8>"),  # the whole run: nothing to say
    ({"stop": 1, "unit": "steps"}, "merge", "<lora:char:0.8:stop=1>"),
    ({"weight": 0.5, "te": 2.0, "unet": 1.0, "lbw": "IND", "start": 3}, "merge", "<lora:char:0.8:0.4:lbw=IND:start=3>"),
    ({"mask": "left", "keyframes": [[0, 0], [0.5, 1]]}, "merge", "<lora:char:0.8>"),  # no A1111 spelling: spec chunk only
])
def test_a1111_text_writes_the_tags_in_the_same_spelling(fields, method, written):
    spec = GenerationSpec(model="m", prompt="a cat", loras=[LoRARef("/l/char.safetensors", **fields)], method=method, steps=20)
    text = spec.a1111_parameters()
    assert text.split("\n")[0] == f"a cat {written}"
    # read back by the same parser (and so by the extension, test above), the strengths are the ones applied
    tag = parse_tags(text.split("\n")[0])[1][0]
    ref, scale = spec.loras[0], 0.8
    assert (tag.te, tag.unet) == pytest.approx((ref.weight * ref.te * scale, ref.weight * ref.unet * scale))


def test_written_tags_remake_the_same_controls_through_apply_tags():
    ref = LoRARef("/l/char.safetensors", weight=1.0, te=0.5, unet=0.25, lbw="OUTS", start=4, stop=12)
    spec = GenerationSpec(model="m", prompt="p", loras=[ref], method="merge", method_params={"lora_scale": 1.0}, steps=20)
    text, (again,) = apply_tags(spec.a1111_parameters().split("\n")[0], [LoRARef("/l/char.safetensors")])
    assert text == "p"
    assert (again.weight * again.te, again.weight * again.unet, again.lbw) == (0.5, 0.25, "OUTS")
    assert spec.step_window(again) == spec.step_window(ref) == (4, 12)
