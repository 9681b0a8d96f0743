"""The surface every composition method shares: a parameter dataclass, `prepare`, `denoise`; a name registry.

A method answers two questions per step (see docs/architecture.md): routing (which LoRA applies to which batch
row and layer) and combining (how branch predictions become one noise prediction). It talks to the pipeline
only through a `DenoiseContext`, so the same method runs on SD 1.x/2.x and SDXL.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch

from ..conditioning import Conditioning
from ..controls import LoRAControls
from ..errors import MethodError
from ..files import WritePolicy
from ..lora import LoRA
from ..routing import LoRARouter, Routing


@dataclass(frozen=True)
class ActiveLoRA:
    """A LoRA chosen for this generation, with its user weight (multiplied by the method's LoRA scale) and its
    controls (text-encoder/UNet strengths, block weights, schedule, mask), which the routing layer applies."""

    name: str
    weight: float
    lora: LoRA
    controls: LoRAControls = field(default_factory=LoRAControls, compare=False)

    @property
    def category(self) -> str | None:
        return self.lora.category


@dataclass(frozen=True)
class Step:
    """Where the sampler is: loop index `index` of `count` model evaluations, at scheduler timestep `timestep`."""

    index: int
    count: int
    timestep: torch.Tensor

    @property
    def fraction(self) -> float:
        """tau in [0, 1): the share of the run already done (0 = first, noisiest step)."""
        return self.index / self.count


class DenoiseContext(Protocol):
    """What a method may ask of the loop during one generation: the only door between methods and the pipeline
    (`loraloom.pipelines.Run` implements it). A method never reaches the pipeline object itself."""

    loras: Sequence[ActiveLoRA]
    guidance_scale: float
    unet_router: LoRARouter
    prompt: str  # the run's prompt (methods with per-branch prompts default to it)
    negative_prompt: str
    height: int
    width: int
    scheduler: Any  # this run's diffusers scheduler (set timesteps; read-only for methods)
    write_policy: WritePolicy  # where files a method writes may go: `composition.files.write_file(path, …, write_policy)`
    can_fuse: bool  # no LoRA has a schedule, mask or region: fusing the LoRAs into the weights is allowed
    regional: bool  # some LoRA is bound to a region or mask (`pipelines.regions`)
    feature_cache: bool  # `predict_features` works: a UNet with a DeepCache cut (not the diffusion transformers)

    def encode(
        self, text_gates: Sequence[Mapping[str, float]], prompts: Sequence[str] | None = None
    ) -> list[tuple[Conditioning, Conditioning]]:
        """(negative, positive) conditioning for each text-encoder gate setting (and branch prompt, default the
        run's prompt), encoded once per distinct pair."""

    def predict(
        self,
        latents: torch.Tensor,
        step: Step,
        conditioning: Conditioning,
        routing: Routing,
        layer_gates: Mapping[str, Mapping[str, float]] | None = None,
        max_batch: int | None = None,
    ) -> torch.Tensor:
        """UNet output for each row under `routing` (chunked into calls of at most `max_batch` rows)."""

    def fuse_paths(self, gates: Mapping[str, float]) -> frozenset[str] | None:
        """The denoiser layers worth fusing `gates` into for this run (`composition.fuse_cost`: fusing costs less than
        routing over its steps and tokens); None = every adapted layer (a UNet)."""

    def enter(self, cm: AbstractContextManager) -> Any:
        """Keep a context (e.g. fused weights) open until the generation ends, even on error."""

    def add_lora(self, lora: LoRA) -> LoRA:
        """Make a LoRA built in `prepare` (e.g. a merged one) resident until the generation ends."""

    # --- attention maps, latent updates, feature caching, profiling (CLoRA, CMLoRA) --------------------------
    def token_indices(self, prompt: str, words: Sequence[str]) -> list[list[int]]:
        """Positions (BOS = 0) of each word's tokens in `prompt` among the text tokens the denoiser attends to (SD: the
        CLIP tokens; FLUX: T5's; SD3: CLIP's 77, then T5's from 77); [] for a missing word."""

    def predict_with_attention(
        self,
        latents: torch.Tensor,
        step: Step,
        conditioning: Conditioning,
        routing: Routing,
        tokens: torch.Tensor,
        map_side: int | None = None,
        output: bool = True,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """UNet output and the cross-attention maps (rows, h, w, K) of token positions `tokens` (rows, K; -1 = none),
        averaged over layers x heads at one resolution (`map_side` cells across; None: CLoRA's W/32 rule).
        `output=False` stops the UNet after the last captured layer and returns (None, maps). Differentiable with
        respect to `latents` when grad is enabled (the UNet's own parameters are not tracked). On FLUX/SD3: the joint
        attention's image->text maps on the image token grid, averaged over its joint blocks (`pipelines.joint_attention`)."""

    def predict_features(
        self,
        latents: torch.Tensor,
        step: Step,
        conditioning: Conditioning,
        routing: Routing,
        features: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """DeepCache-style pass: `features=None` runs the full UNet and also returns its deep features; given
        `features` (rows aligned), only the outermost level runs on them (a shallow pass). Returns (output, features)."""

    def set_masks(self, masks: Mapping[str, torch.Tensor | None]) -> None:
        """Confine LoRAs to parts of the image from now on ({name: (H, W) mask at the latent's size, None lifts it}):
        their deltas are multiplied by the mask in every image-side layer (`composition.routing.SpatialGate`)."""

    def set_latents(self, latents: torch.Tensor) -> None:
        """Replace this step's latents (latent-optimising methods such as CLoRA): the scheduler steps from these."""

    # --- whole samples and training (CMLoRA's profiling, ZipLoRA's reference images and objective) ---------------
    def sample(self, prompt: str, gates: Mapping[str, float], *, seed: int, num_inference_steps: int,
               scheduler: str | None = None, output_type: str = "pil") -> Any:
        """One plain-CFG sample with `gates` on every UNet row and in the text encoder, this run's negative prompt,
        guidance and size, on a fresh scheduler (`scheduler`: a name; None: this run's kind) seeded `seed`: a PIL
        image, or latents with `output_type="latent"`. Not counted in this run's UNet calls."""

    def training_scheduler(self) -> Any:
        """A DDPM scheduler with the model's own noise schedule, for training objectives (add_noise at random t)."""


def param(default, help: str, **extra):
    """A method parameter with its help text (shown by the CLI and as UI tooltips)."""
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help, **extra})
    return dataclasses.field(default=default, metadata={"help": help, **extra})


class Method:
    """Base class: subclasses set `name`, `Params` (a dataclass with the paper's defaults) and implement
    `prepare(ctx)` (once per generation) and `denoise(ctx, latents, step)` (once per step)."""

    name: ClassVar[str] = ""
    Params: ClassVar[type] = object
    description: ClassVar[str] = ""
    supports_regions: ClassVar[bool] = False  # regions and masks have a meaning for this method (else refused)
    supports_controls: ClassVar[bool] = True  # per-LoRA strengths, block weights and schedules apply (else refused)

    def __init__(self, params: Any = None, **overrides):
        if params is None:
            params = self.Params(**overrides)
        elif isinstance(params, Mapping):
            params = self.Params(**{**params, **overrides})
        elif overrides:
            params = dataclasses.replace(params, **overrides)
        self.params = params

    def prepare(self, ctx: DenoiseContext) -> None:
        raise NotImplementedError

    def fused_gates(self, ctx: DenoiseContext) -> Mapping[str, float] | None:
        """The gates this method will fuse into the denoiser's weights in `prepare` (None: it fuses nothing). Weights
        kept fused from the last generation (`ComposedPipeline.keep_fused`) stay only when they are these."""
        return None

    def denoise(self, ctx: DenoiseContext, latents: torch.Tensor, step: Step) -> torch.Tensor:
        raise NotImplementedError


REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} is already registered")
    REGISTRY[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    try:
        return REGISTRY[name]
    except KeyError:
        raise MethodError(f"unknown method {name!r}. Fix: use one of {', '.join(sorted(REGISTRY))}") from None


def make_method(name: str, params: Mapping[str, Any] | Any | None = None) -> Method:
    """Instantiate a registered method; unknown parameter names, values of the wrong type and values outside a
    parameter's `min`/`max`/`choices` give a clear `MethodError` naming the parameter."""
    cls = get_method(name)
    if isinstance(params, Mapping):
        fields = {f.name: f for f in dataclasses.fields(cls.Params)}
        unknown = set(params) - set(fields)
        if unknown:
            raise MethodError(f"method {name!r} has no parameter(s) {sorted(unknown)}; known: {sorted(fields)}")
        for key, value in params.items():
            check_param(name, fields[key], value)
    return cls(params)


_KINDS = {"int": ((int,), "a whole number"), "float": ((int, float), "a number"), "bool": ((bool,), "true or false"),
          "str": ((str,), "text"), "list": ((list, tuple), "a list")}


def check_param(method: str, f: dataclasses.Field, value: Any) -> None:
    """`value` fits field `f` of a method's parameters: its declared type (int, float, bool, str, list; None where the
    type allows it) and its `min`, `max` and `choices` metadata."""
    where = f"{method}.{f.name}"
    kind = str(f.type).replace(" ", "")
    optional = kind.endswith("|None") or kind.startswith("None|")
    base = kind.removesuffix("|None").removeprefix("None|").split("[")[0]
    if value is None:
        if optional:
            return
        raise MethodError(f"{where} must not be empty")
    if base in _KINDS:
        types, words = _KINDS[base]
        if not isinstance(value, types) or (base != "bool" and isinstance(value, bool)):
            raise MethodError(f"{where} must be {words}, got {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        low, high = f.metadata.get("min"), f.metadata.get("max")
        if (low is not None and value < low) or (high is not None and value > high) or value != value:
            bounds = " and ".join(b for b in (f">= {low}" if low is not None else "", f"<= {high}" if high is not None else "") if b)
            raise MethodError(f"{where} must be {bounds or 'a number'}, got {value!r}")
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise MethodError(f"{where} must be one of {', '.join(map(str, choices))}, got {value!r}")


def describe_params(cls: type[Method]) -> list[dict]:
    """The parameter dataclass as data: name, type, default, help (drives CLI help and UI controls)."""
    out = []
    for f in dataclasses.fields(cls.Params):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        out.append({"name": f.name, "type": f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type)),
                    "default": default, "help": f.metadata.get("help", ""), **{k: v for k, v in f.metadata.items() if k != "help"}})
    return out


NO_PATH = ("", "off", "none")  # values a path parameter uses to mean "no file" (never taken as paths)


def written_paths(method: str, params: Mapping[str, Any]) -> dict[str, str]:
    """The parameters of `params` that name a file or folder the method may write (`param(..., writes=True)`),
    set to a path: {name: path}. Callers check these against their write policy before any model loads."""
    out = {}
    for f in dataclasses.fields(get_method(method).Params):
        value = params.get(f.name)
        if f.metadata.get("writes") and isinstance(value, str) and value.strip().lower() not in NO_PATH:
            out[f.name] = value
    return out


def params_to_dict(params: Any) -> dict:
    return dataclasses.asdict(params)


def cfg_pair(cond: tuple[Conditioning, Conditioning]) -> Conditioning:
    """Stack (negative, positive) into the usual CFG batch [negative; positive]."""
    return Conditioning.cat([cond[0], cond[1]])
