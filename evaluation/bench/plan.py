"""The work of a benchmark run: every (set × method × seed) as a `WorkItem` with the full `GenerationSpec` that
makes its image, in one canonical order, and which process of a sharded run takes which item.

Seeds. By default an image's seed is a pure function of (set id, seed value) — `derived_seed` — so any image can
be regenerated alone, and every method sees the same initial noise for the same set and seed (paired
comparisons). `seeding: plain` uses the seed value itself. `--reference-seeding` reproduces the ComposLoRA
reference code instead (docs/methods/composlora.md#seeding): one CPU generator seeded once per (group, number of LoRAs, method) run,
latents drawn for the run's sets in manifest order; we get the same noise without running in order by
fast-forwarding a fresh generator past the draws of the sets before (`reference_generator`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from loraloom.composition.errors import SpecError
from loraloom.composition.lora_file import file_sha256
from loraloom.composition.methods import available_methods, get_method, make_method
from loraloom.pipelines.spec import GenerationSpec, LoRARef

from .manifest import BenchSet, Manifest
from .regions import BenchRegions, region_refs

_VARIANT = re.compile(r"^\s*([A-Za-z0-9_\-]+)\s*(?:\((.*)\))?\s*$")


@dataclass(frozen=True)
class MethodVariant:
    """A method and the parameters this run gives it beyond the manifest's (`switch(switch_interval=3)`)."""

    name: str
    params: tuple[tuple[str, object], ...] = ()
    regions: bool = False  # each LoRA bound to its set's region (`bench run --regions`; label `NAME+regions`)

    @property
    def label(self) -> str:
        label = self.name
        if self.params:
            label += "(" + ",".join(f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in self.params) + ")"
        return label + ("+regions" if self.regions else "")

    @property
    def has_lora_scale(self) -> bool:
        return any(f.name == "lora_scale" for f in dataclasses.fields(get_method(self.name).Params))


