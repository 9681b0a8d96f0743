"""Composed generation on diffusers components: one denoising loop that asks a composition method for the
noise prediction at every step. Works for SD 1.x/2.x and SDXL (the family only changes how text is encoded).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from loraloom.composition.conditioning import Conditioning
from loraloom.composition.errors import AdapterNameError, IncompatibleLoRA
from loraloom.composition.lora import LoRA, load_lora
from loraloom.composition.metadata import FAMILY_NAMES, family_display
from loraloom.composition.methods import ActiveLoRA, Method, Step, make_method, params_to_dict
from loraloom.composition.routing import LoRARouter, Routing

from .attention import StopForward, capture_cross_attention, enable_fast_attention, token_positions
from .loading import load_base_pipeline, pipeline_family
from .schedulers import DEFAULT_SCHEDULER, make_scheduler, step_kwargs
from .unet_cache import check_feature_cache_support, full_pass, shallow_pass

TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")


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


class ComposedPipeline:
    """A diffusers SD/SDXL pipeline plus resident LoRAs behind routers, run by composition methods.

    ```py
    cp = ComposedPipeline.from_pretrained("runwayml/stable-diffusion-v1-5", local_files_only=True)
    cp.load_lora("loras/character.safetensors"); cp.load_lora("loras/style.safetensors")
    out = cp("a portrait", loras=["character", "style"], method="composite", seed=0)
    out.images[0].save("out.png")
    ```
    """

    def __init__(self, pipe, family: str | None = None):
        self.pipe = pipe
        self.family = family or pipeline_family(pipe)
        self.routers: dict[str, LoRARouter] = {"unet": LoRARouter(pipe.unet, "unet")}
        for comp in TEXT_COMPONENTS:
            if getattr(pipe, comp, None) is not None:
                self.routers[comp] = LoRARouter(getattr(pipe, comp), comp)
        self.loras: dict[str, LoRA] = {}
        self.attention_backend = enable_fast_attention(pipe)
        self._lock = threading.RLock()
        self._interrupt = False
        pipe.set_progress_bar_config(disable=True)

    @classmethod
    def from_pretrained(cls, model: str, **kwargs) -> "ComposedPipeline":
        """`model`: diffusers folder, hub id, single-file .safetensors, or `tiny:sd1` / `tiny:sdxl`."""
        family = kwargs.get("family")
        return cls(load_base_pipeline(model, **kwargs), family=family if family in FAMILY_NAMES else None)

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.unet.dtype

    @property
    def default_size(self) -> int:
        return int(self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor)

    # --- LoRAs ----------------------------------------------------------------------------------------------
    def load_lora(self, path, name: str | None = None, *, allow_pickle: bool = False) -> LoRA:
        """Load a LoRA file and make it resident (see `add_lora` for the checks)."""
        lora = load_lora(path, name, allow_pickle=allow_pickle, unet_config=self.pipe.unet.config)
        return self.add_lora(lora)

    def add_lora(self, lora: LoRA) -> LoRA:
        """Make a loaded LoRA resident. Family, components and every layer shape are checked before anything changes."""
        with self._lock:
            if lora.name in self.loras:
                raise AdapterNameError(f"a LoRA named {lora.name!r} is already loaded; load it under another name.")
            info, model = lora.info, FAMILY_NAMES[self.family]
            if info.family is not None and info.family != self.family:
                made_for = family_display(info.family)
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
            for comp, router in self.routers.items():
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
            name, weight = (item, 1.0) if isinstance(item, str) else (item[0], float(item[1]))
            if name not in self.loras:
                raise AdapterNameError(f"no LoRA named {name!r} is loaded (loaded: {sorted(self.loras) or 'none'}).")
            out.append(ActiveLoRA(name, weight, self.loras[name]))
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
        num_inference_steps: int = 30,
        guidance_scale: float = 7.5,
        height: int | None = None,
        width: int | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        scheduler: str | None = DEFAULT_SCHEDULER,
        callback_on_step_end: Callable | None = None,
        output_type: str = "pil",
        progress_bar: bool = True,
    ) -> GenerationOutput:
        """Generate one image. `loras`: names (weight 1) or (name, weight) pairs of resident LoRAs.

        `callback_on_step_end(pipeline, step_index, timestep, {"latents": ...})` may return {"latents": ...}
        to replace them, as in diffusers.
        """
        if not isinstance(prompt, str):
            raise TypeError("prompt must be one string (loraloom generates one image per call; use seeds for more)")
        height = height or self.default_size
        width = width or self.default_size
        self._check_args(num_inference_steps, guidance_scale, height, width)
        if generator is None:
            generator = torch.Generator("cpu").manual_seed(0 if seed is None else int(seed))
        method = method if isinstance(method, Method) else make_method(method, method_params)
        with self._lock:
            self._interrupt = False
            active = self._active(loras)
            started = time.perf_counter()
            interrupted = False
            run = _Run(self, active, prompt, negative_prompt or "", float(guidance_scale), height, width)
            sched = make_scheduler(scheduler, self.pipe.scheduler.config, type(self.pipe.scheduler))
            sched.set_timesteps(num_inference_steps, device=self.device)
            run.scheduler = sched
            timesteps = sched.timesteps
            latents = self._initial_latents(height, width, generator) * sched.init_noise_sigma
            extra = step_kwargs(sched, generator)
            try:
                method.prepare(run)
                for i, t in enumerate(tqdm(timesteps, desc=method.name, disable=not progress_bar, leave=False)):
                    if self._interrupt:
                        interrupted = True
                        break
                    step = Step(i, len(timesteps), t)
                    eps = method.denoise(run, latents, step)
                    if run.new_latents is not None:  # a latent-optimising method (CLoRA) moved this step's latents
                        latents, run.new_latents = run.new_latents, None
                    latents = sched.step(eps, t, latents, **extra, return_dict=False)[0]
                    if callback_on_step_end is not None:
                        result = callback_on_step_end(self, i, t, {"latents": latents})
                        if result and "latents" in result:
                            latents = result["latents"]
            finally:
                run.close()
            images = [] if output_type == "latent" else self.decode_latents(latents)
            return GenerationOutput(
                images=images, latents=latents, seconds=time.perf_counter() - started, method=method.name,
                params=params_to_dict(method.params), unet_calls=run.unet_calls, unet_rows=run.unet_rows,
                extras=getattr(method, "extras", {}), interrupted=interrupted,
            )

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this (VAE factor x the UNet's downsampling)."""
        return self.pipe.vae_scale_factor * 2 ** (len(self.pipe.unet.config.block_out_channels) - 1)

    def _check_args(self, steps, guidance_scale, height, width) -> None:
        if int(steps) < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {steps}")
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
        multiple = self.size_multiple
        for label, v in (("height", height), ("width", width)):
            if v <= 0 or v % multiple:
                raise ValueError(f"{label} must be a positive multiple of {multiple} for this model, got {v}")

    def _initial_latents(self, height, width, generator) -> torch.Tensor:
        shape = (1, self.pipe.unet.config.in_channels, height // self.pipe.vae_scale_factor, width // self.pipe.vae_scale_factor)
        # Drawn on the CPU generator, so a seed gives the same image on any device.
        noise = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
        return noise.to(self.device, self.dtype)

    def decode_latents(self, latents: torch.Tensor, output_type: str = "pil"):
        vae = self.pipe.vae
        upcast = vae.dtype == torch.float16 and vae.config.get("force_upcast", False)
        z = latents.to(torch.float32 if upcast else vae.dtype)
        if upcast:
            vae.to(torch.float32)
        try:
            mean, std = vae.config.get("latents_mean"), vae.config.get("latents_std")
            if mean is not None and std is not None:
                mean_t = torch.tensor(mean).view(1, -1, 1, 1).to(z)
                std_t = torch.tensor(std).view(1, -1, 1, 1).to(z)
                z = z * std_t / vae.config.scaling_factor + mean_t
            else:
                z = z / vae.config.scaling_factor
            image = vae.decode(z, return_dict=False)[0]
        finally:
            if upcast:
                vae.to(torch.float16)
        return self.pipe.image_processor.postprocess(image, output_type=output_type)

    # --- text encoding --------------------------------------------------------------------------------------
    def encode_prompt_rows(self, prompts: list[str], negatives: list[str], text_gates: list[Mapping[str, float]], height: int, width: int):
        """Encode prompt i with text-encoder LoRA gates i (one batched call per encoder); (negative, positive)."""
        routing = Routing.blocks([(1, g) for g in text_gates])
        for comp in TEXT_COMPONENTS:
            if comp in self.routers:
                self.routers[comp].set_routing(routing)
        try:
            if self.family == "sdxl":
                # An empty negative prompt is passed as None so SDXL's force_zeros_for_empty_prompt applies, as in diffusers.
                pos, neg, pooled, neg_pooled = self.pipe.encode_prompt(
                    prompt=prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=True,
                    negative_prompt=None if not any(negatives) else negatives,
                )
                proj = self.pipe.text_encoder_2.config.projection_dim
                ids = self.pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=pos.dtype, text_encoder_projection_dim=proj)
                ids = ids.to(self.device).repeat(len(prompts), 1)
                return Conditioning(neg, neg_pooled, ids), Conditioning(pos, pooled, ids)
            pos, neg = self.pipe.encode_prompt(prompts, self.device, 1, True, negative_prompt=negatives)
            return Conditioning(neg), Conditioning(pos)
        finally:
            for comp in TEXT_COMPONENTS:
                if comp in self.routers:
                    self.routers[comp].set_routing(None)


