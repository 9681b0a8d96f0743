"""The spec of one generated image, and its PNG metadata.

Every PNG loraloom writes carries the full `GenerationSpec` as JSON in a `loraloom` text chunk (so
`loraloom generate --from-png` can remake it and `loraloom eval` can score it), plus an A1111-style
`parameters` chunk that other tools read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, PngImagePlugin

from loraloom.composition.controls import LBW_PRESETS, ControlError, LoRAControls, Region, Schedule, block_spec
from loraloom.composition.errors import SpecError
from loraloom.composition.files import WritePolicy, write_file
from loraloom.composition.lora_file import lora_name
from loraloom.composition.metadata import CATEGORIES, FAMILY_NAMES
from loraloom.composition.methods import make_method, params_to_dict
from loraloom.composition.spatial import NAMED_REGIONS

from .defaults import DEFAULTS
from .loading import DTYPES
from .schedulers import scheduler_class

SPEC_CHUNK = "loraloom"
A1111_CHUNK = "parameters"
SPEC_FORMAT = 1


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("loraloom")
    except Exception:  # not installed (running from a checkout)
        return "0+unknown"


MAX_STEPS = 1000  # the noise schedules of SD 1.x/2.x/XL have 1000 training timesteps
MAX_SIDE = 8192


def max_pixels() -> int:
    """The largest image (height x width) a spec may ask for: $LORALOOM_MAX_PIXELS, default 2048 x 2048
    (`loraloom generate --max-pixels` sets it). A guard against a typo allocating tens of gigabytes."""
    try:
        return int(os.environ.get("LORALOOM_MAX_PIXELS", 2048 * 2048))
    except ValueError:
        raise SpecError(f"LORALOOM_MAX_PIXELS={os.environ['LORALOOM_MAX_PIXELS']!r} is not a whole number") from None


def checked_number(name: str, value, kind: type, low: float, high: float):
    """`value` as `kind` if it is a finite number in [low, high]; `SpecError` naming `name` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SpecError(f"{name} must be {'a whole number' if kind is int else 'a number'}, got {value!r}")
    if kind is int and value != int(value):
        raise SpecError(f"{name} must be a whole number, got {value!r}")
    if not low <= value <= high:
        raise SpecError(f"{name} must be between {low:g} and {high:g}, got {value!r}")
    return kind(value)


def checked_size(height, width) -> tuple[int | None, int | None]:
    """Height and width: each None (the model's own) or a positive multiple of 8 up to `MAX_SIDE`, and together at
    most `max_pixels()` (a missing side counts as 1024, the largest model default)."""
    sides = []
    for name, value in (("height", height), ("width", width)):
        if value is not None:
            value = checked_number(name, value, int, 8, MAX_SIDE)
            if value % 8:
                raise SpecError(f"{name} must be a multiple of 8, got {value}")
        sides.append(value)
    pixels = (sides[0] or 1024) * (sides[1] or 1024)
    if pixels > max_pixels():
        raise SpecError(f"{sides[0] or 'model default'} x {sides[1] or 'model default'} is {pixels} pixels, more than the "
                        f"limit of {max_pixels()}. Fix: a smaller size, or raise the limit (--max-pixels / $LORALOOM_MAX_PIXELS).")
    return sides[0], sides[1]


# --- per-LoRA controls and regions, as a spec records them (composition.controls applies them) -------------------
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MAX_MASK_BYTES = 64 << 20  # a mask image is kilobytes; a file this large is not one
MAX_MASK_PIXELS = 8192 * 8192
MAX_FEATHER = 0.5  # a fraction of the image: from the edge to the middle
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _text(number: float | None) -> str:
    return "none" if number is None else f"{number:g}"


def checked_mask(value, where: str):
    """A mask as a spec records it, or `SpecError` naming `where`: a named region (its name in lower case, see
    `composition.spatial.NAMED_REGIONS`), a box [x0, y0, x1, y1] in fractions of the width and height (0, 0 = the
    top-left corner), or an image file {"image": path, "sha256": hex}. A text that is no region's name is an image
    path when it ends in an image suffix (.png, .jpg, …); `sha256` is added when the file is first read
    (`pin_mask`) and checked whenever it is read again (`mask_image`)."""
    if value is None:
        return None
    if isinstance(value, str):
        key = value.strip().lower()
        if key in NAMED_REGIONS:
            return key
        if value.strip().lower().endswith(IMAGE_SUFFIXES):
            return {"image": value.strip()}
        raise SpecError(f"{where}: mask {value!r} is neither a named region ({', '.join(NAMED_REGIONS)}) nor an image "
                        f"file ({', '.join(IMAGE_SUFFIXES)}). Fix: a region's name, a box [x0, y0, x1, y1] in fractions, "
                        "or the path of a mask image (white = acts, black = does not).")
    if isinstance(value, Mapping):
        unknown = set(value) - {"image", "sha256"}
        if unknown or not isinstance(value.get("image"), str) or not value["image"].strip():
            raise SpecError(f"{where}: a mask image is {{image: path, sha256: hex (optional)}}, got {dict(value)!r}")
        out = {"image": value["image"].strip()}
        if not out["image"].lower().endswith(IMAGE_SUFFIXES):
            raise SpecError(f"{where}: mask image {out['image']!r} is not an image file ({', '.join(IMAGE_SUFFIXES)})")
        pin = value.get("sha256")
        if pin is not None:
            if not isinstance(pin, str) or not _SHA256.fullmatch(pin.lower()):
                raise SpecError(f"{where}: mask sha256 must be 64 hex digits, got {pin!r}")
            out["sha256"] = pin.lower()
        return out
    if isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)) and len(value) == 4:
        box = [checked_number(f"{where}: mask box value", v, float, 0.0, 1.0) for v in value]
        if not (box[0] < box[2] and box[1] < box[3]):
            raise SpecError(f"{where}: mask box {list(value)!r} must be [x0, y0, x1, y1] with x0 < x1 and y0 < y1 "
                            "(fractions of the width and height, 0 to 1; 0, 0 is the top-left corner)")
        return box
    raise SpecError(f"{where}: mask must be a named region ({', '.join(NAMED_REGIONS)}), a box [x0, y0, x1, y1] in "
                    f"fractions or an image path, got {value!r}")


