"""The spec of one generated image, and its PNG metadata.

Every PNG loraloom writes carries the full `GenerationSpec` as JSON in a `loraloom` text chunk (so
`loraloom generate --from-png` can remake it and `loraloom eval` can score it), plus an A1111-style
`parameters` chunk that other tools read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, PngImagePlugin

from loraloom.composition.errors import SpecError
from loraloom.composition.files import WritePolicy, write_file
from loraloom.composition.metadata import CATEGORIES, FAMILY_NAMES
from loraloom.composition.methods import make_method

from .defaults import DEFAULTS
from .loading import DTYPES
from .schedulers import scheduler_class

SPEC_CHUNK = "loraloom"
A1111_CHUNK = "parameters"
SPEC_FORMAT = 1

A1111_SAMPLERS = {
    "dpmsolver++": ("DPM++ 2M", None), "dpmsolver++-karras": ("DPM++ 2M", "Karras"), "dpmsolver++-sde": ("DPM++ 2M SDE", None),
    "ddim": ("DDIM", None), "ddpm": ("DDPM", None), "euler": ("Euler", None), "euler-a": ("Euler a", None),
    "heun": ("Heun", None), "lms": ("LMS", None), "pndm": ("PLMS", None), "unipc": ("UniPC", None),
}


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


@dataclass
class LoRARef:
    """A LoRA as a spec names it: file, user weight, and what the user says it is."""

    path: str
    weight: float = 1.0
    name: str | None = None
    category: str | None = None
    triggers: list[str] = field(default_factory=list)
    sha256: str | None = None

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

    @property
    def adapter_name(self) -> str:
        return self.name or Path(self.path).stem


@dataclass
class GenerationSpec:
    """Everything that decides one image."""

    model: str
    prompt: str
    negative_prompt: str = ""
    loras: list[LoRARef] = field(default_factory=list)
    method: str = "merge"
    method_params: dict = field(default_factory=dict)
    steps: int = DEFAULTS.steps
    guidance_scale: float = DEFAULTS.guidance_scale
    height: int | None = DEFAULTS.height
    width: int | None = DEFAULTS.width
    scheduler: str = DEFAULTS.scheduler
    seed: int = 0
    family: str | None = None
    dtype: str = "float32"
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
        self.steps = checked_number("steps", self.steps, int, 1, MAX_STEPS)
        self.guidance_scale = checked_number("guidance_scale", self.guidance_scale, float, 0.0, 100.0)
        self.seed = checked_number("seed", self.seed, int, 0, 2**63 - 1)
        self.height, self.width = checked_size(self.height, self.width)
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
            make_method(self.method, self.method_params)  # unknown methods and parameter names fail here
        except (ValueError, TypeError) as err:
            raise SpecError(str(err)) from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

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
        try:
            return GenerationSpec(loras=loras, **data)
        except TypeError as err:
            raise SpecError(f"bad generation spec: {err}") from None

    def identity(self) -> str:
        """Hash of what decides the pixels (not the loraloom version), for file names and de-duplication."""
        d = self.to_dict()
        d.pop("version", None)
        for lora in d["loras"]:
            lora.pop("sha256", None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]

    def file_name(self) -> str:
        return f"{self.method}_s{self.seed}_{self.identity()}.png"

    def a1111_parameters(self) -> str:
        """The A1111 `parameters` text: prompt with <lora:name:weight> tags, negative prompt, settings line."""
        tags = " ".join(f"<lora:{l.adapter_name}:{l.weight:g}>" for l in self.loras)
        sampler, schedule = A1111_SAMPLERS.get(self.scheduler, (self.scheduler, None))
        settings = [f"Steps: {self.steps}", f"Sampler: {sampler}"]
        if schedule:
            settings.append(f"Schedule type: {schedule}")
        settings += [f"CFG scale: {self.guidance_scale:g}", f"Seed: {self.seed}"]
        if self.width and self.height:
            settings.append(f"Size: {self.width}x{self.height}")
        settings.append(f"Model: {Path(self.model).name or self.model}")
        hashes = [f"{l.adapter_name}: {l.sha256[:10]}" for l in self.loras if l.sha256]
        if hashes:
            settings.append('Lora hashes: "' + ", ".join(hashes) + '"')
        settings.append(f"Composition: {self.method}")
        settings.append(f"Version: loraloom {self.version}")
        prompt = f"{self.prompt} {tags}".strip()
        return f"{prompt}\nNegative prompt: {self.negative_prompt}\n" + ", ".join(settings)


def png_info(spec: GenerationSpec) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_itxt(SPEC_CHUNK, spec.to_json())
    info.add_text(A1111_CHUNK, spec.a1111_parameters())
    return info


def save_png(image: Image.Image, path: str | os.PathLike, spec: GenerationSpec, policy: WritePolicy) -> Path:
    """Write the PNG with its spec through the write policy (atomic: an interrupted run leaves no half-written PNG)."""
    info = png_info(spec)
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
