"""bench_methods.py plug-in: the cost of the per-LoRA controls and of regional prompts (issue 23).

    masked_merge_vs_single     Merge of 3 LoRAs, each with a mask of its own (left / right / top: unfused, gated
                               per layer, each in a region of its own with the run's prompt) / one unmasked LoRA
                               through our pipeline, unfused                                          target <= 1.10
    schedule_vs_single         one LoRA with start/stop (on from 0.2 to 0.8 of the run) / the same LoRA always
                               on (both unfused: a scheduled LoRA cannot be fused)                    target <= 1.01
    lbw_fused_vs_base          Merge of the N LoRAs with block weights (the extension's preset "MIDD"), fused
                               into the weights / the base model with no LoRA                         target <= 1.05
    regional_prompt_vs_single  2 regions (left / right) with prompts of their own, one LoRA each / one prompt
                               with one LoRA, unfused                                                  target <= 1.25

Info lines split the masked Merge's cost: `unfused_merge3_vs_single` (the same three LoRAs unfused, everywhere /
one) and `masked_merge_vs_unfused_merge3` (what the masks and the four prompt copies add).

Each ratio is of medians over round-robin repeats (benchmarks.common.interleaved_medians, one warm-up each) of the
run's clock (`bench_methods.py --clock`: process CPU time by default, with one torch thread); the other clock
follows as `info …_wall` / `info …_cpu` lines. Standalone:

    python benchmarks/methods_controls.py --model tiny --threads 1
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

MASKS = ("left", "right", "top")  # one per LoRA of the masked Merge
SCHEDULE = {"start": 0.2, "stop": 0.8}
BLOCKS = "MIDD"  # LoRA Block Weight preset (BASE, IN04-IN08, M00, OUT03-OUT05 at 1, the rest 0)
REGION_PROMPTS = ("a portrait of a character, red", "a portrait of a character, blue")


def functions(env, names: list[str]) -> dict:
    """The timed generations: {name: zero-argument callable}."""
    from loraloom.composition.controls import Region

    cp, kw, prompt = env.ours, env.kw, env.prompt
    a, b, c = names[:3]

    def gen(loras, method="merge", params=None, **extra):
        return lambda: cp(prompt, loras=loras, method=method, method_params=params or {}, **kw, **extra)

    regions = [Region("left", prompt=REGION_PROMPTS[0], loras=(a,)), Region("right", prompt=REGION_PROMPTS[1], loras=(b,))]
    return {
        "base": gen([]),
        "single": gen([a], params={"fuse": False}),
        "masked_merge": gen([{"name": n, "mask": m} for n, m in zip((a, b, c), MASKS, strict=True)]),
        "unfused_merge": gen([a, b, c], params={"fuse": False}),  # info: the same 3 LoRAs unfused, without masks
        "scheduled": gen([{"name": a, **SCHEDULE}], params={"fuse": False}),
        "lbw_fused": gen([{"name": n, "lbw": BLOCKS} for n in names]),
        "regional": gen([a, b], regions=regions),
    }


def check(env, names: list[str]) -> None:
    """Guards before timing: the block-weighted Merge really fuses (no routed layer active during its loop), and the
    masked and regional runs really run regionally (their outputs differ from the unmasked ones)."""
    from loraloom.composition.controls import Region

    cp = env.ours
    kw = {**env.kw, "num_inference_steps": 1}
    seen = []
    cp(env.prompt, loras=[{"name": n, "lbw": BLOCKS} for n in names], method="merge", **kw,
       callback_on_step_end=lambda pipe, i, t, d: seen.append(sum(bool(r.active) for r in pipe.routers["unet"].layers.values())))
    if any(seen):
        raise RuntimeError(f"lbw Merge did not fuse: {seen} routed layers active")
    plain = cp(env.prompt, loras=names[:3], method="merge", method_params={"fuse": False}, **kw).latents
    masked = cp(env.prompt, loras=[{"name": n, "mask": m} for n, m in zip(names[:3], MASKS, strict=True)], method="merge",
                **kw).latents
    if torch.equal(plain, masked):
        raise RuntimeError("the masked Merge gave the unmasked image")
    single = cp(env.prompt, loras=names[:1], method="merge", method_params={"fuse": False}, **kw).latents
    regional = cp(env.prompt, loras=names[:2], regions=[Region("left", prompt=REGION_PROMPTS[0], loras=(names[0],)),
                                                         Region("right", prompt=REGION_PROMPTS[1], loras=(names[1],))],
                  method="merge", **kw).latents
    if torch.equal(single, regional):
        raise RuntimeError("the regional run gave the single-LoRA image")


def measure(env) -> list[tuple[str, float]]:
    from benchmarks.common import interleaved_medians, write_loras

    names = list(env.names)
    added = []
    if len(names) < 3:  # bench_methods.py --n 2: three LoRAs are needed for the masked Merge
        for p in write_loras(env.ours.pipe, 3, env.rank, Path(tempfile.mkdtemp(prefix="loraloom-bench-ctl-")))[len(names):]:
            added.append(env.ours.load_lora(p, f"ctl{len(names) + len(added)}").name)
        names += added
    try:
        check(env, names)
        timings = interleaved_medians(functions(env, names), repeats=env.repeats)
    finally:
        for n in added:
            env.ours.remove_lora(n)
    for name, t in timings.items():
        print(f"time {name:20s} wall {t.wall:8.3f} s  cpu {t.cpu:8.3f} s  cpu runs {[round(x, 3) for x in t.cpus]}", flush=True)
    other = "wall" if env.clock == "cpu" else "cpu"

    def ratio(a, b, clock=env.clock):
        return timings[a].get(clock) / timings[b].get(clock)

    pairs = (("masked_merge_vs_single", "masked_merge", "single"), ("schedule_vs_single", "scheduled", "single"),
             ("lbw_fused_vs_base", "lbw_fused", "base"), ("regional_prompt_vs_single", "regional", "single"))
    lines = [(f"info {line}_{other}", ratio(a, b, other)) for line, a, b in pairs]
    # What the masks themselves cost: the masked Merge against the same three LoRAs unfused and everywhere.
    lines += [("info unfused_merge3_vs_single", ratio("unfused_merge", "single")),
              ("info masked_merge_vs_unfused_merge3", ratio("masked_merge", "unfused_merge"))]
    return lines + [(line, ratio(a, b)) for line, a, b in pairs]


def main() -> None:
    import argparse

    from benchmarks.bench_methods import NEGATIVE, PROMPT, BenchEnv
    from benchmarks.common import MODELS, builder, write_loras
    from loraloom.pipelines import ComposedPipeline

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="tiny")
    ap.add_argument("--repeats", type=int, help="timed rounds (default 9 on tiny, 5 otherwise, as bench_methods.py)")
    ap.add_argument("--n", type=int, default=3, help="LoRAs of the block-weighted Merge (at least 3 are loaded)")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    _, size, steps, rank = MODELS[args.model]
    steps = args.steps or steps
    repeats = args.repeats or (9 if args.model == "tiny" else 5)
    base = builder(args.model)()
    base.set_progress_bar_config(disable=True)
    ours = ComposedPipeline(base)
    paths = write_loras(base, max(args.n, 3), rank)
    names = [ours.load_lora(p, f"l{i}").name for i, p in enumerate(paths)]
    kw = dict(num_inference_steps=steps, guidance_scale=7.5, height=size, width=size, seed=0, negative_prompt=NEGATIVE,
              output_type="latent", progress_bar=False, scheduler="dpmsolver++")
    env = BenchEnv(model=args.model, ours=ours, reference=None, lora_paths=paths, names=names[:args.n], kw=kw, prompt=PROMPT,
                   repeats=repeats, clock=args.clock, size=size, steps=steps, rank=rank, single_seconds=float("nan"),
                   base_factory=builder(args.model))
    print(f"model={args.model} size={size} steps={steps} rank={rank} N={args.n} repeats={repeats} threads={torch.get_num_threads()}")
    for name, value in measure(env):
        print(f"{name} {value:.4g}")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
