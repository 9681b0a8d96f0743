"""What a LoRA says about itself: base family, trigger words, category (header metadata and sidecar file)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from .errors import LoRAFileError, SpecError
from .files import read_yaml_file

FAMILIES = ("sd1", "sd2", "sdxl")
FAMILY_NAMES = {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x", "sdxl": "Stable Diffusion XL",
                "flux": "FLUX.1", "sd3": "Stable Diffusion 3/3.5"}
# Header spellings of the diffusion-transformer families (kohya `ss_base_model_version`, modelspec architecture
# prefixes as sd-scripts, ai-toolkit and SimpleTuner write them) -> family.
DIT_FAMILY_PREFIXES = (("flux-1", "flux"), ("flux1", "flux"), ("flux.1", "flux"), ("flux_1", "flux"),
                       ("stable-diffusion-v3", "sd3"), ("stable-diffusion-3", "sd3"), ("sd3", "sd3"))
CATEGORIES = ("character", "clothing", "style", "background", "object")
# Text-encoder context width -> family (cross-attention key/value input width of the UNet).
CONTEXT_DIM_FAMILY = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
# First text encoder's width -> families (CLIP ViT-L in SD 1.x and SDXL, OpenCLIP ViT-H in SD 2.x).
TEXT_WIDTH_FAMILIES = {768: ("sd1", "sdxl"), 1024: ("sd2",)}


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


def family_key(name: str | None) -> str | None:
    """The family a header's base-model name means: 'flux' or 'sd3' for their spellings (`flux-1-dev`, `flux1`,
    `stable-diffusion-v3-medium`, …; `family_from_metadata` returns those as written), any other name as it is."""
    if name is None:
        return None
    return next((fam for prefix, fam in DIT_FAMILY_PREFIXES if name.startswith(prefix)), name)


def family_from_keys(layer_shapes: dict[str, dict[str, tuple[int, ...]]], file_keys=()) -> tuple[tuple[str, ...], str | None]:
    """The families a LoRA's key names and factor shapes fit, with the evidence, for files whose header is silent.

    `layer_shapes`: {component: {PEFT module path: down-factor shape}}; `file_keys`: the keys as stored (the
    kohya text-encoder prefix is only visible there). Each clue narrows the set of families; a clue that would
    empty it is ignored (the earlier, stronger one stands). Returns ((), None) when nothing is decisive.
    """
    clues: list[tuple[set[str], str]] = []
    unet, te = layer_shapes.get("unet", {}), layer_shapes.get("text_encoder", {})
    if layer_shapes.get("text_encoder_2"):
        clues.append(({"sdxl"}, "a second text encoder"))
    for module, shape in unet.items():
        if module.endswith(("attn2.to_k", "attn2.to_v")) and len(shape) == 2 and shape[1] in CONTEXT_DIM_FAMILY:
            clues.append(({CONTEXT_DIM_FAMILY[shape[1]]}, f"cross-attention width {shape[1]}"))
            break
    prefixes = {m.group(0) for m in map(re.compile(r"^lora_te[12]?_").match, file_keys) if m}
    if prefixes & {"lora_te1_", "lora_te2_"}:
        clues.append(({"sdxl"}, "kohya `lora_te1_`/`lora_te2_` names (two text encoders)"))
    elif "lora_te_" in prefixes:
        clues.append(({"sd1", "sd2"}, "kohya `lora_te_` names (one text encoder)"))
    for module, shape in te.items():
        if module.endswith("q_proj") and len(shape) == 2 and shape[1] in TEXT_WIDTH_FAMILIES:
            clues.append((set(TEXT_WIDTH_FAMILIES[shape[1]]), f"text-encoder width {shape[1]}"))
            break
    if any(re.search(r"\.transformer_blocks\.[1-9]", m) for m in unet):
        clues.append(({"sdxl"}, "several transformer blocks per attention layer"))
    if any(m.endswith(".proj_in") and len(s) == 4 for m, s in unet.items()):
        clues.append(({"sd1"}, "convolutional proj_in layers"))
    if any(m.startswith("down_blocks.0.attentions.") for m in unet):
        clues.append(({"sd1", "sd2"}, "attention in the first down block"))
    families, evidence = set(FAMILIES), []
    for fams, why in clues:
        if families & fams:
            families &= fams
            evidence.append(why)
    if not evidence:
        return (), None
    return tuple(f for f in FAMILIES if f in families), ", ".join(evidence)


def family_display(families) -> str:
    """'Stable Diffusion 1.x or Stable Diffusion 2.x' for ('sd1', 'sd2'); unknown names as they are."""
    if isinstance(families, str):
        families = (families,)
    return " or ".join(FAMILY_NAMES.get(f, f) for f in families)


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
        if side.exists() or side.is_symlink():
            if side.is_symlink() and side.resolve().parent != Path(lora_path).resolve().parent:
                raise LoRAFileError(side, f"the sidecar is a link to {side.resolve()}, outside the LoRA's folder; it is not read.",
                                    "put the sidecar itself next to the LoRA file.")
            try:
                data = read_yaml_file(side, "sidecar", max_bytes=1 << 20)  # JSON is YAML too
            except SpecError as err:
                raise LoRAFileError(side, f"sidecar cannot be read ({err}).", "fix or delete the sidecar file.") from None
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