class _Run:
    """The `DenoiseContext` of one generation: prompt, active LoRAs, UNet calls, resources to release."""

    def __init__(self, owner: ComposedPipeline, loras, prompt, negative_prompt, guidance_scale, height, width):
        self.owner = owner
        self.loras = loras
        self.prompt = prompt
        self.negative_prompt = negative_prompt
        self.guidance_scale = guidance_scale
        self.height, self.width = height, width
        self.unet_router = owner.routers["unet"]
        self.scheduler = None
        self.unet_calls = 0
        self.unet_rows = 0
        self.shallow_calls = 0  # DeepCache-style shallow passes (predict_features with cached features)
        self.shallow_rows = 0
        self.new_latents = None
        self._stack = ExitStack()

    @property
    def pipeline(self) -> ComposedPipeline:
        return self.owner

    def encode(self, text_gates, prompts=None):
        """(negative, positive) conditioning per branch: branch i's prompt (default: the run's prompt) encoded
        with text-encoder gates i. Identical (prompt, gates) pairs are encoded once, all in one batched call."""
        prompts = list(prompts) if prompts is not None else [self.prompt] * len(text_gates)
        if len(prompts) != len(text_gates):
            raise ValueError(f"{len(prompts)} prompts for {len(text_gates)} text-encoder gate settings")
        keys = [(p, tuple(sorted((k, float(v)) for k, v in g.items() if v != 0.0))) for p, g in zip(prompts, text_gates)]
        unique = list(dict.fromkeys(keys))
        n = len(unique)
        neg, pos = self.owner.encode_prompt_rows([k[0] for k in unique], [self.negative_prompt] * n, [dict(k[1]) for k in unique],
                                                 self.height, self.width)
        index = {k: i for i, k in enumerate(unique)}
        return [(neg.rows(index[k], index[k] + 1), pos.rows(index[k], index[k] + 1)) for k in keys]

    def add_lora(self, lora: LoRA) -> LoRA:
        """Make a LoRA built during `prepare` (e.g. a merged one) resident until this generation ends."""
        self.owner.add_lora(lora)
        self._stack.callback(self.owner.remove_lora, lora.name)
        return lora

    def predict(self, latents, step, conditioning, routing, layer_gates=None, max_batch=None):
        x = self.scheduler.scale_model_input(latents, step.timestep)
        total = x.shape[0]
        if len(conditioning) != total:
            raise ValueError(f"{total} latent rows but {len(conditioning)} conditioning rows")
        chunk = max_batch or total
        outs = []
        for lo in range(0, total, chunk):
            hi = min(lo + chunk, total)
            self.unet_router.set_routing(routing if chunk == total else routing.rows(lo, hi), layer_gates)
            outs.append(self.owner.pipe.unet(x[lo:hi], step.timestep, **conditioning.rows(lo, hi).unet_kwargs(), return_dict=False)[0])
            self.unet_calls += 1
            self.unet_rows += hi - lo
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def enter(self, cm: AbstractContextManager):
        return self._stack.enter_context(cm)

    # --- attention maps, latent updates, feature caching, profiling (CLoRA, CMLoRA) ------------------------------
    def token_indices(self, prompt, words):
        return token_positions(self.owner.pipe.tokenizer, prompt, words)

    def predict_with_attention(self, latents, step, conditioning, routing, tokens, map_side=None, output=True):
        """One UNet call that also captures cross-attention maps (see DenoiseContext.predict_with_attention)."""
        unet = self.owner.pipe.unet
        x = self.scheduler.scale_model_input(latents, step.timestep)
        if len(conditioning) != x.shape[0] or tokens.shape[0] != x.shape[0]:
            raise ValueError(f"{x.shape[0]} latent rows, {len(conditioning)} conditioning rows, {tokens.shape[0]} token rows")
        self.unet_router.set_routing(routing)
        # With grad on, track the latents only: frozen weights keep the graph (and its memory) to what d/dz needs.
        frozen = [p for p in unet.parameters() if p.requires_grad] if torch.is_grad_enabled() else []
        for p in frozen:
            p.requires_grad_(False)
        out = None
        try:
            with capture_cross_attention(unet, tokens, tuple(latents.shape[-2:]), map_side, stop_after_last=not output) as store:
                try:
                    out = unet(x, step.timestep, **conditioning.unet_kwargs(), return_dict=False)[0]
                except StopForward:
                    pass
        finally:
            for p in frozen:
                p.requires_grad_(True)
        self.unet_calls += 1
        self.unet_rows += x.shape[0]
        return out, store.maps()

    def predict_features(self, latents, step, conditioning, routing, features=None):
        """Full pass returning deep features, or a shallow pass reusing them (see DenoiseContext.predict_features)."""
        unet = self.owner.pipe.unet
        check_feature_cache_support(unet)
        x = self.scheduler.scale_model_input(latents, step.timestep)
        if len(conditioning) != x.shape[0]:
            raise ValueError(f"{x.shape[0]} latent rows but {len(conditioning)} conditioning rows")
        self.unet_router.set_routing(routing)
        kw = conditioning.unet_kwargs()
        if features is None:
            out, features = full_pass(unet, x, step.timestep, kw["encoder_hidden_states"], kw["added_cond_kwargs"])
            self.unet_calls += 1
            self.unet_rows += x.shape[0]
        else:
            out = shallow_pass(unet, x, step.timestep, kw["encoder_hidden_states"], features, kw["added_cond_kwargs"])
            self.shallow_calls += 1
            self.shallow_rows += x.shape[0]
        return out, features

    def set_latents(self, latents):
        self.new_latents = latents.detach()

    @torch.no_grad()
    def generate_image(self, prompt, gates, *, seed, num_inference_steps):
        """A plain CFG generation with static `gates` (profiling), on its own scheduler and generator."""
        sub = _Run(self.owner, self.loras, prompt, self.negative_prompt, self.guidance_scale, self.height, self.width)
        sched = type(self.scheduler).from_config(self.scheduler.config)
        sched.set_timesteps(num_inference_steps, device=self.owner.device)
        sub.scheduler = sched
        generator = torch.Generator("cpu").manual_seed(int(seed))
        latents = self.owner._initial_latents(self.height, self.width, generator) * sched.init_noise_sigma
        extra = step_kwargs(sched, generator)
        neg, pos = sub.encode([gates])[0]
        cond, routing = Conditioning.cat([neg, pos]), Routing.uniform(gates)
        for i, t in enumerate(sched.timesteps):
            eps_u, eps_c = sub.predict(torch.cat([latents, latents]), Step(i, len(sched.timesteps), t), cond, routing).chunk(2)
            latents = sched.step(eps_u + self.guidance_scale * (eps_c - eps_u), t, latents, **extra, return_dict=False)[0]
        return self.owner.decode_latents(latents)[0]

    def close(self) -> None:
        try:
            self._stack.close()
        finally:
            for router in self.owner.routers.values():
                router.set_routing(None)
