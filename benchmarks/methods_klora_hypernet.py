"""bench_methods.py plug-in: K-LoRA's per-step cost and the hypernetwork's merge time against ZipLoRA's.

    klora_vs_single      K-LoRA generation / one fixed LoRA (our pipeline, unfused), interleaved medians;
                         the per-layer Top-K table is remembered across generations, as in repeated use
                         (the first generation with a pair pays `info klora_table_seconds` once)     target <= 1.05
    hypernet_vs_ziplora  time to merge a pair with the hypernetwork (one forward per layer + the merged
                         factors) / with ZipLoRA's optimisation (default 100 steps, prompt encoding
                         included; reference-image generation, our stand-in for training images, excluded
                         and reported as an info line)                                             target <= 0.001

Both ratios are of process CPU time (run with --threads 1): on a shared machine wall-clock time measures the
neighbours' load as much as ours. The wall-clock ratios follow as `info …_wall` lines.
The hypernetwork here is untrained (random weights, input layers for this model's widths): its cost does not
depend on its training. ZipLoRA is timed once (it takes minutes on sd15-shape); the hypernetwork as a median.
"""

from __future__ import annotations

import gc
import statistics
import time

import torch


def _timed(fn) -> tuple[float, float]:
    """(wall, process CPU) seconds of one call."""
    gc.collect()
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def _interleaved(fns: dict, repeats: int) -> dict[str, tuple[float, float, list[float]]]:
    """Round-robin repeats after one warm-up each: {name: (median wall, median CPU, CPU runs)}."""
    for fn in fns.values():
        fn()
    runs = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            runs[name].append(_timed(fn))
    return {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v), [c for _, c in v]) for k, v in runs.items()}


def _klora_lines(env) -> list[tuple[str, float]]:
    from loraloom.composition.methods import klora

    ours, kw, a, b = env.ours, env.kw, env.names[0], env.names[1]
    klora._SCORES.clear()
    first_wall, first_cpu = _timed(lambda: ours(env.prompt, loras=[a, b], method="klora", **kw))  # builds the table
    res = _interleaved({
        "klora": lambda: ours(env.prompt, loras=[a, b], method="klora", **kw),
        "single": lambda: ours(env.prompt, loras=[a], method="merge", method_params={"fuse": False}, **kw),
    }, env.repeats)
    klora._SCORES.clear()
    tables = []
    table_wall, table_cpu = _timed(lambda: tables.append(_table_only(env)))
    for name, (wall, cpu, runs) in res.items():
        print(f"time {name:20s} median {wall:8.3f} s  cpu {cpu:8.3f} s  cpu runs {[round(t, 3) for t in runs]}", flush=True)
    print(f"info klora first generation (table built): cpu {first_cpu:.3f} s; table of {len(tables[0].paths)} layers: "
          f"cpu {table_cpu:.3f} s", flush=True)
    return [("info klora_table_cpu_seconds", table_cpu), ("info klora_first_vs_single", first_cpu / res["single"][1]),
            ("info klora_vs_single_wall", res["klora"][0] / res["single"][0]),
            ("klora_vs_single", res["klora"][1] / res["single"][1])]


def _table_only(env):
    """The table as `prepare` builds it by default: Top-K sums of the attention projections, gamma over every
    module both files adapt (gamma_layers="file")."""
    from loraloom.composition.merging import is_attention_projection
    from loraloom.composition.methods import ActiveLoRA
    from loraloom.composition.methods.klora import file_layers, klora_table

    router = env.ours.routers["unet"]
    a, b = env.names[0], env.names[1]
    layers = {p: ([r.factors[a]], [r.factors[b]]) for p, r in router.layers.items()
              if a in r.factors and b in r.factors and is_attention_projection(p)}
    active = [ActiveLoRA(n, 1.0, env.ours.loras[n]) for n in (a, b)]
    return klora_table(layers, gamma_layers=file_layers(active, [a], [b]))


