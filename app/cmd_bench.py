"""`loraloom bench run|score|report|check`: the benchmark runner (docs/benchmarks.md)."""

from __future__ import annotations

import argparse
import math
import sys

from .bench_tuning import apply_tuned, register_tune
from .cli_options import add_offload_arguments


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def register(sub) -> None:
    p = sub.add_parser("bench", help="run a benchmark manifest: generate, score, report",
                       description="Benchmarks: every (set x method x seed) of a manifest, stored durably in DIR/bench.sqlite "
                                   "with atomically written PNGs; resumable, shardable under `accelerate launch`. "
                                   "See docs/benchmarks.md.")
    bs = p.add_subparsers(dest="bench_command", metavar="ACTION")

    r = bs.add_parser("run", help="generate every image of the manifest not in DIR yet",
                      description="Generate every (set x method x seed) not yet done. A rerun resumes and never duplicates; "
                                  "under `accelerate launch` each process takes its shard. Missing LoRA files are listed "
                                  "before anything is generated.")
    r.add_argument("manifest", help="benchmark manifest (YAML/JSON), e.g. assets/toyworld/benchmark.yaml")
    r.add_argument("--methods", default="merge,switch,composite",
                   help="comma-separated methods, each NAME or NAME(key=value,...), e.g. "
                        "'merge,switch(switch_interval=3),composite' (default: %(default)s)")
    r.add_argument("--out", required=True, help="output folder (database + images)")
    r.add_argument("--limit", type=int, help="only the first N sets (in manifest order, after --sets)")
    r.add_argument("--sets", type=_csv, help="set id patterns (fnmatch), comma-separated, e.g. 'anime-n2-*'")
    r.add_argument("--seeds", type=int, help="only the first K seeds of each set")
    r.add_argument("--lora-dir", help="folder holding the LoRA files (overrides the manifest's lora_dir)")
    r.add_argument("--reference-seeding", action="store_true",
                   help="reproduce the ComposLoRA reference's noise: one CPU generator per (group, N, method) run, "
                        "drawn in set order (default: each image's seed is a function of its set and seed)")
    r.add_argument("--regions", nargs="?", const="", metavar="FILE",
                   help="bind each LoRA to its set's region (methods that take regions: merge, switch, composite; "
                        "labels NAME+regions): the set's own `regions:` entry, else FILE, else regions.yaml beside the "
                        "manifest (the toy world ships one). Run once without and once with into the same --out to "
                        "compare them in one report")
    r.add_argument("--steps", type=int, help="override the sampler steps of every set (quick runs)")
    r.add_argument("--guidance-scale", type=float, help="override the CFG scale of every set")
    r.add_argument("--height", type=int, help="override the height of every set")
    r.add_argument("--width", type=int, help="override the width of every set")
    r.add_argument("--scheduler", help="override the sampler of every set")
    r.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 … (auto: cuda when available; under accelerate "
                                                    "each process gets its own GPU)")
    r.add_argument("--dtype", default="float32", help="float32 (default), float16 or bfloat16")
    add_offload_arguments(r)
    r.add_argument("--threads", type=int, help="torch CPU threads per process")
    r.add_argument("--allow-download", action="store_true", help="let diffusers fetch hub models that are not cached")
    r.add_argument("--no-retry-failed", action="store_true", help="leave items that failed before as they are")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--dry-run", action="store_true", help="check the manifest and files, print the plan's counts, stop")
    r.add_argument("--tuned", metavar="FILE", help="run each method at the sampler settings `bench tune` chose (its "
                                                   "tuned.json) and leave its tuning sets out")
    r.set_defaults(func=run_cmd)
    register_tune(bs)

    c = bs.add_parser("check", help="validate a manifest: counts per group and N, missing files",
                      description="Read a manifest, print its sets per group and number of LoRAs, and list the LoRA files "
                                  "that are missing under the LoRA folder.")
    c.add_argument("manifest")
    c.add_argument("--lora-dir", help="folder holding the LoRA files (overrides the manifest's lora_dir)")
    c.set_defaults(func=check_cmd)

    s = bs.add_parser("score", help="score every image of DIR (CLIPScore, toy-world checker, MLLM judge)",
                      description="Score every generated image of DIR and store the scores in DIR/bench.sqlite; resumable "
                                  "(what is scored is not scored again).")
    s.add_argument("dir", help="output folder of `bench run`")
    s.add_argument("--manifest", help="the manifest (default: the one recorded in DIR)")
    s.add_argument("--clip", help="CLIP model: local transformers folder, cached hub id or open_clip:ARCH@TAG "
                                  "(default: the manifest's `clip`, else openai/clip-vit-base-patch16 from the local cache)")
    s.add_argument("--no-clip", action="store_true", help="skip CLIPScore")
    s.add_argument("--clip-text", choices=("scoring", "prompt"), default="scoring",
                   help="score against the set's scoring text (trigger words by default, as ComposLoRA) or the full prompt")
    s.add_argument("--clip-scale", type=float, default=100.0, help="w in w*max(cos,0) (default: %(default)s)")
    s.add_argument("--no-checker", action="store_true", help="skip the toy-world checker")
    s.add_argument("--batch-size", type=int, default=32, help="images per scoring batch (default: %(default)s)")
    s.add_argument("--device", default="auto", help="cpu, cuda … (auto: cuda when available)")
    s.add_argument("--allow-download", action="store_true", help="let transformers fetch a CLIP that is not cached")
    j = s.add_argument_group("MLLM judge (ComposLoRA's pairwise protocol; see docs/evaluation.md)")
    j.add_argument("--judge", choices=("openai", "transformers"), help="judge backend; enables pairwise judging")
    j.add_argument("--judge-model", help="model name on the server, or a local VLM folder")
    j.add_argument("--base-url", default="https://api.openai.com/v1", help="chat API base URL (default: %(default)s)")
    j.add_argument("--api-key-env", default="OPENAI_API_KEY", help="NAME of the variable holding the API key")
    j.add_argument("--temperature", type=float, default=None, help="default: 1.0 for openai, greedy for transformers")
    j.add_argument("--max-tokens", type=int, default=2048)
    j.add_argument("--seed", type=int, default=None, help="decoding seed, where the server supports it")
    j.add_argument("--json-mode", action="store_true", help="ask for response_format=json_object")
    j.add_argument("--image-max-side", type=int, default=None, help="downscale images sent to the judge")
    j.add_argument("--timeout", type=float, default=120.0)
    j.add_argument("--retries", type=int, default=3)
    j.add_argument("--baseline", help="compare every method with this one (default: merge when present, else all pairs)")
    j.add_argument("--one-order", action="store_true", help="ask each pair in one order only (cheaper, position-biased)")
    j.add_argument("--workers", type=int, default=1, help="comparisons sent at once (openai judge)")
    j.add_argument("--reask", type=int, default=2, help="re-asks after an unparseable answer")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=score_cmd)

    rp = bs.add_parser("report", help="write the HTML report and Markdown summary of DIR",
                       description="Tables per method x number of LoRAs (mean ± 95%% CI, the ComposLoRA papers' layout), "
                                   "plots, pairwise win rates, time per image and image grids, as one self-contained "
                                   "HTML file and a Markdown summary.")
    rp.add_argument("dir", help="output folder of `bench run`")
    rp.add_argument("--out", help="report folder (default: DIR/report)")
    rp.add_argument("--manifest", help="the manifest (default: the one recorded in DIR)")
    rp.add_argument("--baseline", help="baseline method of the win rates (default: merge when present)")
    rp.add_argument("--grid-sets", type=int, default=2, help="image-grid rows per number of LoRAs (default: %(default)s)")
    rp.set_defaults(func=report_cmd)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _load(args, sets_needed: bool = True):
    from loraloom.evaluation.bench.manifest import load_manifest

    manifest = load_manifest(args.manifest)
    sets = manifest.select(limit=args.limit, patterns=args.sets) if sets_needed else manifest.sets
    return manifest, sets


