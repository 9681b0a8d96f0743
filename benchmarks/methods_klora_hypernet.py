"""bench_methods.py plug-in: K-LoRA's per-step cost and the hypernetwork's merge time against ZipLoRA's.

    klora_vs_single      K-LoRA generation / one fixed LoRA (our pipeline, unfused), interleaved medians;
                         the per-layer Top-K table is remembered across generations, as in repeated use
                         (the first generation with a pair pays `info klora_table_seconds` once)     target <= 1.05
    hypernet_vs_ziplora  time to merge a pair with the hypernetwork (one forward per layer + the merged
                         factors) / with ZipLoRA's optimisation (default 100 steps, prompt encoding
                         included; reference-image generation, our stand-in for training images, excluded
                         and reported as an info line)                                             target <= 0.001

The hypernetwork here is untrained (random weights, input layers for this model's widths): its cost does not
depend on its training. ZipLoRA is timed once (it takes minutes on sd15-shape); the hypernetwork as a median.
"""

from __future__ import annotations

import statistics
import time

import torch

from benchmarks.common import interleaved_medians


def _klora_lines(env) -> list[tuple[str, float]]:
    from composition.methods import klora

    ours, kw, a, b = env.ours, env.kw, env.names[0], env.names[1]
    klora._SCORES.clear()
    t0 = time.perf_counter()
    ours(env.prompt, loras=[a, b], method="klora", **kw)  # fills the table: the first-use cost
    first = time.perf_counter() - t0
    res = interleaved_medians({
        "klora": lambda: ours(env.prompt, loras=[a, b], method="klora", **kw),
        "single": lambda: ours(env.prompt, loras=[a], method="merge", method_params={"fuse": False}, **kw),
    }, repeats=env.repeats)
    klora._SCORES.clear()
    t0 = time.perf_counter()
    table = _table_only(env)
    table_seconds = time.perf_counter() - t0
    for name, (med, times) in res.items():
        print(f"time {name:20s} median {med:8.3f} s  runs {[round(t, 3) for t in times]}")
    print(f"info klora first generation (table built) {first:.3f} s; table of {len(table.paths)} layers {table_seconds:.3f} s")
    return [("info klora_table_seconds", table_seconds), ("info klora_first_vs_single", first / res["single"][0]),
            ("klora_vs_single", res["klora"][0] / res["single"][0])]


def _table_only(env):
    from composition.merging import is_attention_projection
    from composition.methods.klora import klora_table

    router = env.ours.routers["unet"]
    a, b = env.names[0], env.names[1]
    layers = {p: ([r.factors[a]], [r.factors[b]]) for p, r in router.layers.items()
              if a in r.factors and b in r.factors and is_attention_projection(p)}
    return klora_table(layers)


def _merge_lines(env) -> list[tuple[str, float]]:
    from composition.hypernetwork import MergeHypernetwork, widths_of
    from composition.merge_objective import TrainableMerge, training_scheduler
    from composition.merging import merged_lora
    from composition.methods import ActiveLoRA
    from composition.methods.hypernet import merge_with_hypernet
    from composition.methods.ziplora import ZipLoRAParams, merge_layers, optimise_coefficients, pair_data, reference_latents
    from pipelines.composed import _Run

    ours = env.ours
    subject, style = ours.loras[env.names[0]], ours.loras[env.names[1]]
    torch.manual_seed(0)
    net = MergeHypernetwork(widths_of([subject, style], ("to_q", "to_out.0")))
    times = []
    for _ in range(max(env.repeats, 3)):
        t0 = time.perf_counter()
        merge_with_hypernet(net, subject, style)
        times.append(time.perf_counter() - t0)
    hyper = statistics.median(times)
    print(f"time hypernet_merge        median {hyper:8.4f} s  runs {[round(t, 4) for t in times]}")

    p = ZipLoRAParams()
    active = [ActiveLoRA(subject.name, 1.0, subject), ActiveLoRA(style.name, 1.0, style)]
    run = _Run(ours, active, env.prompt, "", env.kw["guidance_scale"], env.size, env.size)
    t0 = time.perf_counter()
    x_c = reference_latents(run, active[0], env.prompt, p.reference_images, p.reference_steps, p.seed)
    x_s = reference_latents(run, active[1], env.prompt, p.reference_images, p.reference_steps, p.seed + 1000)
    references = time.perf_counter() - t0
    t0 = time.perf_counter()
    data = pair_data(run, active[0], active[1], env.prompt, env.prompt, x_c, x_s)
    router = ours.routers["unet"]
    with TrainableMerge(router, "bench-zip", subject, style, merge_layers(subject, style, "unet", p.scope)) as merged:
        coefs, _ = optimise_coefficients(router.model, router, merged, data, training_scheduler(ours.pipe), p.steps, p.lr,
                                         p.lam, p.similarity, p.seed, progress=False)
    merged_lora("bench-zipped", subject, style, {"unet": coefs})
    zip_seconds = time.perf_counter() - t0
    print(f"time ziplora_optimisation  once   {zip_seconds:8.3f} s  ({p.steps} steps); reference images {references:.3f} s "
          f"({2 * p.reference_images} x {p.reference_steps} steps)")
    return [("info ziplora_seconds", zip_seconds), ("info ziplora_reference_images_seconds", references),
            ("info hypernet_merge_seconds", hyper), ("hypernet_vs_ziplora", hyper / zip_seconds)]


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
    from pipelines import ComposedPipeline

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="tiny")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = ap.parse_args()
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
                   repeats=args.repeats, size=size, steps=steps, rank=rank, single_seconds=math.nan,
                   base_factory=builder(args.model))
    for name, value in measure(env):
        print(f"{name} {value:.4g}")


if __name__ == "__main__":
    main()
