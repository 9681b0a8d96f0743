"""The `tune` action of `loraloom bench` and `bench run --tuned` (registered by cmd_bench): each method's sampler settings chosen on held-out sets and seeds
(evaluation/bench/tune.py; docs/benchmarks.md#tuning)."""

from __future__ import annotations

import argparse


def register_tune(bs) -> None:
    t = bs.add_parser("tune", help="choose each method's sampler settings (CFG, steps) on held-out sets and seeds",
                      description="Run every setting of --grid for every method on a few sets per (group, N) and on "
                                  "seeds no manifest uses, score them (toy-world checker, else CLIPScore), and write "
                                  "DIR/tuned.json with each method's best setting; `bench run --tuned DIR/tuned.json` "
                                  "runs each method at its setting and leaves the tuning sets out.")
    t.add_argument("manifest", help="benchmark manifest (YAML/JSON), e.g. assets/toyworld/benchmark.yaml")
    t.add_argument("--methods", default="merge,switch,composite", help="as for `bench run` (default: %(default)s)")
    t.add_argument("--grid", nargs="+", required=True, metavar="KEY=V1,V2",
                   help="the settings to try: cfg=…, steps=…, scheduler=…; every combination runs, e.g. "
                        "--grid cfg=2,4,7 steps=25,50")
    t.add_argument("--out", required=True, help="output folder (a benchmark folder per setting, and tuned.json)")
    t.add_argument("--sets", type=lambda v: [x.strip() for x in v.split(",") if x.strip()],
                   help="set id patterns (fnmatch) tuning may draw from (default: all)")
    t.add_argument("--sets-per-group", type=int, default=2,
                   help="tuning sets per (group, number of LoRAs), chosen by a hash of their ids (default: %(default)s)")
    t.add_argument("--seeds", type=int, default=2, help="tuning seeds per set, never a manifest's seed (default: %(default)s)")
    t.add_argument("--lora-dir", help="folder holding the LoRA files (overrides the manifest's lora_dir)")
    t.add_argument("--height", type=int, help="override the height of every set")
    t.add_argument("--width", type=int, help="override the width of every set")
    t.add_argument("--clip", help="CLIP for scoring when the manifest has no checker (default: the manifest's `clip`)")
    t.add_argument("--device", default="auto", help="cpu, cuda, … (auto: cuda when available)")
    t.add_argument("--dtype", default="float32", help="float32 (default), float16 or bfloat16")
    t.add_argument("--threads", type=int, help="torch CPU threads")
    t.add_argument("--allow-download", action="store_true", help="let diffusers fetch hub models that are not cached")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.set_defaults(func=tune_cmd)


def tune_cmd(args: argparse.Namespace) -> int:
    from loraloom.evaluation.bench.manifest import load_manifest
    from loraloom.evaluation.bench.plan import parse_methods
    from loraloom.evaluation.bench.tune import TuneOptions, parse_grid, tune

    variants = parse_methods(args.methods)
    settings = parse_grid(args.grid)
    manifest = load_manifest(args.manifest)
    opts = TuneOptions(manifest=manifest, out=args.out, variants=variants, settings=settings,
                       sets=manifest.select(patterns=args.sets), per_group=args.sets_per_group, seeds=args.seeds,
                       lora_dir=args.lora_dir, overrides={"height": args.height, "width": args.width},
                       device=args.device, dtype=args.dtype, allow_download=args.allow_download,
                       progress=not args.no_progress, threads=args.threads, clip=args.clip or "")
    result = tune(opts)
    for line in result.lines():
        print(line)
    print(f"wrote {args.out}/tuned.json; use it with `loraloom bench run {args.manifest} --tuned {args.out}/tuned.json`")
    return 0


def apply_tuned(path: str, manifest, variants, sets, overrides: dict) -> tuple[list, dict]:
    """`bench run --tuned FILE`: (the sets without the tuning sets, {method label: sampler settings}); refuses a
    run-wide override of a setting that was tuned (it would hide the tuned value)."""
    from loraloom.composition.errors import SpecError
    from loraloom.evaluation.bench.tune import read_tuned

    tuned = read_tuned(path, manifest, variants)
    clash = sorted({k for s in tuned.choices.values() for k in s} & {k for k, v in overrides.items() if v is not None})
    if clash:
        flags = ", ".join("--" + k.replace("_", "-") for k in clash)
        raise SpecError(f"{flags} would replace what --tuned {path} chose per method; leave {flags} out")
    kept = [s for s in sets if s.id not in tuned.tuning_sets]
    left_out = len(sets) - len(kept)
    if not kept:
        raise SpecError(f"every selected set was a tuning set of {path}; select others (--sets) or tune on fewer sets")
    print(f"--tuned {path}: " + "; ".join(f"{label} at " + ", ".join(f"{k}={v}" for k, v in sorted(s.items()))
                                          for label, s in tuned.choices.items())
          + f"; {left_out} tuning set(s) left out")
    return kept, tuned.choices