def mask_label(mask) -> str:
    """A mask as an error message names it: the region's name, the box, or the image's file name."""
    if isinstance(mask, dict):
        return Path(mask["image"]).name
    if isinstance(mask, list):
        return "[" + ", ".join(f"{v:g}" for v in mask) + "]"
    return str(mask)


def _read_mask_bytes(mask: dict, where: str) -> tuple[bytes, str]:
    """The bytes of a mask image file and their sha256; `SpecError` when the file is missing, not a regular file,
    too large, or not the file the spec records (its `sha256`)."""
    path = Path(mask["image"]).expanduser()
    if not path.exists():
        raise SpecError(f"{where}: mask image {path}: no such file. Fix: check the path (in a spec file, relative paths "
                        "start at the spec's folder).")
    if not path.is_file():
        raise SpecError(f"{where}: mask image {path}: is not a regular file (a folder, pipe or device).")
    try:
        size = path.stat().st_size
        if size > MAX_MASK_BYTES:
            raise SpecError(f"{where}: mask image {path}: {size} bytes is too large for a mask (at most {MAX_MASK_BYTES}).")
        data = path.read_bytes()
    except OSError as err:
        raise SpecError(f"{where}: mask image {path}: cannot be read ({err.strerror or err}).") from None
    digest = hashlib.sha256(data).hexdigest()
    pin = mask.get("sha256")
    if pin and pin != digest:
        raise SpecError(f"{where}: mask image {path} is not the file this spec was made with: the spec records sha256 "
                        f"{pin[:12]}…, the file now has {digest[:12]}…. Fix: put back the mask image the spec names (an "
                        "image is remade only from the same mask), or leave 'sha256' out of the mask to use the file as "
                        "it is now (a spec file: run it again).")
    return data, digest


def _load_mask(mask: dict, where: str) -> tuple[Image.Image, str]:
    """(greyscale image, sha256) of a mask image file, read once: the bytes decoded are the bytes hashed."""
    data, digest = _read_mask_bytes(mask, where)
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > MAX_MASK_PIXELS:
                raise SpecError(f"{where}: mask image {mask['image']}: {im.width} x {im.height} is too large for a mask "
                                f"(at most {MAX_MASK_PIXELS} pixels; any size is resized to the latent's).")
            return im.convert("L"), digest
    except SpecError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise SpecError(f"{where}: mask image {mask['image']}: cannot be read as an image ({' '.join(str(err).split())})") from None


def mask_image(mask: dict, where: str) -> Image.Image:
    """The mask image a spec names, as a greyscale PIL image (luminance, white = 1; transparency is not read), after
    checking that the file holds the bytes the spec records (`sha256`)."""
    return _load_mask(mask, where)[0]


def pin_mask(mask, where: str):
    """`mask` with the sha256 of its image file's bytes now (checked against a recorded one, and decoded once to see
    that it is an image); named regions and boxes as they are."""
    if not isinstance(mask, dict):
        return mask
    return {**mask, "sha256": _load_mask(mask, where)[1]}


LBW_FIX = (f"a preset ({', '.join(LBW_PRESETS)}) or a vector, one number per block (the LoRA Block Weight extension's: "
           "12, 17, 20 or 26 on SD/SDXL, BASE, IN…, MID, OUT…; FLUX.1: 58, BASE, D00–D18, S00–S37, or 57 without BASE; "
           "SD3: 1 + its joint blocks, BASE, J00…, or one per joint block; docs/controls.md)")


def checked_lbw(value, where: str):
    """Block weights as a spec records them: a LoRA Block Weight preset's name (upper case) or a list of numbers (a
    text of comma-separated numbers is read as one). How many numbers depends on the model (the UNets' 12, 17, 20 or
    26; FLUX.1's and SD3's blocks as the loaded transformer counts them): that is checked when the model is loaded."""
    if value is None:
        return None
    fix = LBW_FIX
    if isinstance(value, str):
        if value.strip().upper() in LBW_PRESETS:
            return value.strip().upper()
        if "," not in value:
            raise SpecError(f"{where}: lbw {value!r} is not a preset nor a list of numbers. Fix: {fix}")
        value = [v.strip() for v in value.split(",")]
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes)):
        raise SpecError(f"{where}: lbw must be {fix}, got {value!r}")
    numbers = []
    for v in value:
        try:
            number = float(v) if isinstance(v, str) else v
        except ValueError:
            raise SpecError(f"{where}: lbw value {v!r} is not a number (random R/U and X values are not supported). Fix: {fix}") from None
        numbers.append(checked_number(f"{where}: lbw value", number, float, -100.0, 100.0))
    try:
        block_spec(numbers)
    except ControlError as err:
        raise SpecError(f"{where}: lbw: {err}. Fix: {fix}") from None
    return numbers


