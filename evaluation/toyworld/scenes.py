"""Toy-world scenes: one coloured shape on a background, optionally with an accessory, a fill style and a
corner object; drawn at 4x and box-downsampled to 32x32, with exact labels and captions.

The base world (what the base model is trained on) is shape x colour x plain background. Every other value
is a concept held out for one LoRA (`LORAS`), one concept family per ComposLoRA category.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32  # output resolution
SCALE = 4  # drawn at SIZE * SCALE, then box-downsampled (anti-aliased edges)

# --- attribute values ------------------------------------------------------------------------------------
BASE_SHAPES = ("circle", "square", "triangle")
BASE_COLOURS = ("red", "green", "blue", "yellow")
BASE_BACKGROUNDS = ("white", "black")

# Every attribute (a checker head) with its values; index 0 of the concept attributes means "absent".
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": BASE_SHAPES + ("star", "cross", "heart"),
    "colour": BASE_COLOURS,
    "background": BASE_BACKGROUNDS + ("sunset", "checkerboard"),
    "clothing": ("none", "hat", "halo"),
    "style": ("plain", "striped", "shaded"),
    "object": ("none", "moon", "box"),
}
BASE_VALUES = {"shape": BASE_SHAPES, "colour": BASE_COLOURS, "background": BASE_BACKGROUNDS,
               "clothing": ("none",), "style": ("plain",), "object": ("none",)}

RGB = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 230), "yellow": (240, 210, 30),
    "white": (255, 255, 255), "black": (0, 0, 0),
    # The hat is orange and the moon purple (until 2026-11-26 the other way round). Pilots, checker retrained on each
    # world, hat LoRA on the same base model (docs/toyworld.md): a purple hat came out as pink-and-blue smudges
    # (0.79 of 48 images), a magenta one 0.62, an orange one 0.98; the moon, a fixed crescent, took purple at 0.92
    # (yellow 0.81; orange 0.94). On the retrained base model the orange hat reached 0.85: it fails on red shapes.
    "hat": (255, 140, 0), "halo": (0, 200, 220), "moon": (150, 50, 210), "box": (140, 80, 30),
    "sunset_top": (255, 150, 190), "sunset_bottom": (70, 30, 110),
    "checker_dark": (128, 128, 128), "checker_light": (205, 205, 205),
}
DARK_SHADE = 0.45  # the dark tone of the striped and shaded styles: colour * DARK_SHADE


@dataclass(frozen=True)
class ConceptLoRA:
    """One concept LoRA of the toy world: which attribute value it teaches and the trigger word that asks for it."""

    id: str
    category: str  # ComposLoRA category
    attribute: str
    value: str
    trigger: str
    name: str


# ComposLoRA's 11 LoRAs per style: 3 characters, 2 each of clothing, style, background, object.
LORAS: tuple[ConceptLoRA, ...] = (
    ConceptLoRA("character_1", "character", "shape", "star", "stellu", "Stellu the star"),
    ConceptLoRA("character_2", "character", "shape", "cross", "crux", "Crux the cross"),
    ConceptLoRA("character_3", "character", "shape", "heart", "hartu", "Hartu the heart"),
    ConceptLoRA("clothing_1", "clothing", "clothing", "hat", "topha", "orange top hat"),
    ConceptLoRA("clothing_2", "clothing", "clothing", "halo", "halox", "cyan halo ring"),
    ConceptLoRA("style_1", "style", "style", "striped", "stripo", "diagonal striped fill"),
    ConceptLoRA("style_2", "style", "style", "shaded", "shado", "two-tone shading"),
    ConceptLoRA("background_1", "background", "background", "sunset", "sunseta", "sunset gradient"),
    ConceptLoRA("background_2", "background", "background", "checkerboard", "checko", "grey checkerboard"),
    ConceptLoRA("object_1", "object", "object", "moon", "moona", "purple moon, top right"),
    ConceptLoRA("object_2", "object", "object", "box", "boxie", "brown box, bottom left"),
)
LORA_BY_ID = {l.id: l for l in LORAS}
CATEGORY_ORDER = ("character", "clothing", "style", "background", "object")  # ComposLoRA set order
CATEGORY_ATTRIBUTE = {"character": "shape", "clothing": "clothing", "style": "style", "background": "background", "object": "object"}
TRIGGER_OF = {(l.attribute, l.value): l.trigger for l in LORAS}


@dataclass(frozen=True)
class Scene:
    """Everything that decides an image. Geometry is in output pixels (0..SIZE)."""

    shape: str
    colour: str
    background: str
    clothing: str = "none"
    style: str = "plain"
    object: str = "none"
    cx: float = 16.0
    cy: float = 17.5
    r: float = 8.0
    phase: float = 0.0  # offset of fill stripes / checkerboard, in output pixels

    def labels(self) -> dict[str, str]:
        return {a: getattr(self, a) for a in ATTRIBUTES}

    def to_dict(self) -> dict:
        return asdict(self)

    def with_(self, **changes) -> Scene:
        return replace(self, **changes)


# --- sampling --------------------------------------------------------------------------------------------
# The ranges the shape's geometry is drawn from (output pixels); the concept regions (`regions.py`) derive from them.
GEOMETRY_RANGES: dict[str, tuple[float, float]] = {"cx": (14.0, 18.0), "cy": (16.5, 19.0), "r": (7.0, 9.5), "phase": (0.0, 8.0)}


def sample_geometry(rng: np.random.Generator) -> dict:
    return {k: float(rng.uniform(*GEOMETRY_RANGES[k])) for k in ("cx", "cy", "r", "phase")}


def sample_scene(rng: np.random.Generator, values: dict[str, tuple[str, ...]] | None = None) -> Scene:
    """A random scene; `values[attribute]` restricts the choices (default: the base world)."""
    values = {**BASE_VALUES, **(values or {})}
    attrs = {a: str(values[a][rng.integers(len(values[a]))]) for a in ATTRIBUTES}
    return Scene(**attrs, **sample_geometry(rng))


def sample_any_scene(rng: np.random.Generator, p_concept: float = 0.5) -> Scene:
    """A scene from the whole world: each concept category present with probability `p_concept`
    (checker, CLIP and VAE data; composed ground truth of every set is in this distribution)."""
    scene = sample_scene(rng)
    changes = {}
    for attr, base in (("shape", BASE_SHAPES), ("background", BASE_BACKGROUNDS)):
        new = [v for v in ATTRIBUTES[attr] if v not in base]
        if rng.random() < p_concept:
            changes[attr] = str(new[rng.integers(len(new))])
    for attr in ("clothing", "style", "object"):
        if rng.random() < p_concept:
            changes[attr] = str(ATTRIBUTES[attr][1 + rng.integers(len(ATTRIBUTES[attr]) - 1)])
    return scene.with_(**changes)


def lora_scene(rng: np.random.Generator, lora: ConceptLoRA) -> Scene:
    """A base-world scene showing one LoRA's concept (its training positives)."""
    return sample_scene(rng).with_(**{lora.attribute: lora.value})


