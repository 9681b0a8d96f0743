"""CLoRA: contrastive attention-map guidance and attention masks for composing concept LoRAs (Meral, Simsar,
Tombari, Yanardag, ICCV 2025, arXiv 2403.19776). Spec: docs/methods/clora.md.

Branches share one latent: the base prompt without concept LoRAs, and one branch per concept LoRA (its prompt,
its LoRA in UNet and text encoder). On the early steps the latent takes gradient steps on an InfoNCE loss that
pulls each concept's cross-attention maps together across branches and pushes different concepts apart; at every
step each branch's noise prediction is kept where its concept's attention is strong (the base branch fills the
rest). All branches (each a CFG pair) run in one batched UNet call. The loss's labels are token lists per branch
(`concept_positions`): a trigger word two LoRAs share (the reference notebook's 'sks') is labelled by the concept
whose LoRA the branch runs, as the reference's per-branch index lists do.

FLUX.1 and SD 3/3.5: both parts carry over. The maps are the joint attention's image->text block (image queries
against the text keys, softmax over the text keys, averaged over heads and every double-stream / joint block;
`pipelines.joint_attention`), differentiable with respect to the latents as the UNet's are, so the InfoNCE latent
update and the masks work unchanged on the image token grid (FLUX: the latent in 2x2 patches), and the masked fusion
of the branches' predictions is elementwise on the latent, whatever the prediction means (noise on SD, a flow
velocity here). The words are looked up among the tokens the transformer attends to (FLUX: T5's; SD3: CLIP's 77,
then T5's). The gradient passes through the transformer, which costs its activations' memory on the update steps;
`step_size` (20) was tuned by CLoRA on SD's noise-prediction latents and is not re-tuned for flow models. FLUX.1 has
no negative branch (null rows, not computed), so `reference_mode`, which averages the maps of both CFG halves, is
refused there. "UNet" below reads "transformer" there.

Where we differ from the reference code (`reference_mode=True` restores it):
- Fusion uses the noise predictions of the *updated* latents (one extra no-grad pass on the update steps). The
  reference fuses the predictions of the forward pass made before its last latent update, i.e. of latents that
  are no longer the ones the scheduler steps from (docs/methods/clora.md#latent-update).
- Maps come from the conditional rows only. The reference averages both CFG halves at the concept token
  positions, but in the negative prompt those positions hold unrelated tokens (docs/methods/clora.md#attention-maps).
- The gradient pass runs the conditional rows only and stops the UNet after the last captured layer (nothing
  later influences the loss); the reference runs every row through the whole UNet with grad.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..attention_masks import branch_masks, fuse_predictions, info_nce_loss, masks_to_image, token_embeddings
from ..conditioning import Conditioning
from ..errors import MethodError
from ..files import WritePolicy, write_file
from ..routing import Routing
from .base import DenoiseContext, Method, Step, param, register
from .guidance import classifier_free_guidance


@dataclass
class CLoRAParams:
    lora_scale: float = param(1.0, "Weight of each concept LoRA in its branch (CLoRA: 1.0); each LoRA's own weight "
                                   "multiplies it.")
    concepts: list = param([], "Per concept LoRA, in the order the LoRAs are given, the tokens naming its concept: "
                               "words, comma-separated (e.g. 'sks, dog'), looked up in every branch's prompt — a word "
                               "that several concepts name (a shared trigger such as 'sks') counts only in the branch "
                               "of the LoRA whose prompt it is in; or per branch, {branch: words or token positions} "
                               "with branch 'base' or a concept LoRA's name and positions counted from BOS = 0 (e.g. "
                               "{base: [2], cat: [2, 3], dog: [2]}): only the branches named. Default: the LoRA's "
                               "trigger words.")
    base_prompt: str = param("", "Prompt of the base branch (no concept LoRA), e.g. 'a cat and a dog'. "
                                 "Default: the run's prompt.")
    prompts: list = param([], "One prompt per concept LoRA for its branch, e.g. 'a sks dog and a cat'. "
                              "Default: the run's prompt for every branch.")
    global_categories: list = param(["style"], "LoRAs of these categories get no branch or mask: they apply to every "
                                               "branch at style_scale (CLoRA's style LoRA).")
    style_scale: float = param(1.0, "Weight of the global (style) LoRAs in every branch (code: 1.0; notebook: 0.8).")
    temperature: float = param(0.5, "InfoNCE temperature (CLoRA: 0.5).", min=0.0)
    step_size: float = param(20.0, "Latent gradient step size, constant over steps (CLoRA code: 20).")
    update_fraction: float = param(0.5, "Share of the steps, from the first, that update the latents (paper: until "
                                        "step 25 of 50; code default 30 of 50).", min=0.0, max=1.0)
    refine_at: list = param([0.0, 0.2, 0.4], "Where (share of the run) extra refinement iterations run (paper: steps "
                                             "0, 10, 20 of 50).")
    refine_iterations: int = param(20, "Extra gradient iterations at each refinement step (CLoRA: 20).", min=0)
    mask_threshold: float = param(0.3, "A map cell joins a LoRA's mask where one of its concept tokens' maps exceeds "
                                       "this share of that map's maximum (code: 0.3; notebook: 0.4).", min=0.0, max=1.0)
    mask_morphology: str = param("none", "3x3 clean-up of each mask (off in CLoRA).",
                                 choices=["none", "erode", "dilate", "open", "close"])
    attention_resolution: int = param(0, "Cells across of the attention maps; 0: CLoRA's rule, W/32 for an 8x VAE "
                                         "(SD 1.x 512² -> 16, SDXL 1024² -> 32), at least 8 (toy world -> 8).", min=0)
    mask_dir: str = param("", "Folder to save each step's masks as PNG strips (base branch first, then each concept "
                              "LoRA; white = the branch acts there). Empty: not saved.", path="dir", writes=True)
    reference_mode: bool = param(False, "Reproduce the reference code: maps averaged over both CFG halves, a grad "
                                        "forward over every row, and fusion of the predictions made before the last "
                                        "latent update (stale).")


@dataclass
class _Branch:
    name: str | None  # concept LoRA (None: base)
    prompt: str
    gates: dict


@register
class CLoRA(Method):
    name = "clora"
    Params = CLoRAParams
    description = "Concept LoRAs in separate branches, kept apart by contrastive attention guidance and attention masks."

    # --- setup -----------------------------------------------------------------------------------------------
    def prepare(self, ctx: DenoiseContext) -> None:
        p = self.params
        prompt = getattr(ctx, "prompt", "")
        globals_ = {l.name: l.weight * p.style_scale for l in ctx.loras if l.category in p.global_categories}
        concept_loras = [l for l in ctx.loras if l.name not in globals_]
        if p.prompts and len(p.prompts) != len(concept_loras):
            raise MethodError(f"clora: {len(p.prompts)} branch prompts for {len(concept_loras)} concept LoRAs "
                             f"({', '.join(l.name for l in concept_loras)})")
        if p.concepts and len(p.concepts) != len(concept_loras):
            raise MethodError(f"clora: {len(p.concepts)} concept entries for {len(concept_loras)} concept LoRAs "
                             f"({', '.join(l.name for l in concept_loras)})")
        self.branches = [_Branch(None, p.base_prompt or prompt, dict(globals_))]
        for i, l in enumerate(concept_loras):
            self.branches.append(_Branch(l.name, p.prompts[i] if p.prompts else prompt,
                                         {**globals_, l.name: l.weight * p.lora_scale}))
        # positions[j][g]: token positions labelled concept g in branch j's prompt
        self.positions = concept_positions(ctx, self.branches, concept_loras, p.concepts or None)
        # tokens captured per branch: every concept position in that branch's prompt, padded with -1
        cols = [sorted({i for pos in self.positions[j] for i in pos}) for j in range(len(self.branches))]
        k = max([len(c) for c in cols] + [1])
        self.columns = cols
        branch_tokens = torch.full((len(self.branches), k), -1, dtype=torch.long)
        for j, c in enumerate(cols):
            branch_tokens[j, :len(c)] = torch.tensor(c, dtype=torch.long)
        self.branch_tokens = branch_tokens
        # (branch, column in that branch's captured maps, concept label) for the loss
        self.embedding_index = [(j, cols[j].index(i), g) for j in range(len(self.branches))
                                for g, pos in enumerate(self.positions[j]) for i in pos]
        self.loss_defined = len(concept_loras) >= 2

        conds = ctx.encode([b.gates for b in self.branches], [b.prompt for b in self.branches])
        length = conds[0][1].hidden.shape[1]
        for j, b in enumerate(self.branches):
            late = [i for pos in self.positions[j] for i in pos if i >= length]
            if late:
                raise MethodError(f"clora: token position(s) {sorted(set(late))} of branch {b.name or 'base'!r} are past the "
                                 f"text encoder's {length} tokens")
        neg = conds[0][0]
        if p.reference_mode and neg.null is not None and bool(neg.null.any()):
            raise MethodError("clora: reference_mode averages the attention maps of both CFG halves, but this model has "
                              "no negative branch (FLUX.1: guidance is a model input, the negative rows are null). Fix: "
                              "leave reference_mode off (maps from the conditional rows).")
        self.cond_all = Conditioning.cat([part for pair in conds for part in pair])  # [neg_0, pos_0, neg_1, pos_1, ...]
        self.cond_pos = Conditioning.cat([pair[1] for pair in conds])
        self.routing_all = Routing.from_blocks([(2, b.gates) for b in self.branches])
        self.routing_pos = Routing.from_blocks([(1, b.gates) for b in self.branches])
        self.extras = {"branches": [b.name or "base" for b in self.branches], "concept_positions": {
            l.name: {b.name or "base": self.positions[j][g] for j, b in enumerate(self.branches)}
            for g, l in enumerate(concept_loras)}, "masks": [], "loss": []}
        self.mask_dir = ctx.write_policy.resolve(p.mask_dir, "clora.mask_dir") if p.mask_dir else None

    # --- schedule ----------------------------------------------------------------------------------------------
    def iterations(self, step: Step) -> int:
        """Gradient iterations at this step: 0 after the update phase, else 1 (+ refinement iterations)."""
        p = self.params
        if not self.loss_defined or step.index >= round(p.update_fraction * step.count):
            return 0
        refine = {int(round(f * step.count)) for f in p.refine_at}
        return 1 + (p.refine_iterations if step.index in refine else 0)

    # --- pieces ------------------------------------------------------------------------------------------------
    def _tokens(self, both_halves: bool, pos_only: bool) -> torch.Tensor:
        if pos_only:
            return self.branch_tokens
        none = torch.full_like(self.branch_tokens, -1)
        neg = self.branch_tokens if both_halves else none
        return torch.stack([neg, self.branch_tokens], 1).flatten(0, 1)  # rows [neg_0, pos_0, neg_1, ...]

    def branch_maps(self, maps: torch.Tensor, pos_only: bool) -> torch.Tensor:
        """(N+1, h, w, K) per-branch maps from the captured rows (conditional row, or mean of both halves)."""
        if pos_only:
            return maps
        pairs = maps.reshape(len(self.branches), 2, *maps.shape[1:])
        return pairs.mean(1) if self.params.reference_mode else pairs[:, 1]

    def loss(self, maps: torch.Tensor) -> torch.Tensor:
        """InfoNCE over every concept token map of every branch, labelled by concept (docs/methods/clora.md#contrastive-loss)."""
        picked = torch.stack([maps[j, :, :, c] for j, c, _ in self.embedding_index])
        return info_nce_loss(token_embeddings(picked), [g for _, _, g in self.embedding_index], self.params.temperature)

    def masks(self, maps: torch.Tensor) -> torch.Tensor:
        """(N+1, h, w) bool masks: concept j where its own words attend (docs/methods/clora.md#masks), the base branch elsewhere."""
        per_branch = []
        for j in range(len(self.branches)):
            cols = [self.columns[j].index(i) for i in (self.positions[j][j - 1] if j else [])]
            per_branch.append(maps[j][..., cols])
        return branch_masks(per_branch, self.params.mask_threshold, self.params.mask_morphology)

    def _update(self, ctx, z, step, n):
        """n gradient steps on the latents. Returns (z, last (eps, maps) of the reference's grad forward or None)."""
        p = self.params
        side = p.attention_resolution or None
        stale = None
        for _ in range(n):
            with torch.enable_grad():
                z = z.detach().requires_grad_(True)
                if p.reference_mode:  # every row, whole UNet, with grad (as the reference)
                    rows = z.repeat(2 * len(self.branches), 1, 1, 1)
                    eps, maps = ctx.predict_with_attention(rows, step, self.cond_all, self.routing_all,
                                                           self._tokens(True, False), side, output=True)
                    maps_b = self.branch_maps(maps, pos_only=False)
                else:
                    rows = z.repeat(len(self.branches), 1, 1, 1)
                    eps, maps = ctx.predict_with_attention(rows, step, self.cond_pos, self.routing_pos,
                                                           self._tokens(False, True), side, output=False)
                    maps_b = maps
                loss = self.loss(maps_b)
                grad = torch.autograd.grad(loss, z)[0]
            self.extras["loss"].append((step.index, float(loss.detach())))
            if p.reference_mode:
                stale = (eps.detach(), maps_b.detach())
            z = (z - p.step_size * grad).detach()
        return z, stale

    # --- step -------------------------------------------------------------------------------------------------
    def denoise(self, ctx: DenoiseContext, latents: torch.Tensor, step: Step) -> torch.Tensor:
        if latents.shape[0] != 1:
            raise MethodError("clora generates one image per call (latents with batch size 1)")
        p = self.params
        n = self.iterations(step)
        stale = None
        if n:
            latents, stale = self._update(ctx, latents, step, n)
            ctx.set_latents(latents)
        if stale is not None:
            eps, maps = stale  # reference: predictions of the latents before the last update
        else:
            rows = latents.repeat(2 * len(self.branches), 1, 1, 1)
            eps, maps = ctx.predict_with_attention(rows, step, self.cond_all, self.routing_all,
                                                   self._tokens(p.reference_mode, False), p.attention_resolution or None)
            maps = self.branch_maps(maps, pos_only=False)
        masks = self.masks(maps)
        self.extras["masks"].append(masks.cpu())
        if self.mask_dir is not None:
            save_masks(masks_to_image(masks), self.mask_dir / f"clora_masks_step{step.index:03d}.png", step.index, ctx.write_policy)
        eps = eps.reshape(len(self.branches), 2, *latents.shape)
        return classifier_free_guidance(fuse_predictions(eps[:, 0], masks), fuse_predictions(eps[:, 1], masks),
                                        ctx.guidance_scale)


# --- concept tokens per branch --------------------------------------------------------------------------------
def _words(entry) -> list[str]:
    """Words of one entry: a comma-separated string or a list of words."""
    items = entry.split(",") if isinstance(entry, str) else entry
    if not isinstance(items, Sequence) or not all(isinstance(w, str) for w in items):
        raise MethodError(f"clora: concept words must be a comma-separated string or a list of words, got {entry!r}")
    return [w.strip() for w in items if w.strip()]


def _branch_entry(ctx, prompt: str, entry, where: str) -> list[int]:
    """Token positions of one per-branch entry: words (looked up in `prompt`) or positions (ints, BOS = 0)."""
    if isinstance(entry, Sequence) and not isinstance(entry, str) and entry and all(
            isinstance(i, int) and not isinstance(i, bool) for i in entry):
        if min(entry) < 1:
            raise MethodError(f"clora: {where}: token positions count from BOS = 0, so the prompt's first token is 1; "
                             f"got {list(entry)}")
        return sorted(set(entry))
    words = _words(entry)
    return sorted({i for hits in ctx.token_indices(prompt, words) for i in hits})


def concept_positions(ctx, branches: Sequence, concept_loras: Sequence, concepts: Sequence | None) -> list[list[list[int]]]:
    """positions[j][g]: the token positions labelled concept g in branch j's prompt (branch 0: base; branch g + 1:
    concept LoRA g); docs/methods/clora.md#contrastive-loss.

    Per concept, `concepts[g]` is words or {branch: words or positions} (see CLoRAParams.concepts); default the
    LoRA's trigger words. Words are looked up in every branch's prompt. A token that several concepts claim in one
    branch — a trigger word shared by two LoRAs, e.g. 'sks' — is labelled by the concept whose LoRA that branch runs
    ('sks' in the cat LoRA's branch 'a sks cat and a dog' is the cat), by nobody where that concept does not claim it
    (the base branch); tokens given per branch take precedence over words, and two concepts given the same token
    of one branch is an error."""
    names = ["base"] + [l.name for l in concept_loras]
    entries = []
    for g, l in enumerate(concept_loras):
        entry = concepts[g] if concepts else l.lora.triggers
        if isinstance(entry, Mapping):
            unknown = sorted(set(entry) - set(names))
            if unknown:
                raise MethodError(f"clora: concept of LoRA {l.name!r} names unknown branch(es) {unknown}; branches: {names}")
        elif not _words(entry):
            raise MethodError(f"clora: LoRA {l.name!r} has no trigger words; name its concept words with concepts=[...] "
                             f"(one entry per concept LoRA)")
        entries.append(entry)

    positions = []
    for j, b in enumerate(branches):
        row, given = [], []
        for g, entry in enumerate(entries):
            if isinstance(entry, Mapping):
                value = entry.get(names[j])
                where = f"concept of LoRA {concept_loras[g].name!r}, branch {names[j]!r}"
                row.append(set() if value is None else set(_branch_entry(ctx, b.prompt, value, where)))
                given.append(value is not None)
            else:
                row.append(set(_branch_entry(ctx, b.prompt, entry, "")))
                given.append(False)
        for i in sorted(set().union(*row)):
            claims = [g for g, pos in enumerate(row) if i in pos]
            if len(claims) < 2:
                continue
            explicit = [g for g in claims if given[g]]
            if len(explicit) > 1:
                raise MethodError(f"clora: token position {i} of branch {names[j]!r} ({b.prompt!r}) is given to both "
                                 f"{concept_loras[explicit[0]].name!r} and {concept_loras[explicit[1]].name!r}")
            keep = explicit[0] if explicit else (j - 1 if j - 1 in claims else None)
            for g in claims:
                if g != keep:
                    row[g].discard(i)
        positions.append([sorted(pos) for pos in row])
    for g, l in enumerate(concept_loras):
        if not positions[g + 1][g]:
            raise MethodError(f"clora: none of {entries[g]!r} (concept words of LoRA {l.name!r}) is in its branch prompt "
                             f"{branches[g + 1].prompt!r} (or it is cut off at the text encoder's length); put them in "
                             f"the prompt or name other words with concepts=[...]")
    return positions


def save_masks(image, path: Path, step: int, policy: WritePolicy) -> Path:
    """One step's mask strip as a PNG (through the write policy), marked as loraloom's so a later run may replace it."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("loraloom", f"clora masks, step {step}")
    return write_file(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info), policy, what="clora.mask_dir file")