# The controls of a LoRA entry and their defaults: a spec without them is written (and named) as before they existed.
LORA_CONTROL_DEFAULTS = {"te": 1.0, "unet": 1.0, "lbw": None, "start": None, "stop": None, "unit": None,
                         "keyframes": [], "mask": None, "feather": 0.0}
SCHEDULE_UNITS = ("steps", "fraction")


@dataclass
class LoRARef:
    """A LoRA as a spec names it: file, user weight, what the user says it is, and its controls.

    Controls (`composition.controls`; all optional): `te`/`unet` multiply the weight in the text encoders / the
    denoiser (A1111's <lora:name:te:unet>; on FLUX.1 and SD3 `unet` is the transformer's strength); `lbw` block
    weights (a LoRA Block Weight preset or vector; `checked_lbw`); `start`/`stop`
    when it acts (fractions of the run, or step numbers when one is above 1; `unit` "steps" or "fraction" says it
    instead), `keyframes` [[position, factor], …] ramp it; `mask` where it acts (a named region, a box, an image
    path: `checked_mask`) with `feather` (a fraction of the image) softening the mask's edge."""

    path: str
    weight: float = 1.0
    name: str | None = None
    category: str | None = None
    triggers: list[str] = field(default_factory=list)
    sha256: str | None = None
    te: float = 1.0
    unet: float = 1.0
    lbw: str | list[float] | None = None
    start: float | None = None
    stop: float | None = None
    unit: str | None = None
    keyframes: list[list[float]] = field(default_factory=list)
    mask: str | list[float] | dict | None = None
    feather: float = 0.0

    def __post_init__(self):
        if not isinstance(self.path, str) or not self.path.strip():
            raise SpecError(f"a LoRA entry needs a path (text), got {self.path!r}")
        self.weight = checked_number(f"LoRA {Path(self.path).name} weight", self.weight, float, -100.0, 100.0)
        if self.name is not None and (not isinstance(self.name, str) or not self.name.strip()):
            raise SpecError(f"LoRA {Path(self.path).name}: name must be non-empty text, got {self.name!r}")
        if self.category is not None and self.category not in CATEGORIES:
            raise SpecError(f"LoRA {Path(self.path).name}: category {self.category!r} is not one of {', '.join(CATEGORIES)}")
        if isinstance(self.triggers, str):
            self.triggers = [t.strip() for t in self.triggers.split(",") if t.strip()]
        if not isinstance(self.triggers, list) or not all(isinstance(t, str) for t in self.triggers):
            raise SpecError(f"LoRA {Path(self.path).name}: triggers must be a list of words, got {self.triggers!r}")
        self._check_controls()

    def _check_controls(self) -> None:
        where = f"LoRA {self.adapter_name}"
        self.te = checked_number(f"{where}: te", self.te, float, -100.0, 100.0)
        self.unet = checked_number(f"{where}: unet", self.unet, float, -100.0, 100.0)
        self.lbw = checked_lbw(self.lbw, where)
        for name in ("start", "stop"):
            if getattr(self, name) is not None:
                setattr(self, name, checked_number(f"{where}: {name}", getattr(self, name), float, 0.0, MAX_STEPS))
        if self.unit is not None and self.unit not in SCHEDULE_UNITS:
            raise SpecError(f"{where}: unit {self.unit!r} is not one of {', '.join(SCHEDULE_UNITS)} (or leave it out: "
                            "start/stop above 1 are step numbers, else fractions of the run)")
        if self.keyframes is None:
            self.keyframes = []
        if not isinstance(self.keyframes, Sequence) or isinstance(self.keyframes, str) or not all(
                isinstance(k, Sequence) and not isinstance(k, str) and len(k) == 2 for k in self.keyframes):
            raise SpecError(f"{where}: keyframes must be a list of [position, factor] pairs, got {self.keyframes!r}")
        self.keyframes = [[checked_number(f"{where}: keyframe position", p, float, 0.0, MAX_STEPS),
                           checked_number(f"{where}: keyframe factor", v, float, -100.0, 100.0)] for p, v in self.keyframes]
        try:
            schedule = self.schedule()
        except ControlError as err:
            raise SpecError(f"{where}: {err}") from None
        if self.unit is not None and schedule is None:
            raise SpecError(f"{where}: unit says how start, stop and keyframes count; this LoRA has none of them. Fix: "
                            "leave unit out, or give start/stop")
        self.mask = checked_mask(self.mask, where)
        self.feather = checked_number(f"{where}: feather", self.feather, float, 0.0, MAX_FEATHER)
        if self.feather and self.mask is None:
            raise SpecError(f"{where}: feather softens a mask's edge; this LoRA has no mask. Fix: give it a mask, or leave "
                            "feather out")

    @property
    def adapter_name(self) -> str:
        return self.name or lora_name(self.path)

    @property
    def has_controls(self) -> bool:
        """Some control differs from its default (the LoRA then runs through `LoRAControls`)."""
        return any(getattr(self, k) != v for k, v in LORA_CONTROL_DEFAULTS.items())

    def schedule(self) -> Schedule | None:
        """When the LoRA acts (`composition.controls.Schedule`), or None for the whole run."""
        if self.start is None and self.stop is None and not self.keyframes:
            return None
        return Schedule(self.start or 0.0, self.stop, tuple((p, v) for p, v in self.keyframes), self.unit or "auto")

    def controls(self, mask=None) -> LoRAControls:
        """The `LoRAControls` the pipeline applies; `mask`: what to give the pipeline for an image mask (the image)."""
        given = self.mask
        if isinstance(given, list):
            given = tuple(given)
        return LoRAControls(te=self.te, unet=self.unet, blocks=tuple(self.lbw) if isinstance(self.lbw, list) else self.lbw,
                            schedule=self.schedule(), mask=mask if isinstance(given, dict) else given, feather=self.feather)


