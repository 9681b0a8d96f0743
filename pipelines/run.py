"""The run context of one generation: the one door between a composition method and the denoising loop.

A `Run` implements `composition.methods.DenoiseContext`: everything a method may ask of the loop (encode
prompts under text-encoder gates, UNet outputs under a routing, attention maps, cached features, latent
updates, whole reference samples, a training scheduler, resident LoRAs for the run). Methods see nothing else
of the pipeline, so the same method runs on every model family. `ComposedPipeline.run(...)` makes one (as a
context manager: what a method opened — fused weights, temporary LoRAs — is released when it closes);
`ComposedPipeline.__call__` makes one per generation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, nullcontext
from typing import TYPE_CHECKING

import torch

from loraloom.composition.conditioning import Conditioning
from loraloom.composition.files import WritePolicy
from loraloom.composition.grad import frozen
from loraloom.composition.lora import LoRA
from loraloom.composition.merge_objective import training_scheduler
from loraloom.composition.methods import ActiveLoRA
from loraloom.composition.routing import Routing

from .attention import StopForward, capture_cross_attention, token_positions
from .denoise import denoise, guided
from .schedulers import make_scheduler
from .unet_cache import check_feature_cache_support, full_pass, shallow_pass

if TYPE_CHECKING:
    from .composed import ComposedPipeline


class Run:
    """One generation's context: its prompt, active LoRAs, guidance, size and scheduler, and the UNet calls made.

    Counters: `unet_calls`/`unet_rows` (full UNet passes and the batch rows in them), `shallow_calls`/
    `shallow_rows` (DeepCache-style shallow passes). Use as a context manager, or call `close()`.
    """

    def __init__(self, pipeline: ComposedPipeline, loras: Sequence[ActiveLoRA], prompt: str, negative_prompt: str,
                 guidance_scale: float, height: int, width: int, scheduler=None, write_policy: WritePolicy | None = None):
        self.pipeline = pipeline
        self.loras = list(loras)
        self.prompt = prompt
        self.negative_prompt = negative_prompt
        self.guidance_scale = float(guidance_scale)
        self.height, self.width = height, width
        self.unet_router = pipeline.routers["unet"]
        self.scheduler = scheduler
        self.write_policy = write_policy or pipeline.write_policy()
        self.unet_calls = 0
        self.unet_rows = 0
        self.shallow_calls = 0
        self.shallow_rows = 0
        self.new_latents: torch.Tensor | None = None
        self._stack = ExitStack()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- text and UNet ------------------------------------------------------------------------------------------
    def encode(self, text_gates, prompts=None):
        """(negative, positive) conditioning per branch: branch i's prompt (default: the run's prompt) encoded
        with text-encoder gates i. Identical (prompt, gates) pairs are encoded once, all in one batched call."""
        prompts = list(prompts) if prompts is not None else [self.prompt] * len(text_gates)
        if len(prompts) != len(text_gates):
            raise ValueError(f"{len(prompts)} prompts for {len(text_gates)} text-encoder gate settings")
        keys = [(p, tuple(sorted((k, float(v)) for k, v in g.items() if v != 0.0))) for p, g in zip(prompts, text_gates)]
        unique = list(dict.fromkeys(keys))
        n = len(unique)
        neg, pos = self.pipeline.encode_prompt_rows([k[0] for k in unique], [self.negative_prompt] * n,
                                                    [dict(k[1]) for k in unique], self.height, self.width)
        index = {k: i for i, k in enumerate(unique)}
        return [(neg.rows(index[k], index[k] + 1), pos.rows(index[k], index[k] + 1)) for k in keys]

    def predict(self, latents, step, conditioning, routing, layer_gates=None, max_batch=None):
        """UNet output for each row under `routing` (chunked into calls of at most `max_batch` rows)."""
        x = self.scheduler.scale_model_input(latents, step.timestep)
        total = x.shape[0]
        if len(conditioning) != total:
            raise ValueError(f"{total} latent rows but {len(conditioning)} conditioning rows")
        chunk = max_batch or total
        outs = []
        for lo in range(0, total, chunk):
            hi = min(lo + chunk, total)
            self.unet_router.set_routing(routing if chunk == total else routing.rows(lo, hi), layer_gates)
            outs.append(self.pipeline.pipe.unet(x[lo:hi], step.timestep, **conditioning.rows(lo, hi).unet_kwargs(), return_dict=False)[0])
            self.unet_calls += 1
            self.unet_rows += hi - lo
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    # --- resources held until the run ends -----------------------------------------------------------------------
    def enter(self, cm: AbstractContextManager):
        """Keep a context (e.g. fused weights) open until the run ends, even on error."""
        return self._stack.enter_context(cm)

    def add_lora(self, lora: LoRA) -> LoRA:
        """Make a LoRA built during `prepare` (e.g. a merged one) resident until this run ends."""
        self.pipeline.add_lora(lora)
        self._stack.callback(self.pipeline.remove_lora, lora.name)
        return lora

    # --- attention maps, latent updates, feature caching (CLoRA, CMLoRA) -------------------------------------------
    def token_indices(self, prompt, words):
        return token_positions(self.pipeline.pipe.tokenizer, prompt, words)

    def predict_with_attention(self, latents, step, conditioning, routing, tokens, map_side=None, output=True):
        """One UNet call that also captures cross-attention maps (see DenoiseContext.predict_with_attention)."""
        unet = self.pipeline.pipe.unet
        x = self.scheduler.scale_model_input(latents, step.timestep)
        if len(conditioning) != x.shape[0] or tokens.shape[0] != x.shape[0]:
            raise ValueError(f"{x.shape[0]} latent rows, {len(conditioning)} conditioning rows, {tokens.shape[0]} token rows")
        self.unet_router.set_routing(routing)
        out = None
        # With grad on, track the latents only: frozen weights keep the graph (and its memory) to what d/dz needs.
        with frozen(unet) if torch.is_grad_enabled() else nullcontext():
            with capture_cross_attention(unet, tokens, tuple(latents.shape[-2:]), map_side, stop_after_last=not output) as store:
                try:
                    out = unet(x, step.timestep, **conditioning.unet_kwargs(), return_dict=False)[0]
                except StopForward:
                    pass
        self.unet_calls += 1
        self.unet_rows += x.shape[0]
        return out, store.maps()

    def predict_features(self, latents, step, conditioning, routing, features=None):
        """Full pass returning deep features, or a shallow pass reusing them (see DenoiseContext.predict_features)."""
        unet = self.pipeline.pipe.unet
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

    # --- whole samples and training (profiling, reference images, merge objectives) -----------------------------------
    @torch.no_grad()
    def sample(self, prompt: str, gates: Mapping[str, float], *, seed: int, num_inference_steps: int,
               scheduler: str | None = None, output_type: str = "pil"):
        """One plain-CFG sample with static `gates` on every UNet row and in the text encoders, this run's negative
        prompt, guidance and size, on a fresh scheduler (`scheduler`: a name, default this run's kind) and a CPU
        generator seeded `seed`. A PIL image, or the latents with `output_type="latent"`. Its UNet calls are not
        counted in this run's."""
        sub = Run(self.pipeline, self.loras, prompt, self.negative_prompt, self.guidance_scale, self.height, self.width,
                  write_policy=self.write_policy)
        if scheduler is None:
            sched = type(self.scheduler).from_config(self.scheduler.config)
        else:
            pipe_sched = self.pipeline.pipe.scheduler
            sched = make_scheduler(scheduler, pipe_sched.config, type(pipe_sched))
        sched.set_timesteps(num_inference_steps, device=self.pipeline.device)
        sub.scheduler = sched
        generator = torch.Generator("cpu").manual_seed(int(seed))
        latents = self.pipeline.initial_latents(self.height, self.width, generator) * sched.init_noise_sigma
        cond, routing = Conditioning.cat(list(sub.encode([gates])[0])), Routing.uniform(gates)
        latents, _ = denoise(sched, latents, guided(lambda x, step: sub.predict(x, step, cond, routing), self.guidance_scale),
                             generator=generator)
        return latents if output_type == "latent" else self.pipeline.decode_latents(latents)[0]

    def training_scheduler(self):
        """A DDPM scheduler with the model's own noise schedule (add_noise at training timesteps; merge objectives)."""
        return training_scheduler(self.pipeline.pipe)

    def close(self) -> None:
        try:
            self._stack.close()
        finally:
            for router in self.pipeline.routers.values():
                router.set_routing(None)
