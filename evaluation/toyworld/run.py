"""The whole toy-world recipe as one resumable command: `loraloom toyworld train --stage all`.

Stages and what runs side by side (each process single-threaded; see `training.launch`):

1. tokenizer                      (instant)
2. vae  |  clip                   (two processes)
3. base                           (two data-parallel processes, gradients all-reduced)
4. 11 LoRAs + checker             (a pool of two processes; the kohya twin is converted afterwards)
5. manifest, example spec, README numbers
"""

from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch

from . import ASSETS as DEFAULT_ASSETS
from . import STAGES
from . import WORK as DEFAULT_WORK
from . import scenes as S
from .recipe import Recipe
from .trainers import Paths
from .training import Timings, quiet_library_bars

EXAMPLE_SPEC = DEFAULT_ASSETS.parent / "examples" / "toyworld.yaml"


def _job(name: str, paths: Paths, recipe: Recipe, progress: bool, arg=None) -> tuple[str, float]:
    """One stage (or one LoRA) in a worker process, timed."""
    from . import trainers as T

    torch.set_num_threads(1)
    if not progress:
        quiet_library_bars()
    timings = Timings(paths.work)
    start = time.perf_counter()
    with timings.measure(name if arg is None else f"lora_{arg}"):
        if name == "vae":
            T.stage_vae(paths, recipe, progress)
        elif name == "clip":
            T.stage_clip(paths, recipe, progress)
        elif name == "checker":
            from diffusers import AutoencoderKL

            T.stage_checker(paths, recipe, AutoencoderKL.from_pretrained(paths.trained_vae()), progress)
        elif name == "lora":
            T.train_lora(paths, recipe, S.LORA_BY_ID[arg], progress=progress)
        else:
            raise ValueError(name)
    return name if arg is None else f"lora_{arg}", time.perf_counter() - start


def run_jobs(jobs: list[tuple], paths: Paths, recipe: Recipe, progress: bool) -> None:
    """Run (name, arg) jobs on `recipe.workers` single-threaded processes (in order, when workers == 1)."""
    if recipe.workers <= 1 or len(jobs) == 1:
        for name, arg in jobs:
            _job(name, paths, recipe, progress, arg)
        return
    with ProcessPoolExecutor(max_workers=recipe.workers, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(_job, name, paths, recipe, progress, arg) for name, arg in jobs]
        for f in futures:
            f.result()  # re-raises a worker's error


def reset_stage(stage: str, paths: Paths) -> None:
    """Forget a stage's checkpoints (a fresh, non-resumed run of it)."""
    if stage in paths.stage_work():
        shutil.rmtree(paths.stage_work()[stage], ignore_errors=True)
    timings = paths.work / "timings"
    for t in timings.glob(f"{'lora_*' if stage == 'loras' else stage}.json") if timings.exists() else []:
        t.unlink()


def train(stages=("all",), work: str | Path = DEFAULT_WORK, assets: str | Path = DEFAULT_ASSETS, recipe: Recipe | None = None,
          resume: bool = False, progress: bool = True, lora_ids: list[str] | None = None) -> dict:
    """Run the recipe's stages (in dependency order); returns the stage timings."""
    from . import trainers as T
    from .manifest import write_example, write_manifest

    recipe = recipe or Recipe()
    if not progress:
        quiet_library_bars()
    stages = list(STAGES) if "all" in stages else [s for s in STAGES if s in stages]
    paths = Paths(work, assets)
    paths.work.mkdir(parents=True, exist_ok=True)
    paths.assets.mkdir(parents=True, exist_ok=True)
    saved = paths.work / "recipe.json"
    if resume and saved.exists():
        before = json.loads(saved.read_text())
        changed = recipe.changed_from(before)
        if changed:
            # Finished stages are kept as they are; a stage resumed mid-way continues with the new values.
            print(f"toyworld: resuming with changed recipe values {changed}; finished stages are not retrained.")
    saved.write_text(json.dumps(recipe.to_dict(), indent=2) + "\n")
    if not resume:
        for stage in stages:
            reset_stage(stage, paths)
    torch.set_num_threads(max(1, recipe.threads // max(1, recipe.workers)))
    timings = Timings(paths.work)
    T.stage_tokenizer(paths, recipe)
    early = [(s, None) for s in ("vae", "clip") if s in stages]
    if early:
        run_jobs(early, paths, recipe, progress)
    if "base" in stages:
        with timings.measure("base", workers=recipe.workers):
            T.stage_base(paths, recipe, progress)
    late = []
    if "loras" in stages:
        ids = lora_ids or [l.id for l in S.LORAS]
        # most steps first, so that the two workers finish together (convolution targets add little: the star took
        # 539 CPU-s with them, 536 without)
        late += sorted((("lora", i) for i in ids), key=lambda job: -recipe.for_lora(job[1]).lora_steps)
    if "checker" in stages:
        late.append(("checker", None))
    if late:
        run_jobs(late, paths, recipe, progress)
    if "loras" in stages and (lora_ids is None or T.KOHYA_TWIN in lora_ids):
        T.write_kohya_twin(paths)
    if "manifest" in stages:
        write_manifest(paths.assets / "benchmark.yaml", recipe)
        if paths.assets.resolve() == DEFAULT_ASSETS.resolve():
            write_example(EXAMPLE_SPEC, recipe)
        write_training_record(paths, recipe)
    return timings.read()


def write_training_record(paths: Paths, recipe: Recipe) -> Path:
    """`training.json` next to the assets: the recipe, each stage's wall time and its final numbers."""
    from .training import done_marker

    done = {}
    for name in ("vae", "base", "checker", "clip"):
        marker = done_marker(paths.stage_work()[name])
        if marker.exists():
            done[name] = json.loads(marker.read_text())
    record = {"recipe": recipe.to_dict(), "timings": Timings(paths.work).read(), "results": done,
              "torch": torch.__version__}
    out = paths.assets / "training.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    return out
