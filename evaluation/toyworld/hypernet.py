"""The toy world for LoRA.rar's merge hypernetwork: extra subject and style LoRAs to train it on (the toy world's
own LoRA recipe under other seeds) and the subject x style table that evaluates the merge methods with the
checker. `loraloom hypernet toyworld-loras` and `loraloom hypernet toyworld-eval` call these."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from . import scenes as S
from .recipe import Recipe

# Extra toy-world LoRAs for hypernetwork training: concept id : training seed (the shipped LoRAs use seed 0).
TOY_SUBJECTS = ("character_1:1", "character_2:1", "character_3:1", "clothing_1:1", "clothing_2:1", "object_1:1",
                "object_2:1", "character_1:2", "character_2:2", "character_3:2")
TOY_STYLES = ("style_1:1", "style_2:1", "background_1:1", "background_2:1", "style_1:2", "style_2:2", "background_1:2",
              "background_2:2")


def toy_prompt(spec: S.ConceptLoRA, colour: str = "red") -> str:
    """A concept's own prompt in the toy world's caption language: the concept on a plain scene."""
    base = S.Scene(shape="circle", colour=colour, background="white")
    return S.caption(base.with_(**{spec.attribute: spec.value}), background=spec.attribute != "shape")


# --- extra LoRAs for training ----------------------------------------------------------------------------
def train_variant_lora(spec: S.ConceptLoRA, seed: int, target: Path, model: Path, work: Path, recipe: Recipe,
                       progress: bool = True) -> None:
    """One concept LoRA trained on `model` with the toy world's recipe under `seed` (checkpoints in `work`),
    written to `target` with a sidecar that carries its own prompt (the file appears last, so an interrupted run
    is redone)."""
    from .trainers import Paths, train_lora

    paths = Paths(work, work / "assets", model=model)
    trained = train_lora(paths, replace(recipe, seed=seed, threads=1, workers=1), spec, progress=progress)
    target.parent.mkdir(parents=True, exist_ok=True)
    side = json.loads(trained.with_suffix(".json").read_text())
    side.update({"prompt": toy_prompt(spec), "training_seed": seed})
    shutil.copyfile(trained, target.with_suffix(".tmp"))
    target.with_suffix(".json").write_text(json.dumps(side, indent=2) + "\n")
    target.with_suffix(".tmp").replace(target)


def train_variant_loras(out: Path, work: Path, model: Path, subjects, styles, recipe: Recipe,
                        progress: bool = True) -> Iterator[tuple[Path, S.ConceptLoRA, str]]:
    """Train each `concept-id:seed` of `subjects` and `styles` into `<out>/subjects` and `<out>/styles` (those
    already there are kept; checkpoints in `<work>/seed<seed>`); yields (file, concept, seed as written) as each
    one is written."""
    import torch

    torch.set_num_threads(1)  # one core per process (the recipe's threads=1); run two processes to use two cores
    for kind, items in (("subjects", subjects), ("styles", styles)):
        for item in items:
            lora_id, _, seed = item.partition(":")
            spec = S.LORA_BY_ID[lora_id]
            target = out / kind / f"{lora_id}_s{seed}.safetensors"
            if target.exists():
                continue
            train_variant_lora(spec, int(seed), target, model, work / f"seed{seed}", recipe, progress)
            yield target, spec, seed


# --- subject x style table -------------------------------------------------------------------------------
def pair_params(method: str, spec_c: S.ConceptLoRA, spec_s: S.ConceptLoRA, out: Path, pair: str,
                checkpoint: str | None) -> dict:
    """Method parameters of one pair: ZipLoRA's own prompts and coefficient cache, the hypernetwork's checkpoint."""
    if method == "ziplora":
        return {"subject_prompt": toy_prompt(spec_c, colour="red"), "style_prompt": toy_prompt(spec_s, colour="red"),
                "coefficients": str(out / "ziplora_coefficients" / f"{pair}.safetensors"), "progress": False}
    if method == "hypernet" and checkpoint:
        return {"checkpoint": checkpoint}
    return {}


def pair_table(scores: dict, methods: list[str], subjects: list[str], styles: list[str], seeds: int) -> str:
    """The markdown table: per method, the share of images with both the subject and the style, and each alone."""
    rows = ["| method | subject and style | subject | style | n |", "|---|---|---|---|---|"]
    for method in methods:
        mine = [v for k, v in scores.items() if k.startswith(method + "/") and k.split("/")[1].split("+")[0] in subjects
                and k.split("/")[1].split("+")[1] in styles and int(k.split("/s")[-1]) < seeds]
        n = len(mine)
        both = sum(v["subject"] and v["style"] for v in mine)
        rows.append(f"| {method} | {both / n:.2f} ({both}/{n}) | {sum(v['subject'] for v in mine) / n:.2f} | "
                    f"{sum(v['style'] for v in mine) / n:.2f} | {n} |")
    return "\n".join(rows)


def pair_image(cp, out: Path, method: str, c: str, s: str, seed: int, colour: str, sampler: dict,
               checkpoint: str | None) -> Path:
    """`<out>/<method>/<subject>+<style>_s<seed>.png`, generated unless it is already there."""
    image_path = out / method / f"{c}+{s}_s{seed}.png"
    if not image_path.exists():
        spec_c, spec_s = S.LORA_BY_ID[c], S.LORA_BY_ID[s]
        img = cp(f"a {colour} {spec_c.trigger}, {spec_s.trigger}", loras=[c, s], method=method,
                 method_params=pair_params(method, spec_c, spec_s, out, f"{c}+{s}", checkpoint),
                 num_inference_steps=sampler["steps"], guidance_scale=sampler["guidance_scale"], scheduler="default",
                 seed=seed, progress_bar=False).images[0]
        image_path.parent.mkdir(parents=True, exist_ok=True)
        img.save(image_path)
    return image_path


def pair_score(checker, image_path: Path, c: str, s: str, colour: str) -> dict:
    """What the checker sees in one image, and whether that is the subject, the style and the prompt's colour."""
    from PIL import Image

    spec_c, spec_s = S.LORA_BY_ID[c], S.LORA_BY_ID[s]
    seen = checker.predict([Image.open(image_path)])[0]
    return {"subject": seen[spec_c.attribute] == spec_c.value, "style": seen[spec_s.attribute] == spec_s.value,
            "colour": seen["colour"] == colour, "seen": seen}


