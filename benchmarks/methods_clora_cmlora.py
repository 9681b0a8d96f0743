"""CLoRA and CMLoRA lines of `benchmarks/bench_methods.py` (a method plug-in; also runnable alone).

    cmlora_vs_composite  CMLoRA / Composite, N = 4, T steps, CMLoRA defaults (non-uniform 2/3/2 refresh schedule,
                         DeepCache-style feature cache, every LoRA refreshed at a refresh step:
                         refresh_policy="all"; its floor at T = 20 is 0.625, docs/methods/clora_cmlora.md)
                                                                                                 target <= 0.55
    clora_vs_composite   CLoRA / Composite, N = 2, T steps, CLoRA's paper defaults (20 refinement iterations at
                         0 / 0.2 / 0.4 of the run, latent updates on the first half)               reported

Ratios use the run's clock (`bench_methods.py --clock`, process CPU time by default; the standalone run uses CPU
time); the other clock follows in `info …_wall` / `info …_cpu` lines.

T is 20 on both models (the schedules are fractions of the run; at the bench's 4 sd15-shape steps they would
degenerate). CMLoRA's one-time profiling uses one seed and 10 steps here (the defaults are 2 and 20). Info lines: CMLoRA variants (only the newly dominant LoRA refreshing at a refresh
step, refresh_policy="dominant", the default before issue 26; cached noise predictions instead of features), the one-time profiling cost, the refresh share, and peak memory (RSS above the loaded model, sampled
every 5 ms in a fresh process) of one CLoRA, CLoRA reference_mode and Composite generation (N = 2, 2 steps, no
refinement iterations: the peak is one gradient pass however many there are).

    python benchmarks/methods_clora_cmlora.py --model tiny     # alone, without the core lines
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

STEPS = 20
# One-time profiling kept short in the bench (one seed, 10 steps); the timed runs hit the cache either way.
PROFILE = {"profile_seeds": [0], "profile_steps": 10}
WARMUP = True  # one untimed run of each before the timed rounds (--no-warmup for the long sd15-shape runs)
# Peak memory: one generation of 2 steps without refinement iterations (the peak is one gradient pass, whatever
# their number), in a fresh process per method.
MEMORY_STEPS = 2
CONCEPTS = ["ohwx", "zorp", "kvel", "drum"]  # trigger words of the bench LoRAs (one per LoRA)


def _write_loras(pipe, folder: Path, rank: int, n: int = 4) -> list[Path]:
    from loraloom.pipelines.tiny import write_random_lora

    cats = ["character", "object", "clothing", "background"]
    return [write_random_lora(pipe, folder / f"cc{i}.safetensors", seed=100 + i, rank=rank, alpha=float(rank), std=0.02,
                              triggers=(CONCEPTS[i],), category=cats[i]) for i in range(n)]


def _prompt(n: int) -> str:
    return "a portrait of " + " and ".join(CONCEPTS[:n]) + ", detailed"


def _interleaved(fns: dict, repeats: int, warmup: bool = True) -> dict[str, tuple[float, float, list[float]]]:
    """benchmarks.common.interleaved_medians as name -> (median wall s, median process CPU s, wall runs)."""
    from benchmarks.common import interleaved_medians

    return {k: (t.wall, t.cpu, t.walls) for k, t in interleaved_medians(fns, repeats, int(warmup)).items()}


def _timed(env, cp, names, steps):
    kw = {**env.kw, "num_inference_steps": steps}
    prof = Path(tempfile.mkdtemp(prefix="loraloom-bench-prof-")) / "profiles.json"
    four, two = names[:4], names[:2]

    def run(method, loras, n, **params):
        return lambda: cp(_prompt(n), loras=loras, method=method, method_params=params, **kw)

    started = time.perf_counter()
    first = cp(_prompt(4), loras=four, method="cmlora", method_params={"profile_cache": str(prof), **PROFILE}, **kw)
    profile_s = first.extras.get("profile_seconds", float("nan"))
    print(f"info cmlora first run {time.perf_counter() - started:.1f} s (profiling {profile_s:.1f} s, then cached); "
          f"order {first.extras['order']} H {first.extras['H']} rows full {first.extras['full_rows']} cached "
          f"{first.extras['cached_rows']}", flush=True)
    fns = {
        "composite4": run("composite", four, 4),
        "cmlora4": run("cmlora", four, 4, profile_cache=str(prof), **PROFILE),
        "cmlora4_dominant": run("cmlora", four, 4, profile_cache=str(prof), **PROFILE, refresh_policy="dominant"),
        "cmlora4_noise": run("cmlora", four, 4, profile_cache=str(prof), **PROFILE, cache_mode="noise"),
        "composite2": run("composite", two, 2),
        "clora2": run("clora", two, 2),
    }
    res = _interleaved(fns, repeats=min(env.repeats, 3), warmup=WARMUP)
    for name, (med, cpu, times) in res.items():
        print(f"time {name:20s} median {med:8.3f} s  cpu {cpu:8.3f} s  runs {[round(t, 3) for t in times]}", flush=True)
    return res, profile_s


def _peak_worker(model: str, size: int, steps: int, paths: list[str], method: str, params: dict) -> None:
    """Child process: build the model, load the LoRAs, run one generation; print the peak RSS above the start."""
    import psutil

    from benchmarks.common import builder
    from loraloom.pipelines import ComposedPipeline

    torch.set_num_threads(1)
    cp = ComposedPipeline(builder(model)())
    names = [cp.load_lora(p).name for p in paths]
    kw = dict(num_inference_steps=steps, guidance_scale=7.5, height=size, width=size, seed=0, output_type="latent",
              progress_bar=False, scheduler="dpmsolver++")
    cp(_prompt(len(names)), loras=names, method=method, method_params=params, num_inference_steps=1,
       **{k: v for k, v in kw.items() if k != "num_inference_steps"})  # warm-up: allocator pools, lazy imports
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.005)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    cp(_prompt(len(names)), loras=names, method=method, method_params=params, **kw)
    done.set()
    t.join()
    print(json.dumps({"base_mb": base / 2**20, "peak_extra_mb": (peak[0] - base) / 2**20}))


def peak_memory(model: str, size: int, steps: int, paths: list[Path], method: str, params: dict | None = None) -> dict:
    cmd = [sys.executable, __file__, "--peak-worker", json.dumps({"model": model, "size": size, "steps": steps,
                                                                   "paths": [str(p) for p in paths], "method": method,
                                                                   "params": params or {}})]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(env, parts: str = "all") -> list[tuple[str, float]]:
    """The plug-in's lines; `parts`: "all", "timing" (the ratios) or "memory" (the peak-memory info lines)."""
    folder = Path(tempfile.mkdtemp(prefix="loraloom-bench-cc-"))
    paths = _write_loras(env.ours.pipe, folder, env.rank)
    if parts == "memory":
        return _memory_lines(env, paths)
    names = [env.ours.load_lora(p).name for p in paths]
    try:
        res, profile_s = _timed(env, env.ours, names, STEPS)
    finally:
        for n in names:
            env.ours.remove_lora(n)
    from loraloom.composition.methods.cmlora import refresh_steps

    main, other = (1, 0) if env.clock == "cpu" else (0, 1)  # index into (wall, cpu): the lines use env.clock
    suffix = "_wall" if env.clock == "cpu" else "_cpu"

    def ratio(a, b, i=main):
        return res[a][i] / res[b][i]

    lines = [("info cmlora_refresh_share", len(refresh_steps(STEPS)) / STEPS),
             ("info cmlora_profile_seconds", profile_s),
             (f"info cmlora_vs_composite{suffix}", ratio("cmlora4", "composite4", other)),
             ("info cmlora_dominant_refresh_vs_composite", ratio("cmlora4_dominant", "composite4")),
             (f"info cmlora_dominant_refresh_vs_composite{suffix}", ratio("cmlora4_dominant", "composite4", other)),
             ("info cmlora_noise_cache_vs_composite", ratio("cmlora4_noise", "composite4")),
             (f"info cmlora_noise_cache_vs_composite{suffix}", ratio("cmlora4_noise", "composite4", other)),
             (f"info clora_vs_composite{suffix}", ratio("clora2", "composite2", other))]
    if parts == "all":
        lines += _memory_lines(env, paths)
    lines += [("cmlora_vs_composite", ratio("cmlora4", "composite4")), ("clora_vs_composite", ratio("clora2", "composite2"))]
    return lines


