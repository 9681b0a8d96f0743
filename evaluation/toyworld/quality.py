"""The toy world's quality bars (`loraloom toyworld check`): generate on fresh seeds, read the images with the
checker, and report what fraction shows what the prompt asked for.

Every image here is generated through `pipelines.ComposedPipeline` (the product path), with the sampler
defaults of the toy model as its manifest gives them (`manifest.sampler_defaults`: 25 trailing-DDIM steps and the
recipe's CFG scale, 32x32).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import scenes as S
from .manifest import composition_sets, sampler_defaults, set_colour, set_prompt

CHECK_SEED = 100_000  # fresh seeds: training never samples initial noise from these


@dataclass
class Probe:
    """One image to generate and what the checker must find in it (`expect`) or must not find (`absent`)."""

    prompt: str
    seed: int
    loras: tuple[str, ...] = ()
    expect: dict[str, str] = field(default_factory=dict)
    absent: dict[str, str] = field(default_factory=dict)
    group: str = ""
    method: str = ""  # the composition method ("" = the generator's)
    regions: dict = field(default_factory=dict)  # {LoRA id: region} (`regions.py`); empty = every LoRA everywhere
    set_id: str = ""  # the benchmark set the probe comes from (`benchmark.yaml`'s ids)


def base_probes(seeds_per_prompt: int = 4) -> list[Probe]:
    """shape x colour x background prompts of the base world."""
    out = []
    seed = CHECK_SEED
    for shape, colour, bg in itertools.product(S.BASE_SHAPES, S.BASE_COLOURS, S.BASE_BACKGROUNDS):
        scene = S.Scene(shape, colour, bg)
        for _ in range(seeds_per_prompt):
            out.append(Probe(S.caption(scene), seed, expect={"shape": shape, "colour": colour, "background": bg}, group="base"))
            seed += 1
    return out


def lora_probes(spec: S.ConceptLoRA, n: int = 24, seed: int = CHECK_SEED + 10_000) -> list[Probe]:
    """Prompts with the LoRA's trigger (random base attributes) and the LoRA loaded: its concept must appear."""
    rng = np.random.default_rng([seed, S.LORAS.index(spec)])
    out = []
    for i in range(n):
        scene = S.lora_scene(rng, spec)
        out.append(Probe(S.caption(scene, background=i % 3 != 2), seed + 100 * S.LORAS.index(spec) + i, (spec.id,),
                         expect={spec.attribute: spec.value}, group=f"alone:{spec.id}"))
    return out


def leak_probes(spec: S.ConceptLoRA, n: int = 24, seed: int = CHECK_SEED + 20_000) -> list[Probe]:
    """Base prompts (no trigger) with the LoRA loaded: its concept must not appear."""
    rng = np.random.default_rng([seed, S.LORAS.index(spec)])
    out = []
    for i in range(n):
        scene = S.sample_scene(rng)
        out.append(Probe(S.caption(scene, background=i % 3 != 2), seed + 100 * S.LORAS.index(spec) + i, (spec.id,),
                         absent={spec.attribute: spec.value}, group=f"leak:{spec.id}"))
    return out


def merge_probes(n: int, seeds_per_set: int, max_sets: int | None = None, seed: int = CHECK_SEED + 30_000) -> list[Probe]:
    sets = composition_sets(n)
    pick = list(range(len(sets)))
    if max_sets is not None and max_sets < len(sets):
        pick = [int(i) for i in np.linspace(0, len(sets) - 1, max_sets).round().astype(int)]
    out = []
    for i, index in enumerate(pick):
        loras = sets[index]
        colour = set_colour(i)
        for k in range(seeds_per_set):
            out.append(Probe(set_prompt(loras, colour), seed + 1000 * n + seeds_per_set * i + k, tuple(l.id for l in loras),
                             expect={l.attribute: l.value for l in loras}, group=f"merge{n}", set_id=f"n{n}-{index:03d}"))
    return out


def judge(probes: list[Probe], predictions: list[dict[str, str]]) -> list[bool]:
    ok = []
    for p, pred in zip(probes, predictions):
        good = all(pred[a] == v for a, v in p.expect.items()) and not any(pred[a] == v for a, v in p.absent.items())
        ok.append(good)
    return ok