@dataclass
class RegionRef:
    """A region as a spec names it (`composition.controls.Region`): a `mask` (named region, box or image path), its own
    `prompt` / `negative_prompt` (None: the run's), the `loras` (adapter names of the spec's LoRAs) that act only
    here, and `feather`. Checked by `GenerationSpec` (which knows the LoRAs)."""

    mask: str | list[float] | dict
    prompt: str | None = None
    negative_prompt: str | None = None
    loras: list[str] = field(default_factory=list)
    feather: float = 0.0

    @staticmethod
    def from_mapping(item, where: str) -> RegionRef:
        """A region from a spec file's or a PNG's mapping; `SpecError` naming `where` for a missing mask or an
        unknown key."""
        if not isinstance(item, Mapping):
            raise SpecError(f"{where} must be a mapping with a mask, got {item!r}")
        known = [f.name for f in dataclasses.fields(RegionRef)]
        unknown = sorted(set(item) - set(known))
        if unknown:
            raise SpecError(f"{where}: unknown key(s) {unknown}; known: {', '.join(known)}")
        if "mask" not in item:
            raise SpecError(f"{where}: a region needs a mask (a named region, a box [x0, y0, x1, y1] or an image path)")
        return RegionRef(**item)

    def check(self, where: str, names: Sequence[str]) -> None:
        if self.mask is None:
            raise SpecError(f"{where}: a region needs a mask (a named region, a box [x0, y0, x1, y1] or an image path)")
        self.mask = checked_mask(self.mask, where)
        where = f"{where} ({mask_label(self.mask)})"
        for name in ("prompt", "negative_prompt"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise SpecError(f"{where}: {name} must be text, got {getattr(self, name)!r}")
        if isinstance(self.loras, str):
            self.loras = [self.loras]
        if not isinstance(self.loras, Sequence) or not all(isinstance(n, str) for n in self.loras):
            raise SpecError(f"{where}: loras must be a list of LoRA names, got {self.loras!r}")
        self.loras = list(self.loras)
        for n in self.loras:
            if n not in names:
                raise SpecError(f"{where}: LoRA {n!r} is not one of this spec's LoRAs ({', '.join(names) or 'none'}). "
                                "Fix: name a LoRA of the spec's 'loras' by its adapter name (its 'name', else its file name "
                                "without the extension).")
        if len(set(self.loras)) != len(self.loras):
            raise SpecError(f"{where}: a LoRA is listed twice in it ({', '.join(self.loras)})")
        if self.prompt is None and self.negative_prompt is None and not self.loras:
            raise SpecError(f"{where}: changes nothing. Fix: give it a prompt, a negative_prompt or loras")
        self.feather = checked_number(f"{where}: feather", self.feather, float, 0.0, MAX_FEATHER)

    def region(self, mask=None) -> Region:
        """The `Region` the pipeline takes; `mask`: what to give it for an image mask (the image)."""
        given = tuple(self.mask) if isinstance(self.mask, list) else self.mask
        return Region(mask if isinstance(given, dict) else given, prompt=self.prompt, negative_prompt=self.negative_prompt,
                      loras=tuple(self.loras), feather=self.feather)


@dataclass
class GenerationSpec:
    """Everything that decides one image."""

    model: str
    prompt: str
    negative_prompt: str = ""
    loras: list[LoRARef] = field(default_factory=list)
    method: str = "merge"
    method_params: dict = field(default_factory=dict)
    # steps, guidance_scale, scheduler None: the model family's (`pipelines.families`: SD `DEFAULTS`, FLUX.1-dev 28 /
    # 3.5, schnell 4 / 0, SD 3 28 / 7, SD 3.5 28 / 3.5, flow models their own scheduler); the PNG records the values used
    steps: int | None = None
    guidance_scale: float | None = None
    height: int | None = DEFAULTS.height
    width: int | None = DEFAULTS.width
    scheduler: str | None = None
    seed: int = 0
    family: str | None = None
    dtype: str = "float32"
    regions: list[RegionRef] = field(default_factory=list)
    base_weight: float = 0.0
    version: str = field(default_factory=_version)
    format: int = SPEC_FORMAT

    def __post_init__(self):
        self._check()

    def _check(self) -> None:
        """Refuse what cannot be generated, with the field named, before any model is loaded (`SpecError`)."""
        for name in ("model", "prompt", "negative_prompt", "method", "dtype"):
            if not isinstance(getattr(self, name), str):
                raise SpecError(f"{name} must be text, got {getattr(self, name)!r}")
        if not self.model.strip():
            raise SpecError("model is empty; name a diffusers folder, hub id, single .safetensors file or tiny:sd1")
        if self.steps is not None:
            self.steps = checked_number("steps", self.steps, int, 1, MAX_STEPS)
        if self.guidance_scale is not None:
            self.guidance_scale = checked_number("guidance_scale", self.guidance_scale, float, 0.0, 100.0)
        self.seed = checked_number("seed", self.seed, int, 0, 2**63 - 1)
        self.height, self.width = checked_size(self.height, self.width)
        if self.scheduler is not None:
            scheduler_class(self.scheduler)
        if self.dtype not in DTYPES:
            raise SpecError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.family is not None and self.family not in FAMILY_NAMES:
            raise SpecError(f"family {self.family!r} is not one of {', '.join(FAMILY_NAMES)} (or leave it out)")
        if not isinstance(self.loras, list) or not all(isinstance(r, LoRARef) for r in self.loras):
            raise SpecError("loras must be a list of LoRA entries")
        if not isinstance(self.method_params, Mapping):
            raise SpecError(f"method_params must map parameter names to values, got {self.method_params!r}")
        try:
            method = make_method(self.method, self.method_params)  # unknown methods and parameter names fail here
        except (ValueError, TypeError) as err:
            raise SpecError(str(err)) from None
        self._check_controls(method)

    def _check_controls(self, method) -> None:
        """Regions, masks, schedules and the rest of the per-LoRA controls, against this spec's LoRAs, steps and
        method (which of them the method can run: `Method.supports_regions`, `supports_controls`)."""
        names = [r.adapter_name for r in self.loras]
        if not isinstance(self.regions, list):
            raise SpecError(f"regions must be a list of regions, got {self.regions!r}")
        regions = []
        for i, region in enumerate(self.regions):
            if not isinstance(region, RegionRef):
                region = RegionRef.from_mapping(region, f"region {i + 1}")
            region.check(f"region {i + 1}", names)
            regions.append(region)
        self.regions = regions
        self.base_weight = checked_number("base_weight", self.base_weight, float, 0.0, 1.0)
        masked = [r.adapter_name for r in self.loras if r.mask is not None]
        if (regions or masked) and len(set(names)) != len(names):
            raise SpecError(f"two LoRAs share an adapter name {names}; give them distinct 'name' fields (regions name "
                            "LoRAs by it)")
        placed: dict[str, int] = {}
        for i, region in enumerate(regions):
            for n in region.loras:
                if n in placed:
                    raise SpecError(f"LoRA {n!r} is in region {placed[n] + 1} and region {i + 1}; bind each LoRA to one region")
                if n in masked:
                    raise SpecError(f"LoRA {n!r} has a mask of its own and is in region {i + 1}, whose mask it takes. Fix: "
                                    "leave out one of the two")
                placed[n] = i
        if self.base_weight and not (regions or masked):
            raise SpecError("base_weight mixes the prompt into regions; this spec has no regions nor masked LoRAs. Fix: "
                            "leave base_weight out, or add regions")
        for ref in self.loras:
            schedule = ref.schedule()
            if schedule is not None:
                window = Schedule(schedule.start, schedule.stop, unit=schedule.unit)
                steps = self.run_steps
                if not any(window.factor(i, steps) for i in range(steps)):
                    raise SpecError(f"LoRA {ref.adapter_name}: start {_text(ref.start)} / stop {_text(ref.stop)} leave no step of "
                                    f"{steps} where it acts. Fix: an earlier start or a later stop (step numbers count "
                                    "from 0; fractions are of the run)")
        if (regions or masked) and not method.supports_regions:
            raise SpecError(f"method {self.method!r} has no meaning for regions or masked LoRAs. Fix: use merge, switch or "
                            "composite, or leave out the regions and masks.")
        if not method.supports_controls:
            named = [r.adapter_name for r in self.loras if r.has_controls]
            if named:
                raise SpecError(f"method {self.method!r} merges the LoRAs into one, so per-LoRA strengths, block weights, "
                                f"schedules and masks ({', '.join(named)}) have no place in it. Fix: leave them out, or "
                                "use merge.")

    def sampler_values(self) -> tuple[int, float, str]:
        """(steps, guidance_scale, scheduler) with the ones left unset at `DEFAULTS` (the SD families' values: what an
        unset field meant before the families had their own, so SD names and checks are unchanged). The values a
        model family actually used are what the PNG records (`PipelineCache.recorded`)."""
        return (DEFAULTS.steps if self.steps is None else self.steps,
                DEFAULTS.guidance_scale if self.guidance_scale is None else self.guidance_scale,
                DEFAULTS.scheduler if self.scheduler is None else self.scheduler)

    @property
    def run_steps(self) -> int:
        return self.sampler_values()[0]

    @property
    def has_controls(self) -> bool:
        """Some LoRA has a control, or the spec has regions or a base weight (what a spec without them lacks)."""
        return bool(self.regions) or bool(self.base_weight) or any(r.has_controls for r in self.loras)

    def to_dict(self) -> dict:
        """The spec as JSON-able data. Controls at their defaults are left out (no regions, no base weight, a LoRA
        entry's te/unet 1, …), so a spec without controls is written as before they existed."""
        d = dataclasses.asdict(self)
        for lora in d["loras"]:
            for key, default in LORA_CONTROL_DEFAULTS.items():
                if key in lora and lora[key] == default:
                    del lora[key]
        if not d["regions"]:
            del d["regions"]
        if not d["base_weight"]:
            del d["base_weight"]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=False)

    @staticmethod
    def from_dict(data: dict) -> GenerationSpec:
        if not isinstance(data, dict):
            raise SpecError("a generation spec must be a JSON object")
        data = dict(data)
        known = {f.name for f in dataclasses.fields(GenerationSpec)}
        unknown = set(data) - known
        if unknown:
            raise SpecError(f"unknown spec field(s): {sorted(unknown)}")
        loras = []
        for item in data.pop("loras", []) or []:
            if isinstance(item, str):
                item = {"path": item}
            try:
                loras.append(LoRARef(**item))
            except TypeError as err:
                raise SpecError(f"bad LoRA entry {item!r}: {err}") from None
        regions = data.pop("regions", None) or []
        if not isinstance(regions, list):
            raise SpecError(f"regions must be a list of regions, got {regions!r}")
        regions = [RegionRef.from_mapping(item, f"region {i + 1}") for i, item in enumerate(regions)]
        try:
            return GenerationSpec(loras=loras, regions=regions, **data)
        except TypeError as err:
            raise SpecError(f"bad generation spec: {err}") from None

    def params_in_effect(self) -> dict:
        """Every parameter of the method as it runs: the spec's `method_params` over the method's defaults."""
        return params_to_dict(make_method(self.method, self.method_params).params)

    def changed_params(self) -> dict:
        """The method parameters that differ from the method's defaults (what a label or a name needs to say)."""
        defaults = params_to_dict(make_method(self.method).params)
        return {k: v for k, v in self.method_params.items() if k not in defaults or defaults[k] != v}

    def identity(self) -> str:
        """Hash of what decides the pixels (not the loraloom version), for file names and de-duplication.

        Method parameters count only where they differ from the method's defaults. A PNG records every parameter in
        effect (`params_in_effect`) while the spec it was made from usually names none, and both must have one
        name: `loraloom generate` skips an image whose file exists (resume), and `--from-png` remakes it under its
        own name. So `{}`, `{lora_scale: 0.8}` (merge's default) and the PNG's full list are one identity, and
        every name loraloom gave before keeps meaning the same spec (a spec that spelled out a default gets the
        name of the same spec without it). A later change of a default does not rename old images; their PNGs
        keep the value that was in effect. Controls at their defaults are not in `to_dict`, so a spec without
        controls keeps the name it had before controls existed; a mask image counts by its path, as a LoRA file
        does (not by its sha256, which the PNG records)."""
        d = self.to_dict()
        d.pop("version", None)
        # Unset sampler fields hash as DEFAULTS (what a spec file that left them out always had), so every name
        # given before still means the same spec and a rerun finds its images.
        d["steps"], d["guidance_scale"], d["scheduler"] = self.sampler_values()
        d["method_params"] = self.changed_params()
        for entry in [*d["loras"], *d.get("regions", [])]:
            entry.pop("sha256", None)
            if isinstance(entry.get("mask"), dict):  # a mask image counts by its path, as a LoRA file does
                entry["mask"].pop("sha256", None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]

    def file_name(self) -> str:
        return f"{self.method}_s{self.seed}_{self.identity()}.png"

    def applied_weight(self, ref: LoRARef) -> float:
        """The strength a LoRA is applied with, as A1111 would write it in <lora:name:w>: its weight times the
        method's global scale (`lora_scale`, e.g. Merge's 0.8; CLoRA's style LoRAs: `style_scale`)."""
        p = self.params_in_effect()
        if self.method == "clora" and ref.category in p.get("global_categories", ()):
            return ref.weight * float(p["style_scale"])
        return ref.weight * float(p.get("lora_scale", 1.0))

    def step_window(self, ref: LoRARef) -> tuple[int, int] | None:
        """The steps (first, end) of this run's `steps` in which a scheduled LoRA acts (its start/stop, as step
        numbers counted from 0: the LoRA Block Weight extension's start=/stop=); None without a schedule."""
        schedule = ref.schedule()
        if schedule is None or (ref.start is None and ref.stop is None):
            return None
        window = Schedule(schedule.start, schedule.stop, unit=schedule.unit)
        steps = self.run_steps
        active = [i for i in range(steps) if window.factor(i, steps)]
        return (active[0], active[-1] + 1) if active else (0, 0)

    def a1111_tag(self, ref: LoRARef, name: str | None = None) -> str:
        """A LoRA's tag in the A1111 text, in A1111's and the LoRA Block Weight extension's spelling: <lora:name:w>
        with the strength applied (`applied_weight`), <lora:name:te:unet> when the text-encoder and UNet strengths
        differ, then `lbw=` (preset or vector), `start=`/`stop=` (step numbers) when set. Keyframe ramps, masks and
        regions have no A1111 spelling: the `loraloom` chunk holds them."""
        w = self.applied_weight(ref)
        te, unet = w * ref.te, w * ref.unet
        items = [name or a1111_name(ref.adapter_name), f"{te:g}"] + ([] if te == unet else [f"{unet:g}"])
        if ref.lbw is not None:
            items.append("lbw=" + (ref.lbw if isinstance(ref.lbw, str) else ",".join(f"{v:g}" for v in ref.lbw)))
        window = self.step_window(ref)
        if window is not None:
            if window[0] > 0:
                items.append(f"start={window[0]}")
            if window[1] < self.run_steps:
                items.append(f"stop={window[1]}")
        return "<lora:" + ":".join(items) + ">"

    def a1111_parameters(self, provenance: Provenance | None = None) -> str:
        """The A1111 `parameters` text ("infotext"), as A1111's processing.create_infotext writes it: the prompt
        with <lora:name:w> tags (`a1111_tag`), "Negative prompt: …", then one line of `key: value` settings.

        A prompt cannot add lines or fields (`a1111_line`); values are quoted as A1111 quotes them (`a1111_quote`).
        `provenance` (what the run knows: hashes of the bytes it loaded, the scheduler it ran) adds "Model hash",
        "Lora hashes" and the exact sampler; without it those are left out rather than guessed."""
        prov = provenance or Provenance()
        names = [a1111_name(ref.adapter_name) for ref in self.loras]
        tags = " ".join(self.a1111_tag(ref, n) for n, ref in zip(names, self.loras))
        sampler, schedule = a1111_sampler(*_scheduler_facts(self.sampler_values()[2], prov.scheduler))
        settings: dict[str, object] = {"Steps": self.run_steps, "Sampler": sampler, "Schedule type": schedule,
                                       "CFG scale": f"{self.sampler_values()[1]:g}", "Seed": self.seed}
        if self.width and self.height:
            settings["Size"] = f"{self.width}x{self.height}"
        settings["Model hash"] = prov.model_hash
        settings["Model"] = a1111_model_name(self.model)
        lora_hashes = [f"{n}: {prov.lora_hashes[ref.adapter_name]}" for n, ref in zip(names, self.loras)
                       if prov.lora_hashes.get(ref.adapter_name)]
        settings["Lora hashes"] = ", ".join(lora_hashes) or None
        settings["Composition"] = self.method
        settings["Version"] = f"loraloom {self.version}"
        text = ", ".join(f"{k}: {a1111_quote(v)}" for k, v in settings.items() if v is not None)
        # civitai's A1111 extension (sd_civitai_extension, scripts/gen_hashing.py) appends every resource's AutoV2
        # as `Hashes: {json}`, unquoted, last: civitai and sd-parsers read it.
        resources = {"model": prov.model_hash} if prov.model_hash else {}
        resources.update({f"lora:{n}": ref.sha256[:10] for n, ref in zip(names, self.loras) if ref.sha256})
        if resources:
            text += ", Hashes: " + _one_line(json.dumps(resources))
        prompt = " ".join(part for part in (a1111_line(self.prompt), tags) if part)
        return f"{prompt}\nNegative prompt: {a1111_line(self.negative_prompt)}\n{text}"


