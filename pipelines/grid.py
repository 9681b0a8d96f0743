"""X/Y/Z plots: one base spec varied along one, two or three axes, every cell an image with its own spec, drawn as
one labelled grid image per Z value (as A1111's X/Y/Z plot script draws it).

An axis is written `KIND=VALUES`, the same in the web UI and on the command line (`loraloom grid --x … --y …`):

- `method=merge,switch,composite` (or `method=*`: every registered method)
- `seed=0-3` · `cfg=1-5 (+2)` · `steps=10,20,30` · `scheduler=ddim,euler` · `size=32x32,64x48` (width x height)
- `weight:NAME=0.4-1.2 [5]` — the strength of the LoRA called NAME (its adapter name)
- `param:METHOD.NAME=1,2,5` (or `METHOD.NAME=…`) — a parameter of a method; cells of other methods keep theirs

Values are a comma-separated list, or for numbers a range as A1111 writes it: `a-b` (whole numbers, step 1),
`a-b (+s)` (step s), `a-b [n]` (n values evenly spaced). Every cell's spec is checked before any image is made
(`GenerationSpec`'s own checks, which name the field), so a bad value fails the whole grid up front.

Cells already made are reused: a cell's file is named by its spec (`GenerationSpec.file_name`), and a PNG of that
name whose recorded spec has the same identity and the same LoRA bytes (sha256) is taken as it is. The grid image
carries a `loraloom-grid` text chunk (the base spec, the axes and the cells' files), so a grid can be read back.

Plain Python (PIL, no Gradio): the web UI's X/Y/Z tab and `loraloom grid` both use it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from loraloom.composition.errors import LoraloomError, SpecError

from .spec import SPEC_CHUNK, GenerationSpec

GRID_CHUNK = "loraloom-grid"
MAX_CELLS = 1024
AXIS_KINDS = ("method", "seed", "cfg", "steps", "scheduler", "size", "weight", "param")
_ALIASES = {"guidance_scale": "cfg", "guidance": "cfg", "methods": "method", "seeds": "seed", "sampler": "scheduler"}
_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)"
_RANGE = re.compile(rf"^\s*({_NUMBER})\s*-\s*({_NUMBER})\s*(?:\(\s*({_NUMBER})\s*\)|\[\s*(\d+)\s*\])?\s*$")
AXIS_HELP = ("KIND=VALUES with KIND one of method, seed, cfg, steps, scheduler, size, weight:LORA, param:METHOD.NAME; "
             "VALUES a comma-separated list or a range a-b, a-b (+step), a-b [count]")


class GridError(SpecError):
    """An axis or a grid that cannot be made; the message names the axis and says how to write it."""


@dataclass(frozen=True)
class Axis:
    kind: str  # one of AXIS_KINDS
    values: tuple  # typed values (int seeds, float CFG, (w, h) sizes, …)
    target: str | None = None  # the LoRA (weight) or "method.param" (param)

    @property
    def name(self) -> str:
        """How the axis is labelled on the grid: `method`, `seed`, `weight:character_1`, `switch.switch_interval`."""
        if self.kind == "weight":
            return f"weight:{self.target}"
        if self.kind == "param":
            return str(self.target)
        return {"cfg": "CFG"}.get(self.kind, self.kind)

    @property
    def text(self) -> str:
        """The axis as it is written (`parse_axis` reads it back)."""
        head = {"weight": f"weight:{self.target}", "param": f"param:{self.target}"}.get(self.kind, self.kind)
        return f"{head}={','.join(value_label(self.kind, v) for v in self.values)}"

    def labels(self) -> list[str]:
        return [value_label(self.kind, v) for v in self.values]

    def to_dict(self) -> dict:
        return {"kind": self.kind, "target": self.target, "values": [list(v) if isinstance(v, tuple) else v for v in self.values],
                "text": self.text}


def value_label(kind: str, value) -> str:
    if kind == "size":
        return f"{value[0]}x{value[1]}"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def number_values(text: str, where: str, whole: bool) -> list:
    """Numbers from `1,2,5`, `1-5`, `1-9 (+2)`, `0.5-1.5 [3]` (A1111's X/Y/Z spelling)."""
    out: list = []
    for part in _split(text):
        m = _RANGE.match(part)
        if m and not re.fullmatch(_NUMBER, part.strip()):
            a, b = float(m.group(1)), float(m.group(2))
            if m.group(4):
                n = int(m.group(4))
                if n < 1:
                    raise GridError(f"{where}: [{n}] asks for no values. Fix: a count of 1 or more")
                vals = [a + (b - a) * i / (n - 1) for i in range(n)] if n > 1 else [a]
            else:
                step = float(m.group(3)) if m.group(3) else (1.0 if b >= a else -1.0)
                if step == 0 or (b - a) * step < 0:
                    raise GridError(f"{where}: range {part.strip()!r} never reaches its end. Fix: a step with the "
                                    "direction of the range, e.g. 1-9 (+2)")
                count = int(math.floor((b - a) / step + 1e-9)) + 1
                if count > MAX_CELLS:
                    raise GridError(f"{where}: range {part.strip()!r} has {count} values, more than {MAX_CELLS}")
                vals = [a + step * i for i in range(count)]
            out.extend(_number(v, where, whole) for v in vals)
        else:
            try:
                out.append(_number(float(part), where, whole))
            except ValueError:
                raise GridError(f"{where}: {part.strip()!r} is not a number nor a range. Fix: 1,2,5 or 1-5 or "
                                "1-9 (+2) or 0.5-1.5 [3]") from None
    return out


def _number(v: float, where: str, whole: bool):
    v = round(v, 6)
    if whole:
        if v != int(v):
            raise GridError(f"{where}: {v:g} is not a whole number")
        return int(v)
    return float(v)


def _split(text: str) -> list[str]:
    """Comma-separated items, not splitting inside brackets, quotes or a JSON value."""
    items, depth, quote, cur = [], 0, None, ""
    for ch in text:
        if quote:
            cur += ch
            if ch == quote:
                quote = None
            continue
        if ch in "\"'":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(cur)
            cur = ""
            continue
        cur += ch
    items.append(cur)
    return [i.strip() for i in items if i.strip()]


def parse_axis(text: str, where: str = "axis", methods: Sequence[str] | None = None) -> Axis:
    """An `Axis` from `KIND=VALUES` (see the module's docstring); `GridError` naming `where` and the fix."""
    from loraloom.composition.methods import available_methods, describe_params, get_method

    if not isinstance(text, str) or "=" not in text:
        raise GridError(f"{where}: {text!r} is not KIND=VALUES. Fix: {AXIS_HELP}")
    head, _, values = text.partition("=")
    head, values = head.strip(), values.strip()
    if not values:
        raise GridError(f"{where}: {head}= has no values. Fix: {AXIS_HELP}")
    kind, _, target = head.partition(":")
    kind = _ALIASES.get(kind.strip().lower(), kind.strip().lower())
    target = target.strip() or None
    if kind not in AXIS_KINDS and "." in head and ":" not in head:
        kind, target = "param", head
    where = f"{where} ({head})"
    if kind not in AXIS_KINDS:
        raise GridError(f"{where}: unknown axis {head!r}. Fix: {AXIS_HELP}")
    if kind in ("weight", "param") and not target:
        raise GridError(f"{where}: name the {'LoRA' if kind == 'weight' else 'parameter'}: "
                        f"{'weight:NAME=0.5,1' if kind == 'weight' else 'param:METHOD.NAME=1,2'}")
    if kind not in ("weight", "param") and target:
        raise GridError(f"{where}: {kind} takes no ':{target}'")
    known = list(methods) if methods is not None else available_methods()
    if kind == "method":
        vals = known if values.strip() == "*" else _split(values)
        unknown = [m for m in vals if m not in known]
        if unknown:
            raise GridError(f"{where}: unknown method(s) {', '.join(unknown)}; known: {', '.join(known)}")
        out: list = vals
    elif kind in ("seed", "steps"):
        out = number_values(values, where, whole=True)
    elif kind in ("cfg", "weight"):
        out = number_values(values, where, whole=False)
    elif kind == "scheduler":
        from .schedulers import scheduler_class

        out = _split(values)
        for name in out:
            scheduler_class(name)
    elif kind == "size":
        out = []
        for part in _split(values):
            m = re.fullmatch(r"\s*(\d+)\s*(?:[xX×]\s*(\d+))?\s*", part)
            if not m:
                raise GridError(f"{where}: {part!r} is not a size. Fix: WIDTHxHEIGHT such as 64x48, or one number for a square")
            w = int(m.group(1))
            out.append((w, int(m.group(2)) if m.group(2) else w))
    else:  # param
        method, _, name = target.partition(".")
        if method not in known:
            raise GridError(f"{where}: unknown method {method!r}; known: {', '.join(known)}")
        names = [d["name"] for d in describe_params(get_method(method))]
        if name not in names:
            raise GridError(f"{where}: {method} has no parameter {name!r}; its parameters: {', '.join(names)}")
        import yaml

        out = []
        for part in _split(values):
            try:
                out.append(yaml.safe_load(part))
            except yaml.YAMLError:
                out.append(part)
    if not out:
        raise GridError(f"{where}: no values. Fix: {AXIS_HELP}")
    if len(set(map(json.dumps, [list(v) if isinstance(v, tuple) else v for v in out]))) != len(out):
        raise GridError(f"{where}: a value is given twice ({values}); give each once")
    return Axis(kind=kind, values=tuple(out), target=target)


@dataclass
class Cell:
    """One image of the grid: its place (x, y, z indices), its spec and, once made, its file."""

    x: int
    y: int
    z: int
    spec: GenerationSpec
    path: Path | None = None
    image: Any = None  # PIL image once made
    seconds: float | None = None  # generation time (None: reused, or not made)
    reused: bool = False
    error: str | None = None
    score: float | None = None
    note: str = ""  # e.g. "param n/a for this method"

    @property
    def done(self) -> bool:
        return self.image is not None or self.error is not None


@dataclass
class GridPlan:
    base: GenerationSpec
    axes: list[Axis | None]  # x, y, z (None: no such axis)
    cells: list[Cell] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(len(a.values) if a else 1 for a in self.axes)  # type: ignore[return-value]

    def page(self, z: int) -> list[Cell]:
        return [c for c in self.cells if c.z == z]

    def identity(self) -> str:
        """12 hex digits naming the grid: the base spec's identity and the axes."""
        blob = json.dumps({"base": self.base.identity(), "axes": [a.text if a else None for a in self.axes]})
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def file_name(self, z: int) -> str:
        nz = self.shape[2]
        return f"grid_{self.identity()}" + (f"_z{z}" if nz > 1 else "") + ".png"

    def record(self, z: int | None = None) -> dict:
        """What a grid PNG carries: the base spec, the axes, and per cell its place, file and numbers."""
        cells = self.cells if z is None else self.page(z)
        return {"base": self.base.to_dict(), "axes": [a.to_dict() if a else None for a in self.axes], "z": z,
                "cells": [{"x": c.x, "y": c.y, "z": c.z, "file": c.path.name if c.path else None, "seconds": c.seconds,
                           "reused": c.reused, "score": c.score, "error": c.error, "note": c.note} for c in cells]}


def apply_axis(spec: GenerationSpec, axis: Axis, value, params_by_method: dict | None = None,
               method_axis: bool = False) -> tuple[GenerationSpec, str]:
    """`spec` with `axis` set to `value`; (spec, note). A method's own parameters come from `params_by_method`. A
    parameter axis of another method leaves the cell as it is (note 'n/a') when a method axis chose the method; with
    no method axis it picks its method."""
    params_by_method = params_by_method or {}
    k = axis.kind
    if k == "method":
        return dataclasses.replace(spec, method=value, method_params=dict(params_by_method.get(value, {}))), ""
    if k == "seed":
        return dataclasses.replace(spec, seed=value), ""
    if k == "cfg":
        return dataclasses.replace(spec, guidance_scale=value), ""
    if k == "steps":
        return dataclasses.replace(spec, steps=value), ""
    if k == "scheduler":
        return dataclasses.replace(spec, scheduler=value), ""
    if k == "size":
        return dataclasses.replace(spec, width=value[0], height=value[1]), ""
    if k == "weight":
        names = [r.adapter_name for r in spec.loras]
        if axis.target not in names:
            raise GridError(f"axis {axis.name}: the spec has no LoRA named {axis.target!r}; its LoRAs: "
                            f"{', '.join(names) or 'none'}")
        loras = [dataclasses.replace(r, weight=value) if r.adapter_name == axis.target else dataclasses.replace(r)
                 for r in spec.loras]
        return dataclasses.replace(spec, loras=loras), ""
    method, _, name = str(axis.target).partition(".")
    if spec.method != method:
        if method_axis:
            return spec, f"{axis.target} n/a"
        spec = dataclasses.replace(spec, method=method, method_params=dict(params_by_method.get(method, {})))
    return dataclasses.replace(spec, method_params={**spec.method_params, name: value}), ""


def plan_grid(base: GenerationSpec, x: Axis, y: Axis | None = None, z: Axis | None = None,
              params_by_method: dict | None = None, max_cells: int = MAX_CELLS) -> GridPlan:
    """Every cell's spec, checked (`GenerationSpec`'s checks name the field; the cell's axis values are named too)."""
    axes = [x, y, z]
    kinds = [a.kind for a in axes if a]
    for kind in ("method", "seed", "cfg", "steps", "scheduler", "size"):
        if kinds.count(kind) > 1:
            raise GridError(f"two axes vary {kind}; vary each thing on one axis")
    targets = [a.target for a in axes if a and a.kind in ("weight", "param")]
    if len(set(targets)) != len(targets):
        raise GridError(f"two axes vary the same {targets}; vary each thing on one axis")
    nx, ny, nz = (len(a.values) if a else 1 for a in axes)
    if nx * ny * nz > max_cells:
        raise GridError(f"{nx} x {ny} x {nz} = {nx * ny * nz} cells, more than {max_cells}. Fix: fewer values")
    method_axis = "method" in kinds
    plan = GridPlan(base=base, axes=axes)
    for iz in range(nz):
        for iy in range(ny):
            for ix in range(nx):
                spec, notes = base, []
                try:
                    for axis, i in ((z, iz), (y, iy), (x, ix)):  # x last: the columns are what a reader compares
                        if axis is None:
                            continue
                        spec, note = apply_axis(spec, axis, axis.values[i], params_by_method, method_axis)
                        if note:
                            notes.append(note)
                    spec = GenerationSpec.from_dict(spec.to_dict())  # a spec of its own (LoRA entries not shared)
                except GridError:
                    raise
                except LoraloomError as err:
                    where = ", ".join(f"{a.name}={a.labels()[i]}" for a, i in ((x, ix), (y, iy), (z, iz)) if a)
                    raise GridError(f"cell {where}: {err}") from None
                plan.cells.append(Cell(x=ix, y=iy, z=iz, spec=spec, note="; ".join(notes)))
    return plan


def find_existing(spec: GenerationSpec, out_dir: str | Path) -> Path | None:
    """The PNG made from `spec` before (same file name, same identity, same LoRA bytes when `spec` records them), or
    None. A file that cannot be read, or whose spec differs, is not taken."""
    from .spec import read_png_spec

    path = Path(out_dir) / spec.file_name()
    if not path.is_file():
        return None
    try:
        made = read_png_spec(path)
    except (LoraloomError, OSError, ValueError):
        return None
    if made.identity() != spec.identity():
        return None
    for want, have in zip(spec.loras, made.loras):
        if want.sha256 and have.sha256 and want.sha256 != have.sha256:
            return None
    return path


Runner = Callable[[GenerationSpec], tuple[Path, Any, float]]  # spec -> (PNG written, PIL image, seconds)


def run_grid(plan: GridPlan, run: Runner, out_dir: str | Path | None = None, reuse: bool = True,
             stop_on_error: bool = False, fatal: tuple[type[BaseException], ...] = ()) -> Iterator[Cell]:
    """Make every cell (cells whose spec is already in `out_dir` are reused), yielding each cell when done. A cell
    whose generation fails keeps its error (`Cell.error`) and the grid goes on, unless `stop_on_error` or the error
    is one of `fatal` (e.g. the user stopped the run)."""
    made: dict[str, Cell] = {}
    for cell in plan.cells:
        key = cell.spec.file_name()
        if key in made:  # the same spec twice in one grid (a parameter axis that does not apply): one image
            src = made[key]
            cell.path, cell.image, cell.reused, cell.error = src.path, src.image, True, src.error
            yield cell
            continue
        existing = find_existing(cell.spec, out_dir) if reuse and out_dir is not None else None
        if existing is not None:
            with Image.open(existing) as im:
                cell.image = im.convert("RGB")
            cell.path, cell.reused = existing, True
        else:
            try:
                cell.path, cell.image, cell.seconds = run(cell.spec)
            except LoraloomError as err:
                if stop_on_error or isinstance(err, fatal):
                    raise
                cell.error = " ".join(str(err).split())
        made[key] = cell
        yield cell


# --- drawing ---------------------------------------------------------------------------------------------------
BACKGROUND, INK, PENDING, FAILED, FRAME = (255, 255, 255), (20, 20, 20), (228, 228, 228), (250, 225, 225), (170, 170, 170)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int, lines: int = 3) -> list[str]:
    words, out, cur = text.replace(",", ", ").split(), [], ""
    for w in words:
        trial = f"{cur} {w}".strip()
        if draw.textlength(trial, font=font) <= width or not cur:
            cur = trial
        else:
            out.append(cur)
            cur = w
    if cur:
        out.append(cur)
    if len(out) > lines:
        out = out[:lines]
        out[-1] = out[-1][: max(1, len(out[-1]) - 1)] + "…"
    return out


