"""`loraloom generate SPEC.yaml` and `loraloom generate --from-png IMG`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from loraloom.composition.errors import SpecError

from .cli_options import add_offload_arguments


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate images from a spec file (prompts x seeds x methods)",
                       description="Generate every (prompt, method, seed) of a YAML/JSON spec. Images that already "
                                   "exist are skipped, so an interrupted run resumes where it stopped.")
    p.add_argument("spec", nargs="?", help="spec file (YAML or JSON); see assets/examples/")
    p.add_argument("--from-png", metavar="IMG", help="regenerate the image a loraloom PNG describes")
    p.add_argument("--out", help="output folder (default: the spec's 'out', else outputs/<spec name>)")
    p.add_argument("--method", type=_csv, help="method(s), comma-separated (overrides the spec)")
    p.add_argument("--seed", type=lambda v: [int(x) for x in _csv(v)], help="seed(s), comma-separated")
    p.add_argument("--prompt", help="prompt (overrides the spec); <lora:name:w>, <lora:name:te:unet> and lbw=, start=, "
                                    "stop=, step=a-b tags set the controls of the spec's LoRAs (docs/controls.md)")
    p.add_argument("--model", help="base model (overrides the spec)")
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance-scale", type=float)
    p.add_argument("--scheduler")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, mps)")
    p.add_argument("--dtype", help="float32 (default), float16 or bfloat16")
    add_offload_arguments(p)
    p.add_argument("--local-files-only", action="store_true", help="never contact the Hugging Face hub")
    p.add_argument("--allow-pickle", action="store_true", help="also load .ckpt/.pt/.bin LoRAs (torch.load weights_only=True)")
    p.add_argument("--max-pixels", type=int, help="largest height x width a spec may ask for (default 2048x2048)")
    p.add_argument("--model-config", help="diffusers folder/hub id of the same architecture for a single-file "
                                          "checkpoint (needed for FLUX.1 and SD3 files)")
    p.add_argument("--force", action="store_true", help="regenerate images that already exist")
    p.add_argument("--dry-run", action="store_true", help="list the images the spec describes and stop")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from loraloom.pipelines.batch import PipelineCache, expand, load_batch_spec, run_specs
    from loraloom.pipelines.composed import check_offload
    from loraloom.pipelines.spec import read_png_spec

    if bool(args.spec) == bool(args.from_png):
        raise SpecError("give a spec file or --from-png IMG (one of them)")
    if args.max_pixels is not None:
        os.environ["LORALOOM_MAX_PIXELS"] = str(args.max_pixels)  # read where specs are checked
    check_offload(args.offload, args.device)  # no accelerator: one line, before anything is read or loaded
    cache = PipelineCache(device=args.device, local_files_only=args.local_files_only, model_config=args.model_config,
                          allow_pickle=args.allow_pickle, offload=args.offload)
    if args.from_png:
        spec = read_png_spec(args.from_png)
        out_dir = Path(args.out or "outputs/reproduced")
        paths, _ = run_specs([spec], out_dir, skip_existing=False, cache=cache)
        _compare(Path(args.from_png), paths[0])
        return 0
    overrides = {
        "methods": args.method, "seeds": args.seed, "prompt": args.prompt, "model": args.model, "steps": args.steps,
        "guidance_scale": args.guidance_scale, "scheduler": args.scheduler, "height": args.height, "width": args.width,
        "dtype": args.dtype, "out": args.out,
    }
    batch = load_batch_spec(args.spec, overrides)
    if args.local_files_only:
        batch.local_files_only = True
        cache.local_files_only = True
    cache.model_config = cache.model_config or batch.model_config
    specs = expand(batch, allow_pickle=args.allow_pickle)
    out_dir = Path(batch.out or Path("outputs") / Path(args.spec).stem)
    if args.dry_run:
        for s in specs:
            print(out_dir / s.file_name(), "|", s.method, "| seed", s.seed, "|", s.prompt)
        return 0
    paths, skipped = run_specs(specs, out_dir, skip_existing=not args.force, cache=cache)
    made = len(paths) - skipped
    print(f"{made} image(s) written, {skipped} already there, in {out_dir.resolve()}")
    return 0


def _compare(source: Path, made: Path) -> None:
    import numpy as np
    from PIL import Image

    a = np.asarray(Image.open(source).convert("RGB"), dtype=np.int16)
    b = np.asarray(Image.open(made).convert("RGB"), dtype=np.int16)
    if a.shape != b.shape:
        print(f"reproduced {made} (size differs from the source: {a.shape} vs {b.shape})")
        return
    diff = int(np.abs(a - b).max())
    verdict = "identical to the source" if diff == 0 else f"max pixel difference {diff} from the source"
    print(f"reproduced {made.resolve()}: {verdict}")
