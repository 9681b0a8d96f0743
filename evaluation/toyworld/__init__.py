"""The toy world: procedurally drawn 32x32 scenes with exact labels, a tiny trained SD1-architecture model,
11 concept LoRAs (ComposLoRA's categories), a ground-truth checker and a tiny CLIP. See docs/toyworld.md.

The trained artefacts live in `assets/toyworld/`; `loraloom toyworld train` reproduces them and
`loraloom toyworld check` measures them.
"""

from pathlib import Path

from loraloom.resources import asset

ASSETS = asset("toyworld")
MODEL = ASSETS / "model"
LORAS_DIR = ASSETS / "loras"
CHECKER = ASSETS / "checker"
CLIP = ASSETS / "clip"
MANIFEST = ASSETS / "benchmark.yaml"
WORK = Path("outputs") / "toyworld-train"  # checkpoints of `loraloom toyworld train` (relative to the current folder)
STAGES = ("tokenizer", "vae", "clip", "base", "loras", "checker", "manifest")
