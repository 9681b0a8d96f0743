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
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, PngImagePlugin

from loraloom.composition.errors import SpecError
from loraloom.composition.files import WritePolicy, write_file
from loraloom.composition.metadata import CATEGORIES, FAMILY_NAMES
from loraloom.composition.methods import make_method, params_to_dict

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
        keep the value that was in effect."""
        d = self.to_dict()
        d.pop("version", None)
        d["method_params"] = self.changed_params()
        for lora in d["loras"]:
            lora.pop("sha256", None)
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

    def a1111_parameters(self, provenance: Provenance | None = None) -> str:
        """The A1111 `parameters` text ("infotext"), as A1111's processing.create_infotext writes it: the prompt
        with <lora:name:w> tags, "Negative prompt: …", then one line of `key: value` settings.

        A prompt cannot add lines or fields (`a1111_line`); values are quoted as A1111 quotes them (`a1111_quote`).
        `provenance` (what the run knows: hashes of the bytes it loaded, the scheduler it ran) adds "Model hash",
        "Lora hashes" and the exact sampler; without it those are left out rather than guessed."""
        prov = provenance or Provenance()
        names = [a1111_name(ref.adapter_name) for ref in self.loras]
        tags = " ".join(f"<lora:{n}:{self.applied_weight(ref):g}>" for n, ref in zip(names, self.loras))
        sampler, schedule = a1111_sampler(*_scheduler_facts(self.scheduler, prov.scheduler))
        settings: dict[str, object] = {"Steps": self.steps, "Sampler": sampler, "Schedule type": schedule,
                                       "CFG scale": f"{self.guidance_scale:g}", "Seed": self.seed}
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
