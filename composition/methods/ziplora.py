"""ZipLoRA: per-column merge coefficients of a subject and a style LoRA, optimised per pair (Shah et al., ECCV 2024,
arXiv 2311.13600; docs/methods/ziplora.md), then one merged LoRA run like Merge.

dW_m = m_c (x) dW_c + m_s (x) dW_s (column j scaled by m[j]), m initialised to ones (= direct merge) and trained
with the ZipLoRA objective (`composition.merge_objective`): each LoRA's own prediction on its own prompt at noised
reference latents, plus lambda * sum_layers |cos(m_c, m_s)|. The merged update is exactly a rank-(r_c + r_s) LoRA
(`composition.merging`), added for the generation and fused into the weights.

Reference images: ZipLoRA uses the images each LoRA was trained on. loraloom has no training images, so it
generates them with each LoRA alone on its own prompt (`reference_images` per LoRA, `reference_steps` steps) —
a stand-in, said here and in the docs.

Choices where sources differ (docs/methods/ziplora.md#objective): the similarity is |cos(m_c, m_s)| (what the paper names and LoRA.rar
computes; the paper's formula prints a dot product, mkshing's code uses mean |m_c * m_s|: `similarity`);
lr 0.01 (LoRA.rar's ZipLoRA script; mkshing's README 5e-5 barely moves ones in 100 steps); 100 steps; lambda 0.01.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import LoraloomError
from ..grad import frozen
from ..lora import LoRA
from ..merge_objective import PairBatchData, TrainableMerge, objective, own_prompt
from ..merging import (
    Coefficients,
    is_attention_projection,
    load_coefficients,
    lora_fingerprint,
    merged_lora,
    plain_lora,
    save_coefficients,
    save_lora_file,
    subject_and_style,
)
from ..routing import Routing
from .base import ActiveLoRA, DenoiseContext, Method, Step, cfg_pair, param, register
from .guidance import classifier_free_guidance

log = logging.getLogger(__name__)
# Sampler of the reference images: DPM-Solver++ (loraloom's default sampler) whatever the run's own is.
REFERENCE_SCHEDULER = "dpmsolver++"


class MergedLoRAMethod(Method):
    """Shared by ZipLoRA and the hypernetwork: build one merged LoRA in `prepare`, then run exactly like Merge
    (text encoder with the merged LoRA's text-encoder part, UNet weights fused for the run)."""

    supports_controls = False  # the merged LoRA replaces the pair: their schedules, masks, strengths have no place

    title = ""

    def build(self, ctx: DenoiseContext, subject: ActiveLoRA, style: ActiveLoRA) -> LoRA:
        raise NotImplementedError

    def prepare(self, ctx: DenoiseContext) -> None:
        p = self.params
        subject, style = subject_and_style(list(ctx.loras), p.roles, self.title)
        # Other adapter types as plain factors: exact for LoCon-Tucker and LoHa, an SVD at svd_rank for LoKr, DoRA,
        # OFT, BOFT and full diffs (refused when svd_rank is 0). Each LoRA's own prediction still uses its real adapters.
        (subject, rep_c), (style, rep_s) = (self._plain(a, p.svd_rank) for a in (subject, style))
        self.build_extras = {}
        if p.save_merged:  # refused before any work when the path may not be written
            ctx.write_policy.resolve(p.save_merged, f"{self.name}.save_merged")
        merged = self.build(ctx, subject, style)
        if p.save_merged:
            written = save_lora_file(merged, p.save_merged, ctx.write_policy)
            log.info("%s: merged LoRA written to %s", self.name, written)
        ctx.add_lora(merged)
        gates = {merged.name: p.lora_scale}
        self.cond = cfg_pair(ctx.encode([gates])[0])
        if p.fuse:
            ctx.enter(ctx.unet_router.fused(gates))
            self.routing = Routing.none()
        else:
            self.routing = Routing.uniform(gates)
        self.extras = {self.name: {"subject": subject.name, "style": style.name, "merged": merged.name,
                                   **getattr(self, "build_extras", {})}}
        if rep_c["converted"] or rep_s["converted"]:
            self.extras[self.name]["plain_factors"] = {subject.name: rep_c, style.name: rep_s}

    @staticmethod
    def _plain(active: ActiveLoRA, svd_rank: int) -> tuple[ActiveLoRA, dict]:
        lora, report = plain_lora(active.lora, svd_rank)
        if lora is active.lora:
            return active, report
        if report["svd"]:
            log.info("%s: %d layers merged as rank-%d SVDs of their ΔW (largest relative error %.3g)", active.name,
                     report["svd"], svd_rank, report["max_relative_error"])
        return ActiveLoRA(active.name, active.weight, lora, active.controls), report

    def denoise(self, ctx: DenoiseContext, latents: torch.Tensor, step: Step) -> torch.Tensor:
        eps_u, eps_c = ctx.predict(torch.cat([latents, latents]), step, self.cond, self.routing).chunk(2)
        return classifier_free_guidance(eps_u, eps_c, ctx.guidance_scale)


def merge_layers(subject: LoRA, style: LoRA, component: str, scope: str) -> list[str]:
    """Linear layers both LoRAs adapt in `component`, restricted to attention projections for scope='attention'."""
    c, s = subject.layers.get(component, {}), style.layers.get(component, {})
    return [p for p in c if p in s and not c[p].is_conv and not s[p].is_conv and (scope == "all" or is_attention_projection(p))]


def reference_latents(ctx: DenoiseContext, lora: ActiveLoRA, prompt: str, n: int, steps: int, seed: int,
                      scheduler: str | None = REFERENCE_SCHEDULER) -> torch.Tensor:
    """n images generated with this LoRA alone on its own prompt, as latents (the stand-in for training images)."""
    gates = {lora.name: lora.weight}
    return torch.cat([ctx.sample(prompt, gates, seed=seed + i, num_inference_steps=steps, scheduler=scheduler,
                                 output_type="latent") for i in range(n)])


def pair_data(ctx: DenoiseContext, subject: ActiveLoRA, style: ActiveLoRA, p_c: str, p_s: str,
              x_c: torch.Tensor, x_s: torch.Tensor) -> PairBatchData:
    both = {subject.name: subject.weight, style.name: style.weight}
    with torch.no_grad():  # the prompts are fixed inputs of the objective
        conds = ctx.encode([{subject.name: subject.weight}, {style.name: style.weight}, both, both], [p_c, p_s, p_c, p_s])
    pos = [c[1] for c in conds]
    return PairBatchData(subject.name, style.name, subject.weight, style.weight, x_c, x_s, *pos)


def optimise_coefficients(unet, router, merged: TrainableMerge, data: PairBatchData, scheduler, steps: int = 100,
                          lr: float = 0.01, lam: float = 0.01, similarity: str = "cosine", seed: int = 0,
                          progress: bool = True, desc: str = "ziplora") -> tuple[Coefficients, list[dict]]:
    """ZipLoRA's optimisation of per-column coefficients (init ones), AdamW on the coefficients only, grad-norm
    clip 1.0 (the DreamBooth-script defaults both codes inherit), one subject and one style reference per step."""
    device = data.x_c.device
    m = {p: (torch.ones(c.down.shape[1], device=device, requires_grad=True),
             torch.ones(s.down.shape[1], device=device, requires_grad=True)) for p, (c, s) in merged.sources.items()}
    params = [t for pair in m.values() for t in pair]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    g = torch.Generator(device="cpu").manual_seed(seed)
    history = []
    with frozen(unet), torch.enable_grad():
        bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
        for i in bar:
            parts = objective(unet, router, merged, data, m, scheduler, g, lam, similarity, index=(i, i))
            opt.zero_grad(set_to_none=True)
            parts["loss"].backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            history.append({k: float(v.detach()) for k, v in parts.items()})
            bar.set_postfix(loss=f"{history[-1]['loss']:.4g}", sim=f"{history[-1]['similarity']:.3g}")
    return {p: (a.detach(), b.detach()) for p, (a, b) in m.items()}, history


@dataclass
class MergedLoRAParams:
    """Parameters every merged-LoRA method shares (listed first)."""

    save_merged: str = param("", "Also write the merged LoRA to this .safetensors path (diffusers layout; loads in "
                                 "loraloom and diffusers' load_lora_weights).", path="file", writes=True)
    lora_scale: float = param(1.0, "Scale of the merged LoRA (the coefficients replace a merge scale; paper 1).")
    roles: str = param("category", "Which LoRA is the subject: 'category' (character/clothing/object vs "
                                    "style/background; given order when undecided) or 'given' (first = subject).",
                       choices=["category", "given"])
    fuse: bool = param(True, "Fuse the merged LoRA into the UNet weights for the run (restored bit-exactly after).")
    svd_rank: int = param(0, "LoKr, DoRA, OFT, BOFT and full-diff layers have no low-rank factors to merge column-wise: "
                             "0 refuses them; r > 0 merges the truncated rank-r SVD of their ΔW (an approximation; the "
                             "largest relative error is reported in the extras). LoRA, LoCon, Tucker LoCon and LoHa "
                             "merge exactly.", min=0)


@dataclass
class ZipLoRAParams(MergedLoRAParams):
    steps: int = param(100, "Optimisation steps of the merge coefficients (paper: <= 100).", min=0)
    lr: float = param(0.01, "Learning rate of the coefficients (LoRA.rar's ZipLoRA script: 0.01; mkshing's README "
                            "5e-5 barely moves them in 100 steps).")
    lam: float = param(0.01, "lambda, weight of the coefficient-similarity penalty (paper 0.01).")
    similarity: str = param("cosine", "Penalty per layer: 'cosine' = |cos(m_c, m_s)| (paper's name, LoRA.rar); 'dot' = "
                                      "|m_c . m_s| (paper's printed formula); 'mean_product' = mean |m_c * m_s| (mkshing).",
                            choices=["cosine", "dot", "mean_product"])
    scope: str = param("attention", "Layers with coefficients: 'attention' = to_q/to_k/to_v/to_out.0 (the ZipLoRA "
                                    "codes); 'all' = every Linear layer both LoRAs adapt. Other layers are summed.",
                       choices=["attention", "all"])
    reference_images: int = param(2, "Reference images per LoRA, generated with that LoRA alone on its own prompt "
                                     "(stand-ins for the LoRA's training images, which loraloom does not have).", min=1)
    reference_steps: int = param(25, "Denoising steps of each reference image.", min=1)
    subject_prompt: str = param("", "The subject LoRA's own prompt ({triggers} = its trigger words). Empty: the "
                                    "sidecar's 'prompt', else its trigger words, else the run's prompt.")
    style_prompt: str = param("", "The style LoRA's own prompt, as subject_prompt.")
    seed: int = param(0, "Seed of the reference images, noise and timesteps.")
    coefficients: str = param("", "Coefficient file (.safetensors): loaded if it exists and matches the pair, else "
                                  "written after optimising. Empty: optimise every generation, keep nothing.", path="file", writes=True)
    progress: bool = param(True, "Show a progress bar for the optimisation.")


@register
class ZipLoRA(MergedLoRAMethod):
    name = "ziplora"
    title = "ZipLoRA"
    Params = ZipLoRAParams
    description = "Subject and style merged column-wise with coefficients optimised per pair."

    def build(self, ctx: DenoiseContext, subject: ActiveLoRA, style: ActiveLoRA) -> LoRA:
        p = self.params
        pair_key = {"subject": subject.name, "style": style.name, "subject_sha256": lora_fingerprint(subject.lora),
                    "style_sha256": lora_fingerprint(style.lora), "w_c": repr(subject.weight), "w_s": repr(style.weight)}
        coefs = None
        if p.coefficients and not self.coefficient_file(ctx).exists():  # refused before the optimisation, not after
            ctx.write_policy.resolve(p.coefficients, f"{self.name}.coefficients")
        if p.coefficients and self.coefficient_file(ctx).exists():
            coefs, meta = load_coefficients(self.coefficient_file(ctx))
            stale = [k for k in ("subject_sha256", "style_sha256", "w_c", "w_s") if meta.get(k) != pair_key[k]]
            if stale:
                raise LoraloomError(f"{p.coefficients}: these coefficients were optimised for another pair or weights "
                                    f"({', '.join(stale)} differ). Fix: delete the file to optimise again, or pass another path.")
            self.build_extras = {"coefficients": p.coefficients, "optimised": False}
        elif p.steps == 0:  # the coefficients' initial value, ones: the direct merge
            coefs, self.build_extras = None, {"optimised": False}
        else:
            coefs, history = self.optimise(ctx, subject, style)
            coefs = {"unet": coefs}
            self.build_extras = {"optimised": True, "loss_first": history[0]["loss"] if history else None,
                                 "loss_last": history[-1]["loss"] if history else None, "history": history}
            if p.coefficients:
                save_coefficients(p.coefficients, coefs, {**pair_key, "steps": str(p.steps), "lr": str(p.lr), "lam": str(p.lam)},
                                  ctx.write_policy)
        return merged_lora(f"ziplora:{subject.name}+{style.name}", subject.lora, style.lora, coefs, subject.weight, style.weight,
                           description=f"ZipLoRA merge of {subject.name} (subject) and {style.name} (style)")

    def coefficient_file(self, ctx: DenoiseContext) -> Path:
        """Where `coefficients` points: an absolute path as given, a relative one in the run's output folder."""
        path = Path(self.params.coefficients).expanduser()
        return path if path.is_absolute() else ctx.write_policy.root / path

    def optimise(self, ctx: DenoiseContext, subject: ActiveLoRA, style: ActiveLoRA):
        p = self.params
        router = ctx.unet_router
        unet = router.model
        p_c = own_prompt(subject.lora, p.subject_prompt, ctx.prompt)
        p_s = own_prompt(style.lora, p.style_prompt, ctx.prompt)
        x_c = reference_latents(ctx, subject, p_c, p.reference_images, p.reference_steps, p.seed)
        x_s = reference_latents(ctx, style, p_s, p.reference_images, p.reference_steps, p.seed + 1000)
        data = pair_data(ctx, subject, style, p_c, p_s, x_c, x_s)
        paths = merge_layers(subject.lora, style.lora, "unet", p.scope)
        if not paths:
            raise LoraloomError(f"ZipLoRA: {subject.name} and {style.name} share no Linear layer to merge column-wise.")
        with TrainableMerge(router, f"ziplora-train:{subject.name}+{style.name}", subject.lora, style.lora, paths,
                            subject.weight, style.weight) as merged:
            return optimise_coefficients(unet, router, merged, data, ctx.training_scheduler(), p.steps, p.lr,
                                         p.lam, p.similarity, p.seed, p.progress)
