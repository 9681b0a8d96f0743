"""Composed generation on diffusers components: one denoising loop that asks a composition method for the
noise prediction at every step. Works for SD 1.x/2.x, SDXL, SD 3/3.5 and FLUX.1; what differs between them (text
encoding, latents, the denoiser call, guidance, the sampler) is the model family's (`pipelines.families`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loraloom.composition.controls import Region, use_from
from loraloom.composition.errors import AdapterNameError, GenerationError, IncompatibleLoRA
from loraloom.composition.files import WritePolicy
from loraloom.composition.frequency import cache_folder
from loraloom.composition.lora import LoRA, load_lora
from loraloom.composition.metadata import FAMILY_NAMES, family_display, family_key, sidecar_paths
from loraloom.composition.methods import ActiveLoRA, Method, make_method, params_to_dict
from loraloom.composition.routing import LoRARouter, Routing
from loraloom.composition.transformer_loras import load_transformer_lora

from .attention import enable_fast_attention
from .denoise import denoise
from .families import family_for
from .families.base import DIT_METHODS, METHOD_LIMITS
from .loading import load_base_pipeline
from .run import Run


@dataclass
class GenerationOutput:
    images: list  # PIL images (empty for output_type="latent")
    latents: torch.Tensor
    seconds: float
    method: str
    params: dict
    unet_calls: int = 0
    unet_rows: int = 0
    extras: dict = field(default_factory=dict)
    interrupted: bool = False  # stopped by `interrupt()` before the last step: latents are partial
    # The scheduler that ran: its config with diffusers' "_class_name" (a spec's "default" is the model's own
    # class; the PNG's A1111 text names the sampler and schedule type from this).
    scheduler: dict = field(default_factory=dict)
    steps: int | None = None  # the steps and guidance scale used (the family's when the caller left them None)
    guidance_scale: float | None = None


def check_method_family(method: Method, family) -> None:
    """Refuse a method that does not run on the loaded model family, with the reason (`families.base.METHOD_LIMITS`)."""
    reason = METHOD_LIMITS.get(family.denoiser, {}).get(method.name)
    if reason:
        raise GenerationError(f"method {method.name!r} does not run on {FAMILY_NAMES[family.name]} models: {reason} Fix: use "
                              f"one of {', '.join(DIT_METHODS)}.")


# --cpu-offload / --sequential-offload: the diffusers pipeline method each calls
OFFLOAD_MODES = {"model": "enable_model_cpu_offload", "sequential": "enable_sequential_cpu_offload"}
OFFLOAD_FLAGS = {"model": "--cpu-offload", "sequential": "--sequential-offload"}


def accelerator_device() -> str | None:
    """The accelerator torch sees (cuda, xpu, mps …), None on a CPU-only machine."""
    acc = getattr(torch, "accelerator", None)
    if acc is not None and acc.is_available():
        return acc.current_accelerator().type
    return "cuda" if torch.cuda.is_available() else None


def check_offload(mode: str | None, device: str | None = None) -> str | None:
    """The accelerator an offload `mode` ('model', 'sequential') will run on; refused with the fix, before anything is
    loaded, where there is none or the model is to be loaded on one already (`--device cuda`)."""
    if mode is None:
        return None
    if mode not in OFFLOAD_MODES:
        raise GenerationError(f"offload {mode!r} is not one of {', '.join(OFFLOAD_MODES)}")
    flag = OFFLOAD_FLAGS[mode]
    accel = accelerator_device()
    if accel is None:
        raise GenerationError(f"{flag} keeps the models in CPU memory and moves them to an accelerator as they run, but "
                              "torch sees no accelerator (CUDA, XPU, MPS) on this machine. Fix: leave out "
                              f"{flag} (on the CPU the models are in RAM already), or run on a machine with a GPU.")
    if device not in (None, "cpu", "auto"):
        raise GenerationError(f"{flag} loads the models into CPU memory and moves them to {accel} itself; --device "
                              f"{device} would load them onto the accelerator first. Fix: leave out --device (or pass "
                              "--device cpu) with " + flag + ".")
    return accel


def check_method_controls(method: Method, run: Run) -> None:
    """Refuse controls a method has no place for, before it does any work: regions and masks outside Merge, Switch
    and Composite; any per-LoRA control for the methods that replace the LoRAs by a merged one."""
    if run.regional and not method.supports_regions:
        raise GenerationError(f"method {method.name!r} has no meaning for regions or masked LoRAs. Fix: use merge, switch "
                              "or composite, or leave out the regions and masks.")
    if not method.supports_controls:
        named = [a.name for a in run.loras if not a.controls.is_plain]
        if named:
            raise GenerationError(f"method {method.name!r} merges the LoRAs into one, so per-LoRA strengths, block weights, "
                                  f"schedules and masks ({', '.join(named)}) have no place in it. Fix: leave them out, or use merge.")


class ComposedPipeline:
    """A diffusers SD/SDXL pipeline plus resident LoRAs behind routers, run by composition methods.

    ```py
    cp = ComposedPipeline.from_pretrained("runwayml/stable-diffusion-v1-5", local_files_only=True)
    cp.load_lora("loras/character.safetensors"); cp.load_lora("loras/style.safetensors")
    out = cp("a portrait", loras=["character", "style"], method="composite", seed=0)
    out.images[0].save("out.png")
    ```
    """

    def __init__(self, pipe, family: str | None = None, model_path: str | Path | None = None):
        self.pipe = pipe
        self.arch = family_for(pipe, family)  # what differs per model family (pipelines.families)
        self.family = self.arch.name
        self.model_path = Path(model_path).expanduser().resolve() if model_path else None  # a local folder or file
        denoiser = self.arch.denoiser
        self.routers: dict[str, LoRARouter] = {denoiser: LoRARouter(getattr(pipe, denoiser), denoiser)}
        # A transformer's layers see image tokens, text tokens or both: the family says which (masked LoRAs' gates).
        self.routers[denoiser].token_stream = getattr(self.arch, "token_stream", None)
        for comp in self.arch.text_components:
            self.routers[comp] = LoRARouter(getattr(pipe, comp), comp)
        self.loras: dict[str, LoRA] = {}
        self.offload: str | None = None  # 'model' or 'sequential' after `enable_offload`
        self._execution_device: torch.device | None = None
        self.attention_backend = enable_fast_attention(pipe) if denoiser == "unet" else "sdpa"
        self._lock = threading.RLock()
        self._interrupt = False
        pipe.set_progress_bar_config(disable=True)

    @classmethod
    def from_pretrained(cls, model: str, **kwargs) -> ComposedPipeline:
        """`model`: diffusers folder, hub id, single-file .safetensors, or `tiny:sd1` / `tiny:sdxl` / `tiny:flux` /
        `tiny:sd3`. `family` ('flux', 'sd3', …) picks the pipeline class for a hub id."""
        family = kwargs.get("family")
        local = Path(model).expanduser()
        return cls(load_base_pipeline(model, **kwargs), family=family if family in FAMILY_NAMES else None,
                   model_path=local if local.exists() else None)

    def write_policy(self, output_dir: str | Path | None = None) -> WritePolicy:
        """Where a generation may write (method parameters that name files, `composition.files`).

        With `output_dir` (the CLI, the web UI, a PNG's spec): relative paths land there and nothing is written
        outside it but loraloom's cache folder. Without it (a Python caller's own paths): relative paths land in
        the current folder and absolute ones anywhere. Either way the model and every resident LoRA file and its
        sidecar are never written, nor any existing file loraloom did not make."""
        protected = [self.model_path] + [p for lora in self.loras.values() if lora.path for p in (lora.path, *sidecar_paths(lora.path))]
        if output_dir is None:
            return WritePolicy.at(Path.cwd(), allowed=[Path("/")], protected=[p for p in protected if p])
        return WritePolicy.at(output_dir, allowed=[cache_folder()], protected=[p for p in protected if p])

    def enable_offload(self, mode: str | None) -> None:
        """Offload the models to CPU memory with diffusers' `enable_model_cpu_offload` (mode 'model': each component
        moves to the accelerator when it runs) or `enable_sequential_cpu_offload` ('sequential': layer by layer).
        Call it on a model loaded on the CPU, before any LoRA is added; refused where there is no accelerator.

        What was checked (accelerate 1.x `hooks.py`, diffusers `DiffusionPipeline.enable_model_cpu_offload`), reading
        the code, not on a GPU (none here): model offload puts a `CpuOffload` hook (`cpu_offload_with_hook`) on each
        top-level component only; its pre-forward moves the whole component `.to(accelerator)` and the previous one
        back to the CPU. The routing layer shadows `forward` of inner Linear/Conv2d modules, which no hook touches,
        and reads `module.weight` at call time, so it sees the moved weights. Sequential offload hooks every leaf
        module (`AlignDevicesHook`, weights on the meta device between calls and loaded from a CPU copy); a routed
        layer then goes in under the hook as its `_old_forward` (`RoutedLayer.install`). Both: the LoRA factors live
        on the accelerator (`LoRARouter.execution_device`), and Merge runs unfused (`Run.can_fuse`), because a fused
        weight swapped into a module would be moved or replaced by the hooks. LoRA types that read the base weight
        when loaded (DoRA, OFT) are not supported under sequential offload (the weight is on the meta device)."""
        accel = check_offload(mode, str(self.denoiser.device.type))
        if accel is None:
            return
        if self.loras:
            raise GenerationError("offload is set before any LoRA is loaded. Fix: enable it right after loading the model.")
        getattr(self.pipe, OFFLOAD_MODES[mode])(device=accel)
        self.offload = mode
        self._execution_device = torch.device(accel)
        for router in self.routers.values():
            router.execution_device = self._execution_device

    @property
    def denoiser(self) -> torch.nn.Module:
        """The UNet or the diffusion transformer."""
        return getattr(self.pipe, self.arch.denoiser)

    @property
    def device(self) -> torch.device:
        """Where the denoiser runs: its weights' device, or the accelerator of an offloaded model."""
        return self._execution_device if self.offload else self.denoiser.device

    @property
    def dtype(self) -> torch.dtype:
        return self.denoiser.dtype

    @property
    def default_size(self) -> int:
        return self.arch.default_size

    # --- LoRAs ----------------------------------------------------------------------------------------------
    def load_lora(self, path, name: str | None = None, *, allow_pickle: bool = False) -> LoRA:
        """Load a LoRA file and make it resident (see `add_lora` for the checks)."""
        if self.arch.denoiser == "unet":
            lora = load_lora(path, name, allow_pickle=allow_pickle, unet_config=self.pipe.unet.config)
        else:
            lora = load_transformer_lora(path, self.family, name, allow_pickle=allow_pickle)
        return self.add_lora(lora)

    def add_lora(self, lora: LoRA) -> LoRA:
        """Make a loaded LoRA resident. Family, components and every layer shape are checked before anything changes."""
        with self._lock:
            if lora.name in self.loras:
                raise AdapterNameError(f"a LoRA named {lora.name!r} is already loaded; load it under another name.")
            info, model = lora.info, FAMILY_NAMES[self.family]
            if info.family is not None and family_key(info.family) != self.family:
                made_for = family_display(family_key(info.family))
                source = f"header {info.family_source}" if not (info.family_source or "").startswith("keys:") else f"its {info.family_source}"
                raise IncompatibleLoRA(
                    lora.path,
                    f"was made for {made_for} ({source}), but the loaded model is {model}.",
                    f"use a {model} LoRA, or load a {made_for} base model.",
                )
            if info.key_families and self.family not in info.key_families:
                made_for = family_display(info.key_families)
                raise IncompatibleLoRA(
                    lora.path,
                    f"has keys for {made_for} ({info.key_evidence}), but the loaded model is {model}.",
                    f"use a {model} LoRA, or load a {made_for} base model.",
                )
            missing = [c for c in lora.layers if lora.layers[c] and c not in self.routers]
            if missing:
                raise IncompatibleLoRA(lora.path, f"has layers for {missing}, which this {model} model does not have.",
                                       "use a LoRA made for this model family.")
            looks_like = family_display(info.key_families) if info.key_families else None
            for router in self.routers.values():
                router.check(lora, model, looks_like)
            for comp, router in self.routers.items():
                if lora.layers.get(comp):
                    router.add(lora, model, looks_like)
            self.loras[lora.name] = lora
            return lora

    def remove_lora(self, name: str) -> None:
        with self._lock:
            for router in self.routers.values():
                router.remove(name)
            self.loras.pop(name, None)

    def _active(self, loras) -> list[ActiveLoRA]:
        out = []
        for item in loras:
            name, weight, controls = use_from(item)
            if name not in self.loras:
                raise AdapterNameError(f"no LoRA named {name!r} is loaded (loaded: {sorted(self.loras) or 'none'}).")
            out.append(ActiveLoRA(name, weight, self.loras[name], controls))
        if len({a.name for a in out}) != len(out):
            raise AdapterNameError("the same LoRA is listed twice in one composition.")
        return out

    # --- generation -----------------------------------------------------------------------------------------
    def interrupt(self) -> None:
        """Ask a running generation to stop after its current step."""
        self._interrupt = True

    @torch.no_grad()
    def __call__(
        self,
        prompt: str,
        negative_prompt: str = "",
        loras: Sequence[str | tuple[str, float]] = (),
        method: str | Method = "merge",
        method_params: Mapping | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        scheduler: str | None = None,
        callback_on_step_end: Callable | None = None,
        output_type: str = "pil",
        progress_bar: bool = True,
        output_dir: str | Path | None = None,
        regions: Sequence[Region] = (),
        base_weight: float = 0.0,
    ) -> GenerationOutput:
        """Generate one image. `loras`: names (weight 1) or (name, weight) pairs of resident LoRAs.
        `num_inference_steps`, `guidance_scale`, `scheduler` None: the family's defaults (SD: `DEFAULTS`, 30 steps,
        CFG 7.5, DPM-Solver++; FLUX.1 and SD3: their diffusers pipelines' 28 steps, guidance 3.5 / CFG 7.0, the
        model's own flow-matching scheduler).

        `callback_on_step_end(pipeline, step_index, timestep, {"latents": ...})` may return {"latents": ...}
        to replace them, as in diffusers. Files a method writes (its path parameters) go through
        `write_policy(output_dir)`: relative paths land in `output_dir` (default: the current folder).

        Each entry of `loras` may carry controls (a mapping with `te`, `unet`, `lbw`, `start`, `stop`, `keyframes`,
        `mask`; see `composition.controls.use_from`); `regions` bind prompts and LoRAs to parts of the image
        (`composition.controls.Region`), `base_weight` mixes the run's prompt into them (Regional Prompter's base ratio).
        """
        if not isinstance(prompt, str):
            raise TypeError("prompt must be one string (loraloom generates one image per call; use seeds for more)")
        height = height or self.default_size
        width = width or self.default_size
        num_inference_steps = self.arch.default_steps if num_inference_steps is None else num_inference_steps
        guidance_scale = self.arch.default_guidance if guidance_scale is None else guidance_scale
        self._check_args(num_inference_steps, guidance_scale, height, width)
        if generator is None:
            generator = torch.Generator("cpu").manual_seed(0 if seed is None else int(seed))
        method = method if isinstance(method, Method) else make_method(method, method_params)
        check_method_family(method, self.arch)
        with self._lock:
            self._interrupt = False
            started = time.perf_counter()
            run = self.run(loras, prompt, negative_prompt, guidance_scale, height, width, scheduler, num_inference_steps,
                           output_dir=output_dir, regions=regions, base_weight=base_weight)
            latents = self.initial_latents(height, width, generator) * self.arch.init_noise_sigma(run.scheduler)

            def predict(latents, step):
                eps = method.denoise(run, latents, step)
                if run.new_latents is not None:  # a latent-optimising method (CLoRA) moved this step's latents
                    latents, run.new_latents = run.new_latents, None
                return eps, latents

            def on_step(i, t, latents):
                result = callback_on_step_end(self, i, t, {"latents": latents})
                return result["latents"] if result and "latents" in result else latents

            with run:
                check_method_controls(method, run)
                run.claim_fused(method)
                method.prepare(run)
                latents, interrupted = denoise(run.scheduler, latents, predict, generator=generator,
                                               on_step=on_step if callback_on_step_end is not None else None,
                                               stop=lambda: self._interrupt, progress_bar=progress_bar, desc=method.name)
            images = [] if output_type == "latent" else self.decode_latents(latents)
            return GenerationOutput(
                images=images, latents=latents, seconds=time.perf_counter() - started, method=method.name,
                params=params_to_dict(method.params), unet_calls=run.unet_calls, unet_rows=run.unet_rows,
                extras=getattr(method, "extras", {}), interrupted=interrupted,
                scheduler={"_class_name": type(run.scheduler).__name__, **run.scheduler.config},
                steps=int(num_inference_steps), guidance_scale=float(guidance_scale),
            )

    @contextmanager
    def keep_fused(self):
        """Within the block, Merge's fused weights stay in place between generations, and a generation that fuses
        the same LoRAs at the same gates and controls reuses them (a batch: the fusing once, not per image). Any
        other generation, and the block's end, restores the base weights bit-exactly first
        (`LoRARouter.fused`)."""
        routers = list(self.routers.values())
        previous = [r.keep_fused for r in routers]
        for r in routers:
            r.keep_fused = True
        try:
            yield self
        finally:
            for r, keep in zip(routers, previous, strict=True):
                r.keep_fused = keep
                if not keep:
                    r.release()

    def run(self, loras: Sequence[str | tuple[str, float]] = (), prompt: str = "", negative_prompt: str = "",
            guidance_scale: float | None = None, height: int | None = None, width: int | None = None,
            scheduler: str | None = None, num_inference_steps: int | None = None,
            output_dir: str | Path | None = None, regions: Sequence[Region] = (), base_weight: float = 0.0) -> Run:
        """The run context of one generation (`loraloom.pipelines.Run`, a `DenoiseContext`), for driving a method
        step by step: its scheduler is made from `scheduler` and, given `num_inference_steps`, has its timesteps
        set. `scheduler` None: the family's default (SD: `DEFAULTS.scheduler`; FLUX/SD3: the model's own). Use it as
        a context manager; `__call__` makes one per generation."""
        height = height or self.default_size
        width = width or self.default_size
        guidance_scale = self.arch.default_guidance if guidance_scale is None else guidance_scale
        sched = self.arch.make_scheduler(scheduler, num_inference_steps, height, width, self.device)
        return Run(self, self._active(loras), prompt, negative_prompt or "", float(guidance_scale), height, width, sched,
                   write_policy=self.write_policy(output_dir), regions=regions, base_weight=base_weight)

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this (VAE factor x the UNet's downsampling, or x FLUX's packing)."""
        return self.arch.size_multiple

    def _check_args(self, steps, guidance_scale, height, width) -> None:
        if int(steps) < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {steps}")
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
        multiple = self.size_multiple
        for label, v in (("height", height), ("width", width)):
            if v <= 0 or v % multiple:
                raise ValueError(f"{label} must be a positive multiple of {multiple} for this model, got {v}")

    def initial_latents(self, height, width, generator) -> torch.Tensor:
        """The starting noise of one image, drawn on `generator` (CPU) so that a seed gives the same image on any device."""
        return self.arch.initial_latents(height, width, generator, self.device, self.dtype)

    def decode_latents(self, latents: torch.Tensor, output_type: str = "pil"):
        return self.arch.decode(latents, output_type)

    # --- text encoding --------------------------------------------------------------------------------------
    def encode_prompt_rows(self, prompts: list[str], negatives: list[str], text_gates: list[Mapping[str, float]], height: int, width: int):
        """Encode prompt i with text-encoder LoRA gates i (one batched call per encoder); (negative, positive)."""
        routing = Routing.from_blocks([(1, g) for g in text_gates])
        for comp in self.arch.text_components:
            self.routers[comp].set_routing(routing)
        try:
            return self.arch.encode(prompts, negatives, height, width)
        finally:
            for comp in self.arch.text_components:
                self.routers[comp].set_routing(None)