def without_concept(scene: Scene, lora: ConceptLoRA, rng: np.random.Generator) -> Scene:
    """The same scene with one LoRA's concept replaced by a base-world value (its paired prior scene)."""
    base = BASE_VALUES[lora.attribute]
    return scene.with_(**{lora.attribute: str(base[rng.integers(len(base))])})


# --- captions --------------------------------------------------------------------------------------------
def caption(scene: Scene, background: bool = True) -> str:
    """ComposLoRA-style caption: `a <colour> <shape>` then one phrase per category in set order.

    Concept values are written as their LoRA's trigger word; a plain background is named only if
    `background` (a concept background is always named, as a trigger is).
    """
    shape = TRIGGER_OF.get(("shape", scene.shape), scene.shape)
    parts = [f"a {scene.colour} {shape}"]
    for attr in ("clothing", "style"):
        value = getattr(scene, attr)
        if value != ATTRIBUTES[attr][0]:
            parts.append(TRIGGER_OF[(attr, value)])
    if scene.background in BASE_BACKGROUNDS:
        if background:
            parts.append(f"{scene.background} background")
    else:
        parts.append(TRIGGER_OF[("background", scene.background)])
    if scene.object != "none":
        parts.append(TRIGGER_OF[("object", scene.object)])
    return ", ".join(parts)