def evaluate_pairs(out: Path, methods: list[str], subjects: list[str], styles: list[str], seeds: int,
                   checkpoint: str | None = None, steps: int | None = None, guidance_scale: float | None = None,
                   progress: bool = True) -> str:
    """Every (subject, style) pair of the shipped LoRAs x seeds, generated with each method (existing images are
    re-scored, not regenerated) and read by the checker; writes `scores.json` and `table.md` into `out` and
    returns the table."""
    import torch
    from tqdm.auto import tqdm

    from loraloom.pipelines import ComposedPipeline

    from . import ASSETS, CHECKER, LORAS_DIR, MODEL
    from .checker import Checker
    from .manifest import sampler_defaults

    torch.set_num_threads(1)
    sampler = sampler_defaults(ASSETS, steps, guidance_scale)
    out.mkdir(parents=True, exist_ok=True)
    cp = ComposedPipeline.from_pretrained(str(MODEL))
    checker = Checker.load(CHECKER)
    for lora_id in subjects + styles:
        cp.load_lora(LORAS_DIR / f"{lora_id}.safetensors", lora_id)
    colours = list(S.BASE_COLOURS)
    scores_file = out / "scores.json"
    scores = json.loads(scores_file.read_text()) if scores_file.exists() else {}
    todo = [(m, c, s, seed) for m in methods for c in subjects for s in styles for seed in range(seeds)]
    for method, c, s, seed in tqdm(todo, desc="toyworld eval", disable=not progress, dynamic_ncols=True):
        colour = colours[seed % len(colours)]
        image_path = pair_image(cp, out, method, c, s, seed, colour, sampler, checkpoint)
        scores[f"{method}/{c}+{s}/s{seed}"] = pair_score(checker, image_path, c, s, colour)
    scores_file.write_text(json.dumps(scores, indent=1))
    table = pair_table(scores, methods, subjects, styles, seeds)
    (out / "table.md").write_text(table + "\n")
    return table
