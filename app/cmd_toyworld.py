"""`loraloom toyworld …`: train, check and look at the toy world (a tiny trained model with concept LoRAs,
a ground-truth checker and a tiny CLIP, shipped in assets/toyworld/)."""

from __future__ import annotations

import argparse
from pathlib import Path


def _setting(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    k, v = text.split("=", 1)
    return k.strip(), v.strip()


def register(sub) -> None:
    from loraloom.evaluation.toyworld import ASSETS as DEFAULT_ASSETS
    from loraloom.evaluation.toyworld import STAGES
    from loraloom.evaluation.toyworld import WORK as DEFAULT_WORK

    p = sub.add_parser("toyworld", help="train / check / show the offline toy world",
                       description="The toy world: a tiny text-to-image model of 32x32 shape scenes, 11 concept LoRAs, "
                                   "a checker that knows the ground truth, and a tiny CLIP. See docs/toyworld.md.")
    tw = p.add_subparsers(dest="toyworld_command", metavar="ACTION")

    t = tw.add_parser("train", help="run the training recipe (resumable)",
                      description="Train the toy world. `--stage all` reproduces every shipped artefact.")
    t.add_argument("--stage", nargs="+", default=["all"], choices=["all", *STAGES],
                   help="stage(s) to run (default: all); later stages read earlier ones from --work and --assets")
    t.add_argument("--resume", action="store_true", help="continue from the checkpoints in --work instead of starting the stages afresh")
    t.add_argument("--work", default=str(DEFAULT_WORK), help=f"checkpoint folder (default: {DEFAULT_WORK})")
    t.add_argument("--assets", default=str(DEFAULT_ASSETS), help="where the trained artefacts go (default: assets/toyworld)")
    t.add_argument("--lora", nargs="+", help="train only these LoRA ids (with --stage loras)")
    t.add_argument("--workers", type=int, help="single-threaded processes side by side (default: 2)")
    t.add_argument("--set", type=_setting, action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value (see evaluation/toyworld/recipe.py), e.g. --set lora_steps=200")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.set_defaults(func=run_train)

    c = tw.add_parser("check", help="measure the quality bars (prints the six result lines last)")
    c.add_argument("--assets", default=str(DEFAULT_ASSETS))
    c.add_argument("--quick", action="store_true", help="fewer images (a rough number in about a quarter of the time)")
    c.add_argument("--smoke", action="store_true", help="one image per probe where possible: every part of the check "
                                                        "runs in seconds (for an install; the numbers mean little)")
    c.add_argument("--workers", type=int, default=2, help="single-threaded generation processes (default: 2)")
    c.add_argument("--images", help="also save contact sheets of every probe group into this folder")
    c.add_argument("--steps", type=int, help="sampling steps (default: the world's own, from its benchmark.yaml)")
    c.add_argument("--guidance-scale", type=float, help="CFG scale (default: the world's own, from its benchmark.yaml)")
    c.add_argument("--regions", action="store_true",
                   help="instead of the quality bars: Merge, Switch and Composite on the set probes (N = 2, 3, 4), without "
                        "and with each LoRA in its concept's region (regions.yaml); prints plain_all_concepts_N and "
                        "regions_all_concepts_N last")
    c.add_argument("--sizes", type=int, nargs="+", help="with --regions: set sizes N (default: 2 3 4)")
    c.add_argument("--sets", help="with --regions: sets per size, evenly spaced, or 'all' (default: all 24 of N = 2, "
                                  "48 of N = 3 and of N = 4)")
    c.add_argument("--seeds-per-set", type=int, help="with --regions: seeds per set (default: 4 for N = 2, else 2)")
    c.add_argument("--methods", help="with --regions: comma-separated methods (default: merge,switch,composite)")
    c.add_argument("--records", help="with --regions: write one JSON line per image here")
    c.add_argument("--no-progress", action="store_true")
    c.set_defaults(func=run_check)

    cc = tw.add_parser("compose-check", help="a quick composition check: each method on 4 sets per N = 2, 3, 4",
                       description="Each method on a fixed subset of the toy benchmark (4 sets per N = 2, 3, 4, 2 seeds; "
                                   "klora/ziplora/hypernet on the N = 2 sets), read by the checker; prints "
                                   "compose_<method>_<N> <all-concepts share> last. Resumable; the folder opens in "
                                   "`loraloom bench report`. About 5-15 minutes on 2 CPU cores.")
    cc.add_argument("--assets", default=str(DEFAULT_ASSETS))
    cc.add_argument("--methods", help="comma-separated methods, NAME or NAME(key=value,...) "
                                      "(default: merge,switch,composite,clora,cmlora,loratorio,tokenroute)")
    cc.add_argument("--seed-offset", type=int, default=0, help="seed values K, K+1 (default: 0); another K: fresh images")
    cc.add_argument("--sets-per-n", type=int, default=4, help="sets per N (default: %(default)s)")
    cc.add_argument("--seeds", type=int, default=2, help="seeds per set (default: %(default)s)")
    cc.add_argument("--out", help="output folder (default: outputs/compose-check/seed-offset-K)")
    cc.add_argument("--no-progress", action="store_true")
    cc.set_defaults(func=run_compose_check)

    g = tw.add_parser("grid", help="a PNG grid: base model, each LoRA alone, merged sets")
    g.add_argument("--assets", default=str(DEFAULT_ASSETS))
    g.add_argument("--out", default="outputs/toyworld-grid.png")
    g.add_argument("--seeds", type=int, default=6, help="columns (seeds) per row")
    g.set_defaults(func=run_grid)

    s = tw.add_parser("scenes", help="a PNG sheet of generator scenes (every concept) with their captions")
    s.add_argument("--out", default="outputs/toyworld-scenes.png")
    s.set_defaults(func=run_scenes)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def recipe_with_settings(settings, command: str):
    """The toy world's recipe with `--set` (key, text) overrides; a bad one ends `command` with a message naming it."""
    from loraloom.evaluation.toyworld.recipe import Recipe

    try:
        return Recipe().with_settings(settings)
    except (KeyError, ValueError) as err:
        raise SystemExit(f"{command}: --set: {err.args[0]}") from None


def _recipe(args):
    from dataclasses import replace

    recipe = recipe_with_settings(args.set, "loraloom toyworld")
    return replace(recipe, workers=args.workers) if args.workers else recipe


def run_train(args) -> int:
    from loraloom.evaluation.toyworld.run import train

    recipe = _recipe(args)
    timings = train(args.stage, work=args.work, assets=args.assets, recipe=recipe, resume=args.resume,
                    progress=not args.no_progress, lora_ids=args.lora)
    total = 0.0
    for stage, t in timings.items():
        print(f"{stage:24s} {t['seconds'] / 60:6.1f} min  (sessions {t['sessions']}, load at end {t.get('load_end')})")
        total += t["seconds"]
    print(f"artefacts in {args.assets}; checkpoints in {args.work}")
    return 0


def region_settings(args):
    """`RegionCheckSettings` of `toyworld check --regions` and its options (--quick / --smoke shrink the default)."""
    from loraloom.evaluation.toyworld.quality import REGION_METHODS, RegionCheckSettings

    settings = RegionCheckSettings(workers=args.workers)
    if args.quick:
        settings.max_sets, settings.seeds = dict.fromkeys(range(2, 6), 12), dict.fromkeys(range(2, 6), 1)
    if args.smoke:
        settings.max_sets, settings.seeds = dict.fromkeys(range(2, 6), 1), dict.fromkeys(range(2, 6), 1)
    if args.sizes:
        bad = [n for n in args.sizes if n not in range(2, 6)]
        if bad:
            raise SystemExit(f"loraloom toyworld check: --sizes {bad}: the toy world's sets have 2 to 5 LoRAs")
        settings.sizes = tuple(args.sizes)
    if args.sets:
        if args.sets != "all" and not (args.sets.isdigit() and int(args.sets) > 0):
            raise SystemExit(f"loraloom toyworld check: --sets {args.sets!r}: a positive number or 'all'")
        settings.max_sets = dict.fromkeys(range(2, 6), None if args.sets == "all" else int(args.sets))
    if args.seeds_per_set:
        settings.seeds = dict.fromkeys(range(2, 6), args.seeds_per_set)
    if args.methods:
        methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        bad = [m for m in methods if m not in REGION_METHODS]
        if bad or not methods:
            raise SystemExit(f"loraloom toyworld check: --methods {args.methods!r}: choose from {', '.join(REGION_METHODS)} "
                             "(the methods that take regions)")
        settings.methods = methods
    return settings


def run_check(args) -> int:
    from loraloom.evaluation.toyworld.quality import CheckSettings
    from loraloom.evaluation.toyworld.quality import run_check as check

    if args.regions:
        from loraloom.evaluation.toyworld.quality import run_region_check

        run_region_check(args.assets, region_settings(args), steps=args.steps, guidance_scale=args.guidance_scale,
                         progress=not args.no_progress, out_dir=Path(args.images) if args.images else None,
                         records_path=Path(args.records) if args.records else None)
        return 0
    only = [f"--{n.replace('_', '-')}" for n in ("sizes", "sets", "seeds_per_set", "methods", "records") if getattr(args, n)]
    if only:
        raise SystemExit(f"loraloom toyworld check: {', '.join(only)} only go with --regions")
    settings = CheckSettings(workers=args.workers)
    if args.quick:
        settings = CheckSettings(base_seeds=1, lora_images=8, leak_images=8, merge2_seeds=1, merge4_sets=12, merge4_seeds=1,
                                 checker_images=500, workers=args.workers)
    if args.smoke:
        settings = CheckSettings(base_seeds=1, lora_images=1, leak_images=1, merge2_seeds=1, merge4_sets=1, merge4_seeds=1,
                                 checker_images=50, workers=args.workers)
    check(args.assets, settings, steps=args.steps, guidance_scale=args.guidance_scale, progress=not args.no_progress,
          out_dir=Path(args.images) if args.images else None)
    return 0


def run_grid(args) -> int:
    import torch

    from loraloom.evaluation.toyworld.grid import make_grid

    # One thread, as the check's workers use: the toy model is too small for two threads to help, and two
    # threads next to any other busy process spin-wait (tenfold slower on this 2-core machine).
    torch.set_num_threads(1)
    path = make_grid(args.assets, args.out, seeds=args.seeds)
    print(path)
    return 0


def run_scenes(args) -> int:
    from loraloom.evaluation.toyworld.grid import scene_sheet

    print(scene_sheet(args.out))
    return 0


def run_compose_check(args) -> int:
    from loraloom.evaluation.toyworld.compose_check import METHODS
    from loraloom.evaluation.toyworld.compose_check import run_compose_check as check

    methods = (args.methods,) if args.methods else METHODS  # parse_methods splits at commas outside parentheses
    check(args.assets, methods, seed_offset=args.seed_offset, out=args.out, per_n=args.sets_per_n, seeds=args.seeds,
          progress=not args.no_progress)
    return 0
