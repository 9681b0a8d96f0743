"""CMLoRA: Cached Multi-LoRA composition (Zou, Shen, Bouganis, Zhao, ICLR 2025, arXiv 2502.04923).
Spec: docs/methods/cmlora.md (and docs/methods/composlora.md#composite).

Composite-style collective guidance (every LoRA its own CFG branch, all batched) in which one *dominant* LoRA
weighs more, the dominant role rotating in an order measured in the frequency domain: LoRAs that add
high-frequency content (H) lead early, the others (L) join the rotation late. Non-dominant LoRAs reuse cached
work between refresh steps, on a non-uniform schedule (refresh every 2nd step on the first 37.5 % of the run, every
3rd step up to 87.5 %, every 2nd to the end).

Default (paper-intent) mode, per step:
  - refresh step (in R): the dominant LoRA rotates; every LoRA runs the full UNet and refreshes its cache
    (`refresh_policy="all"`, the default: the paper chose the 2/3/2 intervals from how long cached features stay
    similar, so no cache should be older than that). `refresh_policy="dominant"`: only the newly dominant LoRA
    refreshes, as the reference code invalidates exactly one cache per refresh (docs/methods/cmlora.md#reference-code)
    — cheaper, but the other caches age by up to |H| refresh intervals (15 steps at T = 20, k = 4);
  - other steps: the dominant LoRA runs the full UNet; the others run a DeepCache-style shallow pass on their own
    cached deep features (`cache_mode="features"`) or reuse their cached noise prediction (`cache_mode="noise"`);
  - eps = (1/k) sum_j w_j [eps_j(n) + s (eps_j(c) - eps_j(n))], w_dom = c_dom * w_non, weights summing to k, with
    c_dom = k - 0.5 at every step (as the reference code computes it). `dominant_decay=True` applies the code's
    dead decay rule, clamped at 1 — which makes the weights uniform from the 2nd refresh for k = 2 and the 3rd for
    k = 3 (docs/methods/cmlora.md#weights).
  - the late phase (L LoRAs join the rotation) starts after step floor(late_phase_start * T), an integer computed
    without floating-point error: step 120 at T = 220 is still early, as the reference's `i <= 120`.

FLUX.1 and SD 3/3.5: the feature cache is off. It is DeepCache (Ma et al., CVPR 2024), an approximation that
saves compute: a shallow pass on cached deep features stands in for the full UNet pass (equal to it when the
features are fresh), at the cut between the UNet's outermost level and everything deeper (`pipelines.unet_cache`).
A transformer's blocks all work at one resolution, with no such cut, so with `cache_mode="features"` every LoRA runs
the full transformer at every step: the computation the cache approximates. What makes CMLoRA's composition — the
frequency partition and order, the rotating dominant LoRA on the refresh schedule, the weights — is unchanged
(`extras["feature_cache"]` says so). `cache_mode="noise"` (reusing a LoRA's cached prediction between refreshes)
needs no cut and works as on the UNet.

`reference_mode=True` reproduces the reference code (`pipeline_offline.py`, docs/methods/cmlora.md#reference-code), bugs included: partition by
category (background = L), caching only for uniform intervals >= 2 (the non-uniform schedule and interval 1 never
use the cache), only the newly dominant LoRA recomputed at a refresh and the dominant LoRA shallow like the others
otherwise, fixed weights (the decay is dead code), the late-phase refresh a no-op (a slice-copy bug), one prompt
encoding with every LoRA in the text encoder. Its absolute "step 120" becomes the last early step floor(120/220 * T)
— exactly 120 at T = 220, where its schedule, dominant LoRA, full passes and weights equal the code's at every step
(tests/test_cmlora.py).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from ..conditioning import Conditioning
from ..errors import MethodError
from ..frequency import (
    ProfileCache,
    default_cache_path,
    high_frequency_score,
    lora_identity,
    model_fingerprint,
    partition_by_score,
    profile_key,
)
from ..routing import Routing
from .base import ActiveLoRA, DenoiseContext, Method, Step, param, register
from .guidance import category_rank, composite_guidance

LATE_PHASE_START = 120 / 220  # the reference's "step <= 120" of 220 steps, as a share of the run


# --- schedules (pure) ----------------------------------------------------------------------------------------------
def boundary_step(share: float, count: int) -> int:
    """The integer step at `share` of a run of `count` steps: floor(share * count), where a product within 1e-9 of an
    integer counts as that integer. 120/220 * 220 is 119.99999999999999 in floating point; this gives 120, the
    reference's step (docs/methods/cmlora.md#refresh-schedule)."""
    return math.floor(share * count + 1e-9)


