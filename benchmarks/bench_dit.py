"""Speed and memory of Merge, Switch and Composite on FLUX.1- and SD 3.5-shaped models: the ratio lines of
`bench_methods.py` (which hands `--model flux-shape` / `sd35-shape` to this script).

    python benchmarks/bench_dit.py --model flux-shape      # FLUX.1 widths, 2 double + 4 single blocks, 256x256, CPU
    python benchmarks/bench_dit.py --model sd35-shape      # SD 3.5 Large widths, 4 joint blocks
    python benchmarks/bench_dit.py --model flux-tiny       # the tests' tiny FLUX, seconds (checks the script)
    python benchmarks/bench_dit.py --model flux-shape --full --device cuda --dtype bfloat16 --size 1024 --shared-weights

Models come from config with random weights (`benchmarks/dit_shapes.py`), LoRAs are written in the diffusers/PEFT
layout on the attention projections (joint add_q/k/v_proj and to_add_out included), the MLPs and FLUX's
single-stream proj_mlp/proj_out. Times cover prompt encoding and the denoising loop (latent output). Lines:

    switch_vs_single        our Switch / one fixed LoRA (ours, unfused)                        target <= 1.03
    composite_vs_reference  our Composite / a loop that calls diffusers' set_adapters per LoRA
                            and the transformer once per LoRA per step                         target <= 0.8
    composite_vs_limit      our Composite / (N x one single-LoRA generation)                  target <= 1.05
    merge_vs_base           our Merge (default: fused where it pays, fuse_cost) / the base model  target <= 1.05
    lora_memory_ratio       memory added by making the N LoRAs resident / their file sizes    target <= 1.3
    klora_vs_single         our K-LoRA (2 LoRAs; its table made in prepare) / one fixed LoRA   target <= 1.05
    single_vs_diffusers     one LoRA through ours / through diffusers' load_lora_weights      (info)
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # dit_references.py: the reference loops the tests pin
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import interleaved_medians, rss_bytes

PROMPT, NEGATIVE = "a portrait of a character, detailed", "blurry"


def _tiny(name):
    def build(seed=0, full=False, device="cpu", dtype=torch.float32):
        from loraloom.pipelines.tiny_dit import build_tiny_flux, build_tiny_sd3

        return (build_tiny_flux if name == "flux" else build_tiny_sd3)(seed).to(device, dtype)

    return build


def _shape(name):
    def build(**kwargs):
        from benchmarks.dit_shapes import build_flux_shape, build_sd35_shape

        return (build_flux_shape if name == "flux" else build_sd35_shape)(**kwargs)

    return build


MODELS = {  # name: (builder, family, size, steps, rank, LoRA std)
    "flux-tiny": (_tiny("flux"), "flux", 32, 4, 4, 0.1),
    "sd3-tiny": (_tiny("sd3"), "sd3", 32, 4, 4, 0.1),
    "flux-shape": (_shape("flux"), "flux", 256, 4, 16, 0.01),
    "sd35-shape": (_shape("sd3"), "sd3", 256, 4, 16, 0.01),
}
GUIDANCE = {"flux": 3.5, "sd3": 4.5}
# The generations each ratio line times (`--lines` runs only those).
LINE_NEEDS = {
    "single_vs_diffusers": ("single", "diffusers_single"),
    "switch_vs_single": ("switch", "single"),
    "composite_vs_reference": ("composite", "reference_composite"),
    "composite_vs_limit": ("composite", "single"),
    "merge_vs_base": ("merge_fused", "base"),
    "lora_memory_ratio": (),
    "klora_vs_single": ("klora", "single"),
}


def memory_bytes(device) -> int:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()
    return rss_bytes()


def synced(fn):
    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="flux-tiny")
    ap.add_argument("--n", type=int, default=3, help="number of LoRAs composed")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--size", type=int, help="image side in pixels (default: 256 for the shapes, 32 for the tiny models)")
    ap.add_argument("--repeats", type=int, help="timed rounds per function (default 5; 9 on the tiny models)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1, so CPU time measures the work)")
    ap.add_argument("--clock", choices=["cpu", "wall"], help="time the ratios use (default: cpu on a CPU, wall on CUDA)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ap.add_argument("--full", action="store_true", help="the real block counts and text-encoder depths (GPU)")
    ap.add_argument("--text-tokens", type=int, help="T5 tokens (default: the family's, FLUX 512, SD3 256)")
    ap.add_argument("--lines", help="comma-separated ratio lines to measure (default: all); only the generations they "
                                    "need are timed, e.g. --lines merge_vs_base")
    ap.add_argument("--shared-weights", action="store_true",
                    help="one copy of the model: time ours first, then load the LoRAs into it through PEFT for the "
                         "diffusers references (for models two copies of which do not fit)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    build, family, size, steps, rank, std = MODELS[args.model]
    size, steps = args.size or size, args.steps or steps
    repeats = args.repeats or (9 if args.model.endswith("tiny") else 5)
    clock = args.clock or ("wall" if torch.device(args.device).type == "cuda" else "cpu")
    dtype = getattr(torch, args.dtype)
    guidance = GUIDANCE[family]
    from dit_references import (
        FLUX_TARGETS,
        SD3_TARGETS,
        composite_reference,
        diffusers_latents,
        flux_predict,
        sd3_predict,
        write_peft_lora,
    )

    from loraloom.pipelines import ComposedPipeline

    base = build(seed=0, full=args.full, device=args.device, dtype=dtype)
    base.set_progress_bar_config(disable=True)
    ours = ComposedPipeline(base if args.shared_weights else copy.deepcopy(base))
    tokens = args.text_tokens or ours.arch.max_sequence_length
    ours.arch.max_sequence_length = tokens
    print(f"model={args.model} full={args.full} size={size} steps={steps} rank={rank} N={args.n} repeats={repeats} "
          f"threads={torch.get_num_threads()} device={args.device} dtype={args.dtype} t5_tokens={tokens} clock={clock}")
    folder = Path(tempfile.mkdtemp(prefix="loraloom-bench-dit-"))
    targets = FLUX_TARGETS if family == "flux" else SD3_TARGETS
    paths = [write_peft_lora(base, folder, f"l{i}", seed=i + 1, rank=rank, alpha=rank, targets=targets, text_encoder=False, std=std)
             for i in range(args.n)]
    file_bytes = sum(p.stat().st_size for p in paths)
    names = [f"l{i}" for i in range(args.n)]
    before = memory_bytes(args.device)
    for name, p in zip(names, paths):
        ours.load_lora(p, name)
    after = memory_bytes(args.device)

    kw = dict(num_inference_steps=steps, guidance_scale=guidance, height=size, width=size, seed=0, output_type="latent",
              progress_bar=False, negative_prompt=NEGATIVE)

    def our(method, loras, **params):
        return lambda: ours(PROMPT, loras=loras, method=method, method_params=params, **kw)

    ours_fns = {"base": our("merge", []), "single": our("merge", names[:1], fuse=False), "switch": our("switch", names),
                "composite": our("composite", names), "merge_fused": our("merge", names),
                "klora": our("klora", names[:2], roles="given")}
    lines = args.lines.split(",") if args.lines else list(LINE_NEEDS)
    unknown = sorted(set(lines) - set(LINE_NEEDS))
    if unknown:
        ap.error(f"--lines: unknown {unknown}; the lines are {', '.join(LINE_NEEDS)}")
    needed = {f for line in lines for f in LINE_NEEDS[line]}
    ours_fns = {k: f for k, f in ours_fns.items() if k in needed}
    our_composite = ours_fns["composite"]().latents if "composite" in needed else None

    reference = base
    encode = {"max_sequence_length": tokens}
    extra = {} if family == "flux" else {"negative_prompt": NEGATIVE}

    def reference_composite():
        predict = (flux_predict(reference, PROMPT, guidance, size, **encode) if family == "flux"
                   else sd3_predict(reference, PROMPT, guidance, size, negative_prompt=NEGATIVE, **encode))
        return composite_reference(reference, names, 0.8, PROMPT, steps, guidance, predict, size)

    def diffusers_single():
        reference.set_adapters(names[:1], [0.8])
        return diffusers_latents(reference, PROMPT, steps, guidance, size=size, max_sequence_length=tokens, **extra)

    def load_reference():
        for name, p in zip(names, paths):
            reference.load_lora_weights(str(p), adapter_name=name)

    ref_fns = {k: f for k, f in {"reference_composite": reference_composite, "diffusers_single": diffusers_single}.items()
               if k in needed}
    if torch.device(args.device).type == "cuda":  # time the work, not its launch
        ours_fns, ref_fns = ({k: synced(f) for k, f in fns.items()} for fns in (ours_fns, ref_fns))
    if args.shared_weights:
        timings = interleaved_medians(ours_fns, repeats=repeats)
        for name in names:
            ours.remove_lora(name)
        if ref_fns:
            load_reference()
            timings.update(interleaved_medians(ref_fns, repeats=repeats))
    else:
        if ref_fns:
            load_reference()
        timings = interleaved_medians({**ours_fns, **ref_fns}, repeats=repeats)
    if our_composite is not None and "reference_composite" in ref_fns:
        with torch.no_grad():
            agree = (reference_composite().float() - our_composite.float()).abs().max().item()
        print(f"check: |our composite - reference loop| max = {agree:.2e} (latents up to {our_composite.abs().max().item():.2f})")
    for name, t in timings.items():
        print(f"time {name:20s} wall {t.wall:8.3f} s  cpu {t.cpu:8.3f} s  wall runs {[round(x, 3) for x in t.walls]}")
    res = {name: t.get(clock) for name, t in timings.items()}
    values = {
        "single_vs_diffusers": lambda: res["single"] / res["diffusers_single"],
        "switch_vs_single": lambda: res["switch"] / res["single"],
        "composite_vs_reference": lambda: res["composite"] / res["reference_composite"],
        "composite_vs_limit": lambda: res["composite"] / (args.n * res["single"]),
        "merge_vs_base": lambda: res["merge_fused"] / res["base"],
        "lora_memory_ratio": lambda: (after - before) / file_bytes,
        "klora_vs_single": lambda: res["klora"] / res["single"],
    }
    for line in lines:
        print(f"{'info ' if line == 'single_vs_diffusers' else ''}{line} {values[line]():.3f}")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
