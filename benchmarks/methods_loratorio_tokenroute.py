"""bench_methods.py plug-in: the cost of LoRAtorio and of token-routed fusion (issue 25).

    loratorio_vs_composite       LoRAtorio of the N LoRAs / Composite of N + 1 LoRAs: both run N + 1 CFG pairs per
                                 step in one batched UNet call (LoRAtorio's extra pair is the base model), so what
                                 is left is LoRAtorio's own work (patch cosines, SoftMin, weighted sums, the base
                                 branch's routing)                                                     target <= 1.10
    tokenroute_vs_merge_unfused  token-routed fusion / unfused Merge, the same 3 LoRAs (2 subjects with trigger words
                                 in the prompt, 1 style LoRA): one capture pass (the positive row, stopped after the
                                 captured layers) at step round(T/3), then the subjects' deltas gated by their masks
                                                                                                       target <= 1.15

Info lines: `loratorio_vs_composite_same_n` (LoRAtorio / Composite of the same N LoRAs: N + 1 pairs against N, so
its floor is (N + 1) / N — more on a CPU, where a batch's cost grows faster than its rows), the dynamic selection
(`loratorio_top1_vs_composite_same_n`: top_k = 1 of the N, one call for the base pair and every LoRA's conditional
row, a second for the chosen LoRA's unconditional row), the reference's two-phase token routing
(`tokenroute_restart_vs_merge_unfused`: round(T/3) - 1 extra CFG steps without UNet LoRAs), and the two target
lines on the other clock.

Each ratio is of medians over round-robin repeats (benchmarks.common.interleaved_medians, one warm-up each) of the
run's clock (`bench_methods.py --clock`: process CPU time by default, with one torch thread). Standalone:

    python benchmarks/methods_loratorio_tokenroute.py --model tiny --threads 1
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

ROUTED = (("tr_char", "character", "ohwx"), ("tr_obj", "object", "zorp"), ("tr_style", "style", "inkwash"))
ROUTED_PROMPT = "a portrait of ohwx and zorp, inkwash, detailed"


def _routed_loras(env) -> list[str]:
    from loraloom.pipelines.tiny import write_random_lora

    folder = Path(tempfile.mkdtemp(prefix="loraloom-bench-tr-"))
    return [env.ours.load_lora(write_random_lora(env.ours.pipe, folder / f"{name}.safetensors", seed=40 + i, rank=env.rank,
                                                 alpha=float(env.rank), std=0.02, triggers=(trig,), category=cat), name).name
            for i, (name, cat, trig) in enumerate(ROUTED)]


def _extra_lora(env) -> str:
    """One more random LoRA, like the bench's own, for Composite of N + 1."""
    from benchmarks.common import write_loras

    path = write_loras(env.ours.pipe, len(env.names) + 1, env.rank, Path(tempfile.mkdtemp(prefix="loraloom-bench-lt-")))[-1]
    return env.ours.load_lora(path, "lt_extra").name


def functions(env, names: list[str], extra: str, routed: list[str]) -> dict:
    """The timed generations: {name: zero-argument callable}."""
    cp, kw = env.ours, env.kw

    def gen(prompt, loras, method, params=None):
        return lambda: cp(prompt, loras=loras, method=method, method_params=params or {}, **kw)

    return {
        "composite": gen(env.prompt, names, "composite"),
        "composite_n1": gen(env.prompt, [*names, extra], "composite"),
        "loratorio": gen(env.prompt, names, "loratorio"),
        "loratorio_top1": gen(env.prompt, names, "loratorio", {"top_k": 1}),
        "merge_unfused": gen(ROUTED_PROMPT, routed, "merge", {"fuse": False}),
        "tokenroute": gen(ROUTED_PROMPT, routed, "tokenroute", {"lora_scale": 0.8}),
        "tokenroute_restart": gen(ROUTED_PROMPT, routed, "tokenroute", {"lora_scale": 0.8, "restart": True}),
    }


def check(env, names: list[str], routed: list[str]) -> None:
    """Guards before timing: LoRAtorio is not Composite, and token routing really splits the image between the two
    subject LoRAs (both masks non-empty, the style LoRA unmasked) and changes the result."""
    cp, kw = env.ours, {**env.kw}
    comp = cp(env.prompt, loras=names, method="composite", **kw).latents
    lt = cp(env.prompt, loras=names, method="loratorio", **kw)
    if torch.allclose(comp, lt.latents) or lt.unet_rows != 2 * (len(names) + 1) * kw["num_inference_steps"]:
        raise RuntimeError(f"loratorio ran like composite ({lt.unet_rows} rows)")
    merge = cp(ROUTED_PROMPT, loras=routed, method="merge", method_params={"fuse": False}, **kw).latents
    tr = cp(ROUTED_PROMPT, loras=routed, method="tokenroute", method_params={"lora_scale": 0.8}, **kw)
    masks = tr.extras["masks"]
    if set(masks) != set(routed[:2]) or not all(0 < float(m.mean()) < 1 for m in masks.values()):
        raise RuntimeError(f"token routing did not split the image: {({k: float(v.mean()) for k, v in masks.items()})}")
    if torch.allclose(merge, tr.latents):
        raise RuntimeError("token routing gave unfused Merge's image")
    print(f"info tokenroute masks (share of the image): {({k: round(float(v.mean()), 3) for k, v in masks.items()})}, "
          f"made at step {tr.extras['mask_step']} of {kw['num_inference_steps']}", flush=True)


def measure(env) -> list[tuple[str, float]]:
    from benchmarks.common import interleaved_medians

    names = list(env.names)
    extra = _extra_lora(env)
    routed = _routed_loras(env)
    try:
        check(env, names, routed)
        timings = interleaved_medians(functions(env, names, extra, routed), repeats=env.repeats)
    finally:
        for n in [extra, *routed]:
            env.ours.remove_lora(n)
    for name, t in timings.items():
        print(f"time {name:20s} wall {t.wall:8.3f} s  cpu {t.cpu:8.3f} s  cpu runs {[round(x, 3) for x in t.cpus]}", flush=True)
    other = "wall" if env.clock == "cpu" else "cpu"

    def ratio(a, b, clock=env.clock):
        return timings[a].get(clock) / timings[b].get(clock)

    lines = [(f"info loratorio_vs_composite_{other}", ratio("loratorio", "composite_n1", other)),
             ("info loratorio_vs_composite_same_n", ratio("loratorio", "composite")),
             ("info loratorio_top1_vs_composite_same_n", ratio("loratorio_top1", "composite")),
             (f"info tokenroute_vs_merge_unfused_{other}", ratio("tokenroute", "merge_unfused", other)),
             ("info tokenroute_restart_vs_merge_unfused", ratio("tokenroute_restart", "merge_unfused"))]
    return lines + [("loratorio_vs_composite", ratio("loratorio", "composite_n1")),
                    ("tokenroute_vs_merge_unfused", ratio("tokenroute", "merge_unfused"))]


def main() -> None:
    from benchmarks.bench_methods import plugin_main

    plugin_main(__doc__, measure, "LoRAs of LoRAtorio and Composite")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