@dataclass(frozen=True)
class Provenance:
    """What a generation knows beyond its spec, for the A1111 text: the short hashes of the files it loaded and the
    scheduler it ran (`PipelineCache.recorded` makes one)."""

    lora_hashes: Mapping[str, str] = field(default_factory=dict)  # adapter name -> AutoV3 of the bytes loaded
    model_hash: str | None = None  # AutoV2 of a single-file checkpoint (a folder or hub id has none)
    scheduler: Mapping | None = None  # the config of the scheduler that ran, with "_class_name"


# --- the A1111 infotext ---------------------------------------------------------------------------------------
# Every character Python's str.splitlines() breaks at: A1111 splits the text at "\n", other readers at any of these.
LINE_BREAKS = re.compile("[\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]+")
_NEGATIVE_LABEL = re.compile(r"(negative prompt)\s*:", re.IGNORECASE)
_EXTRA_NETWORK = re.compile(r"<(\w+):")  # A1111's extra-network syntax, <lora:name:w>, <hypernet:…>


def _one_line(text: str) -> str:
    """JSON text with the line breaks json.dumps leaves raw (U+0085, U+2028, U+2029) escaped."""
    return text.replace("\x85", "\\u0085").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def a1111_line(text: str) -> str:
    """A prompt as one line of A1111 text that says nothing but the prompt.

    A1111 writes prompts raw and reads the text line by line: a line starting "Negative prompt:" starts the
    negative prompt and the last line holds the settings, so a prompt with line breaks could forge both (and
    readers such as sd-parsers split at "Negative prompt:" anywhere). Line breaks become spaces, "Negative prompt:"
    becomes "Negative prompt :", and an extra-network tag in the prompt's own text, "<lora:x:1>", becomes
    "<lora :x:1>" (A1111 would load LoRA x; loraloom gave it to the text encoder as words). None of this changes what
    CLIP reads: its tokenizer drops whitespace and splits punctuation from words. The exact prompt is in the
    `loraloom` chunk."""
    text = LINE_BREAKS.sub(" ", text)
    text = _NEGATIVE_LABEL.sub(r"\1 :", text)
    return _EXTRA_NETWORK.sub(r"<\1 :", text).strip()


