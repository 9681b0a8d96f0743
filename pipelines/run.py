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
from loraloom.composition.controls import (
    ControlError,
    Region,
    block_vector,
    flux_block_vector,
    layer_block_weights,
    sd3_block_vector,
)
from loraloom.composition.errors import GenerationError
from loraloom.composition.files import WritePolicy
from loraloom.composition.fuse_cost import token_rows
from loraloom.composition.grad import frozen
from loraloom.composition.lora import LoRA
from loraloom.composition.merge_objective import training_scheduler
from loraloom.composition.methods import ActiveLoRA, Step
from loraloom.composition.routing import Routing, RowBlock, SpatialGate
from loraloom.composition.spatial import mask_from, resize_mask

from .attention import StopForward, capture_cross_attention, token_positions
from .denoise import denoise, guided
from .joint_attention import capture_joint_attention
from .joint_regions import regional_joint_attention
from .regions import RegionLayout, regional_cross_attention
from .unet_cache import check_feature_cache_support, full_pass, shallow_pass

if TYPE_CHECKING:
    from .composed import ComposedPipeline


class Run:
    """One generation's context: its prompt, active LoRAs, guidance, size and scheduler, and the UNet calls made.

    Counters: `unet_calls`/`unet_rows` (full UNet passes and the batch rows in them), `shallow_calls`/
    `shallow_rows` (DeepCache-style shallow passes). Use as a context manager, or call `close()`.
    """

    def __init__(self, pipeline: ComposedPipeline, loras: Sequence[ActiveLoRA], prompt: str, negative_prompt: str,
                 guidance_scale: float, height: int, width: int, scheduler=None, write_policy: WritePolicy | None = None,
                 regions: Sequence[Region] = (), base_weight: float = 0.0):
        self.pipeline = pipeline
        self.loras = list(loras)
        self.prompt = prompt
        self.negative_prompt = negative_prompt
        arch = pipeline.arch
        # A guidance-distilled model (FLUX.1) takes the scale as an input; methods then combine with CFG 1 over null
        # negative rows (`Conditioning.null`), which gives the conditional prediction exactly.
        self.model_guidance = float(guidance_scale)
        self.guidance_scale = 1.0 if arch.distilled_guidance else float(guidance_scale)
        self.height, self.width = height, width
        self.unet_router = pipeline.routers[arch.denoiser]  # the denoiser's router (UNet or transformer)
        self.scheduler = scheduler
        self.write_policy = write_policy or pipeline.write_policy()
        self.unet_calls = 0
        self.unet_rows = 0
        self.shallow_calls = 0
        self.shallow_rows = 0
        self.new_latents: torch.Tensor | None = None
        self._stack = ExitStack()
        vsf = pipeline.pipe.vae_scale_factor
        has_masks = bool(regions) or any(a.controls.mask is not None for a in self.loras)
        # On a diffusion transformer masked LoRAs gate the image tokens (`_token_gates`); with regions the conditioning
        # holds a prompt copy per region and the joint attention blends them (`pipelines.joint_regions`).
        self.token_gates: dict[str, SpatialGate] = {}
        self.layout = None
        if has_masks and arch.denoiser == "unet":
            self.layout = RegionLayout(self.loras, regions, (height // vsf, width // vsf),
                                       pipeline.pipe.tokenizer.model_max_length, base_weight)
        elif has_masks:
            if regions:
                latent_hw = tuple(arch.latent_shape(height, width)[-2:])
                self.layout = RegionLayout(self.loras, regions, latent_hw, int(arch.text_tokens), base_weight)
            self.token_gates = self._token_gates(base_weight)
        self.schedules = {a.name: a.controls.schedule for a in self.loras if a.controls.schedule is not None}
        self._apply_controls()
        if self.layout and arch.denoiser == "unet":
            self.enter(regional_cross_attention(pipeline.pipe.unet, self.layout.spans, self.layout.weights))
        elif self.layout:
            grid = arch.attention_grid(tuple(arch.latent_shape(height, width)[-2:]))
            self.enter(regional_joint_attention(pipeline.pipe.transformer, arch.name, self.layout.spans,
                                                self.layout.weights, grid))

    def claim_fused(self, method) -> None:
        """Before `method.prepare`: weights kept fused from the last generation (`ComposedPipeline.keep_fused`) stay
        only where this method fuses the same gates (`Method.fused_gates`); everywhere else the base weights come
        back before the method reads or routes anything."""
        gates = method.fused_gates(self)
        paths = self.fuse_paths(gates) if gates is not None else None
        for router in self.pipeline.routers.values():
            router.release_unless(gates if router is self.unet_router else None, paths)

    def fuse_paths(self, gates: Mapping[str, float]) -> frozenset[str] | None:
        """The denoiser layers worth fusing `gates` into for this run (`composition.fuse_cost`); None (all of them) on
        a UNet. On a diffusion transformer: each layer's token rows are its stream's tokens (FLUX's packed image
        tokens, the text tokens, both, or one vector for the modulations) × rows per call (1 with FLUX.1's distilled
        guidance, 2 with CFG) × the run's steps."""
        arch = self.pipeline.arch
        if arch.denoiser == "unet" or self.unet_router.token_stream is None:
            return None
        grid = arch.attention_grid(tuple(arch.latent_shape(self.height, self.width)[-2:]))
        image, text = grid[0] * grid[1], int(arch.text_tokens)
        calls, rows = len(self.scheduler.timesteps), 1 if arch.distilled_guidance else 2
        stream = self.unet_router.token_stream
        return self.unet_router.worth_fusing(gates, lambda path: token_rows(stream(path), image, text, calls, rows))

    # --- per-LoRA controls (composition.controls) ------------------------------------------------------------------
    @property
    def regional(self) -> bool:
        """True when some LoRA is bound to a region or mask (on a UNet, and with regions on a diffusion transformer,
        the conditioning then holds several prompt copies; on a diffusion transformer masked LoRAs gate the image
        tokens)."""
        return bool(self.layout) or bool(self.token_gates)

    @property
    def can_fuse(self) -> bool:
        """True when every active LoRA acts the same at every step and everywhere (no schedule, no mask, no region):
        only then may a method fuse them into the weights. Never on an offloaded model (`enable_offload`): its
        weights move between devices (or are reloaded from accelerate's CPU copy) at every call."""
        return not self.regional and not self.schedules and getattr(self.pipeline, "offload", None) is None

    def _token_gates(self, base_weight: float) -> dict[str, SpatialGate]:
        """The spatial gates of the masked LoRAs on a diffusion transformer (FLUX.1, SD 3/3.5): each LoRA's mask (with
        regions: its region's mask, `RegionLayout`) at the latent's size, on the family's image token grid
        (`attention_grid`: FLUX's 2x2-packed tokens, SD3's patches), and on the text tokens the smallest value of the
        mask on that grid (`SpatialGate`: a text token reaches every image token; a mask with an outside leaves the text
        side as the base model's, a full mask acts fully). With regions, a region's LoRAs act in the text encoders on
        their region's prompt copy only (`RegionLayout.copy_gates`)."""
        arch = self.pipeline.arch
        if base_weight and not self.layout:
            raise GenerationError(f"base_weight mixes the run's prompt into regions' prompts; on {arch.name} models it "
                                  "needs regions (a masked LoRA alone uses the run's prompt). Fix: leave out base_weight, "
                                  "or give regions.")
        latent_hw = tuple(arch.latent_shape(self.height, self.width)[-2:])
        grid = arch.attention_grid(latent_hw)
        if self.layout:
            masks = {name: self.layout.masks[r] for name, r in self.layout.region_of.items()}
        else:
            masks = {a.name: mask_from(a.controls.mask, *latent_hw, feather=a.controls.feather)
                     for a in self.loras if a.controls.mask is not None}
        return {name: SpatialGate(mask, grid=grid, text=float(resize_mask(mask, *grid).min())) for name, mask in masks.items()}

    @property
    def feature_cache(self) -> bool:
        """True when `predict_features` works: a UNet (DeepCache's cut); the diffusion transformers have none."""
        return self.pipeline.arch.denoiser == "unet"

    def _apply_controls(self) -> None:
        """Strengths and block weights as per-layer factors in every router, masks as the denoiser's spatial gates. The
        denoiser (a UNet, or FLUX's / SD3's transformer) takes a LoRA's `unet` strength, the text encoders its `te`."""
        arch = self.pipeline.arch
        for comp, router in self.pipeline.routers.items():
            scales = {}
            for a in self.loras:
                c = a.controls
                factor = c.unet if comp == arch.denoiser else c.te
                if factor == 1.0 and c.blocks is None:
                    continue
                paths = [p for p, layer in router.layers.items() if a.name in layer.factors]
                if c.blocks is None:
                    per = dict.fromkeys(paths, 1.0)
                elif arch.denoiser == "unet":
                    per = layer_block_weights(self._block_weights(a.name, c.blocks), comp, paths, self._layers_per_block())
                else:
                    per = layer_block_weights(self._block_weights(a.name, c.blocks), comp, paths, dit=arch.name)
                scales[a.name] = {p: factor * w for p, w in per.items()}
            gates = None
            if comp == arch.denoiser:
                gates = self.layout.gates() if self.layout and arch.denoiser == "unet" else (dict(self.token_gates) or None)
            if scales or gates:
                router.set_controls(scales, gates)

    def _layers_per_block(self) -> int:
        unet_config = self.pipeline.pipe.unet.config
        return unet_config.layers_per_block if isinstance(unet_config.layers_per_block, int) else unet_config.layers_per_block[0]

    def _block_weights(self, name: str, blocks) -> dict[str, float]:
        """{block id: weight} of a LoRA's block weights on this model: the LoRA Block Weight extension's UNet vectors
        (`block_vector`), or the diffusion transformer's blocks as its config counts them (`flux_block_vector`,
        `sd3_block_vector`). A vector of a length this model does not take is refused here, where the model is known."""
        arch = self.pipeline.arch
        try:
            if arch.denoiser == "unet":
                return block_vector(blocks)
            config = self.pipeline.pipe.transformer.config
            if arch.name == "flux":
                return flux_block_vector(blocks, config.num_layers, config.num_single_layers)
            if arch.name == "sd3":
                return sd3_block_vector(blocks, config.num_layers)
        except ControlError as err:
            raise GenerationError(f"LoRA {name!r}: {err}") from None
        raise GenerationError(f"LoRA {name!r}: block weights (lbw) have no block ids on {arch.name} models. Fix: leave out lbw.")

    def _at_step(self, routing: Routing, step: Step) -> Routing:
        """`routing` with every scheduled LoRA's gate times its schedule's factor at this step (0 drops it)."""
        if not self.schedules:
            return routing
        factors = {n: s.factor(step.index, step.count) for n, s in self.schedules.items()}
        return Routing(tuple(RowBlock(b.rows, tuple((n, g * factors.get(n, 1.0)) for n, g in b.gates)) for b in routing.blocks))

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc) -> None:
        self.close(*exc)

    # --- text and UNet ------------------------------------------------------------------------------------------
    def encode(self, text_gates, prompts=None):
        """(negative, positive) conditioning per branch: branch i's prompt (default: the run's prompt) encoded
        with text-encoder gates i. Identical (prompt, negative, gates) rows are encoded once, all in one batched call.
        With regions, each branch's conditioning is its prompt and every region's prompt (each with the LoRAs that
        act there), concatenated along the tokens (`pipelines.regions`)."""
        prompts = list(prompts) if prompts is not None else [self.prompt] * len(text_gates)
        if len(prompts) != len(text_gates):
            raise ValueError(f"{len(prompts)} prompts for {len(text_gates)} text-encoder gate settings")
        copies = [self._copies(p, g) for p, g in zip(prompts, text_gates)]  # per branch: [(prompt, negative, gates)]
        # On the diffusion transformers a LoRA without text-encoder layers leaves the encoding as it is, so its gate is
        # left out of the key and branches that differ only by such LoRAs share one encoding (FLUX's T5 is costly).
        # (SD keeps every gate in the key: its batch layout, and so its images, stay bit for bit as they were.)
        text_free = self._text_free_loras() if self.pipeline.arch.denoiser != "unet" else set()
        keys = [(p, n, tuple(sorted((k, float(v)) for k, v in g.items() if v != 0.0 and k not in text_free)))
                for branch in copies for p, n, g in branch]
        unique = list(dict.fromkeys(keys))
        neg, pos = self.pipeline.encode_prompt_rows([k[0] for k in unique], [k[1] for k in unique],
                                                    [dict(k[2]) for k in unique], self.height, self.width)
        index = {k: i for i, k in enumerate(unique)}
        out, i = [], 0
        for branch in copies:
            rows = [index[k] for k in keys[i:i + len(branch)]]
            i += len(branch)
            out.append(tuple(Conditioning.join_tokens([c.rows(r, r + 1) for r in rows]) for c in (neg, pos)))
        return out

    def _text_free_loras(self) -> set[str]:
        """Names of resident LoRAs with no layer in any text encoder."""
        routers = [r for comp, r in self.pipeline.routers.items() if comp in self.pipeline.arch.text_components]
        return {n for n in self.pipeline.loras if not any(n in layer.factors for r in routers for layer in r.layers.values())}

    def _copies(self, prompt: str, gates) -> list[tuple[str, str, dict]]:
        """The prompt copies one branch's conditioning is made of: just (prompt, negative, gates) without regions."""
        if not self.layout:
            if self.token_gates:  # a masked LoRA's text-encoder part acts as its text tokens do (`_token_gates`)
                gates = {k: v * self.token_gates[k].text if k in self.token_gates else v for k, v in gates.items()}
            return [(prompt, self.negative_prompt, dict(gates))]
        regions = self.layout.regions
        return [(p, n, g) for p, n, g in zip(
            [prompt] + [r.prompt if r.prompt is not None else prompt for r in regions],
            [self.negative_prompt] + [r.negative_prompt if r.negative_prompt is not None else self.negative_prompt for r in regions],
            self.layout.copy_gates(gates), strict=True)]

    def predict(self, latents, step, conditioning, routing, layer_gates=None, max_batch=None):
        """Denoiser output for each row under `routing` (chunked into calls of at most `max_batch` rows); null
        conditioning rows are zero and not computed."""
        arch = self.pipeline.arch
        total = latents.shape[0]
        if len(conditioning) != total:
            raise ValueError(f"{total} latent rows but {len(conditioning)} conditioning rows")
        if conditioning.null is not None and bool(conditioning.null.any()):
            keep = (~conditioning.null).nonzero().flatten()
            out = torch.zeros_like(latents)
            if len(keep):
                out[keep.to(out.device)] = self.predict(latents[keep.to(latents.device)], step, conditioning.select(keep),
                                                        routing_of_rows(routing, keep.tolist()), layer_gates, max_batch)
            return out
        x = arch.model_input(self.scheduler, latents, step.timestep)
        routing = self._at_step(routing, step)
        chunk = max_batch or total
        outs = []
        for lo in range(0, total, chunk):
            hi = min(lo + chunk, total)
            self.unet_router.set_routing(routing if chunk == total else routing.rows(lo, hi), layer_gates)
            outs.append(arch.predict(x[lo:hi], step.timestep, conditioning.rows(lo, hi), self.model_guidance))
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
        """Positions of each word's tokens among the text tokens the denoiser attends to (SD: the CLIP tokenizer's;
        FLUX, SD3: the family's `token_positions`)."""
        arch = self.pipeline.arch
        if arch.denoiser != "unet":
            return arch.token_positions(prompt, words)
        return token_positions(self.pipeline.pipe.tokenizer, prompt, words)

    def predict_with_attention(self, latents, step, conditioning, routing, tokens, map_side=None, output=True):
        """One UNet call that also captures cross-attention maps (see DenoiseContext.predict_with_attention). On the
        diffusion transformers the maps are the joint attention's image->text block (`pipelines.joint_attention`)."""
        if self.pipeline.arch.denoiser != "unet":
            return self._predict_with_joint_attention(latents, step, conditioning, routing, tokens, map_side, output)
        unet = self.pipeline.pipe.unet
        x = self.scheduler.scale_model_input(latents, step.timestep)
        if len(conditioning) != x.shape[0] or tokens.shape[0] != x.shape[0]:
            raise ValueError(f"{x.shape[0]} latent rows, {len(conditioning)} conditioning rows, {tokens.shape[0]} token rows")
        self.unet_router.set_routing(self._at_step(routing, step))
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

    def _predict_with_joint_attention(self, latents, step, conditioning, routing, tokens, map_side, output):
        arch = self.pipeline.arch
        transformer = self.pipeline.pipe.transformer
        if len(conditioning) != latents.shape[0] or tokens.shape[0] != latents.shape[0]:
            raise ValueError(f"{latents.shape[0]} latent rows, {len(conditioning)} conditioning rows, {tokens.shape[0]} token rows")
        if conditioning.null is not None and bool(conditioning.null.any()):
            # FLUX.1's negative rows are null (no prediction, zero): computed are the others; their maps too
            null = conditioning.null.to(tokens.device)
            if bool((tokens[null] >= 0).any()):
                raise ValueError("attention maps asked of a null (FLUX.1 negative) row: it has no text to attend to")
            keep = (~conditioning.null).nonzero().flatten()
            out = torch.zeros_like(latents) if output else None
            maps = None
            if len(keep):
                o, m = self._predict_with_joint_attention(latents[keep.to(latents.device)], step, conditioning.select(keep),
                                                          routing_of_rows(routing, keep.tolist()), tokens[keep.to(tokens.device)],
                                                          map_side, output)
                if output:
                    out[keep.to(out.device)] = o
                maps = m.new_zeros((latents.shape[0], *m.shape[1:]))
                maps[keep.to(m.device)] = m
            return out, maps
        x = arch.model_input(self.scheduler, latents, step.timestep)
        self.unet_router.set_routing(self._at_step(routing, step))
        grid = arch.attention_grid(tuple(latents.shape[-2:]))
        out = None
        with frozen(transformer) if torch.is_grad_enabled() else nullcontext():
            with capture_joint_attention(transformer, arch.name, tokens, grid, map_side, stop_after_last=not output) as store:
                try:
                    out = arch.predict(x, step.timestep, conditioning, self.model_guidance)
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
        self.unet_router.set_routing(self._at_step(routing, step))
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

    def set_masks(self, masks) -> None:
        """Confine LoRAs to parts of the image from now on: {name: (H, W) mask at the latent's size, or None to lift
        it} (token-routed methods build these from attention maps; `composition.routing.SpatialGate`). Masks set
        here act on the UNet's image-side layers only (a LoRA's keys/values of the prompt stay unmasked), on top of
        the run's regions."""
        gates = dict(self.unet_router.gates)
        for name, mask in masks.items():
            if mask is None:
                gates.pop(name, None)
            else:
                lh, lw = self.height // self.pipeline.pipe.vae_scale_factor, self.width // self.pipeline.pipe.vae_scale_factor
                if tuple(mask.shape) != (lh, lw):
                    raise ValueError(f"mask of {name!r} is {tuple(mask.shape)}, the latent is {(lh, lw)}")
                grid = self.pipeline.arch.attention_grid((lh, lw)) if self.pipeline.arch.denoiser != "unet" else None
                gates[name] = SpatialGate(mask.detach().float().cpu(), grid=grid)
        self.unet_router.set_controls(self.unet_router.scales, gates)

    # --- whole samples and training (profiling, reference images, merge objectives) -----------------------------------
    @torch.no_grad()
    def sample(self, prompt: str, gates: Mapping[str, float], *, seed: int, num_inference_steps: int,
               scheduler: str | None = None, output_type: str = "pil"):
        """One plain-CFG sample with static `gates` on every UNet row and in the text encoders, this run's negative
        prompt, guidance and size, on a fresh scheduler (`scheduler`: a name, default this run's kind) and a CPU
        generator seeded `seed`. A PIL image, or the latents with `output_type="latent"`. Its UNet calls are not
        counted in this run's."""
        # The sub-run shares this run's routers, with their strengths, block weights and masks already set.
        sub = Run(self.pipeline, [], prompt, self.negative_prompt, self.model_guidance, self.height, self.width,
                  write_policy=self.write_policy)
        arch = self.pipeline.arch
        if scheduler is None and arch.denoiser == "unet":
            sched = type(self.scheduler).from_config(self.scheduler.config)
            sched.set_timesteps(num_inference_steps, device=self.pipeline.device)
        else:
            sched = arch.make_scheduler(scheduler, num_inference_steps, self.height, self.width, self.pipeline.device)
        sub.scheduler = sched
        generator = torch.Generator("cpu").manual_seed(int(seed))
        latents = self.pipeline.initial_latents(self.height, self.width, generator) * arch.init_noise_sigma(sched)
        cond, routing = Conditioning.cat(list(sub.encode([gates])[0])), Routing.uniform(gates)
        latents, _ = denoise(sched, latents, guided(lambda x, step: sub.predict(x, step, cond, routing), sub.guidance_scale),
                             generator=generator)
        return latents if output_type == "latent" else self.pipeline.decode_latents(latents)[0]

    def training_scheduler(self):
        """A DDPM scheduler with the model's own noise schedule (add_noise at training timesteps; merge objectives)."""
        return training_scheduler(self.pipeline.pipe)

    def close(self, *exc) -> None:
        """Close what the method opened; an exception that ended the run (`exc`, as `__exit__` gets it) is passed on,
        so that e.g. fused weights are restored rather than kept (`ComposedPipeline.keep_fused`)."""
        try:
            self._stack.__exit__(*(exc or (None, None, None)))
        finally:
            for router in self.pipeline.routers.values():
                if router.scales or router.gates:
                    router.set_controls()
                router.set_routing(None)


def routing_of_rows(routing: Routing, rows: Sequence[int]) -> Routing:
    """The routing of the batch made of `rows` (sorted indices) of the batch `routing` was for, renumbered from 0: a
    contiguous block keeps the chosen rows inside it, which are contiguous in the new batch too."""
    out = []
    for b in routing.blocks:
        if b.rows is None:
            out.append(b)
            continue
        inside = [j for j, r in enumerate(rows) if b.rows.start <= r < b.rows.stop]
        if inside:
            out.append(RowBlock(slice(inside[0], inside[-1] + 1), b.gates))
    return Routing(tuple(out))