class ComposedGenerator:
    """Generates probes through `ComposedPipeline` with the toy world's LoRAs resident."""

    def __init__(self, assets: str | Path, steps: int | None = None, guidance_scale: float | None = None,
                 method: str = "merge"):
        """`steps` and `guidance_scale` default to the world's own (`sampler_defaults`)."""
        from loraloom.pipelines import ComposedPipeline

        assets = Path(assets)
        sampler = sampler_defaults(assets, steps, guidance_scale)
        steps, guidance_scale = sampler["steps"], sampler["guidance_scale"]
        self.cp = ComposedPipeline.from_pretrained(str(assets / "model"))
        for spec in S.LORAS:
            self.cp.load_lora(assets / "loras" / f"{spec.id}.safetensors", name=spec.id)
        self.steps, self.guidance_scale, self.method = steps, guidance_scale, method

    def __call__(self, probes: list[Probe], progress=None) -> np.ndarray:
        from .regions import generation_regions

        images = []
        for p in probes:
            regions = generation_regions(p.loras, p.regions)[1] if p.regions else ()
            out = self.cp(p.prompt, loras=[(i, 1.0) for i in p.loras], method=p.method or self.method,
                          method_params={"lora_scale": 1.0}, num_inference_steps=self.steps,
                          guidance_scale=self.guidance_scale, height=S.SIZE, width=S.SIZE, seed=p.seed,
                          scheduler="default", progress_bar=False, regions=regions)
            images.append(np.asarray(out.images[0]))
            if progress is not None:
                progress.update(1)
        return np.stack(images)


def _generate_chunk(assets: str, probes: list[Probe], steps: int | None, guidance_scale: float | None, position: int,
                    progress: bool):
    import torch
    from tqdm.auto import tqdm

    from .training import quiet_library_bars

    torch.set_num_threads(1)
    if not progress:
        quiet_library_bars()
    gen = ComposedGenerator(assets, steps, guidance_scale)
    with tqdm(total=len(probes), desc=f"toyworld check [{position}]", position=position, disable=not progress,
              mininterval=2.0, leave=False) as bar:
        return gen(probes, bar)


def generate_probes(assets, probes: list[Probe], steps: int | None = None, guidance_scale: float | None = None,
                    workers: int = 2, progress: bool = True) -> np.ndarray:
    """Images of all probes, split over `workers` single-threaded processes (each image depends only on its probe);
    `steps` and `guidance_scale` default to the world's own (`sampler_defaults`)."""
    if workers <= 1:
        return _generate_chunk(str(assets), probes, steps, guidance_scale, 0, progress)
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    chunks = [probes[i::workers] for i in range(workers)]
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        parts = [pool.submit(_generate_chunk, str(assets), c, steps, guidance_scale, i, progress) for i, c in enumerate(chunks)]
        results = [p.result() for p in parts]
    images = np.empty((len(probes), S.SIZE, S.SIZE, 3), np.uint8)
    for i, r in enumerate(results):
        images[i::workers] = r
    return images


@dataclass
class CheckSettings:
    base_seeds: int = 4  # per shape x colour x background prompt (24 prompts)
    lora_images: int = 48  # per LoRA, with its trigger (24 gave a spread of about ±0.06 around a bar of 0.90)
    leak_images: int = 48  # per LoRA, without its trigger
    merge2_seeds: int = 4  # per 2-LoRA set (24 sets)
    merge4_sets: int = 48  # of the 96 4-LoRA sets (evenly spaced)
    merge4_seeds: int = 2
    checker_images: int = 2000
    workers: int = 2


