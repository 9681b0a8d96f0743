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
    from benchmarks.bench_methods import plugin_main

    plugin_main(__doc__, measure, "LoRAs of the block-weighted Merge (at least 3 are loaded)", load_at_least=3)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