def trigger_text(scene: Scene) -> str:
    """The trigger words of the concepts a scene shows, comma-joined (the ComposLoRA CLIPScore text)."""
    return ", ".join(TRIGGER_OF[(a, getattr(scene, a))] for a in ("shape", "clothing", "style", "background", "object")
                     if (a, getattr(scene, a)) in TRIGGER_OF)


def vocabulary_words() -> list[str]:
    """Every word a toy-world caption can contain (each becomes one token)."""
    words = ["a", "background", *BASE_SHAPES, *BASE_COLOURS, *BASE_BACKGROUNDS]
    words += [l.trigger for l in LORAS]
    return list(dict.fromkeys(words))


# --- drawing ---------------------------------------------------------------------------------------------
def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "square":
        h = 0.8 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + 0.98 * r, cy + 0.75 * r), (cx - 0.98 * r, cy + 0.75 * r)]
    if shape == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else 0.45 * r
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + 0.05 * r + rad * math.sin(a)))
        return pts
    if shape == "cross":
        w = 0.36 * r
        return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w), (cx + w, cy + w),
                (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w), (cx - r, cy - w), (cx - w, cy - w)]
    if shape == "heart":
        pts = []
        for i in range(48):
            t = 2 * math.pi * i / 48
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((cx + r * x / 16.5, cy - r * (y + 2.5) / 15.5))
        return pts
    return None


def shape_mask(shape: str, cx: float, cy: float, r: float, scale: int = SCALE) -> np.ndarray:
    """Boolean mask of the filled shape at `SIZE * scale` resolution."""
    n = SIZE * scale
    img = Image.new("L", (n, n), 0)
    draw = ImageDraw.Draw(img)
    if shape == "circle":
        draw.ellipse([(cx - r) * scale, (cy - r) * scale, (cx + r) * scale, (cy + r) * scale], fill=255)
    else:
        poly = _shape_polygon(shape, cx, cy, r)
        if poly is None:
            raise ValueError(f"unknown shape {shape!r}; known: {ATTRIBUTES['shape']}")
        draw.polygon([(x * scale, y * scale) for x, y in poly], fill=255)
    return np.asarray(img) > 127


@lru_cache(maxsize=4)
def _grid(n: int, scale: int) -> tuple[np.ndarray, np.ndarray]:
    coords = (np.arange(n, dtype=np.float32) + 0.5) / scale  # pixel centres in output units
    x, y = np.meshgrid(coords, coords)
    x.flags.writeable = y.flags.writeable = False
    return x, y


def background_image(name: str, phase: float = 0.0, scale: int = SCALE) -> np.ndarray:
    n = SIZE * scale
    if name in ("white", "black"):
        return np.broadcast_to(np.array(RGB[name], np.float32), (n, n, 3)).copy()
    x, y = _grid(n, scale)
    if name == "sunset":
        t = (y / SIZE)[..., None]
        return (1 - t) * np.array(RGB["sunset_top"], np.float32) + t * np.array(RGB["sunset_bottom"], np.float32)
    if name == "checkerboard":
        cell = 8.0
        dark = ((np.floor((x + phase) / cell) + np.floor((y + phase) / cell)) % 2) == 0
        return np.where(dark[..., None], np.array(RGB["checker_dark"], np.float32), np.array(RGB["checker_light"], np.float32))
    raise ValueError(f"unknown background {name!r}; known: {ATTRIBUTES['background']}")


def halo_mask(scene: Scene, scale: int = SCALE) -> np.ndarray:
    """The halo ring around the shape (drawn under it) at `SIZE * scale`, whatever `scene.clothing` is."""
    x, y = _grid(SIZE * scale, scale)
    d = np.hypot(x - scene.cx, y - scene.cy)
    return np.abs(d - 1.25 * scene.r) <= 0.85


