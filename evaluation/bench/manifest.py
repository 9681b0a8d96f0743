"""Benchmark manifests (`format: loraloom-benchmark/1`, YAML or JSON): base models, LoRAs, composition sets,
sampler defaults and seeds. The format is documented in docs/benchmarks.md; this module reads and checks it.

Sampler settings are layered: built-in defaults < `defaults` < the set's base model entry < the set itself, so a
manifest with two base models (ComposLoRA's anime and reality halves) states each half's settings once.
Paths are relative to the manifest's folder; LoRA files are relative to `lora_dir` (the `--lora-dir` flag
overrides it).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from loraloom.composition.errors import SpecError
from loraloom.composition.files import read_yaml_file
from loraloom.composition.metadata import CATEGORIES
from loraloom.pipelines.defaults import DEFAULTS

FORMAT = "loraloom-benchmark/1"
SEEDING_MODES = ("derived", "plain")

TOP_KEYS = {"format", "name", "description", "source", "base_models", "defaults", "lora_dir", "lora_source",
            "checker", "clip", "loras", "sets"}
# Settings any layer may set (defaults, a base model, a set).
SETTING_KEYS = {"steps", "guidance_scale", "scheduler", "height", "width", "lora_scale", "negative_prompt", "prompt",
                "seeds", "seeding", "method_params"}
BASE_MODEL_KEYS = {"model", "family", "vae"} | SETTING_KEYS
DEFAULTS_KEYS = {"base_model"} | SETTING_KEYS
LORA_KEYS = {"id", "name", "category", "triggers", "file", "weight", "url", "concept"}
SET_KEYS = {"id", "loras", "base_model", "group", "scoring_text", "expected", "tags", "regions"} | SETTING_KEYS


@dataclass(frozen=True)
class Settings:
    """What decides the images of one set besides its LoRAs (after layering)."""

    steps: int = DEFAULTS.steps
    guidance_scale: float = DEFAULTS.guidance_scale
    scheduler: str = DEFAULTS.scheduler
    height: int | None = DEFAULTS.height
    width: int | None = DEFAULTS.width
    lora_scale: float = 1.0
    negative_prompt: str = ""
    prompt: str = "{triggers}"  # `{triggers}`: the set's trigger words, comma-joined in LoRA order
    seeds: tuple[int, ...] = (0,)
    seeding: str = "derived"  # derived: seed = f(set id, seed); plain: the seed value itself
    method_params: dict = field(default_factory=dict)  # method name -> parameters, for every set


@dataclass(frozen=True)
class BaseModel:
    key: str
    model: str  # as written in the manifest: a path relative to it, a hub id, or tiny:sd1
    family: str | None = None
    vae: str | None = None
    settings: dict = field(default_factory=dict)


@dataclass(frozen=True)
class LoRAEntry:
    id: str
    file: str  # relative to the LoRA folder
    name: str | None = None
    category: str | None = None
    triggers: tuple[str, ...] = ()
    weight: float = 1.0
    url: str | None = None
    concept: dict | None = None


@dataclass(frozen=True)
class BenchSet:
    """One composition set: LoRA ids with weights, in the order the methods see them."""

    id: str
    loras: tuple[tuple[str, float], ...]
    base_model: str
    group: str  # what the report splits by (ComposLoRA: anime / reality); defaults to the base model key
    index: int  # position in the manifest
    run_position: int  # position among the manifest's sets of the same (group, number of LoRAs)
    scoring_text: str | None = None
    expected: dict | None = None
    tags: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)  # the set's own overrides
    regions: dict = field(default_factory=dict)  # {LoRA id: region}, used by `bench run --regions` (bench/regions.py)

    @property
    def n(self) -> int:
        return len(self.loras)

    @property
    def lora_ids(self) -> list[str]:
        return [i for i, _ in self.loras]


@dataclass
class Manifest:
    path: Path
    name: str
    base_models: dict[str, BaseModel]
    defaults: dict
    loras: dict[str, LoRAEntry]
    sets: list[BenchSet]
    sha256: str  # of the file's bytes
    description: str = ""
    source: dict | None = None
    lora_dir: Path | None = None
    lora_source: str | None = None
    checker: Path | None = None
    clip: str | None = None

    @property
    def folder(self) -> Path:
        return self.path.parent

    def settings(self, s: BenchSet) -> Settings:
        layered = {**self.defaults, **self.base_models[s.base_model].settings, **s.settings}
        layered.pop("base_model", None)
        params = {}
        for layer in (self.defaults, self.base_models[s.base_model].settings, s.settings):
            for method, p in (layer.get("method_params") or {}).items():
                params.setdefault(method, {}).update(p)
        layered["method_params"] = params
        if "seeds" in layered:
            layered["seeds"] = tuple(int(x) for x in layered["seeds"])
        return Settings(**layered)

    def lora_folder(self, override: str | Path | None = None) -> Path:
        if override is not None:
            return Path(override).expanduser().resolve()
        return self.lora_dir if self.lora_dir is not None else self.folder

    def lora_path(self, lora_id: str, lora_dir: str | Path | None = None) -> Path:
        return self.lora_folder(lora_dir) / self.loras[lora_id].file

    def triggers(self, s: BenchSet) -> list[str]:
        return [t for i in s.lora_ids for t in self.loras[i].triggers]

    def prompt(self, s: BenchSet) -> str:
        """The set's prompt with `{triggers}` expanded (ComposLoRA: base prompt + ", " + all trigger words)."""
        return self.settings(s).prompt.replace("{triggers}", ", ".join(self.triggers(s)))

    def scoring_text(self, s: BenchSet) -> str:
        """What CLIPScore compares the image with: the set's `scoring_text`, else its trigger words (ComposLoRA)."""
        return s.scoring_text if s.scoring_text is not None else ", ".join(self.triggers(s))

    def model_ref(self, key: str) -> str:
        """The base model as the loader takes it: an absolute path for local folders/files, else as written."""
        return model_location(self.base_models[key].model, self.folder)

    def vae_ref(self, key: str) -> str | None:
        vae = self.base_models[key].vae
        return model_location(vae, self.folder) if vae else None

    def select(self, limit: int | None = None, patterns: list[str] | None = None) -> list[BenchSet]:
        """Sets matching any of the id patterns (fnmatch), then the first `limit` of them, in manifest order."""
        sets = self.sets
        if patterns:
            sets = [s for s in sets if any(fnmatch.fnmatchcase(s.id, p) for p in patterns)]
            if not sets:
                raise SpecError(f"{self.path}: no set id matches {patterns}")
        return sets[:limit] if limit is not None else list(sets)

    def counts(self, sets: list[BenchSet] | None = None) -> dict[tuple[str, int], int]:
        """Number of sets per (group, number of LoRAs)."""
        out: dict[tuple[str, int], int] = defaultdict(int)
        for s in self.sets if sets is None else sets:
            out[(s.group, s.n)] += 1
        return dict(out)


