"""A tiny benchmark for tests and quick trials: the random `tiny:sd1` model, random LoRAs, and a manifest in the
toy world's format (32x32, 2 steps). Its images are noise; it exercises every code path in seconds."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import yaml

from .manifest import FORMAT

TINY_LORAS = (("char_a", "character", ["ohwx"]), ("char_b", "character", ["sks"]), ("coat", "clothing", ["red coat"]),
              ("ink", "style", ["inkwash"]), ("forest", "background", ["forest"]))


@contextmanager
def torch_threads(n: int = 1):
    """Run with `n` torch threads. Tests use one: on a busy 2-core machine two threads of tiny operations spin
    against each other (30x slower), and identical thread counts give identical bytes across processes."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def tiny_sets() -> list[dict]:
    return [
        {"id": "n2-000", "loras": ["char_a", "coat"], "expected": {"shape": "star"}},
        {"id": "n2-001", "loras": ["char_b", "ink"], "expected": {"shape": "cross"}},
        {"id": "n3-000", "loras": ["char_a", "coat", "ink"], "expected": {"shape": "star", "clothing": "hat"}},
        {"id": "n3-001", "loras": ["char_b", "ink", "forest"], "expected": {"shape": "cross", "style": "striped"}},
    ]


def write_tiny_benchmark(folder: str | Path, *, sets: list[dict] | None = None, seeds=(0, 1), steps: int = 2,
                         size: int = 32, extra: dict | None = None, defaults: dict | None = None) -> Path:
    """Random LoRAs under `folder/loras` and `folder/bench.yaml`; returns the manifest path."""
    from loraloom.pipelines.tiny import build_tiny_sd, write_random_lora

    folder = Path(folder)
    pipe = build_tiny_sd()
    for i, (name, _, _) in enumerate(TINY_LORAS):
        path = folder / "loras" / f"{name}.safetensors"
        if not path.exists():
            write_random_lora(pipe, path, seed=i + 1, std=0.2)
    data = {
        "format": FORMAT,
        "name": "tiny",
        "base_models": {"tiny": {"model": "tiny:sd1"}},
        "defaults": {"base_model": "tiny", "steps": steps, "guidance_scale": 4.0, "scheduler": "default", "height": size,
                     "width": size, "lora_scale": 1.0, "negative_prompt": "", "seeds": list(seeds),
                     "prompt": "a picture, {triggers}", **(defaults or {})},
        "lora_dir": "loras",
        "loras": [{"id": n, "name": n.replace("_", " "), "category": c, "triggers": t, "file": f"{n}.safetensors"}
                  for n, c, t in TINY_LORAS],
        "sets": sets if sets is not None else tiny_sets(),
        **(extra or {}),
    }
    path = folder / "bench.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path
