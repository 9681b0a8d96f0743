"""Pictures of the toy world: a sheet of generator scenes, and a grid of generations (base model, each LoRA
alone, merged sets) with the prompt written next to each row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from . import scenes as S
from .manifest import composition_sets, set_colour, set_prompt

ZOOM = 3
LABEL_W = 330


def _labelled_rows(rows: list[tuple[str, list[np.ndarray]]]) -> Image.Image:
    cell = S.SIZE * ZOOM + 4
    cols = max(len(imgs) for _, imgs in rows)
    sheet = Image.new("RGB", (LABEL_W + cols * cell, len(rows) * cell), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, (label, imgs) in enumerate(rows):
        draw.text((4, r * cell + cell // 2 - 6), label, fill=(0, 0, 0))
        for c, im in enumerate(imgs):
            tile = Image.fromarray(im).resize((S.SIZE * ZOOM, S.SIZE * ZOOM), Image.NEAREST)
            sheet.paste(tile, (LABEL_W + c * cell + 2, r * cell + 2))
    return sheet


def scene_sheet(out: str | Path, per_row: int = 6, seed: int = 0) -> Path:
    """Base scenes, then one row per concept LoRA (its training positives), then fully composed scenes."""
    rng = np.random.default_rng(seed)
    rows = [("base: " + S.caption(s := S.sample_scene(rng)), [S.render(s)] + [S.render(S.sample_scene(rng)) for _ in range(per_row - 1)])]
    for spec in S.LORAS:
        scenes_ = [S.lora_scene(rng, spec) for _ in range(per_row)]
        rows.append((f"{spec.id}: {S.caption(scenes_[0])}", [S.render(s) for s in scenes_]))
    scenes_ = [S.sample_any_scene(rng, 1.0) for _ in range(per_row)]
    rows.append(("all: " + S.caption(scenes_[0]), [S.render(s) for s in scenes_]))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _labelled_rows(rows).save(out)
    return out


def make_grid(assets: str | Path, out: str | Path, seeds: int = 6, method: str = "merge") -> Path:
    """Generations through `ComposedPipeline`: base prompts, each LoRA alone (trigger prompt), merged sets."""
    from .quality import ComposedGenerator, Probe

    gen = ComposedGenerator(assets)
    plan: list[tuple[str, str, tuple[str, ...]]] = []
    for shape, colour, bg in (("circle", "red", "white"), ("square", "blue", "black"), ("triangle", "yellow", "white")):
        plan.append(("base", S.caption(S.Scene(shape, colour, bg)), ()))
    for spec in S.LORAS:
        scene = S.Scene("circle" if spec.attribute != "shape" else spec.value, "red", "white")
        if spec.attribute != "shape":
            scene = scene.with_(**{spec.attribute: spec.value})
        plan.append((spec.id, S.caption(scene), (spec.id,)))
    for n, index in ((2, 0), (2, 5), (3, 30), (4, 40), (5, 0)):
        loras = composition_sets(n)[index]
        plan.append((f"merge n={n}", set_prompt(loras, set_colour(index)), tuple(l.id for l in loras)))
    rows = []
    for name, prompt, loras in plan:
        probes = [Probe(prompt, s, loras) for s in range(seeds)]
        rows.append((f"{name}: {prompt}", list(gen(probes))))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _labelled_rows(rows).save(out)
    return out