def a1111_quote(value) -> str:
    """A settings value as A1111 writes it (modules/infotext_utils.py `quote`): JSON-quoted when it holds a comma, a
    colon or a line break. Also when it holds a double quote, which A1111 leaves bare although its reader unquotes
    any value in quotes (and a line break that json.dumps leaves raw is escaped)."""
    text = str(value)
    if any(c in text for c in ',:"') or LINE_BREAKS.search(text):
        return _one_line(json.dumps(text, ensure_ascii=False))
    return text


def a1111_name(name: str) -> str:
    """A LoRA's name as it can stand in <lora:NAME:w>, "Lora hashes" and "Hashes": A1111 drops ':' and ',' from the
    name it writes in "Lora hashes" (extensions-builtin/Lora/extra_networks_lora.py); '<', '>', '{', '}' and line
    breaks would end the tag or the JSON early."""
    return " ".join(re.sub(r"[:,<>{}]", "", LINE_BREAKS.sub(" ", name)).split()) or "lora"


def a1111_model_name(model: str) -> str:
    """A1111's "Model": a checkpoint file's name without its extension (CheckpointInfo.name_for_extra); a diffusers
    folder's name; a hub id or `tiny:` name as given."""
    path = Path(model)
    if path.suffix.lower() in (".safetensors", ".ckpt"):
        return path.stem
    return path.name if (model.startswith((".", "/", "~")) or path.is_dir()) else model


