"""Token-routed fusion, after FreeFuse (Liu, Ding, Zhou, "FreeFuse: Multi-Subject LoRA Fusion via Adaptive
Token-Level Routing at Test Time", arXiv 2510.23515): each subject LoRA acts only where its own words attend, found
by the model itself at an early step; no user masks. Spec: docs/methods/tokenroute.md.

All LoRAs run as in Merge, unfused (one CFG pair per step, every LoRA in the text encoder). At the last of the
first `collect_fraction` of the steps the cross-attention maps of each subject LoRA's words are captured; the
contrastive scores (a LoRA's map minus the others'), a distribution over the image per LoRA and an argmax over the
LoRAs (or a soft share) give one mask per subject LoRA (`composition/spatial_weights.py`), and from the next step
on each subject LoRA's delta is multiplied by its mask in every image-side UNet layer (`ctx.set_masks`, the routing
layer's spatial gates). Global LoRAs (style, background by category; `roles` overrides) are never masked.

FLUX.1 and SD 3/3.5: the maps are the joint attention's image->text block (image queries against the text keys,
softmax over the text keys, averaged over heads and every double-stream / joint block; `pipelines.joint_attention`)
on the image token grid, and the words are looked up among the tokens the transformer attends to (FLUX: T5's; SD3:
CLIP's 77, then T5's). The masks gate each subject LoRA on the transformer's image tokens (`set_masks`: the
family's token grid; its text tokens, and FLUX's single-stream text part, ungated, as a UNet's prompt keys/values).
"UNet" below reads "transformer" there. FLUX.1 has no unconditional branch (its negative
rows are null), so the CFG pair is the conditional prediction; `restart` runs its phase 1 on the flow-matching
scheduler, whose inputs are not scaled.

Where we differ from the reference code (github.com/yaoliliu/FreeFuse, its SDXL pipeline; docs/methods/tokenroute.md#reference-code):
- Default: the masks come from the run's own early steps (LoRAs on, unmasked, on those steps) and confine the
  LoRAs for the rest of the run; the reference first runs the early steps without UNet LoRAs, then restarts from
  the same initial noise with the masks on every step (`restart=True`: that, at the cost of the extra steps).
- Maps: cross-attention of the subject words averaged over every cross-attention layer at one resolution (the
  W/32 level: 32 x 32 for SDXL at 1024², the level of the reference's one layer), not the reference's second stage
  (an inner product of self-attention features around the top-k positions), which needs features the run context
  does not expose; the reference's own fallback without those features is what is implemented.
- Masks: plain argmax (the paper's indicator); the reference's iterative "balanced argmax" (a count-balancing
  bias, neighbour votes and a pull to each region's centre) and its attention bias and text-token masking are not
  implemented.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ..errors import MethodError
from ..routing import Routing
from ..spatial_weights import contrastive_scores, masks_to_latent, position_distributions, route_masks
from .base import DenoiseContext, Method, Step, cfg_pair, param, register
from .guidance import classifier_free_guidance

ROLES = ("subject", "global")


@dataclass
class TokenRouteParams:
    lora_scale: float = param(1.0, "Weight of every LoRA (FreeFuse: 1.0); each LoRA's own weight multiplies it. As in "
                                   "Merge, not divided by the number of LoRAs.")
    concepts: dict = param({}, "Per subject LoRA, the words that name it in the prompt: {LoRA name: 'words, "
                               "comma-separated'} (FreeFuse: its activation words). Default: the LoRA's trigger words. "
                               "The words must be in the prompt.")
    global_categories: list = param(["style", "background"], "LoRAs of these categories are global: never masked "
                                                             "(character, clothing and object LoRAs are subjects).")
    roles: dict = param({}, "Override a LoRA's role by name: {LoRA name: 'subject' or 'global'}.")
    collect_fraction: float = param(1 / 3, "Share of the steps after which the masks are made (the maps of the last "
                                           "of these steps; reference SDXL code: step 10 of 30; FLUX: 5 of 28). At "
                                           "least one step.", min=0.0, max=1.0)
    attention_resolution: int = param(0, "Cells across of the attention maps; 0: the W/32 level (SD 1.x 512² -> 16, "
                                         "SDXL 1024² -> 32, at least 8).", min=0)
    temperature: float = param(0.0, "Temperature of each LoRA's distribution over the image, softmax(C / T); 0 = "
                                    "auto (each LoRA's scores over their standard deviation).", min=0.0)
    mask_mode: str = param("hard", "'hard': each position to the one subject LoRA whose words attend most there "
                                   "(FreeFuse); 'soft': the subject LoRAs share each position in proportion.",
                           choices=["hard", "soft"])
    restart: bool = param(False, "Reproduce the reference code's two phases: the first steps without UNet LoRAs to "
                                 "make the masks, then the whole run again from the same noise with them (costs the "
                                 "collection steps once more). Default: masks from the run's own first steps, applied "
                                 "from then on.")


@register
class TokenRoute(Method):
    name = "tokenroute"
    Params = TokenRouteParams
    description = "Each subject LoRA confined to where its words attend at an early step (FreeFuse-style); no user masks."

    # --- setup -----------------------------------------------------------------------------------------------------
    def prepare(self, ctx: DenoiseContext) -> None:
        p = self.params
        names = [l.name for l in ctx.loras]
        unknown = sorted(set(p.roles) - set(names))
        if unknown:
            raise MethodError(f"tokenroute: roles name unknown LoRA(s) {unknown}; active: {names}")
        bad = {n: r for n, r in p.roles.items() if r not in ROLES}
        if bad:
            raise MethodError(f"tokenroute: a role is 'subject' or 'global', got {bad}")
        gates = {l.name: l.weight * p.lora_scale for l in ctx.loras}
        pair = ctx.encode([gates])[0]  # as Merge: the text encoder sees every LoRA
        self.cond, self.cond_pos = cfg_pair(pair), pair[1]
        self.routing = Routing.uniform(gates)  # unfused, so that the spatial gates apply
        self.subjects = [l for l in ctx.loras if self.role(l) == "subject"]
        self.globals = [l.name for l in ctx.loras if self.role(l) == "global"]
        self.positions = subject_positions(ctx, ctx.prompt, self.subjects, p.concepts)
        length = self.cond.hidden.shape[1]
        late = {n: [i for i in pos if i >= length] for n, pos in self.positions.items()}
        if any(late.values()):
            raise MethodError(f"tokenroute: token positions {({n: v for n, v in late.items() if v})} are past the text "
                              f"encoder's {length} tokens")
        flat = [i for l in self.subjects for i in self.positions[l.name]]
        # the maps come from the positive row alone (a pass of its own, stopped after the last captured layer)
        self.tokens = torch.tensor([flat], dtype=torch.long) if flat else None
        self.columns, start = {}, 0
        for l in self.subjects:
            n = len(self.positions[l.name])
            self.columns[l.name] = list(range(start, start + n))
            start += n
        self.masked = False
        self.extras = {"subjects": [l.name for l in self.subjects], "globals": list(self.globals),
                       "positions": {n: list(v) for n, v in self.positions.items()}, "mask_step": None, "masks": {}}

    def role(self, lora) -> str:
        if lora.name in self.params.roles:
            return self.params.roles[lora.name]
        return "global" if lora.category in self.params.global_categories else "subject"

    def collect_steps(self, count: int) -> int:
        """Steps whose last one gives the maps: round(collect_fraction x T), at least 1."""
        return min(count, max(1, round(self.params.collect_fraction * count)))

    # --- masks ---------------------------------------------------------------------------------------------------
    def masks(self, maps: torch.Tensor, height: int, width: int) -> dict[str, torch.Tensor]:
        """{subject LoRA: (height, width) mask} from the captured maps (1, h, w, K) of the positive row: per LoRA the
        mean map of its words, then docs/methods/tokenroute.md#masks."""
        per_lora = torch.stack([maps[0][..., self.columns[l.name]].mean(-1) for l in self.subjects]).float()
        dists = position_distributions(contrastive_scores(per_lora), self.params.temperature)
        masks = route_masks(dists, self.params.mask_mode)
        self.extras["masks"] = {l.name: m.cpu() for l, m in zip(self.subjects, masks, strict=True)}
        latent = masks_to_latent(masks, height, width)
        return {l.name: m for l, m in zip(self.subjects, latent, strict=True)}

    def _capture(self, ctx: DenoiseContext, latents: torch.Tensor, step: Step, routing: Routing, index: int) -> None:
        """The maps of the subjects' words for `latents` (the positive row under `routing`, the UNet stopped after the
        last captured layer) make the masks, which confine the subject LoRAs from now on."""
        _, maps = ctx.predict_with_attention(latents, step, self.cond_pos, routing, self.tokens,
                                             self.params.attention_resolution or None, output=False)
        masks = self.masks(maps, *latents.shape[-2:])
        # a mask of ones (a lone subject LoRA) is no mask: left ungated, the LoRA runs as in Merge, bit for bit
        ctx.set_masks({n: m for n, m in masks.items() if not bool((m >= 1.0 - 1e-6).all())})
        self.masked = True
        self.extras["mask_step"] = index

    def _collect_first(self, ctx: DenoiseContext, latents: torch.Tensor, step: Step, n: int) -> None:
        """The reference's phase 1: `n` steps from these (the initial) latents on a copy of the run's scheduler, no
        LoRA in the UNet, plain CFG; the maps of the last step make the masks. The run's own scheduler is not stepped."""
        sched = copy.deepcopy(ctx.scheduler)
        timesteps = sched.timesteps
        # Flow-matching schedulers (FLUX, SD3) do not scale the model input: the latents go in as they are.
        scaled = hasattr(sched, "scale_model_input")
        # The run's first scaling call fixes its step index (index-based schedulers such as Euler): make it now, at
        # step 0, as the run itself would, so that the calls below cannot move it.
        if scaled:
            ctx.scheduler.scale_model_input(latents, timesteps[0])
        extra = {"generator": torch.Generator("cpu").manual_seed(0)} if "generator" in inspect.signature(sched.step).parameters else {}
        z, off = latents, Routing.none()
        for i in range(n):
            t = timesteps[i]
            # ctx.predict scales its input with the run's scheduler (still at step 0); give it the input this
            # phase's scheduler wants, divided by the run's scale, so that it reaches the UNet scaled for step i
            x = sched.scale_model_input(z, t) / ctx.scheduler.scale_model_input(torch.ones_like(z), t) if scaled else z
            here = Step(i, step.count, t)
            if i == n - 1:
                self._capture(ctx, x, here, off, i)  # masks in place from the run's step 0
                return
            u, c = ctx.predict(torch.cat([x, x]), here, self.cond, off).chunk(2)
            z = sched.step(classifier_free_guidance(u, c, ctx.guidance_scale), t, z, **extra, return_dict=False)[0]

    # --- step ------------------------------------------------------------------------------------------------------
    def denoise(self, ctx: DenoiseContext, latents: torch.Tensor, step: Step) -> torch.Tensor:
        if latents.shape[0] != 1:
            raise MethodError("tokenroute generates one image per call (latents with batch size 1): its masks are per image")
        rows = torch.cat([latents, latents])
        if self.tokens is not None and not self.masked:
            n = self.collect_steps(step.count)
            if self.params.restart and step.index == 0:
                self._collect_first(ctx, latents, step, n)
            elif not self.params.restart and step.index == n - 1:
                u, c = ctx.predict(rows, step, self.cond, self.routing).chunk(2)  # this step: still unmasked
                self._capture(ctx, latents, step, self.routing, step.index)  # from the next step on
                return classifier_free_guidance(u, c, ctx.guidance_scale)
        u, c = ctx.predict(rows, step, self.cond, self.routing).chunk(2)
        return classifier_free_guidance(u, c, ctx.guidance_scale)


