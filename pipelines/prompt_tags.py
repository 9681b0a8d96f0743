"""LoRA tags in prompts: `<lora:name:w>`, `<lora:name:te:unet>` and the LoRA Block Weight extension's named forms.

A1111 reads `<type:a:b:…>` out of a prompt (modules/extra_networks.py: `<(\\w+):([^>]+)>`, the arguments split at
':'; positional values and `key=value` pairs) and the LoRA Block Weight extension (hako-mikan/sd-webui-lora-block-
weight, `loradealer`) reads more keys from the same tag. loraloom reads the same spellings with the same meaning:

- `<lora:name>` / `<lora:name:w>`: strength w (1 when left out) in the text encoders and the UNet;
- `<lora:name:te:unet>`: text-encoder strength te, UNet strength unet (on FLUX.1 and SD3: the transformer's);
- `te=`, `unet=`: the same by name (the extension's `multidealer`: either one alone sets both);
- `lbw=` (or `w=`, the extension's other spelling): block weights, a preset name (`ALL`, `INS`, `OUTD`, …) or
  numbers separated by commas inside the tag: 12, 17, 20 or 26 on SD/SDXL; on FLUX.1 58 (BASE, D00–D18, S00–S37) or
  57; on SD3 one per joint block, BASE first or not (`composition.controls`; the length is checked against the
  loaded model);
- `start=`, `stop=`, `step=a-b`: the steps (counted from 0) from which / until which / between which the LoRA acts.
  Whole numbers are step numbers, as in the extension; numbers with a decimal point from 0 to 1 are fractions of the
  run (a loraloom addition: `start=0.25`).
- `<lyco:…>` is read as `<lora:…>` (the extension reads both).

A tag names a LoRA of the spec (by its adapter name, or as A1111 text writes that name, `spec.a1111_name`); it does
not add a LoRA. What the tag says wins over the spec's entry for that LoRA: its strengths always (a tag without a
number means 1, as in A1111), `lbw=` and the schedule (start/stop/step) when the tag has them; the entry's other
controls (mask, feather, keyframes, …) stay. The tags are removed from the prompt (runs of spaces left behind are
made one, which changes nothing the CLIP tokenizer reads). Everything is checked before any model loads: malformed
tags, names the spec does not have and values out of range are a `SpecError` naming the tag and the fix (the
length of an `lbw=` vector is the one check left to the loaded model, whose blocks it counts).

Not supported (refused with the reason): `dyn=` and a third positional value (A1111's dynamic rank), `lbwe=`
(elemental weights), the random `R`/`U` and inherited `X` values of block-weight vectors, `<hypernet:…>`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from loraloom.composition.controls import LBW_PRESETS
from loraloom.composition.errors import SpecError

from .spec import MAX_STEPS, LoRARef, a1111_name, checked_lbw

# A1111's extra-network tag (modules/extra_networks.py re_extra_net), with an empty argument list also caught (an error).
TAG = re.compile(r"<(\w+):([^>]*)>")
LORA_TYPES = ("lora", "lyco")
_OPEN = re.compile(r"<(lora|lyco):", re.IGNORECASE)
_SPACES = re.compile(r"[ \t]{2,}")
_WHOLE = re.compile(r"\d+")
_DECIMAL = re.compile(r"\d*\.\d+|\d+\.\d*")
KEYS = ("te", "unet", "lbw", "w", "start", "stop", "step")
_NOT_SUPPORTED = {
    "dyn": "A1111's dyn= (dynamic LoRA rank) is not supported",
    "lbwe": "the extension's elemental weights (lbwe=) are not supported",
    "x": "the extension's inherited block weight (x=) is not supported",
}


@dataclass(frozen=True)
class LoRATag:
    """One tag as written: its text, the LoRA it names, the strengths it sets, and the controls it names (None: not
    named; the spec's entry keeps its own)."""

    text: str
    name: str
    te: float = 1.0
    unet: float = 1.0
    lbw: str | list[float] | None = None
    start: float | None = None
    stop: float | None = None
    unit: str | None = None  # "steps" or "fraction" when the tag names a schedule

    @property
    def has_schedule(self) -> bool:
        return self.unit is not None


def _fail(where: str, tag: str, problem: str, fix: str) -> SpecError:
    return SpecError(f"{where}: tag {tag}: {problem}. Fix: {fix}")


def _number(where: str, tag: str, key: str, value: str, low: float = -100.0, high: float = 100.0) -> float:
    try:
        number = float(value)
    except ValueError:
        raise _fail(where, tag, f"{key} {value!r} is not a number", "write a number, e.g. <lora:name:0.8>") from None
    if not math.isfinite(number) or not low <= number <= high:
        raise _fail(where, tag, f"{key} {value!r} is out of range", f"a number from {low:g} to {high:g}")
    return number


def _position(where: str, tag: str, key: str, value: str) -> tuple[float, str]:
    """A start/stop value and its unit: a whole number is a step number (the extension's), a decimal from 0 to 1 a
    fraction of the run."""
    value = value.strip()
    if _WHOLE.fullmatch(value):
        step = int(value)
        if step > MAX_STEPS:
            raise _fail(where, tag, f"{key}={value} is past the last possible step", f"a step number below {MAX_STEPS}")
        return float(step), "steps"
    if _DECIMAL.fullmatch(value):
        fraction = float(value)
        if fraction > 1.0:
            raise _fail(where, tag, f"{key}={value} is neither a step number (a whole number) nor a fraction of the run "
                                    "(0 to 1)", f"{key}={int(fraction)} for a step, or {key}=0.5 for half-way")
        return fraction, "fraction"
    raise _fail(where, tag, f"{key}={value!r} is not a step number nor a fraction of the run",
                f"a step number ({key}=10, counted from 0) or a fraction ({key}=0.25)")


def parse_tag(text: str, args: str, where: str = "prompt") -> LoRATag:
    """One `<lora:…>` tag (its text and what follows `lora:`), read as A1111 and the LoRA Block Weight extension read
    it; `SpecError` saying what is wrong and how to write it."""
    items = [item.strip() for item in args.split(":")]
    name = items[0]
    if not name:
        raise _fail(where, text, "names no LoRA", "<lora:NAME:weight>, NAME as the spec names the LoRA")
    positional: list[str] = []
    named: dict[str, str] = {}
    for item in items[1:]:
        if "=" in item:
            key, value = (part.strip() for part in item.split("=", 1))
            if key in _NOT_SUPPORTED:
                raise _fail(where, text, _NOT_SUPPORTED[key], f"leave {key}= out")
            if key not in KEYS:
                raise _fail(where, text, f"unknown key {key}=", f"use {'=, '.join(KEYS)}= (or leave it out)")
            if key in named or (key in ("lbw", "w") and {"lbw", "w"} & set(named)):
                raise _fail(where, text, f"{key}= is given twice", "give each key once")
            if not value:
                raise _fail(where, text, f"{key}= has no value", f"e.g. {key}=1")
            named[key] = value
        else:
            if named:
                raise _fail(where, text, f"the value {item!r} comes after a key=value",
                            "write the weights first, <lora:name:w> or <lora:name:te:unet>, then te=, unet=, lbw=, start=, stop=")
            if not item:
                raise _fail(where, text, "has an empty value (two ':' in a row, or a ':' at the end)", "remove the extra ':'")
            positional.append(item)
    if len(positional) > 2:
        raise _fail(where, text, "a third value (A1111's dynamic rank) is not supported",
                    "<lora:name:w> or <lora:name:te:unet>, then lbw=, start=, stop= by name")
    if len(positional) == 2 and not _is_number(positional[1]):
        fix = f"lbw={positional[1]}" if (positional[1].upper() in LBW_PRESETS or "," in positional[1]) else "a number"
        raise _fail(where, text, f"the UNet strength {positional[1]!r} is not a number (block weights are given by name "
                                 "since the extension's 2023 syntax)", f"write <lora:{name}:{positional[0]}:{fix}>")
    # The extension's syntaxdealer + multidealer (A1111's own reading agrees except that it keeps te at 1 for a lone
    # unet=): te from te= or the first value, unet from unet= or the second; either alone sets both; none: 1.
    te_text = named.get("te", positional[0] if positional else None)
    unet_text = named.get("unet", positional[1] if len(positional) > 1 else None)
    te = None if te_text is None else _number(where, text, "te" if "te" in named else "weight", te_text)
    unet = None if unet_text is None else _number(where, text, "unet", unet_text)
    te, unet = (te if te is not None else unet if unet is not None else 1.0), (unet if unet is not None else te if te is not None else 1.0)
    lbw = named.get("lbw", named.get("w"))
    if lbw is not None:
        if lbw.upper() not in LBW_PRESETS and "," not in lbw:
            raise _fail(where, text, f"lbw={lbw} is neither a preset ({', '.join(LBW_PRESETS)}) nor a vector",
                        "lbw=PRESET or lbw= one number per block separated by commas (12, 17, 20 or 26 on SD/SDXL, "
                        "58 on FLUX.1; docs/controls.md)")
        lbw = checked_lbw(lbw, f"{where}: tag {text}")
    start = stop = unit = None
    if "step" in named:
        if "start" in named or "stop" in named:
            raise _fail(where, text, "step= and start=/stop= both say when it acts", "give step=a-b, or start= and stop=")
        parts = named["step"].split("-")
        if len(parts) != 2:
            raise _fail(where, text, f"step={named['step']} is not a range", "step=a-b, e.g. step=5-10 (steps 5 to 9)")
        (start, u1), (stop, u2) = (_position(where, text, "step", p) for p in parts)
    else:
        u1 = u2 = None
        if "start" in named:
            start, u1 = _position(where, text, "start", named["start"])
        if "stop" in named:
            stop, u2 = _position(where, text, "stop", named["stop"])
    if u1 and u2 and u1 != u2 and not (start == 0.0):
        raise _fail(where, text, "start and stop are in different units (a step number and a fraction of the run)",
                    "both step numbers (start=5:stop=20) or both fractions (start=0.2:stop=0.8)")
    if u1 or u2:
        unit = u2 if (u2 and (start == 0.0 or not u1)) else u1
        if stop is not None and stop <= (start or 0.0):
            raise _fail(where, text, f"stop={stop:g} is not after start={start or 0:g}", "a start before the stop")
    return LoRATag(text=text, name=name, te=te, unet=unet, lbw=lbw, start=start, stop=stop, unit=unit)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_tags(prompt: str, where: str = "prompt") -> tuple[str, list[LoRATag]]:
    """(the prompt without its LoRA tags, the tags in order). Only syntax is checked here (`apply_tags` resolves the
    names). Other `<word:…>` text stays in the prompt, except `<hypernet:…>`, refused."""
    tags: list[LoRATag] = []
    pieces: list[str] = []
    last = 0
    for m in TAG.finditer(prompt):
        kind = m.group(1)
        if kind.lower() == "hypernet":
            raise _fail(where, m.group(0), "A1111's hypernetworks are not supported", "remove the tag")
        if kind.lower() not in LORA_TYPES:
            continue
        if kind not in LORA_TYPES:
            raise _fail(where, m.group(0), f"<{kind}:…> is not A1111's spelling", f"write <{kind.lower()}:…>")
        tags.append(parse_tag(m.group(0), m.group(2), where))
        pieces.append(prompt[last:m.start()])
        last = m.end()
    if not tags:
        rest = prompt
    else:
        pieces.append(prompt[last:])
        rest = _SPACES.sub(" ", "".join(pieces)).strip()
    unclosed = _OPEN.search(rest)
    if unclosed:
        tail = rest[unclosed.start():unclosed.start() + 40]
        raise _fail(where, tail + ("…" if len(rest) > unclosed.start() + 40 else ""), "has no closing '>'",
                    "close the tag: <lora:name:w>")
    return rest, tags


def find_lora(name: str, loras: Sequence[LoRARef], tag: str, where: str) -> int:
    """The index of the LoRA a tag names: by adapter name, else by the name A1111 text gives it (`a1111_name`)."""
    names = [r.adapter_name for r in loras]
    if name in names:
        return names.index(name)
    written = [i for i, n in enumerate(names) if a1111_name(n) == name]
    if len(written) == 1:
        return written[0]
    if len(written) > 1:
        raise _fail(where, tag, f"{name!r} could be {', '.join(names[i] for i in written)}",
                    "give those LoRAs distinct 'name' fields in the spec and use one in the tag")
    near = [n for n in names if n.lower() == name.lower()]
    hint = f" (did you mean {near[0]!r}? names are case-sensitive)" if near else ""
    raise _fail(where, tag, f"the spec has no LoRA named {name!r}{hint}; its LoRAs: {', '.join(names) or 'none'}",
                "add the LoRA to the spec's 'loras' (a tag sets the strength and controls of a LoRA the spec lists) "
                "or name one of those")


def merge_tag(ref: LoRARef, tag: LoRATag, where: str = "prompt") -> LoRARef:
    """`ref` with what `tag` says: its strengths always (as weight when te = unet, else weight 1 and te/unet), its
    block weights and schedule when it names them; the entry's other controls stay."""
    if tag.te == tag.unet:
        changes = {"weight": tag.te, "te": 1.0, "unet": 1.0}
    else:
        changes = {"weight": 1.0, "te": tag.te, "unet": tag.unet}
    if tag.lbw is not None:
        changes["lbw"] = tag.lbw
    if tag.has_schedule:
        if ref.keyframes:
            raise _fail(where, tag.text, f"it sets when LoRA {ref.adapter_name} acts and the spec's entry ramps it with "
                                         "keyframes", "set the schedule in one place: the tag's start=/stop=, or the "
                                                      "entry's start, stop and keyframes")
        changes.update(start=tag.start, stop=tag.stop, unit=tag.unit)
    try:
        return dataclasses.replace(ref, **changes)
    except SpecError as err:
        raise SpecError(f"{where}: tag {tag.text}: {err}") from None


def apply_tags(prompt: str, loras: Sequence[LoRARef], where: str = "prompt") -> tuple[str, list[LoRARef]]:
    """(the prompt without its LoRA tags, copies of `loras` with each tag's strengths and controls merged in).
    A prompt without tags comes back unchanged (its LoRAs copied)."""
    text, tags = parse_tags(prompt, where)
    out = [dataclasses.replace(r) for r in loras]
    seen: dict[int, str] = {}
    for tag in tags:
        i = find_lora(tag.name, out, tag.text, where)
        if i in seen:
            raise _fail(where, tag.text, f"LoRA {out[i].adapter_name} is already tagged ({seen[i]})", "tag each LoRA once")
        seen[i] = tag.text
        out[i] = merge_tag(out[i], tag, where)
    return text, out


def has_tags(text: str | None) -> bool:
    """Whether `text` holds a LoRA tag (or the start of one)."""
    return bool(text) and _OPEN.search(text) is not None