def _merge_lines(env) -> list[tuple[str, float]]:
    from loraloom.composition.hypernetwork import MergeHypernetwork, widths_of
    from loraloom.composition.merge_objective import TrainableMerge, training_scheduler
    from loraloom.composition.merging import merged_lora
    from loraloom.composition.methods import ActiveLoRA
    from loraloom.composition.methods.hypernet import merge_with_hypernet
    from loraloom.composition.methods.ziplora import (
        ZipLoRAParams,
        merge_layers,
        optimise_coefficients,
        pair_data,
        reference_latents,
    )

    ours = env.ours
    subject, style = ours.loras[env.names[0]], ours.loras[env.names[1]]
    torch.manual_seed(0)
    net = MergeHypernetwork(widths_of([subject, style], ("to_q", "to_out.0")))
    times = [_timed(lambda: merge_with_hypernet(net, subject, style)) for _ in range(max(env.repeats, 3))]
    hyper_wall, hyper = statistics.median(w for w, _ in times), statistics.median(c for _, c in times)
    print(f"time hypernet_merge        median {hyper_wall:8.4f} s  cpu {hyper:8.4f} s", flush=True)

    p = ZipLoRAParams(**ZIPLORA_OVERRIDES)
    default_steps = ZipLoRAParams().steps
    active = [ActiveLoRA(subject.name, 1.0, subject), ActiveLoRA(style.name, 1.0, style)]
    run = ours.run([(a.name, a.weight) for a in active], env.prompt, "", env.kw["guidance_scale"], env.size, env.size)
    refs = []
    ref_wall, ref_cpu = _timed(lambda: refs.extend([
        reference_latents(run, active[0], env.prompt, p.reference_images, p.reference_steps, p.seed),
        reference_latents(run, active[1], env.prompt, p.reference_images, p.reference_steps, p.seed + 1000)]))

    def optimise():
        data = pair_data(run, active[0], active[1], env.prompt, env.prompt, *refs)
        router = ours.routers["unet"]
        with TrainableMerge(router, "bench-zip", subject, style, merge_layers(subject, style, "unet", p.scope)) as merged:
            coefs, _ = optimise_coefficients(router.model, router, merged, data, training_scheduler(ours.pipe), p.steps,
                                             p.lr, p.lam, p.similarity, p.seed, progress=False)
        merged_lora("bench-zipped", subject, style, {"unet": coefs})

    zip_wall, zip_cpu = _timed(optimise)
    print(f"time ziplora_optimisation  once   {zip_wall:8.3f} s  cpu {zip_cpu:8.3f} s  ({p.steps} steps); reference images "
          f"cpu {ref_cpu:.3f} s ({2 * p.reference_images} x {p.reference_steps} steps)", flush=True)
    lines = [("info ziplora_cpu_seconds", zip_cpu), ("info ziplora_reference_images_cpu_seconds", ref_cpu),
             ("info hypernet_merge_cpu_seconds", hyper), ("info hypernet_vs_ziplora_wall", hyper_wall / zip_wall)]
    if p.steps < default_steps:
        # Fewer optimisation steps than the default were timed (--ziplora-steps): the ratio against them is an upper
        # bound of the true one; the linear extrapolation to the default step count is an info line.
        lines.append((f"info hypernet_vs_ziplora_extrapolated_{default_steps}_steps", hyper / (zip_cpu * default_steps / p.steps)))
        print(f"info ZipLoRA timed at {p.steps} of its {default_steps} default steps: hypernet_vs_ziplora below is an "
              f"upper bound", flush=True)
    return lines + [("hypernet_vs_ziplora", hyper / zip_cpu)]


# Standalone runs on large models may time a shorter ZipLoRA (see main): ZipLoRAParams field -> value.
ZIPLORA_OVERRIDES: dict = {}


def measure(env) -> list[tuple[str, float]]:
    return _klora_lines(env) + _merge_lines(env)


def main() -> None:
    """Only these lines, without the rest of bench_methods.py (whose CLoRA/CMLoRA lines take hours on sd15-shape):
    the same models, LoRAs (random rank-r, UNet + text encoder) and generation settings."""
    import argparse
    import copy
    import math
    import os
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from benchmarks.bench_methods import NEGATIVE, PROMPT, BenchEnv
    from benchmarks.common import MODELS, builder, write_loras
    from loraloom.pipelines import ComposedPipeline

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="tiny")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--ziplora-steps", type=int, help="time ZipLoRA at this many optimisation steps instead of its "
                    "default 100 (the printed ratio is then an upper bound; for sd15-shape on a CPU)")
    ap.add_argument("--reference-images", type=int, help="ZipLoRA reference images per LoRA (not part of the ratio)")
    ap.add_argument("--reference-steps", type=int, help="steps of each reference image (not part of the ratio)")
    args = ap.parse_args()
    for key in ("ziplora_steps", "reference_images", "reference_steps"):
        if getattr(args, key) is not None:
            ZIPLORA_OVERRIDES[key.replace("ziplora_", "")] = getattr(args, key)
    if args.threads:
        torch.set_num_threads(args.threads)
    _, size, steps, rank = MODELS[args.model]
    steps = args.steps or steps
    print(f"model={args.model} size={size} steps={steps} rank={rank} repeats={args.repeats} threads={torch.get_num_threads()}")
    base = builder(args.model)()
    paths = write_loras(base, 2, rank)
    ours = ComposedPipeline(copy.deepcopy(base))
    del base
    names = [f"l{i}" for i in range(2)]
    for name, p in zip(names, paths):
        ours.load_lora(p, name)
    kw = dict(num_inference_steps=steps, guidance_scale=7.5, height=size, width=size, seed=0, negative_prompt=NEGATIVE,
              output_type="latent", progress_bar=False, scheduler="dpmsolver++")
    env = BenchEnv(model=args.model, ours=ours, reference=None, lora_paths=paths, names=names, kw=kw, prompt=PROMPT,
                   repeats=args.repeats, clock="cpu", size=size, steps=steps, rank=rank, single_seconds=math.nan,
                   base_factory=builder(args.model))
    for name, value in measure(env):
        print(f"{name} {value:.4g}")


if __name__ == "__main__":
    main()
