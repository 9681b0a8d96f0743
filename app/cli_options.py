"""Options several subcommands share (`generate`, `ui`, `bench run`), declared once."""

from __future__ import annotations

import argparse


def add_offload_arguments(parser: argparse.ArgumentParser) -> None:
    """`--cpu-offload` / `--sequential-offload` (one of them, into `args.offload`: "model", "sequential" or None),
    passed to diffusers by `ComposedPipeline.enable_offload`."""
    offload = parser.add_mutually_exclusive_group()
    offload.add_argument("--cpu-offload", dest="offload", action="store_const", const="model",
                         help="keep the models in CPU memory, each moved to the GPU while it runs (diffusers' "
                              "enable_model_cpu_offload; needs an accelerator)")
    offload.add_argument("--sequential-offload", dest="offload", action="store_const", const="sequential",
                         help="keep the models in CPU memory, moved to the GPU layer by layer (diffusers' "
                              "enable_sequential_cpu_offload: least memory, slowest; needs an accelerator)")
