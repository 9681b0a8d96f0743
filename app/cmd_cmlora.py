"""`loraloom cmlora-profile`: measure (and cache) CMLoRA's high-frequency score of LoRAs ahead of a run.

The scores land in the same cache a `cmlora` generation reads (docs/methods/clora_cmlora.md), so a benchmark
with many sets profiles each LoRA once here instead of inside its first generation. The cache key includes the
sampler settings: give the size, guidance, negative prompt and scheduler the generations will use.
"""

from __future__ import annotations

import argparse
import json


def register(sub) -> None:
    p = sub.add_parser("cmlora-profile", help="measure CMLoRA's frequency scores of LoRAs (cached per LoRA file)",
                       description="Generate each LoRA alone and the base model on the LoRA's trigger words, measure the "
                                   "high-frequency score (h = 0.2) of both and print ΔH, the H/L split and CMLoRA's order. "
                                   "Results are cached (per LoRA file hash, model and settings).")
    p.add_argument("model", help="diffusers folder, hub id, single .safetensors file, or tiny:sd1 / tiny:sdxl")
    p.add_argument("loras", nargs="+", help="LoRA files")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--scheduler", default=None, help="as `loraloom generate` (default: dpmsolver++)")
    p.add_argument("--lora-scale", type=float, default=None, help="CMLoRA's lora_scale (default: the method's)")
    p.add_argument("--profile-steps", type=int, default=None)
    p.add_argument("--profile-seeds", type=int, nargs="+", default=None)
    p.add_argument("--cache", default=None, help="cache file (default: the method's; see docs/methods/clora_cmlora.md)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--local-files-only", action="store_true")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from loraloom.composition.methods import make_method
    from loraloom.pipelines import ComposedPipeline

    cp = ComposedPipeline.from_pretrained(args.model, device=args.device, local_files_only=args.local_files_only)
    names = [cp.load_lora(path).name for path in args.loras]
    params = {k: v for k, v in {"lora_scale": args.lora_scale, "profile_steps": args.profile_steps,
                                "profile_seeds": args.profile_seeds, "profile_cache": args.cache}.items() if v is not None}
    method = make_method("cmlora", params)
    height, width = args.height or cp.default_size, args.width or cp.default_size
    run_ = cp.run(names, "", args.negative_prompt, args.guidance_scale, height, width, scheduler=args.scheduler)
    method.extras = {}
    deltas = method.frequency_deltas(run_, list(run_.loras))
    from loraloom.composition.frequency import partition_by_score

    high, low = partition_by_score(deltas)
    if args.json:
        print(json.dumps({"delta_h": deltas, "H": high, "L": low, "order": high + low,
                          "seconds": method.extras.get("profile_seconds")}, indent=2))
        return 0
    for n in high + low:
        lora = cp.loras[n]
        print(f"{n:24s} {lora.category or '-':11s} ΔH {deltas[n]:+.5f}  {'H' if n in high else 'L'}  triggers: "
              f"{', '.join(lora.triggers) or '-'}")
    print(f"order: {' > '.join(high + low)}   ({method.extras.get('profile_seconds', 0):.1f} s)")
    return 0