def _scheduler_facts(name: str, ran: Mapping | None) -> tuple[str | None, Mapping]:
    """(diffusers class name, config) of the scheduler: the one that ran when known, else what the spec's name says
    (an alias's config overrides; None for 'default', the model's own class, unknown without the model)."""
    if ran and ran.get("_class_name"):
        return ran["_class_name"], ran
    cls, overrides = scheduler_class(name)
    return (cls.__name__ if cls is not None else None), overrides


# A1111's k-diffusion samplers (modules/sd_samplers_kdiffusion.py), the ones that take a schedule type.
_KDIFFUSION = {"DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 3M SDE", "Euler a", "Euler", "LMS",
               "Heun", "DPM2", "DPM2 a"}
_SAME_SAMPLER = {
    "EulerDiscreteScheduler": "Euler", "EulerAncestralDiscreteScheduler": "Euler a", "HeunDiscreteScheduler": "Heun",
    "LMSDiscreteScheduler": "LMS", "KDPM2DiscreteScheduler": "DPM2", "KDPM2AncestralDiscreteScheduler": "DPM2 a",
    # k-diffusion's sample_dpmpp_sde, ported (stochastic). DPMSolverSinglestepScheduler, which diffusers' own table
    # pairs with "DPM++ SDE", is a deterministic solver: it has no A1111 name.
    "DPMSolverSDEScheduler": "DPM++ SDE", "EDMEulerScheduler": "Euler",
    "DDIMScheduler": "DDIM", "UniPCMultistepScheduler": "UniPC", "LCMScheduler": "LCM",  # A1111's timestep samplers
}
# A sigma schedule that is not Karras/exponential/beta follows the timestep spacing; A1111's schedule types
# (modules/sd_schedulers.py) that space timesteps the same way: "Uniform" = k-diffusion's linspace over t;
# "DDIM" = every (1000 // steps)-th timestep from 1 (diffusers' "leading" with steps_offset 1); "SGM Uniform" =
# linspace without its end point, from the top (diffusers' "trailing").
_SPACING_SCHEDULE = {"linspace": "Uniform", "leading": "DDIM", "trailing": "SGM Uniform"}


