"""Where each concept of the toy world lives: one region per LoRA, derived from the scene generator's layout.

The generator (`scenes.py`) decides every concept's pixels: the shape at a random centre and size
(`GEOMETRY_RANGES`), the style inside the shape, the top hat on the shape's highest point, the halo ring around
it, the moon in the top-right corner, the box in the bottom-left corner, the background behind everything. A
concept's region is the bounding box of its pixels over the whole geometry range, for the set's character (the
hat sits higher on a star than on a heart), grown by a margin (`MARGIN_PX`) and snapped outward to the model's
latent grid (`GRID` cells: 32 px / the VAE's factor 2). Nothing here looks at a generated image; only the margins
were chosen by a pilot (docs/toyworld.md, "Regions"): confined to the bare box of its pixels, a LoRA alone drew its
concept less often (the box 0/8, the moon 1/8, the cross 2/8 images) — its UNet layers also act around the
concept, and the deepest level's cells are 8 px wide —, with the margins every one drew it as often as unmasked.

The regions per LoRA:

- character (shape) and style: the shape's box (the style is drawn on the shape's pixels, so a style LoRA has
  nothing to do elsewhere);
- clothing: the hat's or the halo's box together with the shape's (the hat sits on the shape, the halo rings it:
  a hat LoRA confined to the hat's own box drew it in 6 to 10 of 12 images, 12 of 12 with the shape's box added);
- object: its corner's box;
- background: `"full"` (it is drawn everywhere behind the others).

In a set, the subject's concepts (character, style, clothing) that are not `"full"` then share one region, the union
of their boxes (a top hat's box reaches above the shape's: as two overlapping regions they halved each other's
conditioning, docs/toyworld.md).

`set_regions(set)` gives a set's mapping (LoRA id -> box or `"full"`); `write_regions` writes them for every set of
the benchmark to `regions.yaml` next to `benchmark.yaml` (the benchmark manifest's reader refuses keys it does not
know, so the regions live in their own file); `generation_regions` turns a mapping into what
`ComposedPipeline.__call__` takes (`loras` entries and `composition.controls.Region`s).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path

import numpy as np
import yaml

from . import scenes as S

GRID = 16  # the toy model's latent grid (32 px, VAE downsampling factor 2): boxes are snapped outward to it
# Pixels added on every side of a concept's box (one latent cell = 2 px; the small corner objects need two).
MARGIN_PX = {"shape": 2, "style": 2, "clothing": 2, "object": 4}
FULL = "full"  # the whole image (a named region of composition.spatial)
FORMAT = "loraloom-toyworld-regions/1"
Box = tuple[float, float, float, float]


def concept_mask(scene: S.Scene, attribute: str, scale: int = S.SCALE) -> np.ndarray:
    """Boolean (SIZE*scale)^2 mask of the pixels where `scene` draws its `attribute`'s concept (the shape's pixels for
    the shape and the style, the clothing's, the object's; every pixel for the background)."""
    n = S.SIZE * scale
    if attribute in ("shape", "style", "colour"):
        return S.shape_mask(scene.shape, scene.cx, scene.cy, scene.r, scale)
    if attribute == "clothing":
        if scene.clothing == "hat":
            return S.hat_mask(scene, scale=scale)
        if scene.clothing == "halo":
            return S.halo_mask(scene, scale)
        return np.zeros((n, n), bool)
    if attribute == "object":
        return S.object_mask(scene.object, scale) if scene.object != "none" else np.zeros((n, n), bool)
    if attribute == "background":
        return np.ones((n, n), bool)
    raise ValueError(f"unknown attribute {attribute!r}; known: {', '.join(S.ATTRIBUTES)}")


def pixel_mask(scene: S.Scene, attribute: str) -> np.ndarray:
    """(SIZE, SIZE) boolean: the output pixels a concept touches (any of the drawn sub-pixels of the pixel)."""
    big = concept_mask(scene, attribute)
    return big.reshape(S.SIZE, S.SCALE, S.SIZE, S.SCALE).any(axis=(1, 3))


def geometries(points: int = 3) -> list[dict[str, float]]:
    """The generator's geometry range as a grid of `points` values per parameter (the corners included): the bounding
    box of every concept grows monotonically with the centre and the radius, so the corners give its extremes."""
    axes = {k: np.linspace(*S.GEOMETRY_RANGES[k], points) for k in ("cx", "cy", "r")}
    return [dict(zip(axes, (float(v) for v in vals))) for vals in itertools.product(*axes.values())]


def _snap(lo: float, hi: float) -> tuple[float, float]:
    """[lo, hi) in pixels -> fractions snapped outward to the latent grid."""
    cell = S.SIZE / GRID
    return float(np.floor(lo / cell) / GRID), float(np.ceil(hi / cell) / GRID)


@cache
def concept_region(attribute: str, value: str, shape: str) -> Box | str:
    """The region of one concept (`attribute` = `value`) when the scene's shape is `shape`: `"full"` for a background,
    else the box of its pixels (for clothing: and the shape's) over the generator's geometry range, grown by
    `MARGIN_PX[attribute]` and snapped outward to the latent grid."""
    if attribute == "background":
        return FULL
    union = np.zeros((S.SIZE, S.SIZE), bool)
    for geo in geometries():
        scene = S.Scene(shape, "red", "white", **geo).with_(**({attribute: value} if attribute in ("clothing", "style", "object") else {}))
        union |= pixel_mask(scene, attribute)
        if attribute == "clothing":
            union |= pixel_mask(scene, "shape")
    rows, cols = np.nonzero(union.any(axis=1))[0], np.nonzero(union.any(axis=0))[0]
    m = MARGIN_PX[attribute]
    x0, x1 = _snap(max(0, cols[0] - m), min(S.SIZE, cols[-1] + 1 + m))
    y0, y1 = _snap(max(0, rows[0] - m), min(S.SIZE, rows[-1] + 1 + m))
    box = (x0, y0, x1, y1)
    return FULL if box == (0.0, 0.0, 1.0, 1.0) else box


def lora_region(lora: S.ConceptLoRA | str, shape: str) -> Box | str:
    """The region of a LoRA in a set whose character draws `shape`."""
    spec = S.LORA_BY_ID[lora] if isinstance(lora, str) else lora
    return concept_region(spec.attribute, spec.value, shape)


def set_regions(loras: Sequence[S.ConceptLoRA | str]) -> dict[str, Box | str]:
    """{LoRA id: region} of a composition set (its character decides the shape; a set without one: the union over
    every shape)."""
    specs = [S.LORA_BY_ID[lo] if isinstance(lo, str) else lo for lo in loras]
    shapes = [s.value for s in specs if s.attribute == "shape"]
    if len(shapes) > 1:
        raise ValueError(f"a set has one character, got {shapes}")
    out = {}
    for spec in specs:
        if shapes:
            out[spec.id] = lora_region(spec, shapes[0])
        else:
            boxes = [lora_region(spec, sh) for sh in S.ATTRIBUTES["shape"]]
            out[spec.id] = FULL if FULL in boxes else _union(boxes)
    # The subject's concepts (character, its style, its clothing) are drawn on one figure: they share one region,
    # the union of their boxes. Two regions that overlap without being equal would blend their prompt copies half
    # and half where they overlap, giving each concept half of its conditioning on its own pixels (measured:
    # docs/toyworld.md, "Regions").
    subject = [s.id for s in specs if s.attribute in SUBJECT and out[s.id] != FULL]
    if len(subject) > 1:
        box = _union([out[i] for i in subject])
        out.update(dict.fromkeys(subject, box))
    return out


SUBJECT = ("shape", "style", "clothing")  # the concepts drawn on the figure itself


def _union(boxes) -> Box:
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))


def generation_regions(loras: Sequence[str], regions: Mapping[str, object]) -> tuple[list, list]:
    """(`loras` entries, `Region`s) for `ComposedPipeline.__call__` from {LoRA id: region}: a LoRA whose region is the
    whole image (or that has none) acts everywhere, unmasked; LoRAs that share a region share one `Region` (one
    prompt copy in the cross-attention, with the run's prompt), in the order of `loras` — the grouping of
    `loraloom bench run --regions` (`evaluation.bench.regions.group_regions`)."""
    from loraloom.composition.controls import Region
    from loraloom.evaluation.bench.regions import group_regions

    plain, groups = group_regions(loras, regions)
    return plain, [Region(mask, loras=tuple(names)) for mask, names in groups]


def regions_document() -> dict:
    """The content of `regions.yaml`: the format, how the regions were derived, and {set id: {LoRA id: region}}."""
    from .manifest import benchmark_sets

    return {
        "format": FORMAT,
        "manifest": "benchmark.yaml",
        "description": "Where each LoRA of a set acts: the bounding box [x0, y0, x1, y1] (fractions of the image, (0, 0) "
                       "top left) of its concept's pixels (clothing: and the shape's) over the scene generator's "
                       "geometry range, for the set's character, grown by a margin (px: "
                       + ", ".join(f"{a} {m}" for a, m in MARGIN_PX.items())
                       + f") and snapped outward to the {GRID}x{GRID} latent grid; 'full' = the whole image "
                       "(backgrounds). Derived from the generator's layout (evaluation/toyworld/regions.py), not from "
                       "images. The subject's concepts (character, style, clothing) share one box, the union of theirs.",
        "grid": GRID,
        "sets": {s["id"]: {lid: (list(r) if isinstance(r, tuple) else r) for lid, r in set_regions(s["loras"]).items()}
                 for s in benchmark_sets()},
    }


def write_regions(path: str | Path) -> Path:
    path = Path(path)
    text = "# Generated by `loraloom toyworld train` (evaluation/toyworld/regions.py); do not edit by hand.\n"
    text += yaml.safe_dump(regions_document(), sort_keys=False, width=160, default_flow_style=None)
    path.write_text(text, encoding="utf-8")
    return path


def load_regions(assets: str | Path) -> dict[str, dict[str, object]]:
    """{set id: {LoRA id: region}} of a toy world's `regions.yaml` (derived afresh when the file is missing)."""
    path = Path(assets) / "regions.yaml"
    if path.exists():
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if data.get("format") != FORMAT:
            raise ValueError(f"{path}: format {data.get('format')!r}, expected {FORMAT!r}")
        return {k: dict(v) for k, v in (data.get("sets") or {}).items()}
    return regions_document()["sets"]