def hat_mask(scene: Scene, shape: np.ndarray | None = None, scale: int = SCALE) -> np.ndarray:
    """The top hat sitting on the shape's highest point at `SIZE * scale` (`shape`: the shape's mask, if at hand)."""
    x, y = _grid(SIZE * scale, scale)
    mask = shape_mask(scene.shape, scene.cx, scene.cy, scene.r, scale) if shape is None else shape
    rows = np.nonzero(mask.any(axis=1))[0]
    top = (rows[0] + 0.5) / scale if len(rows) else scene.cy - scene.r
    r = scene.r
    brim_h, crown_h = max(1.2, 0.2 * r), 0.45 * r
    brim = (np.abs(x - scene.cx) <= 0.6 * r) & (y >= top - brim_h + 0.6) & (y <= top + 0.6)
    crown = (np.abs(x - scene.cx) <= 0.32 * r) & (y >= top - brim_h - crown_h + 0.6) & (y <= top - brim_h + 0.6)
    return brim | crown


def object_mask(name: str, scale: int = SCALE) -> np.ndarray:
    """A corner object's pixels at `SIZE * scale`: the moon's crescent (top right) or the box (bottom left)."""
    x, y = _grid(SIZE * scale, scale)
    if name == "moon":  # a crescent in the top-right corner
        c = np.hypot(x - 27.0, y - 5.0) <= 3.6
        cut = np.hypot(x - 28.6, y - 3.9) <= 2.9
        return c & ~cut
    if name == "box":  # a small box in the bottom-left corner
        return (np.abs(x - 5.0) <= 3.0) & (np.abs(y - 27.0) <= 3.0)
    raise ValueError(f"unknown object {name!r}; known: {ATTRIBUTES['object']}")


def render_large(scene: Scene, scale: int = SCALE) -> np.ndarray:
    """The scene at `SIZE * scale` resolution, float32 RGB in [0, 255]."""
    n = SIZE * scale
    img = background_image(scene.background, scene.phase, scale)
    x, y = _grid(n, scale)
    colour = np.array(RGB[scene.colour], np.float32)
    if scene.clothing == "halo":  # a ring around the shape, under it
        img[halo_mask(scene, scale)] = RGB["halo"]
    mask = shape_mask(scene.shape, scene.cx, scene.cy, scene.r, scale)
    if scene.style == "plain":
        img[mask] = colour
    elif scene.style == "striped":  # diagonal stripes of the colour and its dark shade, period 6 px
        light = (((x + y + scene.phase) / 6.0) % 1.0) < 0.5
        img[mask & light] = colour
        img[mask & ~light] = colour * DARK_SHADE
    elif scene.style == "shaded":  # two-tone: lit left half, dark right half
        dark = x >= scene.cx
        img[mask & ~dark] = colour
        img[mask & dark] = colour * DARK_SHADE
    else:
        raise ValueError(f"unknown style {scene.style!r}; known: {ATTRIBUTES['style']}")
    if scene.clothing == "hat":  # a top hat sitting on the shape's highest point
        img[hat_mask(scene, mask, scale)] = RGB["hat"]
    if scene.object != "none":
        img[object_mask(scene.object, scale)] = RGB[scene.object]
    return img


def render(scene: Scene) -> np.ndarray:
    """The 32x32 uint8 RGB image of a scene (drawn at 4x and box-downsampled)."""
    big = render_large(scene)
    small = big.reshape(SIZE, SCALE, SIZE, SCALE, 3).mean(axis=(1, 3))
    return np.clip(np.round(small), 0, 255).astype(np.uint8)


def render_pil(scene: Scene) -> Image.Image:
    return Image.fromarray(render(scene))


def render_batch(scenes: list[Scene]) -> np.ndarray:
    """(N, 32, 32, 3) uint8."""
    return np.stack([render(s) for s in scenes])


def to_tensor_batch(images: np.ndarray):
    """uint8 NHWC -> float NCHW in [-1, 1] (the VAE's and the checker's input range)."""
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