def refresh_steps(count: int, cache_interval: int = 0, intervals=(2, 3, 2), boundaries=(0.375, 0.875)) -> list[int]:
    """Steps at which caches refresh and the dominant LoRA rotates (docs/methods/cmlora.md#refresh-schedule).

    cache_interval 0: non-uniform, every intervals[0]-th step on [0, b1), intervals[1]-th on [b1, b2),
    intervals[2]-th on [b2, T), with b = boundary_step(boundary, T) (T = 220: 0, 2, …, 80, 82, 85, …, 190, 192, …, 218,
    92 steps); 1: every step; c >= 2: every c-th step from 0.
    """
    if count < 1:
        return []
    if cache_interval == 1:
        return list(range(count))
    if cache_interval >= 2:
        return list(range(0, count, cache_interval))
    if cache_interval < 0:
        raise MethodError(f"cache_interval must be >= 0, got {cache_interval}")
    if len(intervals) != 3 or min(intervals) < 1 or len(boundaries) != 2 or not 0 <= boundaries[0] <= boundaries[1] <= 1:
        raise MethodError(f"need three intervals >= 1 and two boundaries 0 <= b1 <= b2 <= 1, got {intervals}, {boundaries}")
    b1, b2 = boundary_step(boundaries[0], count), boundary_step(boundaries[1], count)
    return sorted(set(range(0, b1, intervals[0])) | set(range(b1, b2, intervals[1])) | set(range(b2, count, intervals[2])))


def last_early_step(count: int, late_phase_start: float = LATE_PHASE_START) -> int:
    """The last step of the early phase: boundary_step(late_phase_start, T) (T = 220: 120, the reference's i <= 120)."""
    return boundary_step(late_phase_start, count)


def is_late(index: int, count: int, late_phase_start: float = LATE_PHASE_START) -> bool:
    """The late phase: step index > last_early_step(T) (the reference's i > 120 at T = 220), compared in integers."""
    return index > last_early_step(count, late_phase_start)


def dominant_ratio(k: int, refreshes_before: int, decay: bool) -> float:
    """c_dom = w_dom / w_non (docs/methods/cmlora.md#weights). Without `decay` (the default, and what the reference
    code computes): k - 0.5 throughout. With `decay`: the code's dead rule, minus 0.5^j at the j-th refresh (so
    k - 0.5 - 2(1 - 0.5^n) after n), clamped at 1 so the dominant LoRA never weighs less than the others (the literal
    rule goes below 1 for k <= 3 and negative for k = 2). The clamp makes the weights uniform — Composite's — from the
    2nd refresh at k = 2 and the 3rd at k = 3; at k = 4 c_dom tends to 1.5, at k = 5 to 2.5."""
    c = k - 0.5
    if decay:
        c = max(1.0, c - 2.0 * (1.0 - 0.5 ** max(refreshes_before, 0)))
    return c


def lora_weights(k: int, dominant: int, ratio: float) -> list[float]:
    """w_non = k / (c_dom + k - 1), w_dom = c_dom * w_non: k weights summing to k (docs/methods/cmlora.md#weights)."""
    w_non = k / (ratio + k - 1)
    return [ratio * w_non if j == dominant else w_non for j in range(k)]


@dataclass
class CMLoRAParams:
    lora_scale: float = param(1.0, "Global LoRA scale (CMLoRA code: 1.0; ComposLoRA: 0.8); each LoRA's own weight "
                                   "multiplies it.")
    cache_interval: int = param(0, "0: non-uniform caching (intervals below); 1: no caching (every LoRA runs the full "
                                   "UNet every step); c >= 2: refresh every c-th step.", min=0)
    intervals: list = param([2, 3, 2], "Refresh interval early / middle / late (CMLoRA: c1 = 2, c2 = 3, c1 = 2).")
    boundaries: list = param([0.375, 0.875], "Where the middle and late intervals start (share of the run; the code's "
                                             "T = 220 boundaries).")
    cache_mode: str = param("features", "What non-dominant LoRAs reuse between refreshes: 'features' (DeepCache-style "
                                         "shallow pass on cached deep features, as CMLoRA) or 'noise' (the cached noise "
                                         "prediction; no UNet work at all).", choices=["features", "noise"])
    order: str = param("frequency", "How LoRAs are split into H (lead early) and L (join late) and ordered: "
                                    "'frequency' (measured high-frequency score, cached per LoRA file), 'category' "
                                    "(the reference: background = L, set order), 'given' (all H, given order).",
                       choices=["frequency", "category", "given"])
    refresh_policy: str = param("all", "Who runs the full UNet at a refresh step: 'all' (default, the paper's reading: "
                                       "every LoRA refreshes its cache at every refresh step, so no cache is older than "
                                       "the 2/3/2-step interval chosen from feature similarity) or 'dominant' (only the "
                                       "newly dominant LoRA, as the reference code invalidates one cache per refresh: "
                                       "cheaper, but the other caches age by up to |H| refresh intervals).",
                                choices=["all", "dominant"])
    late_phase_start: float = param(LATE_PHASE_START, "Share of the run after which L LoRAs join the dominant "
                                                      "rotation: the last early step is floor(share x T) (the code's "
                                                      "step 120 of 220).", min=0.0, max=1.0)
    dominant_decay: bool = param(False, "Let the dominant weight decay by 0.5^j at the j-th refresh, clamped at the "
                                        "others' weight (the code's rule, which it never applies). Off by default: "
                                        "with the clamp the weights become uniform (Composite's) from the 2nd refresh "
                                        "for 2 LoRAs and the 3rd for 3.")
    high_frequency_h: float = param(0.2, "h: radii >= h * max radius count as high frequency (CMLoRA: 0.2).", min=0.0, max=0.99)
    profile_steps: int = param(20, "Steps of each profiling image (one per seed, each LoRA alone and the base model).", min=1)
    profile_seeds: list = param([0, 1], "Seeds of the profiling images.")
    profile_prompt: str = param("{triggers}", "Prompt of the profiling images; {triggers}: the LoRA's trigger words.")
    profile_cache: str = param("", "JSON file caching the scores (key: LoRA file sha256, model, settings). Empty: "
                                   "$LORALOOM_CACHE or ~/.cache/loraloom/frequency_profiles.json; 'off': no cache.", path="file", writes=True)
    reference_mode: bool = param(False, "Reproduce the reference code (pipeline_offline.py) with its bugs: category "
                                        "partition, no caching on the non-uniform schedule, fixed weights, no late "
                                        "refresh, one shared prompt encoding.")