def cell_side(plan: GridPlan, min_side: int = 128, max_side: int = 512) -> int:
    """The side each cell is drawn at: the images' larger side, scaled up by a whole factor to at least `min_side`
    (small images stay crisp), at most `max_side`."""
    sides = [max(c.spec.width or 0, c.spec.height or 0) for c in plan.cells] or [min_side]
    side = max(sides) or min_side
    if side < min_side:
        side *= math.ceil(min_side / side)
    return min(side, max_side)


def draw_grid(plan: GridPlan, z: int = 0, side: int | None = None, title: str | None = None) -> Image.Image:
    """The labelled grid of page `z`: X values over the columns, Y values left of the rows, the axes' names in the
    corner, the Z value (and `title`) above. Cells not made yet are grey; failed cells pink with the error's start."""
    side = side or cell_side(plan)
    x_axis, y_axis, z_axis = plan.axes
    nx, ny, _ = plan.shape
    font_size = max(14, min(28, side // 7))
    font, small = _font(font_size), _font(max(11, font_size * 2 // 3))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line = font_size + 6
    x_labels = x_axis.labels() if x_axis else [""]
    y_labels = y_axis.labels() if y_axis else [""]
    top_lines = max(len(_wrap(probe, t, font, side - 8)) for t in x_labels) if x_axis else 0
    left = 0
    if y_axis:
        left = min(max(int(probe.textlength(t, font=font)) for t in [*y_labels, y_axis.name]) + 24, max(side, 160))
    heading = []
    if title:
        heading.append(title)
    if z_axis:
        heading.append(f"{z_axis.name} = {z_axis.labels()[z]}")
    head_h = (len(heading) * line + 8) if heading else 0
    axis_h = line if x_axis else 0
    top = head_h + axis_h + top_lines * line + (6 if x_axis else 0)
    gap = 4
    width = left + nx * (side + gap) + gap
    height = top + ny * (side + gap) + gap
    img = Image.new("RGB", (width, height), BACKGROUND)
    d = ImageDraw.Draw(img)
    for i, text in enumerate(heading):
        d.text((8, 4 + i * line), text, fill=INK, font=font)
    if x_axis:
        d.text((left + gap, head_h), f"x: {x_axis.name}", fill=(90, 90, 90), font=small)
        for ix, label in enumerate(x_labels):
            x0 = left + gap + ix * (side + gap)
            for k, text in enumerate(_wrap(d, label, font, side - 8)):
                tw = d.textlength(text, font=font)
                d.text((x0 + (side - tw) / 2, head_h + axis_h + k * line), text, fill=INK, font=font)
    if y_axis:
        d.text((8, top - line + 4), f"y: {y_axis.name}", fill=(90, 90, 90), font=small)
        for iy, label in enumerate(y_labels):
            y0 = top + gap + iy * (side + gap)
            texts = _wrap(d, label, font, left - 16)
            for k, text in enumerate(texts):
                d.text((8, y0 + side / 2 - len(texts) * line / 2 + k * line), text, fill=INK, font=font)
    for cell in plan.page(z):
        x0, y0 = left + gap + cell.x * (side + gap), top + gap + cell.y * (side + gap)
        if cell.image is not None:
            im = cell.image.convert("RGB")
            scale = min(side / im.width, side / im.height)
            size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
            resample = Image.NEAREST if scale >= 1 and float(scale).is_integer() else Image.LANCZOS
            im = im.resize(size, resample)
            px, py = x0 + (side - size[0]) // 2, y0 + (side - size[1]) // 2
            img.paste(im, (px, py))
            d.rectangle([px - 1, py - 1, px + size[0], py + size[1]], outline=FRAME)
        else:
            d.rectangle([x0, y0, x0 + side - 1, y0 + side - 1], fill=FAILED if cell.error else PENDING)
            text = ("failed: " + cell.error) if cell.error else "…"
            for k, t in enumerate(_wrap(d, text, small, side - 12, lines=max(1, side // (font_size + 4) - 1))):
                d.text((x0 + 6, y0 + 6 + k * (font_size * 2 // 3 + 5)), t, fill=INK, font=small)
    return img


def grid_png_info(plan: GridPlan, z: int) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_itxt(GRID_CHUNK, json.dumps(plan.record(z), sort_keys=True, ensure_ascii=False, default=str))
    return info


def read_grid_record(path: str | Path) -> dict | None:
    """The `loraloom-grid` record of a grid PNG (None when the PNG has none)."""
    with Image.open(path) as im:
        text = getattr(im, "text", {}).get(GRID_CHUNK)
    if not text:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def save_grid(image: Image.Image, plan: GridPlan, z: int, out_dir: str | Path, policy) -> Path:
    """Write page `z`'s grid image (with its record) as grids/<file_name> in `out_dir`, through `policy`."""
    from loraloom.composition.files import write_file

    path = Path(out_dir) / "grids" / plan.file_name(z)
    info = grid_png_info(plan, z)
    return write_file(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info), policy, what="grid image",
                      replace=True)


def is_grid_png(path: str | Path) -> bool:
    try:
        with Image.open(path) as im:
            return GRID_CHUNK in getattr(im, "text", {}) and SPEC_CHUNK not in getattr(im, "text", {})
    except OSError:
        return False


__all__ = ["AXIS_HELP", "AXIS_KINDS", "Axis", "Cell", "GridError", "GridPlan", "apply_axis", "cell_side", "draw_grid",
           "find_existing", "parse_axis", "plan_grid", "read_grid_record", "run_grid", "save_grid"]