def run_cmd(args: argparse.Namespace) -> int:
    from loraloom.evaluation.bench.manifest import missing_files
    from loraloom.evaluation.bench.plan import build_plan, parse_methods, with_regions
    from loraloom.evaluation.bench.regions import load_bench_regions
    from loraloom.evaluation.bench.runner import MissingFilesError, RunOptions, run_benchmark

    variants = parse_methods(args.methods)
    regions = None
    if args.regions is not None:
        variants = with_regions(variants)  # refuses the methods where regions have no meaning, before anything loads
    manifest, sets = _load(args)
    if args.regions is not None:
        regions = load_bench_regions(manifest, sets, args.regions or None)
    overrides = {"steps": args.steps, "guidance_scale": args.guidance_scale, "height": args.height, "width": args.width,
                 "scheduler": args.scheduler}
    tuned = {}
    if args.tuned:
        sets, tuned = apply_tuned(args.tuned, manifest, variants, sets, overrides)
    if args.dry_run:
        missing = missing_files(manifest, sets, args.lora_dir)
        plan = build_plan(manifest, sets, variants, seeds=args.seeds, reference_seeding=args.reference_seeding,
                          lora_dir=args.lora_dir, overrides=overrides, dtype=args.dtype, variant_overrides=tuned,
                          hashes=lambda p: None, regions=regions)
        _print_counts(manifest, sets)
        print(f"{len(plan)} images: {len(sets)} sets x {len(variants)} methods ({', '.join(v.label for v in variants)}) "
              f"x {len(plan) // max(1, len(sets) * len(variants))} seed(s)"
              + (f"; each LoRA in its region ({regions.source})" if regions is not None else ""))
        if missing:
            raise MissingFilesError(missing.message(manifest, manifest.lora_folder(args.lora_dir)))
        return 0
    opts = RunOptions(manifest=manifest, out=args.out, variants=variants, sets=sets, seeds=args.seeds,
                      reference_seeding=args.reference_seeding, lora_dir=args.lora_dir, overrides=overrides,
                      device=args.device, dtype=args.dtype, allow_download=args.allow_download,
                      retry_failed=not args.no_retry_failed, progress=not args.no_progress, threads=args.threads,
                      variant_overrides=tuned, argv=sys.argv[1:], regions=regions, offload=args.offload)
    s = run_benchmark(opts)
    rate = s.generated / s.wall_seconds if s.wall_seconds else math.nan
    who = f"process {s.process_index + 1}/{s.num_processes}: " if s.num_processes > 1 else ""
    print(f"{who}{s.generated} image(s) generated, {s.failed} failed, {s.already_done} already done; "
          f"{s.wall_seconds:.1f} s wall ({rate:.2f} images/s, {s.generation_seconds:.1f} s in the sampler)")
    if s.done_total is not None:
        print(f"{opts.out}: {s.done_total}/{s.planned} images of this plan done, {s.failed_total} failed")
        return 1 if s.failed_total else 0
    return 1 if s.failed else 0