def _memory_lines(env, paths) -> list[tuple[str, float]]:
    lines = []
    for method, params, label in (("clora", {"refine_iterations": 0}, "clora"),
                                  ("clora", {"refine_iterations": 0, "reference_mode": True}, "clora_reference"),
                                  ("composite", {}, "composite")):
        mem = peak_memory(env.model, env.size, MEMORY_STEPS, paths[:2], method, params)
        print(f"info memory {label}: model loaded {mem['base_mb']:.0f} MB, generation peak +{mem['peak_extra_mb']:.0f} MB", flush=True)
        lines.append((f"info peak_extra_mb_{label}", mem["peak_extra_mb"]))
    return lines


def main() -> None:
    import argparse

    if len(sys.argv) > 2 and sys.argv[1] == "--peak-worker":
        _peak_worker(**json.loads(sys.argv[2]))
        return
    from benchmarks.bench_methods import PROMPT, BenchEnv
    from benchmarks.common import MODELS, builder
    from loraloom.pipelines import ComposedPipeline

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="tiny")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--no-warmup", action="store_true", help="no untimed run before the timed rounds")
    ap.add_argument("--only", choices=["all", "timing", "memory"], default="all",
                    help="run only the timed ratios or only the peak-memory lines (sd15-shape timing takes hours on a CPU)")
    args = ap.parse_args()
    global WARMUP
    WARMUP = not args.no_warmup
    if args.threads:
        torch.set_num_threads(args.threads)
    _, size, steps, rank = MODELS[args.model]
    ours = ComposedPipeline(builder(args.model)())
    kw = dict(num_inference_steps=steps, guidance_scale=7.5, height=size, width=size, seed=0, negative_prompt="blurry",
              output_type="latent", progress_bar=False, scheduler="dpmsolver++")
    env = BenchEnv(model=args.model, ours=ours, reference=None, lora_paths=[], names=[], kw=kw, prompt=PROMPT,
                   repeats=args.repeats, clock="cpu", size=size, steps=steps, rank=rank, single_seconds=float("nan"),
                   base_factory=builder(args.model))
    print(f"model={args.model} size={size} steps={STEPS} rank={rank} repeats={args.repeats} threads={torch.get_num_threads()}")
    for name, value in measure(env, args.only):
        print(f"{name} {value:.4g}")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
