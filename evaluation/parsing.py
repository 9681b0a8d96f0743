"""Reading judges' answers: JSON first, then one strict pattern, else a recorded failure. Never a guessed score.

(VIEScore's `give_up_parsing` substitutes a random score when nothing parses; ComposLoRA drops the set. We keep
the raw text and say why it did not parse.)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

PAIRWISE_DIMENSIONS = ("composition", "image_quality")
_JSON_KEYS = {"composition": ("composition_quality", "composition"), "image_quality": ("image_quality", "quality")}
_NUMBER = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:/\s*10)?\s*$")
# ComposLoRA's own output line (MLC evaluate.py), strict: both scores "x/10" on the same line as "Image N"
_PAIRWISE_LINE = re.compile(
    r"image\s*([12])\s*:\s*\**\s*composition quality\s*\**\s*:\s*\**\s*(\d+(?:\.\d+)?)\s*/\s*10\b[^\n]*?"
    r"image quality\s*\**\s*:\s*\**\s*(\d+(?:\.\d+)?)\s*/\s*10\b", re.IGNORECASE)
_WORD = re.compile(r"[a-z]+")


@dataclass(frozen=True)
class Parsed:
    """A parsed answer (`value`), or why there is none (`error`); `method` says which rule read it."""

    value: object = None
    error: str | None = None
    method: str | None = None  # "json" | "pattern"

    @property
    def ok(self) -> bool:
        return self.error is None


def _json_objects(text: str):
    """JSON objects in a reply: ```json fences, the whole text, the first '{' to the last '}', then every object
    that starts at a '{' (an answer may hold an explanation, a JSON object, and more text)."""
    candidates = [m.group(1) for m in re.finditer(r"```(?:json)?\s*(\{.*?\})\s*```", text, re.DOTALL)]
    candidates.append(text.strip())
    if "{" in text and "}" in text:
        candidates.append(text[text.index("{"): text.rindex("}") + 1])
    for c in candidates:
        try:
            obj = json.loads(c)
        except (json.JSONDecodeError, ValueError):
            continue
        if isinstance(obj, dict):
            yield obj
    decoder = json.JSONDecoder()
    for m in re.finditer(r"\{", text):
        try:
            obj, _ = decoder.raw_decode(text, m.start())
        except (json.JSONDecodeError, ValueError):
            continue
        if isinstance(obj, dict):
            yield obj


def _score(value) -> float | None:
    """A 0–10 score from a number or a string like "7.5" or "7.5/10"; None for anything else (bools too)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        x = float(value)
    elif isinstance(value, str) and (m := _NUMBER.match(value)):
        x = float(m.group(1))
    else:
        return None
    return x if 0.0 <= x <= 10.0 else None


def _pairwise_from_json(obj: dict) -> dict | str:
    lowered = {str(k).lower().replace(" ", "_"): v for k, v in obj.items()}
    out = {}
    for n in (1, 2):
        entry = lowered.get(f"image_{n}", lowered.get(f"image{n}"))
        if not isinstance(entry, dict):
            return f"JSON has no object for image_{n}"
        entry = {str(k).lower().replace(" ", "_"): v for k, v in entry.items()}
        scores = {}
        for dim, keys in _JSON_KEYS.items():
            raw = next((entry[k] for k in keys if k in entry), None)
            if raw is None:
                return f"JSON image_{n} has no {keys[0]}"
            s = _score(raw)
            if s is None:
                return f"JSON image_{n}.{keys[0]} = {raw!r} is not a score in [0, 10]"
            scores[dim] = s
        out[n] = scores
    return out


def parse_pairwise(text: str) -> Parsed:
    """{1: {"composition": c1, "image_quality": q1}, 2: {...}} from a pairwise answer.

    JSON (`{"image_1": {"composition_quality": …, "image_quality": …}, "image_2": …}`) first; else ComposLoRA's
    lines `Image N: Composition Quality: x/10, Image Quality: y/10`, valid only as exactly one line per image with
    scores in [0, 10].
    """
    if not text or not text.strip():
        return Parsed(error="empty answer")
    json_error = None
    for obj in _json_objects(text):
        got = _pairwise_from_json(obj)
        if isinstance(got, dict):
            return Parsed(value=got, method="json")
        json_error = json_error or got
    matches = _PAIRWISE_LINE.findall(text)
    if matches:
        images = [int(m[0]) for m in matches]
        if sorted(images) != [1, 2]:
            return Parsed(error=f"score lines found for images {images}; need exactly one for image 1 and one for image 2")
        out = {}
        for n, comp, qual in matches:
            c, q = _score(comp), _score(qual)
            if c is None or q is None:
                return Parsed(error=f"image {n}: scores {comp}/{qual} out of [0, 10]")
            out[int(n)] = {"composition": c, "image_quality": q}
        return Parsed(value=out, method="pattern")
    return Parsed(error=json_error or "no JSON scores and no 'Image N: Composition Quality: x/10, Image Quality: y/10' lines")


def parse_yes_no(text: str) -> Parsed:
    """True (yes) / False (no). JSON `{"answer": "yes"}` first; else the answer must start with yes or no and
    never contain the other word (so "No. Yes, the style…" is a failure, not a vote)."""
    if not text or not text.strip():
        return Parsed(error="empty answer")
    for obj in _json_objects(text):
        lowered = {str(k).lower(): v for k, v in obj.items()}
        if "answer" not in lowered:
            continue
        value = lowered["answer"]
        if isinstance(value, bool):
            return Parsed(value=value, method="json")
        if isinstance(value, str) and value.strip().lower().rstrip(".!") in ("yes", "no"):
            return Parsed(value=value.strip().lower().startswith("yes"), method="json")
        return Parsed(error=f"JSON answer {value!r} is neither yes nor no")
    words = _WORD.findall(text.lower())
    if words and words[0] in ("yes", "no"):
        other = "no" if words[0] == "yes" else "yes"
        if other in words:
            return Parsed(error="the answer says both yes and no")
        return Parsed(value=words[0] == "yes", method="pattern")
    return Parsed(error="the answer starts with neither yes nor no")
