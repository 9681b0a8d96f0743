"""What a LoRA says about itself: base family, trigger words, category (header metadata and sidecar file)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from .errors import LoRAFileError

FAMILIES = ("sd1", "sd2", "sdxl")
CATEGORIES = ("character", "clothing", "style", "background", "object")
# Text-encoder context width -> family (cross-attention key/value input width of the UNet).
CONTEXT_DIM_FAMILY = {768: "sd1", 1024: "sd2", 2048: "sdxl"}


def family_from_metadata(metadata: dict[str, str]) -> tuple[str | None, str | None]:
    """(family, the header key it came from) from kohya `ss_*` or `modelspec.*` keys; (None, None) if silent.

    A family loraloom does not run (FLUX, SD3, ...) is returned by name so callers can refuse it.
    """
    version = (metadata.get("ss_base_model_version") or "").lower()
    if version:
        if version.startswith("sdxl"):
            return "sdxl", "ss_base_model_version"
        if version.startswith("sd_v2") or version.startswith("sd2"):
            return "sd2", "ss_base_model_version"
        if version.startswith("sd_v1") or version.startswith("sd1"):
            return "sd1", "ss_base_model_version"
        return version, "ss_base_model_version"
    arch = (metadata.get("modelspec.architecture") or "").lower()
    if arch:
        base = arch.split("/")[0]
        if base.startswith("stable-diffusion-xl"):
            return "sdxl", "modelspec.architecture"
        if base.startswith("stable-diffusion-v2"):
            return "sd2", "modelspec.architecture"
        if base.startswith("stable-diffusion-v1"):
            return "sd1", "modelspec.architecture"
        return base, "modelspec.architecture"
    v2 = (metadata.get("ss_v2") or "").lower()
    if v2 in ("true", "false"):
        return ("sd2" if v2 == "true" else "sd1"), "ss_v2"
    return None, None


def family_from_shapes(layer_shapes: dict[str, dict[str, tuple[int, ...]]]) -> str | None:
    """Family from the shapes of PEFT-named `down` factors: {component: {module: down shape}}.

    Only the cross-attention key/value input width and a second text encoder are decisive.
    """
    if layer_shapes.get("text_encoder_2"):
        return "sdxl"
    for module, shape in layer_shapes.get("unet", {}).items():
        if module.endswith(("attn2.to_k", "attn2.to_v")) and len(shape) == 2:
            return CONTEXT_DIM_FAMILY.get(shape[1])
    return None


def trigger_suggestions(metadata: dict[str, str], limit: int = 12) -> list[str]:
    """Trigger words the file suggests: `modelspec.trigger_phrase`, then `ss_tag_frequency` tags by count."""
    out: list[str] = []
    phrase = metadata.get("modelspec.trigger_phrase") or ""
    out.extend(t.strip() for t in phrase.split(",") if t.strip())
    raw = metadata.get("ss_tag_frequency")
    if raw:
        try:
            freq = json.loads(raw)
        except json.JSONDecodeError:
            freq = {}
        counts: dict[str, int] = {}
        for tags in freq.values() if isinstance(freq, dict) else []:
            if isinstance(tags, dict):
                for tag, n in tags.items():
                    tag = tag.strip()
                    if tag:
                        counts[tag] = counts.get(tag, 0) + int(n)
        out.extend(t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    seen, unique = set(), []
    for t in out:
        if t not in seen:
            seen.add(t)
            unique.append(t)
    return unique[:limit]


def sidecar_paths(lora_path: str | Path) -> list[Path]:
    p = Path(lora_path)
    return [p.with_suffix(".json"), p.with_suffix(".yaml"), p.with_suffix(".yml")]


def read_sidecar(lora_path: str | Path) -> dict:
    """The optional `<name>.json` / `<name>.yaml` next to a LoRA: `category`, `triggers`, and free keys."""
    for side in sidecar_paths(lora_path):
        if side.exists():
            try:
                text = side.read_text(encoding="utf-8")
                data = json.loads(text) if side.suffix == ".json" else yaml.safe_load(text)
            except (json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError) as err:
                raise LoRAFileError(side, f"sidecar cannot be parsed ({err}).", "fix or delete the sidecar file.") from None
            if data is None:
                return {}
            if not isinstance(data, dict):
                raise LoRAFileError(side, "sidecar must be a mapping with keys such as category and triggers.", "fix the sidecar file.")
            return normalise_sidecar(data, side)
    return {}


def normalise_sidecar(data: dict, where=None) -> dict:
    data = dict(data)
    cat = data.get("category")
    if cat is not None:
        cat = str(cat).strip().lower()
        if cat not in CATEGORIES:
            raise LoRAFileError(where, f"category {cat!r} is not one of {', '.join(CATEGORIES)}.", "use one of those categories.")
        data["category"] = cat
    trig = data.get("triggers")
    if trig is not None:
        if isinstance(trig, str):
            trig = [t.strip() for t in trig.split(",")]
        data["triggers"] = [str(t).strip() for t in trig if str(t).strip()]
    return data


def write_sidecar(lora_path: str | Path, category: str | None = None, triggers: list[str] | None = None) -> Path:
    """Write category/triggers into the LoRA's sidecar (the existing one, else `<name>.json`), keeping other keys."""
    existing = next((s for s in sidecar_paths(lora_path) if s.exists()), None)
    data = read_sidecar(lora_path) if existing else {}
    if category is not None:
        data["category"] = category
    if triggers is not None:
        data["triggers"] = triggers
    data = normalise_sidecar(data, existing or lora_path)
    target = existing or Path(lora_path).with_suffix(".json")
    tmp = target.with_name(target.name + ".tmp")
    if target.suffix == ".json":
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    else:
        tmp.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
    tmp.replace(target)
    return target
