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
    if max_sets is not None and max_sets < len(sets):
        pick = np.linspace(0, len(sets) - 1, max_sets).round().astype(int)
        sets = [sets[i] for i in pick]
    out = []
    for i, loras in enumerate(sets):
        colour = set_colour(i)
        for k in range(seeds_per_set):
            out.append(Probe(set_prompt(loras, colour), seed + 1000 * n + seeds_per_set * i + k, tuple(l.id for l in loras),
                             expect={l.attribute: l.value for l in loras}, group=f"merge{n}"))
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
        images = []
        for p in probes:
            out = self.cp(p.prompt, loras=[(i, 1.0) for i in p.loras], method=self.method,
                          method_params={"lora_scale": 1.0}, num_inference_steps=self.steps,
                          guidance_scale=self.guidance_scale, height=S.SIZE, width=S.SIZE, seed=p.seed,
                          scheduler="default", progress_bar=False)
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
