"""`loraloom grid SPEC.yaml --x method=merge,switch --y seed=0-3 [--z …]`: an X/Y/Z plot from a spec file."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from loraloom.composition.errors import SpecError


def register(sub) -> None:
    from loraloom.pipelines.grid import AXIS_HELP

    p = sub.add_parser("grid", help="an X/Y/Z plot: a spec varied along one, two or three axes, as labelled grid images",
                       description="Vary the spec's first image (its first prompt, method and seed) along --x, --y and "
                                   "--z and draw one labelled grid image per Z value (grids/grid_<id>.png in the "
                                   "output folder, next to every cell's own PNG with its spec). Cells already made are "
                                   f"reused. Axes: {AXIS_HELP}. See docs/ui.md#xyz-plot.")
    p.add_argument("spec", help="spec file (YAML or JSON), as for `loraloom generate`")
    p.add_argument("--x", required=True, metavar="KIND=VALUES", help="the columns, e.g. method=merge,switch,composite")
    p.add_argument("--y", metavar="KIND=VALUES", help="the rows, e.g. seed=0-3")
    p.add_argument("--z", metavar="KIND=VALUES", help="one grid image per value, e.g. cfg=1,2,4")
    p.add_argument("--out", help="output folder (default: the spec's 'out', else outputs/<spec name>)")
    p.add_argument("--prompt", help="prompt (overrides the spec's first prompt); LoRA tags as in `generate`")
    p.add_argument("--score", action="store_true",
                   help="CLIPScore every cell against its LoRAs' trigger words (the toy world's CLIP for the toy world, "
                        "else --clip)")
    p.add_argument("--clip", help="CLIP for --score (a transformers folder or open_clip spec; default: loraloom eval's)")
    p.add_argument("--cell-size", type=int, help="side each cell is drawn at (default: the image's, at least 128 px)")
    p.add_argument("--force", action="store_true", help="make every cell again (default: reuse cells already made)")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, mps)")
    p.add_argument("--local-files-only", action="store_true", help="never contact the Hugging Face hub")
    p.add_argument("--dry-run", action="store_true", help="list the cells and stop")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from loraloom.composition.files import WritePolicy
    from loraloom.composition.frequency import cache_folder
    from loraloom.pipelines.batch import PipelineCache, check_written_paths, expand, generate_image, load_batch_spec
    from loraloom.pipelines.grid import draw_grid, parse_axis, plan_grid, run_grid, save_grid
    from loraloom.pipelines.spec import save_png

    batch = load_batch_spec(args.spec, {"prompt": args.prompt, "out": args.out})
    axes = [parse_axis(text, f"--{name}") if text else None for name, text in (("x", args.x), ("y", args.y), ("z", args.z))]
    base = expand(batch)[0]
    plan = plan_grid(base, axes[0], axes[1], axes[2], batch.method_params)
    out_dir = Path(batch.out or Path("outputs") / Path(args.spec).stem).resolve()
    nx, ny, nz = plan.shape
    if args.dry_run:
        for c in plan.cells:
            print(f"x{c.x} y{c.y} z{c.z} | {out_dir / c.spec.file_name()} | {c.spec.method} | seed {c.spec.seed}"
                  + (f" | {c.note}" if c.note else ""))
        return 0
    check_written_paths([c.spec for c in plan.cells], out_dir)
    cache = PipelineCache(device=args.device, local_files_only=args.local_files_only or batch.local_files_only,
                          model_config=batch.model_config)

    def make(spec):
        cp = cache.get(spec)
        out = generate_image(cp, spec, out_dir)
        done, provenance = cache.recorded(spec, out)
        path = save_png(out.images[0], out_dir / spec.file_name(), done, cp.write_policy(out_dir), provenance)
        return path, out.images[0], out.seconds

    scorer = _scorer(args, base.model) if args.score else None
    start = time.perf_counter()
    done = 0
    for cell in run_grid(plan, make, out_dir, reuse=not args.force):
        done += 1
        state = "reused" if cell.reused else (f"error: {cell.error}" if cell.error else f"{cell.seconds:.2f} s")
        print(f"[{done}/{len(plan.cells)}] {cell.spec.method} seed {cell.spec.seed}: {state}", flush=True)
    if scorer is not None:
        _score(plan, scorer)
    policy = WritePolicy.at(out_dir, allowed=[cache_folder()])
    for z in range(nz):
        path = save_grid(draw_grid(plan, z, side=args.cell_size), plan, z, out_dir, policy)
        print(f"grid {nx} x {ny}" + (f" (z {z + 1}/{nz})" if nz > 1 else "") + f": {path}")
    _table(plan)
    print(f"{len(plan.cells)} cell(s) in {time.perf_counter() - start:.1f} s; "
          f"{sum(c.reused for c in plan.cells)} reused, {sum(bool(c.error) for c in plan.cells)} failed")
    return 1 if all(c.error for c in plan.cells) else 0


def _scorer(args: argparse.Namespace, model: str):
    from loraloom.evaluation.clipscore import CLIPScorer
    from loraloom.evaluation.scoring import is_toyworld_model

    if args.clip:
        return CLIPScorer.load(args.clip, device=args.device, local_files_only=True)
    if is_toyworld_model(model):
        from loraloom.evaluation import toyworld

        return CLIPScorer.from_transformers(toyworld.CLIP, device=args.device)
    if not os.environ.get("LORALOOM_CLIP") and not args.clip:
        raise SpecError("--score needs a CLIP for this model: pass --clip (a transformers folder or an open_clip spec); "
                        "the toy world's CLIP scores toy-world images only")
    return CLIPScorer.load(os.environ["LORALOOM_CLIP"], device=args.device, local_files_only=True)


def _score(plan, scorer) -> None:
    from loraloom.evaluation.scoring import clip_text

    cells = [c for c in plan.cells if c.image is not None]
    texts = [clip_text(c.spec, "triggers") or c.spec.prompt for c in cells]
    for c, s in zip(cells, scorer.score([c.image for c in cells], texts)):
        c.score = float(s)


def _table(plan) -> None:
    x, y, z = plan.axes
    head = [a.name for a in (x, y, z) if a] + ["CLIPScore", "seconds", "file"]
    print(" | ".join(head))
    for c in plan.cells:
        row = [a.labels()[i] for a, i in ((x, c.x), (y, c.y), (z, c.z)) if a]
        row += ["" if c.score is None else f"{c.score:.2f}", "reused" if c.reused else
                ("" if c.seconds is None else f"{c.seconds:.2f}"), c.path.name if c.path else f"error: {c.error}"]
        print(" | ".join(row))