def run_check(assets, settings: CheckSettings | None = None, steps: int | None = None,
              guidance_scale: float | None = None, progress: bool = True, out_dir: Path | None = None,
              printer=print) -> dict[str, float]:
    """Compute the quality bars; prints details, then the six result lines last. Returns the numbers.

    `steps` and `guidance_scale` default to the world's own sampler settings (`sampler_defaults`)."""
    from .checker import Checker
    from .trainers import checker_accuracy
    from .training import quiet_library_bars

    if not progress:
        quiet_library_bars()
    settings = settings or CheckSettings()
    assets = Path(assets)
    sampler = sampler_defaults(assets, steps, guidance_scale)
    steps, guidance_scale = sampler["steps"], sampler["guidance_scale"]
    printer(f"sampler: {steps} steps, CFG {guidance_scale:g}, {S.SIZE}x{S.SIZE}, LoRA weight 1.0, naive merge for sets")
    checker = Checker.load(assets / "checker")
    acc = checker_accuracy(checker, settings.checker_images)
    printer("checker accuracy on fresh generator images: " + ", ".join(f"{a} {v:.4f}" for a, v in acc.items()))
    try:
        from .clipmodel import load_clip, retrieval_accuracy

        model, processor = load_clip(assets / "clip")
        printer(f"tiny CLIP text->image top-1 among 100 fresh scenes: captions {retrieval_accuracy(model, processor):.3f}, "
                f"trigger words {retrieval_accuracy(model, processor, trigger_text=True):.3f} (chance 0.010)")
    except OSError as err:
        printer(f"tiny CLIP not found ({err})")

    probes = base_probes(settings.base_seeds)
    for spec in S.LORAS:
        probes += lora_probes(spec, settings.lora_images) + leak_probes(spec, settings.leak_images)
    probes += merge_probes(2, settings.merge2_seeds) + merge_probes(4, settings.merge4_seeds, settings.merge4_sets)
    images = generate_probes(assets, probes, steps, guidance_scale, settings.workers, progress)
    preds = checker.predict(images)
    ok = np.array(judge(probes, preds))
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(probes):
        groups.setdefault(p.group, []).append(i)
    rate = {g: float(ok[idx].mean()) for g, idx in groups.items()}
    base = groups["base"]
    for attr in ("shape", "colour", "background"):
        printer(f"base {attr} accuracy {np.mean([preds[i][attr] == probes[i].expect[attr] for i in base]):.3f}")
    for spec in S.LORAS:
        printer(f"{spec.id:13s} {spec.trigger:8s} {spec.attribute}={spec.value:12s} alone {rate[f'alone:{spec.id}']:.3f}  "
                f"leak {1 - rate[f'leak:{spec.id}']:.3f}")
    for n in (2, 4):
        idx = groups[f"merge{n}"]
        hits = {a: [preds[i][a] == probes[i].expect[a] for i in idx if a in probes[i].expect]
                for a in ("shape", "clothing", "style", "background", "object")}
        printer(f"merge n={n}: per concept " + ", ".join(f"{a} {np.mean(h):.2f}" for a, h in hits.items() if h))
    if out_dir is not None:
        save_check_images(Path(out_dir), probes, images, ok)
        printer(f"images: {out_dir}")
    result = {
        "checker_accuracy_min": min(acc.values()),
        "base_prompt_accuracy": rate["base"],
        "lora_alone_min": min(rate[f"alone:{l.id}"] for l in S.LORAS),
        "lora_leak_max": max(1 - rate[f"leak:{l.id}"] for l in S.LORAS),
        "merge_all_concepts_2": rate["merge2"],
        "merge_all_concepts_4": rate["merge4"],
    }
    for k, v in result.items():
        printer(f"{k} {v:.3f}")
    return result