def _split_top(text: str) -> list[str]:
    """Split at commas outside parentheses."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def parse_methods(text: str | list[str]) -> list[MethodVariant]:
    """`merge,switch,switch(switch_interval=3,order=given)` → variants; names and parameters are checked now,
    before any model loads (any registered method works: the runner treats them all alike)."""
    items = _split_top(text) if isinstance(text, str) else [t for x in text for t in _split_top(x)]
    out: list[MethodVariant] = []
    for item in items:
        m = _VARIANT.match(item)
        if not m:
            raise SpecError(f"--methods: cannot read {item!r}; write NAME or NAME(key=value,...)")
        name, args = m.group(1), m.group(2)
        get_method(name)
        params = []
        for kv in _split_top(args or ""):
            if "=" not in kv:
                raise SpecError(f"--methods: {item!r}: parameter {kv!r} is not key=value")
            k, v = kv.split("=", 1)
            params.append((k.strip(), yaml.safe_load(v.strip())))
        try:
            make_method(name, dict(params))
        except (TypeError, ValueError) as err:
            raise SpecError(f"--methods: {item!r}: {err}") from None
        variant = MethodVariant(name, tuple(sorted(params)))
        if variant.label in {v.label for v in out}:
            raise SpecError(f"--methods lists {variant.label} twice")
        out.append(variant)
    if not out:
        raise SpecError("--methods is empty; e.g. --methods merge,switch,composite")
    return out


def with_regions(variants: list[MethodVariant]) -> list[MethodVariant]:
    """The variants with each LoRA bound to its region (`--regions`); SpecError, before any model loads, for a method
    where regions have no meaning (`Method.supports_regions`)."""
    refused = [v.label for v in variants if not get_method(v.name).supports_regions]
    if refused:
        takes = sorted(n for n in available_methods() if get_method(n).supports_regions)
        raise SpecError(f"--regions: {', '.join(refused)} cannot bind a LoRA to a region (the method has no meaning for "
                        f"regions). Fix: run those methods without --regions; the methods that take regions are "
                        f"{', '.join(takes)}.")
    return [dataclasses.replace(v, regions=True) for v in variants]


def derived_seed(set_id: str, seed: int) -> int:
    """The seed of image (set, seed value): the first 31 bits of sha256("<set id>:<seed>")."""
    digest = hashlib.sha256(f"{set_id}:{int(seed)}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def reference_generator(seed: int, position: int, latent_shape: tuple[int, ...]) -> torch.Generator:
    """A CPU generator in the state the reference's run generator has when it reaches the set at `position`:
    seeded once, then `position` initial-latent draws of `latent_shape` (float32) taken. Exact only for samplers
    that draw nothing per step (`scheduler_draws_noise`)."""
    g = torch.Generator("cpu").manual_seed(int(seed))
    for _ in range(position):
        torch.randn(latent_shape, generator=g, dtype=torch.float32)
    return g


def scheduler_draws_noise(scheduler) -> bool:
    """True when `scheduler.step` takes random numbers from the generator it is given (ancestral / SDE samplers)."""
    from loraloom.pipelines.schedulers import step_kwargs

    sched = type(scheduler).from_config(scheduler.config)
    # flow-matching schedulers with a resolution-dependent shift (FLUX) need its mu; any value does here
    sched.set_timesteps(4, **({"mu": 1.0} if sched.config.get("use_dynamic_shifting") else {}))
    g = torch.Generator("cpu").manual_seed(0)
    before = g.get_state().clone()
    x = torch.zeros(1, 4, 4, 4)
    for t in sched.timesteps[:3]:
        x = sched.step(torch.zeros_like(x), t, x, **step_kwargs(sched, g), return_dict=False)[0]
    return not torch.equal(before, g.get_state())


@dataclass
class WorkItem:
    """One image to make."""

    item_id: str
    set: BenchSet
    variant: MethodVariant
    seed_index: int
    seed_value: int  # the manifest's seed
    seed: int  # what seeds the generator (derived / plain / the reference stream's seed)
    reference_position: int | None  # position in the reference run (reference seeding only)
    spec: GenerationSpec
    fingerprint: str
    png: str  # relative to the output folder
    vae: str | None = None

    @property
    def run_key(self) -> str:
        """The reference run this item belongs to: (group, number of LoRAs, method, seed value)."""
        return f"{self.set.group}/n{self.set.n}/{self.variant.label}/s{self.seed_value}"


def safe_name(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=\-]+", "_", label).strip("_") or "method"


def item_id(set_id: str, label: str, seed_index: int) -> str:
    return f"{set_id}|{label}|{seed_index}"


class FileHashes:
    """sha256 of LoRA files, computed once per file per process."""

    def __init__(self):
        self._done: dict[Path, str] = {}

    def __call__(self, path: Path) -> str:
        if path not in self._done:
            self._done[path] = file_sha256(path)
        return self._done[path]


def build_plan(manifest: Manifest, sets: list[BenchSet], variants: list[MethodVariant], *, seeds: int | None = None,
               reference_seeding: bool = False, lora_dir=None, overrides: dict | None = None, dtype: str = "float32",
               hashes: FileHashes | None = None, variant_overrides: dict[str, dict] | None = None,
               regions: BenchRegions | None = None) -> list[WorkItem]:
    """Every (set × method × seed) in canonical order: sets in manifest order, then methods as given, then seeds.
    `overrides` replace sampler settings for every set (e.g. {"steps": 10} for a quick run); `variant_overrides`
    ({method label: {"guidance_scale": 7, "steps": 50}}, what `bench tune` chose) replace them per method, after
    `overrides`. A variant with `regions` (label `NAME+regions`) binds each LoRA of a set to its region in `regions`
    (`bench/regions.py`: the spec's `RegionRef`s; a LoRA whose region is the whole image acts unmasked)."""
    hashes = hashes or FileHashes()
    if any(v.regions for v in variants) and regions is None:
        raise SpecError("a method variant binds LoRAs to regions, but the plan was given no regions (load_bench_regions)")
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    variant_overrides = variant_overrides or {}
    items = []
    for s in sets:
        st = dataclasses.replace(manifest.settings(s), **overrides)
        seed_values = list(st.seeds)
        if seeds is not None:
            if seeds > len(seed_values):
                raise SpecError(f"--seeds {seeds}: set {s.id} has only {len(seed_values)} seed(s) {seed_values} in the manifest")
            seed_values = seed_values[:seeds]
        prompt = manifest.prompt(s) if "prompt" not in overrides else st.prompt
        refs = []
        for lid, w in s.loras:
            entry, path = manifest.loras[lid], manifest.lora_path(lid, lora_dir)
            refs.append(LoRARef(path=str(path), weight=w, name=lid, category=entry.category, triggers=list(entry.triggers),
                                sha256=hashes(path) if path.is_file() else None))
        bm = manifest.base_models[s.base_model]
        set_regions = []
        if any(v.regions for v in variants):
            mapping = regions.of(s.id)
            if mapping is None:
                raise SpecError(f"--regions: set {s.id} has no regions ({regions.source}). Fix: add them, or leave the set out")
            set_regions = region_refs(s.lora_ids, mapping)
        for v in variants:
            # per-method settings (bench tune) by the variant's label; a +regions variant takes its method's
            tuned = variant_overrides.get(v.label, variant_overrides.get(dataclasses.replace(v, regions=False).label))
            vst = dataclasses.replace(st, **tuned) if tuned else st
            params = dict(st.method_params.get(v.name, {}))
            if v.has_lora_scale:
                params.setdefault("lora_scale", st.lora_scale)
            params.update(dict(v.params))
            for k, seed_value in enumerate(seed_values):
                if reference_seeding:
                    seed, position = seed_value, s.run_position
                elif st.seeding == "plain":
                    seed, position = seed_value, None
                else:
                    seed, position = derived_seed(s.id, seed_value), None
                spec = GenerationSpec(
                    model=manifest.model_ref(s.base_model), prompt=prompt, negative_prompt=st.negative_prompt,
                    loras=[dataclasses.replace(r) for r in refs], method=v.name, method_params=dict(params), steps=vst.steps,
                    guidance_scale=vst.guidance_scale, height=st.height, width=st.width, scheduler=vst.scheduler, seed=seed,
                    family=bm.family, dtype=dtype, regions=set_regions if v.regions else [],
                )
                items.append(WorkItem(
                    item_id=item_id(s.id, v.label, k), set=s, variant=v, seed_index=k, seed_value=seed_value, seed=seed,
                    reference_position=position, spec=spec, vae=bm.vae,
                    fingerprint=fingerprint(spec, bm.model, bm.vae, [r[0] for r in s.loras], position),
                    png=f"images/{safe_name(v.label)}/{s.id}_s{k}.png",
                ))
    return items


def fingerprint(spec: GenerationSpec, model: str, vae: str | None, lora_ids: list[str], reference_position: int | None) -> str:
    """What decides an image's pixels, independent of where the files lie: the spec with the base model as the
    manifest names it and each LoRA by id and file hash (not path), plus the reference-stream position."""
    d = spec.to_dict()
    d.pop("version", None)
    d["model"], d["vae"], d["reference_position"] = model, vae, reference_position
    # each LoRA by id and hash instead of its path; its controls (te/unet, lbw, schedule, mask) as the spec has them
    d["loras"] = [{**{k: v for k, v in l.items() if k not in ("path", "name")}, "id": i} for i, l in zip(lora_ids, d["loras"])]
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def shard(items: list, process_index: int, num_processes: int) -> list:
    """Item i of the canonical order goes to process i mod P: deterministic, independent of what is done."""
    if not 0 <= process_index < num_processes:
        raise ValueError(f"process index {process_index} outside 0..{num_processes - 1}")
    return items[process_index::num_processes]