@register
class CMLoRA(Method):
    name = "cmlora"
    Params = CMLoRAParams
    description = "Composite with a rotating dominant LoRA in frequency order and non-uniform caching."

    # --- setup -------------------------------------------------------------------------------------------------
    def prepare(self, ctx: DenoiseContext) -> None:
        p = self.params
        if p.reference_mode and p.order == "frequency":
            order = "category"
        else:
            order = p.order
        self.extras: dict = {}
        loras = list(ctx.loras)
        if order == "given":
            high, low = loras, []
        elif order == "category":
            ranked = sorted(loras, key=lambda l: category_rank(l.category))
            high = [l for l in ranked if l.category != "background"]
            low = [l for l in ranked if l.category == "background"]
        else:
            deltas = self.frequency_deltas(ctx, loras)
            h_names, l_names = partition_by_score(deltas)
            by_name = {l.name: l for l in loras}
            high, low = [by_name[n] for n in h_names], [by_name[n] for n in l_names]
            self.extras["frequency_delta"] = deltas
        self.order: list[ActiveLoRA] = high + low
        self.h = len(high)
        self.k = len(self.order)
        gates = [{l.name: l.weight * p.lora_scale} for l in self.order]
        if p.reference_mode:
            shared = ctx.encode([{k: v for g in gates for k, v in g.items()}])[0]
            self.conds = [shared] * self.k
        else:
            self.conds = ctx.encode(gates)
        self.gates = gates
        # No DeepCache cut in a transformer (module doc): cached features off, every LoRA runs the full model.
        self.features_off = p.cache_mode == "features" and not getattr(ctx, "feature_cache", True)
        self.cache: list[torch.Tensor | None] = [None] * self.k
        self.refresh: set[int] | None = None
        self.refreshes = 0  # paper: refreshes so far; reference: its `kcount`
        self.extras.update({"order": [l.name for l in self.order], "H": [l.name for l in high],
                            "L": [l.name for l in low], "dominant": [], "full_rows": 0, "cached_rows": 0})
        if self.features_off:
            self.extras["feature_cache"] = "off: the denoiser has no DeepCache cut (a transformer); every LoRA runs in full"

    def frequency_deltas(self, ctx: DenoiseContext, loras: list[ActiveLoRA]) -> dict[str, float]:
        """ΔH per LoRA: high-frequency score of images made with it alone minus the same without it (docs/methods/cmlora.md#frequency-profile)."""
        p = self.params
        started = time.perf_counter()
        cache = ProfileCache(None if p.profile_cache == "off" else (p.profile_cache or default_cache_path()), ctx.write_policy)
        model = model_fingerprint(ctx.unet_router.model)
        sched = ctx.scheduler
        common = {"h": p.high_frequency_h, "steps": p.profile_steps, "seeds": list(p.profile_seeds),
                  "size": [ctx.height, ctx.width], "guidance": ctx.guidance_scale, "negative": ctx.negative_prompt,
                  "scheduler": [type(sched).__name__, {k: v for k, v in dict(sched.config).items() if not k.startswith("_")}]}

        def score(subject: str, prompt: str, gates: dict) -> float:
            settings = {**common, "prompt": prompt, "gates": sorted(gates.values())}
            key = profile_key(subject, model, settings)
            hit = cache.get(key)
            if hit is not None:
                return float(hit["score"])
            values = [high_frequency_score(ctx.sample(prompt, gates, seed=s, num_inference_steps=p.profile_steps),
                                           p.high_frequency_h) for s in p.profile_seeds]
            value = sum(values) / len(values)
            cache.put(key, {"score": value, "per_seed": values, "subject": subject if subject == "base" else None,
                            "lora": next(iter(gates), None), "prompt": prompt})
            return value

        deltas = {}
        for l in loras:
            prompt = p.profile_prompt.format(triggers=", ".join(l.lora.triggers))
            deltas[l.name] = (score(lora_identity(l.lora), prompt, {l.name: l.weight * p.lora_scale})
                              - score("base", prompt, {}))
        self.extras["profile_seconds"] = time.perf_counter() - started
        return deltas

    # --- per step ----------------------------------------------------------------------------------------------
    def plan(self, step: Step) -> tuple[int, list[int], list[float]]:
        """(dominant index into self.order, LoRAs that run the full UNet now, weights) — updates the rotation state."""
        p = self.params
        if self.refresh is None:
            self.refresh = set(refresh_steps(step.count, p.cache_interval, tuple(p.intervals), tuple(p.boundaries)))
        i, k = step.index, self.k
        refresh = i in self.refresh
        late = is_late(i, step.count, p.late_phase_start)
        hh = self.h or k  # no H LoRA: every LoRA is in the rotation
        if p.reference_mode:
            early = self.h == k or not late  # "no background in the set or i <= 120"
            if refresh:
                if early:
                    self.cache[self.refreshes % hh] = None  # force a full pass for the LoRA becoming dominant
                # else: the code means cache[(kcount % h) + 1] = None but assigns into a slice copy: nothing happens
                self.refreshes += 1
            d = (self.refreshes - 1) % hh if early else (self.refreshes - 1) % hh + 1
            caching = p.cache_interval > 1  # the code's quick_replicate: never for 0 (non-uniform) or 1
            full = [j for j in range(k) if not caching or self.cache[j] is None]
            return d, full, lora_weights(k, d, dominant_ratio(k, 0, decay=False))
        if refresh:
            self.refreshes += 1
        pool = k if late else hh
        d = (self.refreshes - 1) % pool
        if p.cache_interval == 1 or (refresh and p.refresh_policy == "all"):
            full = list(range(k))
        else:
            full = [j for j in range(k) if j == d or self.cache[j] is None]
        return d, full, lora_weights(k, d, dominant_ratio(k, self.refreshes - 1, p.dominant_decay))

    def _rows(self, latents: torch.Tensor, which: list[int]) -> tuple[torch.Tensor, Conditioning, Routing]:
        rows = latents.repeat(2 * len(which), *([1] * (latents.ndim - 1)))
        b = latents.shape[0]
        cond = Conditioning.cat([part for j in which for part in self.conds[j]])
        return rows, cond, Routing.from_blocks([(2 * b, self.gates[j]) for j in which])

    def denoise(self, ctx: DenoiseContext, latents: torch.Tensor, step: Step) -> torch.Tensor:
        p = self.params
        d, full, weights = self.plan(step)
        cached = [j for j in range(self.k) if j not in full]
        b = latents.shape[0]
        eps: list[torch.Tensor | None] = [None] * self.k
        uses_cache = ((p.cache_interval > 1) if p.reference_mode else (p.cache_interval != 1)) and not self.features_off
        if full:
            rows, cond, routing = self._rows(latents, full)
            if uses_cache and p.cache_mode == "features":
                out, feats = ctx.predict_features(rows, step, cond, routing)
                for n, j in enumerate(full):
                    self.cache[j] = feats[2 * b * n:2 * b * (n + 1)]
            else:
                out = ctx.predict(rows, step, cond, routing)
                if uses_cache:
                    for n, j in enumerate(full):
                        self.cache[j] = out[2 * b * n:2 * b * (n + 1)]
            for n, j in enumerate(full):
                eps[j] = out[2 * b * n:2 * b * (n + 1)]
        if cached:
            if p.cache_mode == "features":
                rows, cond, routing = self._rows(latents, cached)
                out, _ = ctx.predict_features(rows, step, cond, routing, torch.cat([self.cache[j] for j in cached]))
                for n, j in enumerate(cached):
                    eps[j] = out[2 * b * n:2 * b * (n + 1)]
            else:
                for j in cached:
                    eps[j] = self.cache[j]
        self.extras["dominant"].append(self.order[d].name)
        self.extras["full_rows"] += 2 * b * len(full)
        self.extras["cached_rows"] += 2 * b * len(cached)
        stacked = torch.stack(eps).reshape(self.k, 2, b, *latents.shape[1:])
        return composite_guidance(stacked[:, 0], stacked[:, 1], ctx.guidance_scale, weights)