def a1111_sampler(class_name: str | None, config: Mapping) -> tuple[str | None, str | None]:
    """(A1111 "Sampler", "Schedule type") of a diffusers scheduler class and config; the class name where A1111 has no
    such sampler; (None, None) when the class is unknown (a spec's 'default' without its model: left out).

    Since A1111 1.9 the sampler and its schedule are two fields, and a missing schedule type means "Automatic",
    which is Karras for DPM++ 2M: so the schedule type is written for every k-diffusion sampler."""
    if class_name is None:
        return None, None
    sampler = _SAME_SAMPLER.get(class_name)
    if class_name == "DPMSolverMultistepScheduler":
        algorithm, order = config.get("algorithm_type", "dpmsolver++"), int(config.get("solver_order", 2))
        if algorithm == "dpmsolver++" and order == 2:
            sampler = "DPM++ 2M"
        elif algorithm == "sde-dpmsolver++" and order == 2:
            sampler = "DPM++ 2M SDE Heun" if config.get("solver_type") == "heun" else "DPM++ 2M SDE"
        elif algorithm == "sde-dpmsolver++" and order == 3:
            sampler = "DPM++ 3M SDE"
    elif class_name == "PNDMScheduler" and config.get("skip_prk_steps"):
        sampler = "PLMS"  # PNDM without its Runge-Kutta warm-up is PLMS (SD checkpoints' own scheduler)
    if sampler is None:
        return class_name, None
    if sampler not in _KDIFFUSION:
        return sampler, None
    if config.get("use_karras_sigmas") or config.get("sigma_schedule") == "karras":
        return sampler, "Karras"
    if config.get("use_exponential_sigmas") or config.get("sigma_schedule") == "exponential":
        return sampler, "Exponential"
    if config.get("use_beta_sigmas"):
        return sampler, "Beta"
    return sampler, _SPACING_SCHEDULE.get(config.get("timestep_spacing"))


def png_info(spec: GenerationSpec, provenance: Provenance | None = None) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_itxt(SPEC_CHUNK, spec.to_json())
    info.add_text(A1111_CHUNK, spec.a1111_parameters(provenance))
    return info


def save_png(image: Image.Image, path: str | os.PathLike, spec: GenerationSpec, policy: WritePolicy,
             provenance: Provenance | None = None) -> Path:
    """Write the PNG with its spec through the write policy (atomic: an interrupted run leaves no half-written PNG).
    A generated image's spec and `provenance` come from `PipelineCache.recorded`."""
    info = png_info(spec, provenance)
    return write_file(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info), policy, what="image")


def read_png_spec(path: str | os.PathLike) -> GenerationSpec:
    """The spec a loraloom PNG carries; a clear error for PNGs from elsewhere."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: {'no such file' if not path.exists() else 'is not a regular file'}; give a loraloom PNG.")
    try:
        with Image.open(path) as im:
            # The spec chunk comes before the pixels (loraloom writes it so): read without decoding the image,
            # so a decompression bomb is never expanded; fall back to trailing chunks only for a sane size.
            text = im.info.get(SPEC_CHUNK)
            if text is None and im.width * im.height <= (Image.MAX_IMAGE_PIXELS or 0):
                text = getattr(im, "text", {}).get(SPEC_CHUNK)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise SpecError(f"{path}: cannot be read as an image ({' '.join(str(err).split())})") from None
    if not text:
        raise SpecError(f"{path}: has no '{SPEC_CHUNK}' metadata; it was not made by loraloom (or the metadata was stripped).")
    try:
        return GenerationSpec.from_dict(json.loads(text))
    except json.JSONDecodeError as err:
        raise SpecError(f"{path}: the '{SPEC_CHUNK}' metadata is not valid JSON ({err})") from None
