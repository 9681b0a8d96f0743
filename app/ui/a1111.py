"""Reading A1111's `parameters` text (the "infotext" A1111, Forge, ComfyUI's A1111 nodes and civitai write into a
PNG) into form settings: what maps onto loraloom is kept, everything else is listed.

Plain Python (no Gradio). The text is

    <prompt, possibly several lines, with <lora:name:w> tags>
    Negative prompt: <negative prompt, possibly several lines>
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x768, Model hash: …, …

read as A1111 reads it (modules/infotext_utils.py `parse_generation_parameters`: the last line holds the settings,
`key: value` pairs, values JSON-quoted when they hold a comma or colon).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from loraloom.pipelines.prompt_tags import parse_tags
from loraloom.pipelines.spec import MAX_STEPS

# A1111's re_param: key: value pairs of the settings line, values possibly "quoted"
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*$")
# A1111 sampler (+ schedule type) -> loraloom scheduler names (pipelines/schedulers.py ALIASES)
SAMPLERS = {
    "DPM++ 2M": "dpmsolver++", "DPM++ 2M Karras": "dpmsolver++-karras", "DPM++ 2M SDE": "dpmsolver++-sde",
    "DPM++ 2M SDE Karras": "dpmsolver++-sde", "DPM++ SDE": "dpmsolver++-sde", "DPM++ SDE Karras": "dpmsolver++-sde",
    "Euler a": "euler-a", "Euler": "euler", "Heun": "heun", "LMS": "lms", "DDIM": "ddim", "PLMS": "pndm",
    "UniPC": "unipc", "DDPM": "ddpm",
}
# Settings the importer reads (the rest is listed as not restored)
READ = {"Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model", "Model hash", "Lora hashes",
        "Composition", "Version", "Hashes"}


@dataclass
class Infotext:
    prompt: str
    negative_prompt: str
    settings: dict[str, str] = field(default_factory=dict)


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value[1:-1]
    return value


def parse_infotext(text: str) -> Infotext:
    """Prompt, negative prompt and settings of an A1111 `parameters` text."""
    lines = text.strip().split("\n")
    settings: dict[str, str] = {}
    if lines and len(_PARAM.findall(lines[-1])) >= 3:  # A1111: the last line is the settings when it has 3+ pairs
        last = lines.pop()
        for key, value in _PARAM.findall(last):
            settings[key.strip()] = _unquote(value)
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.strip().startswith("Negative prompt:"):
            in_negative = True
            line = line.strip()[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    return Infotext("\n".join(prompt).strip(), "\n".join(negative).strip(), settings)


def lora_hashes(settings: dict[str, str]) -> dict[str, str]:
    """{A1111 LoRA name: AutoV3 hash} from "Lora hashes" ("name: hash, name: hash")."""
    out = {}
    for part in settings.get("Lora hashes", "").split(","):
        name, _, digest = part.rpartition(":")
        if name.strip() and digest.strip():
            out[name.strip()] = digest.strip().lower()
    return out


@dataclass
class Imported:
    """Form settings (the keys `settings` holds are the ones to restore) and one line per thing not restored."""

    settings: dict
    warnings: list[str]
    source: str  # "A1111" (or the program the Version names)


def import_infotext(text: str, find_lora, find_model) -> Imported:
    """Form settings from an A1111 `parameters` text. `find_lora(name, autov3 or None)` -> a library name or None;
    `find_model(name, hash or None)` -> a model this UI offers or None."""
    info = parse_infotext(text)
    s, warn = info.settings, []
    settings: dict = {}
    try:
        prompt, tags = parse_tags(info.prompt, "the PNG's prompt")
    except Exception as err:  # a malformed tag: keep the prompt as written, say so
        prompt, tags = info.prompt, []
        warn.append(f"LoRA tags not read: {err}")
    settings["prompt"] = prompt
    settings["negative_prompt"] = info.negative_prompt
    hashes = lora_hashes(s)
    loras = []
    for tag in tags:
        name = find_lora(tag.name, hashes.get(tag.name))
        if name is None:
            how = f" (hash {hashes[tag.name]})" if tag.name in hashes else ""
            warn.append(f"LoRA {tag.name!r}{how} is not in this library; left out ({tag.text}).")
            continue
        entry = {"name": name, "weight": tag.te} if tag.te == tag.unet else {"name": name, "weight": 1.0, "te": tag.te,
                                                                                "unet": tag.unet}
        if tag.lbw is not None:
            entry["lbw"] = tag.lbw
        if tag.has_schedule:
            entry.update(start=tag.start, stop=tag.stop)
        loras.append(entry)
    settings["loras"] = loras
    for key, target, kind, low, high in (("Steps", "steps", int, 1, MAX_STEPS), ("CFG scale", "guidance_scale", float, 0, 100),
                                         ("Seed", "seed", int, 0, 2**63 - 1)):
        if key in s:
            try:
                value = kind(float(s[key]))
                if not low <= value <= high:
                    raise ValueError
                settings[target] = value
            except ValueError:
                warn.append(f"{key} {s[key]!r} is not a number from {low:g} to {high:g}; not restored.")
    if "Size" in s:
        m = _SIZE.match(s["Size"])
        if m and int(m.group(1)) % 8 == 0 and int(m.group(2)) % 8 == 0:
            settings["width"], settings["height"] = int(m.group(1)), int(m.group(2))
        else:
            warn.append(f"Size {s['Size']!r} is not WIDTHxHEIGHT in multiples of 8; not restored.")
    if "Sampler" in s:
        sampler = s["Sampler"]
        schedule = s.get("Schedule type", "")
        key = f"{sampler} {schedule}".strip() if schedule in ("Karras",) else sampler
        name = SAMPLERS.get(key) or SAMPLERS.get(sampler)
        if name is None:
            warn.append(f"Sampler {sampler!r}" + (f" ({schedule})" if schedule else "") + " has no loraloom scheduler; "
                        "the scheduler was left as it was.")
        else:
            settings["scheduler"] = name
            if schedule and schedule not in ("Karras", "Automatic") and not sampler.startswith(("DDIM", "UniPC", "PLMS")):
                warn.append(f"Schedule type {schedule!r} is not restored (loraloom's {name} uses its own spacing).")
    if "Model" in s or "Model hash" in s:
        model = find_model(s.get("Model", ""), s.get("Model hash"))
        if model is None:
            warn.append(f"base model {s.get('Model') or s.get('Model hash')!r} is not offered here; model left as it was.")
        else:
            settings["model"] = model
    if s.get("Composition"):
        settings["method"] = s["Composition"]
    for key, value in s.items():
        if key not in READ:
            warn.append(f"{key}: {value} — no loraloom setting; not restored.")
    source = s.get("Version", "A1111") or "A1111"
    return Imported(settings, warn, source)