def save_check_images(folder: Path, probes: list[Probe], images: np.ndarray, ok) -> None:
    """One contact sheet per probe group (green/red frame: judged right/wrong)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(probes):
        groups.setdefault(p.group, []).append(i)
    for g, idx in groups.items():
        cols = 8
        rows = (len(idx) + cols - 1) // cols
        sheet = np.full((rows * 36, cols * 36, 3), 255, np.uint8)
        for k, i in enumerate(idx):
            r, c = divmod(k, cols)
            frame = (0, 170, 0) if ok[i] else (220, 0, 0)
            sheet[r * 36 : r * 36 + 36, c * 36 : c * 36 + 36] = frame
            sheet[r * 36 + 2 : r * 36 + 34, c * 36 + 2 : c * 36 + 34] = images[i]
        Image.fromarray(sheet).resize((sheet.shape[1] * 2, sheet.shape[0] * 2), Image.NEAREST).save(folder / f"{g.replace(':', '_')}.png")


# --- regions: the set probes with and without each LoRA bound to its concept's region ------------------------------
REGION_METHODS = ("merge", "switch", "composite")
SET_ATTRIBUTES = ("shape", "clothing", "style", "background", "object")


@dataclass
class RegionCheckSettings:
    """`toyworld check --regions`: the set probes of sizes `sizes` (`max_sets[n]` of the n-LoRA sets, evenly spaced,
    None = all; `seeds[n]` seeds each, the check's merge-probe seeds), each run by every method of `methods` without
    regions and with every LoRA bound to its region (`regions.yaml`). The defaults are the check's merge probes
    (N = 2: 24 sets x 4 seeds; N = 4: 48 of 96 sets x 2) plus N = 3 like N = 4 (48 of 72 sets x 2)."""

    sizes: tuple[int, ...] = (2, 3, 4)
    max_sets: dict = field(default_factory=lambda: {2: None, 3: 48, 4: 48, 5: None})
    seeds: dict = field(default_factory=lambda: {2: 4, 3: 2, 4: 2, 5: 2})
    methods: tuple[str, ...] = REGION_METHODS
    workers: int = 2


def region_probes(settings: RegionCheckSettings, regions_by_set: dict[str, dict]) -> list[Probe]:
    """Every set probe once per method and per variant ("plain": no regions; "regions": each LoRA in its region),
    on the same seeds; group `"<variant>:<method>:<n>"`."""
    out = []
    for n in settings.sizes:
        for p in merge_probes(n, settings.seeds.get(n, 2), settings.max_sets.get(n)):
            for method in settings.methods:
                out.append(Probe(p.prompt, p.seed, p.loras, dict(p.expect), group=f"plain:{method}:{n}", method=method,
                                 set_id=p.set_id))
                out.append(Probe(p.prompt, p.seed, p.loras, dict(p.expect), group=f"regions:{method}:{n}", method=method,
                                 regions=dict(regions_by_set[p.set_id]), set_id=p.set_id))
    return out


def wilson(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a rate k/n."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def region_records(probes: list[Probe], predictions: list[dict[str, str]]) -> list[dict]:
    """One record per image: variant, method, n, set, seed, all concepts right, and each expected attribute's hit."""
    ok = judge(probes, predictions)
    out = []
    for p, pred, good in zip(probes, predictions, ok):
        variant, method, n = p.group.split(":")
        out.append({"variant": variant, "method": method, "n": int(n), "set": p.set_id, "seed": p.seed, "ok": bool(good),
                    "hits": {a: pred[a] == v for a, v in p.expect.items()}, "predicted": dict(pred)})
    return out


def summarize_regions(records: list[dict], printer=print) -> dict[str, float]:
    """Per N, method and variant: the all-concepts rate (95 % Wilson interval) and each attribute's; then the result
    lines `plain_all_concepts_<n>` and `regions_all_concepts_<n>` (the best method of each variant), which it returns."""
    sizes = sorted({r["n"] for r in records})
    methods = list(dict.fromkeys(r["method"] for r in records))
    result: dict[str, float] = {}
    best: dict[tuple[str, int], tuple[float, str]] = {}
    for n in sizes:
        for method in methods:
            for variant in ("plain", "regions"):
                rs = [r for r in records if r["n"] == n and r["method"] == method and r["variant"] == variant]
                if not rs:
                    continue
                k = sum(r["ok"] for r in rs)
                lo, hi = wilson(k, len(rs))
                attrs = ", ".join(f"{a} {np.mean([r['hits'][a] for r in rs if a in r['hits']]):.2f}"
                                  for a in SET_ATTRIBUTES if any(a in r["hits"] for r in rs))
                printer(f"n={n} {method:9s} {variant:7s} all concepts {k / len(rs):.3f} [{lo:.3f}, {hi:.3f}] of {len(rs)}; {attrs}")
                if k / len(rs) > best.get((variant, n), (-1.0, ""))[0]:
                    best[(variant, n)] = (k / len(rs), method)
    for variant in ("plain", "regions"):
        for n in sizes:
            if (variant, n) in best:
                result[f"{variant}_all_concepts_{n}"] = best[(variant, n)][0]
    printer("best method: " + ", ".join(f"{v} n={n} {m}" for (v, n), (_, m) in sorted(best.items(), key=lambda kv: (kv[0][1], kv[0][0]))))
    for k, v in result.items():
        printer(f"{k} {v:.3f}")
    return result


def run_region_check(assets, settings: RegionCheckSettings | None = None, steps: int | None = None,
                     guidance_scale: float | None = None, progress: bool = True, out_dir: Path | None = None,
                     records_path: Path | None = None, printer=print) -> dict[str, float]:
    """`toyworld check --regions`: Merge, Switch and Composite on the set probes, without regions and with each LoRA
    in its concept's region (`regions.yaml`, derived from the scene generator's layout), on the same seeds, judged by
    the checker as the check's merge probes are. Prints per (N, method, variant) rates and the result lines last
    (`plain_all_concepts_<n>`, `regions_all_concepts_<n>`: the best method with / without regions); returns them.
    `records_path`: also write one JSON line per image."""
    import json

    from .checker import Checker
    from .regions import load_regions
    from .training import quiet_library_bars

    if not progress:
        quiet_library_bars()
    settings = settings or RegionCheckSettings()
    assets = Path(assets)
    sampler = sampler_defaults(assets, steps, guidance_scale)
    steps, guidance_scale = sampler["steps"], sampler["guidance_scale"]
    printer(f"sampler: {steps} steps, CFG {guidance_scale:g}, {S.SIZE}x{S.SIZE}, LoRA weight 1.0; methods "
            f"{', '.join(settings.methods)}, each without and with regions (assets regions.yaml)")
    probes = region_probes(settings, load_regions(assets))
    images = generate_probes(assets, probes, steps, guidance_scale, settings.workers, progress)
    preds = Checker.load(assets / "checker").predict(images)
    records = region_records(probes, preds)
    if records_path is not None:
        Path(records_path).parent.mkdir(parents=True, exist_ok=True)
        Path(records_path).write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        printer(f"records: {records_path}")
    if out_dir is not None:
        save_check_images(Path(out_dir), probes, images, [r["ok"] for r in records])
        printer(f"images: {out_dir}")
    return summarize_regions(records, printer)


def region_table(records: list[dict]) -> str:
    """Markdown tables of `toyworld check --regions` records (`--records`): per N and method, the all-concepts rate
    without and with regions (95 % Wilson intervals over images), the paired difference (mean over sets of each
    set's difference, ± 1.96 standard errors over sets: the seeds of a set are not independent), and each expected
    attribute's rate without -> with regions (± the wider half of the two Wilson intervals)."""
    sizes = sorted({r["n"] for r in records})
    methods = list(dict.fromkeys(r["method"] for r in records))

    def rate(rs, key=None):
        vals = [r["ok"] if key is None else r["hits"][key] for r in rs if key is None or key in r["hits"]]
        if not vals:
            return ""
        lo, hi = wilson(sum(vals), len(vals))
        return f"{sum(vals) / len(vals):.2f} [{lo:.2f}, {hi:.2f}]"

    lines = ["| N | method | images | all concepts, plain | all concepts, regions | regions - plain (sets) |",
             "|---|---|---|---|---|---|"]
    attr_lines = ["| N | method | " + " | ".join(SET_ATTRIBUTES) + " |", "|---|---|" + "---|" * len(SET_ATTRIBUTES)]
    for n in sizes:
        for method in methods:
            plain = [r for r in records if r["n"] == n and r["method"] == method and r["variant"] == "plain"]
            reg = {(r["set"], r["seed"]): r for r in records if r["n"] == n and r["method"] == method and r["variant"] == "regions"}
            per_set: dict[str, list[float]] = {}
            for r in plain:
                if (r["set"], r["seed"]) in reg:
                    per_set.setdefault(r["set"], []).append(float(reg[(r["set"], r["seed"])]["ok"]) - float(r["ok"]))
            diffs = np.array([np.mean(v) for v in per_set.values()])
            half = 1.96 * diffs.std(ddof=1) / np.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
            lines.append(f"| {n} | {method} | {len(plain)} | {rate(plain)} | {rate(list(reg.values()))} | "
                         f"{diffs.mean():+.2f} ± {half:.2f} ({len(diffs)}) |")
            cells = []
            for a in SET_ATTRIBUTES:
                p = [r["hits"][a] for r in plain if a in r["hits"]]
                q = [r["hits"][a] for r in reg.values() if a in r["hits"]]
                half = max((hi - lo) / 2 for lo, hi in (wilson(sum(p), len(p)), wilson(sum(q), len(q)))) if p else 0.0
                cells.append(f"{np.mean(p):.2f} → {np.mean(q):.2f} ±{half:.2f}" if p else "—")
            attr_lines.append(f"| {n} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + "\n".join(attr_lines) + "\n"