def _print_counts(manifest, sets) -> None:
    from loraloom.evaluation.scoring import format_table

    counts = manifest.counts(sets)
    groups = sorted({g for g, _ in counts}, key=lambda g: min(s.index for s in sets if s.group == g))
    ns = sorted({n for _, n in counts})
    rows = [[g, *[counts.get((g, n), 0) for n in ns], sum(counts.get((g, n), 0) for n in ns)] for g in groups]
    print(f"{manifest.name}: {len(sets)} set(s), {len({i for s in sets for i in s.lora_ids})} LoRA(s)")
    print(format_table(rows, ["group", *[f"N={n}" for n in ns], "total"]))


def check_cmd(args: argparse.Namespace) -> int:
    from loraloom.evaluation.bench.manifest import load_manifest, missing_files

    manifest = load_manifest(args.manifest)
    _print_counts(manifest, manifest.sets)
    missing = missing_files(manifest, manifest.sets, args.lora_dir)
    if missing:
        print(missing.message(manifest, manifest.lora_folder(args.lora_dir)))
        return 1
    print(f"all LoRA files present under {manifest.lora_folder(args.lora_dir)}")
    return 0


def score_cmd(args: argparse.Namespace) -> int:
    from loraloom.evaluation.bench.scoring import ScoreOptions, score_folder

    if args.judge and not args.judge_model:
        from loraloom.evaluation.errors import EvaluationError

        raise EvaluationError("--judge needs --judge-model")
    if not args.verbose:  # transformers' "Loading weights" bars say nothing useful here
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    judge = None
    if args.judge:
        from loraloom.app.cmd_eval import build_judge

        judge = build_judge(args)
    opts = ScoreOptions(folder=args.dir, manifest=args.manifest, clip=None if args.no_clip else (args.clip or ""),
                        clip_text=args.clip_text, clip_scale=args.clip_scale, checker=not args.no_checker,
                        batch_size=args.batch_size, device=args.device, allow_download=args.allow_download, judge=judge,
                        baseline=args.baseline, both_orders=not args.one_order, workers=args.workers, reask=args.reask,
                        progress=not args.no_progress)
    result = score_folder(opts)
    for line in result.lines():
        print(line)
    return 0


def report_cmd(args: argparse.Namespace) -> int:
    from loraloom.evaluation.bench.report import write_report

    paths = write_report(args.dir, out=args.out, manifest=args.manifest, baseline=args.baseline, grid_sets=args.grid_sets)
    for p in paths:
        print(f"wrote {p}")
    return 0