def model_location(value: str, base: Path) -> str:
    """`tiny:` names and hub ids (`org/name`) as written; anything else is a path relative to the manifest. Unlike
    spec files, a manifest's single-word name (`model`) is a local folder even when it does not exist yet, so a
    missing folder is reported as missing instead of being looked up on the hub."""
    from loraloom.pipelines.batch import _resolve  # the rule `loraloom generate` applies to spec files

    if value.startswith("tiny:"):
        return value
    if "/" not in value and "\\" not in value:
        p = Path(value).expanduser()
        return str((p if p.is_absolute() else base / p).resolve())
    return _resolve(value, base)


def _err(path, where: str, problem: str, fix: str | None = None) -> SpecError:
    return SpecError(f"{path}: {where}: {problem}" + (f" Fix: {fix}" if fix else ""))


def _check_keys(path, where: str, data: dict, known: set[str]) -> None:
    if not isinstance(data, dict):
        raise _err(path, where, f"must be a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - known)
    if unknown:
        raise _err(path, where, f"unknown key(s) {unknown}", f"use only {sorted(known)} (docs/benchmarks.md).")


def _check_settings(path, where: str, data: dict) -> dict:
    out = {k: data[k] for k in SETTING_KEYS if k in data}
    for k in ("steps", "height", "width"):
        if k in out and out[k] is not None and (not isinstance(out[k], int) or out[k] <= 0):
            raise _err(path, f"{where}.{k}", f"must be a positive integer, got {out[k]!r}")
    for k in ("guidance_scale", "lora_scale"):
        if k in out and not isinstance(out[k], (int, float)):
            raise _err(path, f"{where}.{k}", f"must be a number, got {out[k]!r}")
    if "seeds" in out:
        seeds = out["seeds"]
        if not isinstance(seeds, list) or not seeds or not all(isinstance(x, int) for x in seeds):
            raise _err(path, f"{where}.seeds", f"must be a non-empty list of integers, got {seeds!r}")
        if len(set(seeds)) != len(seeds):
            raise _err(path, f"{where}.seeds", f"lists a seed twice: {seeds}")
    if "seeding" in out and out["seeding"] not in SEEDING_MODES:
        raise _err(path, f"{where}.seeding", f"must be one of {SEEDING_MODES}, got {out['seeding']!r}")
    mp = out.get("method_params")
    if mp is not None and (not isinstance(mp, dict) or not all(isinstance(v, dict) for v in mp.values())):
        raise _err(path, f"{where}.method_params", "must map a method name to its parameters",
                   "e.g. method_params: {switch: {switch_interval: 5}}")
    for k in ("scheduler", "negative_prompt", "prompt"):
        if k in out and not isinstance(out[k], str):
            raise _err(path, f"{where}.{k}", f"must be a string, got {out[k]!r}")
    return out


def _resolve_path(value: str | None, base: Path) -> Path | None:
    if value is None:
        return None
    p = Path(str(value)).expanduser()
    return (p if p.is_absolute() else base / p).resolve()


def _read_manifest_file(path: Path) -> tuple[bytes, object]:
    """The file's bytes and what YAML (a superset of JSON) makes of them."""
    if not path.exists():
        raise SpecError(f"{path}: no such manifest file")
    data = read_yaml_file(path, "manifest", max_bytes=64 << 20)
    return path.read_bytes(), data


def _check_top_level(path: Path, data) -> None:
    """The document is a mapping in this reader's format with known keys only."""
    if not isinstance(data, dict):
        raise SpecError(f"{path}: a manifest must be a mapping (format, base_models, defaults, loras, sets)")
    if data.get("format") != FORMAT:
        raise _err(path, "format", f"is {data.get('format')!r}", f"this reader knows format: {FORMAT}")
    _check_keys(path, "top level", data, TOP_KEYS)


def _base_models(path: Path, bms) -> dict[str, BaseModel]:
    """`base_models`: key -> {model, family, vae, settings}; a bare string is the model."""
    if not isinstance(bms, dict) or not bms:
        raise _err(path, "base_models", "must map at least one key to {model: ...}", "e.g. base_models: {sd15: {model: runwayml/stable-diffusion-v1-5}}")
    base_models = {}
    for key, entry in bms.items():
        entry = {"model": entry} if isinstance(entry, str) else entry
        _check_keys(path, f"base_models.{key}", entry, BASE_MODEL_KEYS)
        if not entry.get("model"):
            raise _err(path, f"base_models.{key}.model", "is missing", "give a diffusers folder (relative to the manifest), a hub id or tiny:sd1")
        base_models[str(key)] = BaseModel(key=str(key), model=str(entry["model"]), family=entry.get("family"),
                                          vae=entry.get("vae"), settings=_check_settings(path, f"base_models.{key}", entry))
    return base_models


def _default_settings(path: Path, defaults, base_models: dict[str, BaseModel]) -> dict:
    """`defaults`: the checked settings plus `base_model` (the only base model when there is one and none is named)."""
    _check_keys(path, "defaults", defaults, DEFAULTS_KEYS)
    default_settings = _check_settings(path, "defaults", defaults)
    default_bm = defaults.get("base_model")
    if default_bm is None and len(base_models) == 1:
        default_bm = next(iter(base_models))
    if default_bm is not None and default_bm not in base_models:
        raise _err(path, "defaults.base_model", f"{default_bm!r} is not in base_models {sorted(base_models)}")
    if default_bm is not None:
        default_settings["base_model"] = default_bm
    return default_settings


def _lora_entry(path: Path, where: str, entry, loras: dict[str, LoRAEntry]) -> LoRAEntry:
    """One item of `loras`, checked against the ones before it."""
    _check_keys(path, where, entry, LORA_KEYS)
    for k in ("id", "file"):
        if not entry.get(k):
            raise _err(path, f"{where}.{k}", "is missing")
    lid = str(entry["id"])
    if lid in loras:
        raise _err(path, f"{where}.id", f"{lid!r} is used twice", "give every LoRA its own id")
    cat = entry.get("category")
    if cat is not None and cat not in CATEGORIES:
        raise _err(path, f"{where}.category", f"{cat!r} is not one of {list(CATEGORIES)}")
    trig = entry.get("triggers") or []
    if isinstance(trig, str) or not all(isinstance(t, str) for t in trig):
        raise _err(path, f"{where}.triggers", "must be a list of strings", 'e.g. triggers: ["ohwx", "red hair"]')
    return LoRAEntry(id=lid, file=str(entry["file"]), name=entry.get("name"), category=cat, triggers=tuple(trig),
                     weight=float(entry.get("weight", 1.0)), url=entry.get("url"), concept=entry.get("concept"))


def _loras(path: Path, entries) -> dict[str, LoRAEntry]:
    """`loras`: id -> entry, in manifest order; at least one."""
    loras: dict[str, LoRAEntry] = {}
    for i, entry in enumerate(entries):
        lora = _lora_entry(path, f"loras[{i}]", entry, loras)
        loras[lora.id] = lora
    if not loras:
        raise _err(path, "loras", "is empty", "list the LoRAs the sets use")
    return loras


def _set_id(path: Path, i: int, entry, seen: set[str]) -> str:
    """A set's id: present, not used before, usable as a folder name."""
    where = f"sets[{i}]"
    _check_keys(path, where, entry, SET_KEYS)
    sid = entry.get("id")
    if not sid:
        raise _err(path, f"{where}.id", "is missing")
    sid = str(sid)
    where = f"sets[{i}] ({sid})"
    if sid in seen:
        raise _err(path, f"{where}.id", "is used twice", "give every set its own id")
    if any(c in sid for c in "/\\") or sid in (".", ".."):
        raise _err(path, f"{where}.id", "must not contain path separators")
    return sid


def _set_loras(path: Path, where: str, entry, loras: dict[str, LoRAEntry]) -> list[tuple[str, float]]:
    """A set's (LoRA id, weight) pairs: known ids, each once; the LoRA's own weight where the set gives none."""
    refs = []
    for item in entry.get("loras") or []:
        lid, w = (item, None) if isinstance(item, str) else (item.get("id"), item.get("weight"))
        if lid not in loras:
            raise _err(path, f"{where}.loras", f"unknown LoRA id {lid!r}", "add it to `loras` or fix the id")
        refs.append((lid, float(loras[lid].weight if w is None else w)))
    if not refs:
        raise _err(path, f"{where}.loras", "is empty")
    if len({r[0] for r in refs}) != len(refs):
        raise _err(path, f"{where}.loras", "lists a LoRA twice")
    return refs


def _set_regions(path: Path, where: str, entry, lora_ids: list[str]) -> dict:
    """A set's own `regions:` ({LoRA id: named region or box}, every LoRA of the set), checked now; {} without."""
    if entry.get("regions") is None:
        return {}
    from .regions import checked_set_regions

    return checked_set_regions(entry["regions"], lora_ids, f"{path}: {where}.regions")


def _set_base_model(path: Path, where: str, entry, default_bm: str | None, base_models: dict[str, BaseModel]) -> str:
    """A set's base model key: its own, else `defaults.base_model`; one of `base_models`."""
    bm = entry.get("base_model", default_bm)
    if bm is None:
        raise _err(path, f"{where}.base_model", "is missing and there is no defaults.base_model")
    if bm not in base_models:
        raise _err(path, f"{where}.base_model", f"{bm!r} is not in base_models {sorted(base_models)}")
    return bm


def _sets(path: Path, entries, loras: dict[str, LoRAEntry], base_models: dict[str, BaseModel],
          default_bm: str | None) -> list[BenchSet]:
    """`sets`, in manifest order, each with its position among the sets of its (group, number of LoRAs)."""
    sets: list[BenchSet] = []
    seen: set[str] = set()
    positions: dict[tuple[str, int], int] = defaultdict(int)
    for i, entry in enumerate(entries):
        sid = _set_id(path, i, entry, seen)
        seen.add(sid)
        where = f"sets[{i}] ({sid})"
        refs = _set_loras(path, where, entry, loras)
        bm = _set_base_model(path, where, entry, default_bm, base_models)
        group = str(entry.get("group", bm))
        key = (group, len(refs))
        sets.append(BenchSet(id=sid, loras=tuple(refs), base_model=bm, group=group, index=i, run_position=positions[key],
                             scoring_text=entry.get("scoring_text"), expected=entry.get("expected"),
                             tags=dict(entry.get("tags") or {}), settings=_check_settings(path, where, entry),
                             regions=_set_regions(path, where, entry, [r[0] for r in refs])))
        positions[key] += 1
    if not sets:
        raise _err(path, "sets", "is empty", "list at least one composition set")
    return sets


def _check_layered_settings(m: Manifest) -> None:
    """Every set's settings must build (catches a bad value in any layer once, here)."""
    for s in m.sets:
        try:
            m.settings(s)
        except TypeError as err:
            raise _err(m.path, f"set {s.id}", f"bad settings ({err})") from None


def load_manifest(path: str | Path) -> Manifest:
    """Read and check a manifest; every error names the file, the key and the fix."""
    path = Path(path).expanduser().resolve()
    raw, data = _read_manifest_file(path)
    _check_top_level(path, data)
    folder = path.parent
    base_models = _base_models(path, data.get("base_models"))
    default_settings = _default_settings(path, data.get("defaults") or {}, base_models)
    loras = _loras(path, data.get("loras") or [])
    sets = _sets(path, data.get("sets") or [], loras, base_models, default_settings.get("base_model"))
    m = Manifest(path=path, name=str(data.get("name") or path.stem), base_models=base_models, defaults=default_settings,
                 loras=loras, sets=sets, sha256=hashlib.sha256(raw).hexdigest(), description=str(data.get("description") or ""),
                 source=data.get("source"), lora_dir=_resolve_path(data.get("lora_dir"), folder),
                 lora_source=data.get("lora_source"), checker=_resolve_path(data.get("checker"), folder),
                 clip=data.get("clip"))
    _check_layered_settings(m)
    return m


@dataclass
class MissingFiles:
    loras: list[tuple[str, Path]] = field(default_factory=list)  # (LoRA id, expected path)
    models: list[tuple[str, Path]] = field(default_factory=list)  # (base model key, expected path)

    def __bool__(self) -> bool:
        return bool(self.loras or self.models)

    def message(self, manifest: Manifest, lora_dir: Path) -> str:
        lines = []
        if self.loras:
            lines.append(f"{len(self.loras)} LoRA file(s) the selected sets need are missing under {lora_dir}:")
            lines += [f"  {lid}: {p}" for lid, p in self.loras]
            lines.append("Fix: point --lora-dir at the folder that holds them" + (f" ({manifest.lora_source})" if manifest.lora_source else "") + ".")
        if self.models:
            lines.append(f"{len(self.models)} base model path(s) are missing:")
            lines += [f"  {key}: {p}" for key, p in self.models]
        return "\n".join(lines)


def missing_files(manifest: Manifest, sets: list[BenchSet], lora_dir: str | Path | None = None) -> MissingFiles:
    """Every LoRA file and local base model the sets need that is not there (checked before anything loads)."""
    out = MissingFiles()
    needed = {i for s in sets for i in s.lora_ids}
    for lid in (i for i in manifest.loras if i in needed):
        p = manifest.lora_path(lid, lora_dir)
        if not p.is_file():
            out.loras.append((lid, p))
    for key in dict.fromkeys(s.base_model for s in sets):
        ref = manifest.model_ref(key)
        if Path(ref).is_absolute() and not Path(ref).exists():
            out.models.append((key, Path(ref)))
    return out


def settings_dict(s: Settings) -> dict:
    return dataclasses.asdict(s)