# --- subject words ---------------------------------------------------------------------------------------------
def _words(entry) -> list[str]:
    items = entry.split(",") if isinstance(entry, str) else list(entry or [])
    if not all(isinstance(w, str) for w in items):
        raise MethodError(f"tokenroute: concept words must be a comma-separated string or a list of words, got {entry!r}")
    return [w.strip() for w in items if w.strip()]


def subject_positions(ctx, prompt: str, subjects: Sequence, concepts: Mapping) -> dict[str, list[int]]:
    """{subject LoRA: token positions (BOS = 0) of its words in `prompt`}; the words are `concepts[name]`, default
    the LoRA's trigger words. A position two subjects both claim (a shared word) is dropped from both; a subject
    left with no position is an error naming the fix."""
    names = [l.name for l in subjects]
    unknown = sorted(set(concepts) - set(names))
    if unknown:
        raise MethodError(f"tokenroute: concepts name LoRA(s) {unknown} that are not subject LoRAs of this run; subjects: {names}")
    found = {}
    for l in subjects:
        words = _words(concepts[l.name]) if l.name in concepts else _words(l.lora.triggers)
        if not words:
            raise MethodError(f"tokenroute: subject LoRA {l.name!r} has no trigger words; name its words with "
                              f"concepts={{{l.name!r}: '...'}} or make it global with roles={{{l.name!r}: 'global'}}")
        found[l.name] = (words, {i for hits in ctx.token_indices(prompt, words) for i in hits})
    out = {}
    for name, (words, pos) in found.items():
        shared = {i for other, (_, o) in found.items() if other != name for i in o}
        mine = sorted(pos - shared)
        if not mine:
            why = "they are not in the prompt" if not pos else "every one of them is shared with another subject LoRA"
            raise MethodError(f"tokenroute: no token of {words!r} (words of subject LoRA {name!r}) is usable: {why} "
                              f"({prompt!r}); put them in the prompt or name other words with concepts={{{name!r}: '...'}}")
        out[name] = mine
    return out
