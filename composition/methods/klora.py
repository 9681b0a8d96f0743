"""K-LoRA: per attention projection, the subject or the style LoRA, chosen by Top-K sums of their deltas
(Ouyang, Li, Hou, CVPR 2025, arXiv 2502.18461; docs/methods/klora.md).

For every projection l (to_q, to_k, to_v, to_out.0 of self- and cross-attention) the layer uses the subject
delta at step tau iff  S_c,l >= gamma * S_s,l * s(tau)  (eq. 6/10), where S = sum of the K = r_c * r_s largest
|elements| of the delta (eq. 5), gamma balances the two LoRAs (eq. 9) and s(tau) rises with tau (eq. 7), so
content wins early and style late. S and gamma depend only on the weights: they are computed once in `prepare`
(each layer's delta is materialised, reduced to two numbers and dropped), which gives each layer its switch
time(s); per step the gates are read from that table and passed to the routing layer (no Top-K at run time).

Where the reference code (HVision-NKU/K-LoRA) differs, we follow the paper and fix its bugs:
- tau = step index / step count from the pipeline, not a module-global forward counter that is only right for
  exactly 50 steps with 560 wrapped layers and never resets between images (docs/methods/klora.md#step-clock);
- the selected delta is applied at alpha/rank (times the LoRA scale and the user's weight), as every method applies
  a LoRA; the reference's forward applies the chosen B A unscaled, i.e. at scale 1 whatever the file's alpha — 8x
  too strong for a rank-8, alpha-1 LoRA (docs/methods/klora.md#reference-code). That is its real scaling bug;
- the Top-K sums and gamma are also taken of the alpha/rank-scaled deltas (the reference: of B A). With one
  alpha/rank for all of a file's layers (the usual case) this changes no decision: gamma scales exactly as
  S_c / S_s, so the factor cancels in S_c >= gamma S_s s(tau). It matters only where alpha/rank varies between one
  file's layers (per-layer alphas or ranks);
- gamma is taken over every module both files adapt (UNet layers of every type and text-encoder layers), as the
  reference's get_ratio_between_content_and_style, which reads every key pair of the two files
  (`gamma_layers="file"`; `"selected"`: only the layers K-LoRA selects in); layers are paired by module path, not by
  the key order of the two files (docs/methods/klora.md#gamma);
- gamma defaults to the paper's ratio of global sums (eq. 9); the code's trimmed mean of per-layer ratios is
  `gamma="code"`. The time pattern defaults to the paper's s(tau) = 1.5 tau + 0.5 (eq. 7, its main results; the
  code's default is s*, `time_pattern="s*"`). Algorithm 1's `alpha + beta * t/T` swaps alpha and beta; eq. 7
  and the code agree, and we follow them.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..errors import LoraloomError, MethodError
from ..lora import LoRALayer
from ..merging import group_by_role, is_attention_projection, subject_and_style
from ..routing import Routing
from .base import DenoiseContext, Method, Step, cfg_pair, param, register
from .guidance import classifier_free_guidance


# --- the math (pure functions) -----------------------------------------------------------------------------
def topk_abs_sum(delta: torch.Tensor, k: int) -> float:
    """S = sum of the k largest |elements| of a delta (K-LoRA eq. 5).

    Exact, and ~10x faster than one topk over every element: the k-th largest row maximum is a lower bound of
    the k-th largest element (k rows each hold an element at least that large), so every top-k element lies in
    a row whose maximum reaches that bound; only those rows compete.
    """
    a = delta.abs().reshape(delta.shape[0], -1)
    k = min(int(k), a.numel())
    if k < a.shape[0]:
        row_max = a.amax(1)
        a = a[row_max >= torch.topk(row_max, k).values[-1]]
    return float(torch.topk(a.flatten(), k).values.sum())


def time_scale(tau: float, pattern: str = "s", alpha: float = 1.5, beta: float = 0.5,
               alpha_star: float = 1.5, beta_star: float = 1.3) -> float:
    """s(tau) = alpha tau + beta (eq. 7), or s*(tau) = (alpha' tau + beta') mod alpha (supp. D, eq. 12)."""
    if pattern == "s":
        return alpha * tau + beta
    if pattern == "s*":
        return math.fmod(alpha_star * tau + beta_star, alpha)
    raise MethodError(f"unknown time pattern {pattern!r}; use 's' or 's*'")


def time_pieces(pattern: str = "s", alpha: float = 1.5, beta: float = 0.5, alpha_star: float = 1.5,
                beta_star: float = 1.3) -> tuple[list[tuple[float, float]], int]:
    """The time scale as increasing linear pieces: ([(slope, intercept) per piece], index of the first piece).

    Piece k holds where floor((alpha' tau + beta') / alpha) = k (s*), s(tau) = alpha' tau + beta' - k alpha there;
    pattern s is one piece. `piece_index` finds a step's piece with the same arithmetic as `time_scale`.
    """
    if pattern == "s":
        if alpha < 0:
            raise MethodError("the time scale must not decrease (alpha >= 0)")
        return [(alpha, beta)], 0
    if pattern == "s*":
        if alpha <= 0 or alpha_star < 0:
            raise MethodError("s* needs alpha > 0 (the modulus) and alpha' >= 0")
        first = math.floor(beta_star / alpha)
        last = math.floor((alpha_star + beta_star) / alpha)
        return [(alpha_star, beta_star - k * alpha) for k in range(first, last + 1)], first
    raise MethodError(f"unknown time pattern {pattern!r}; use 's' or 's*'")


def piece_index(tau: float, pattern: str, alpha: float, alpha_star: float, beta_star: float, first: int) -> int:
    if pattern == "s":
        return 0
    return math.floor((alpha_star * tau + beta_star) / alpha) - first


def balance_factor(l1_subject: Sequence[float], l1_style: Sequence[float], mode: str = "paper") -> float:
    """gamma: 'paper' = sum_l |dW_c,l|_1 / sum_l |dW_s,l|_1 (eq. 9); 'code' = trimmed mean of the per-layer ratios
    (layers with ratio >= 3x the mean dropped, then re-averaged: `get_ratio_between_content_and_style`)."""
    c = torch.tensor(l1_subject, dtype=torch.float64)
    s = torch.tensor(l1_style, dtype=torch.float64)
    if mode == "paper":
        return float(c.sum() / s.sum())
    if mode == "code":
        ratios = c / s
        mean = ratios.mean()
        kept = ratios[ratios < 3 * mean]
        return float(kept.mean() if kept.numel() else mean)
    raise MethodError(f"unknown gamma mode {mode!r}; use 'paper' or 'code'")


@dataclass
class KLoRATable:
    """Per covered layer: rho = S_c / (gamma S_s) and its switch time in each piece of the time scale.

    The subject is used at tau iff rho >= s(tau), i.e. iff tau <= switch_times[layer, piece(tau)]
    (pattern s: one switch time per layer, (rho - beta) / alpha; content before it, style after).
    """

    paths: list[str]
    rho: torch.Tensor  # (L,) float64
    switch_times: torch.Tensor  # (L, pieces) float64
    gamma: float
    k: list[int]
    pattern: str
    alpha: float
    alpha_star: float
    beta_star: float
    first_piece: int
    extras: dict = field(default_factory=dict)

    def subject_mask(self, tau: float) -> torch.Tensor:
        """(L,) bool: which layers use the subject LoRA(s) at tau."""
        p = piece_index(tau, self.pattern, self.alpha, self.alpha_star, self.beta_star, self.first_piece)
        p = min(max(p, 0), self.switch_times.shape[1] - 1)
        return tau <= self.switch_times[:, p]


_SCORES: dict[tuple, tuple[list, tuple]] = {}


def _remembered(kind: str, subject: Sequence[LoRALayer], style: Sequence[LoRALayer], k, compute):
    """compute(), remembered per factor tensors (weak references plus in-place version counters: a changed or freed
    tensor never hits), so the next generation with the same LoRAs skips the work."""
    tensors = [t for l in (*subject, *style) for t in l.tensors]  # every adapter type's tensors (DoRA/OFT: with the base weight)
    key = (kind, tuple(id(t) for t in tensors), tuple(t._version for t in tensors),
           tuple(l.alpha for l in (*subject, *style)), len(subject), k)
    hit = _SCORES.get(key)
    if hit is not None and all(ref() is t for ref, t in zip(hit[0], tensors)):
        return hit[1]
    value = compute()
    if len(_SCORES) > 4096:  # forget entries whose tensors are gone
        for dead in [key for key, (refs, _) in _SCORES.items() if any(r() is None for r in refs)]:
            del _SCORES[dead]
    _SCORES[key] = ([weakref.ref(t) for t in tensors], value)
    return value


def layer_scores(subject: Sequence[LoRALayer], style: Sequence[LoRALayer], k: int | None = None):
    """(S_c, S_s, |dW_c|_1, |dW_s|_1, K) of one layer; each side is the sum of its LoRAs' scaled deltas.

    K = r_c * r_s (the product of the two sides' ranks, as the code since commit 1adb7d0) unless given.
    The dense deltas live only inside this call. The numbers depend only on the factors, so they are remembered
    per factor tensors: the next generation with the same LoRAs skips the Top-K work.
    """
    return _remembered("scores", subject, style, k, lambda: _layer_scores(subject, style, k))


def layer_l1(subject: Sequence[LoRALayer], style: Sequence[LoRALayer]) -> tuple[float, float]:
    """(|dW_c|_1, |dW_s|_1) of one layer (each side the sum of its LoRAs' scaled deltas), for gamma; remembered."""
    def compute():
        l1_c = float(sum(l.delta(torch.float32) for l in subject).abs().sum())
        return l1_c, float(sum(l.delta(torch.float32) for l in style).abs().sum())

    return _remembered("l1", subject, style, None, compute)


def _layer_scores(subject: Sequence[LoRALayer], style: Sequence[LoRALayer], k: int | None = None):
    r_c = sum(l.rank for l in subject)
    r_s = sum(l.rank for l in style)
    k = int(k or r_c * r_s)
    d_c = sum(l.delta(torch.float32) for l in subject)
    s_c, l1_c = topk_abs_sum(d_c, k), float(d_c.abs().sum())
    del d_c
    d_s = sum(l.delta(torch.float32) for l in style)
    s_s, l1_s = topk_abs_sum(d_s, k), float(d_s.abs().sum())
    return s_c, s_s, l1_c, l1_s, k


def klora_table(
    layers: dict[str, tuple[Sequence[LoRALayer], Sequence[LoRALayer]]], gamma: str = "paper", pattern: str = "s",
    alpha: float = 1.5, beta: float = 0.5, alpha_star: float = 1.5, beta_star: float = 1.3, top_k: int = 0,
    gamma_layers: dict[str, tuple[Sequence[LoRALayer], Sequence[LoRALayer]]] | None = None,
) -> KLoRATable:
    """The K-LoRA decision table of the given layers ({path: (subject layers, style layers)}); gamma over
    `gamma_layers` (same form; default: `layers`)."""
    paths = list(layers)
    if not paths:
        raise LoraloomError("K-LoRA found no layer that both the subject and the style LoRA adapt. Fix: use two LoRAs "
                            "trained on the same base model with attention layers (to_q/to_k/to_v/to_out.0).")
    scores = [layer_scores(*layers[p], k=top_k or None) for p in paths]
    s_c = torch.tensor([x[0] for x in scores], dtype=torch.float64)
    s_s = torch.tensor([x[1] for x in scores], dtype=torch.float64)
    known = {p: (x[2], x[3]) for p, x in zip(paths, scores)}
    if gamma_layers is None:
        l1 = list(known.values())
    else:  # a covered layer's L1 norms are already known (same factor objects)
        def same(p):
            return p in layers and all(a is b for a, b in zip((*layers[p][0], *layers[p][1]), (*gamma_layers[p][0], *gamma_layers[p][1])))

        l1 = [known[p] if same(p) else layer_l1(*gamma_layers[p]) for p in gamma_layers]
    g = balance_factor([x[0] for x in l1], [x[1] for x in l1], gamma)
    with torch.no_grad():
        rho = s_c / (g * s_s)
        rho = torch.where(s_s == 0, torch.where(s_c > 0, torch.inf, 0.0), rho)  # an all-zero style delta never wins
    pieces, first = time_pieces(pattern, alpha, beta, alpha_star, beta_star)
    cols = []
    for slope, intercept in pieces:
        if slope > 0:
            cols.append((rho - intercept) / slope)
        else:
            cols.append(torch.where(rho >= intercept, torch.inf, -torch.inf).to(torch.float64))
    return KLoRATable(paths, rho, torch.stack(cols, 1), g, [x[4] for x in scores], pattern, alpha, alpha_star, beta_star, first)


def file_layers(loras, subject_names: Sequence[str], style_names: Sequence[str]):
    """{path: (subject layers, style layers)} of every module, in every component (UNet, text encoders), that both
    sides adapt: the layer set of the reference's gamma, which reads every (down, up) key pair of the two files.
    UNet paths are the routing layer's module paths; other components' are prefixed `<component>:`. Modules only one
    side adapts have no ratio and are left out (the reference needs both files to list the same keys)."""
    by_name = {l.name: l.lora for l in loras}
    components = sorted({c for n in (*subject_names, *style_names) for c in by_name[n].layers})
    out = {}
    for comp in components:
        paths = sorted({p for n in (*subject_names, *style_names) for p in by_name[n].layers.get(comp, {})})
        for path in paths:
            c = [by_name[n].layers[comp][path] for n in subject_names if path in by_name[n].layers.get(comp, {})]
            s = [by_name[n].layers[comp][path] for n in style_names if path in by_name[n].layers.get(comp, {})]
            if c and s:
                out[path if comp == "unet" else f"{comp}:{path}"] = (c, s)
    return out


# --- the method --------------------------------------------------------------------------------------------
@dataclass
class KLoRAParams:
    lora_scale: float = param(1.0, "Scale of the selected LoRA (K-LoRA applies the chosen delta at 1); each LoRA's "
                                   "own weight multiplies it.")
    time_pattern: str = param("s", "Time scale: 's' = alpha*tau + beta (paper eq. 7, its main results); 's*' = "
                                   "(alpha'*tau + beta') mod alpha (supp. D; the reference code's default).",
                              choices=["s", "s*"])
    alpha: float = param(1.5, "alpha of s(tau) (paper 1.5); also the modulus of s*.")
    beta: float = param(0.5, "beta of s(tau) (paper 1.5 tau + 0.5; grid in supp. F).")
    alpha_star: float = param(1.5, "alpha' of s*(tau) (paper and code 1.5).")
    beta_star: float = param(1.3, "beta' of s*(tau) (paper 1.3; the code uses 1.5 * 0.85 = 1.275).")
    gamma: str = param("paper", "Balance factor: 'paper' = global L1 ratio subject/style (eq. 9); 'code' = trimmed "
                                "mean of per-layer L1 ratios (reference code).", choices=["paper", "code"])
    gamma_layers: str = param("file", "Layers gamma is computed over: 'file' = every module both LoRA files adapt — "
                                      "UNet layers of every type and text-encoder layers, as the reference code (its "
                                      "get_ratio_between_content_and_style reads every key pair of the two files); "
                                      "'selected' = only the layers K-LoRA selects in (scope).",
                              choices=["file", "selected"])
    top_k: int = param(0, "K of the Top-K sums; 0 = r_subject * r_style (paper). Other values are the paper's "
                          "K ablation.", min=0)
    roles: str = param("category", "Which LoRA is the subject: 'category' (character/clothing/object = subject, "
                                    "style/background = style; the given order when categories do not decide) or "
                                    "'given' (first = subject).", choices=["category", "given"])
    n_loras: str = param("pair", "'pair': exactly two LoRAs (the paper). 'groups': any number, split by category "
                                 "into a subject group and a style group; each side's delta is the sum of its LoRAs' "
                                 "deltas and K = (sum of subject ranks) * (sum of style ranks). Not in the paper.",
                         choices=["pair", "groups"])
    scope: str = param("attention", "Layers K-LoRA selects in: 'attention' = to_q/to_k/to_v/to_out.0 of every "
                                    "attention module (paper, SDXL code); 'all' = every layer both LoRAs adapt "
                                    "(as the FLUX code does for full-layer LoRAs).", choices=["attention", "all"])
    other_layers: str = param("merge", "UNet layers outside the K-LoRA selection (other layer types, or layers only "
                                       "one LoRA adapts): 'merge' applies every LoRA there as Merge does; 'off' drops "
                                       "them (the SDXL reference loads attention layers only).",
                              choices=["merge", "off"])
    text_encoder: bool = param(True, "Encode the prompt with every LoRA's text-encoder part (as Merge). K-LoRA "
                                     "itself only routes the UNet; the reference LoRAs have no text-encoder part.")


@register
class KLoRA(Method):
    """One UNet call per step (CFG pair); each attention projection uses the subject or the style LoRA."""

    name = "klora"
    Params = KLoRAParams
    description = "Per layer, subject or style LoRA by Top-K weight sums, style taking over as denoising proceeds."

    def prepare(self, ctx: DenoiseContext) -> None:
        p = self.params
        if p.n_loras == "pair":
            subject, style = subject_and_style(list(ctx.loras), p.roles, "K-LoRA")
            subjects, styles = [subject], [style]
        elif p.n_loras == "groups":
            if len(ctx.loras) < 2:
                raise LoraloomError(f"K-LoRA needs a subject and a style LoRA (got {len(ctx.loras)}).")
            subjects, styles = group_by_role(list(ctx.loras), p.roles)
        else:
            raise MethodError(f"n_loras must be 'pair' or 'groups', got {p.n_loras!r}")
        self.subject_names = [l.name for l in subjects]
        self.style_names = [l.name for l in styles]
        router = ctx.unet_router
        covered, uncovered = {}, []
        for path, routed in router.layers.items():
            c = [routed.factors[n] for n in self.subject_names if n in routed.factors]
            s = [routed.factors[n] for n in self.style_names if n in routed.factors]
            in_scope = p.scope == "all" or is_attention_projection(path)
            if c and s and in_scope:
                covered[path] = (c, s)
            elif c or s:
                uncovered.append(path)
        gamma_layers = file_layers(ctx.loras, self.subject_names, self.style_names) if p.gamma_layers == "file" else None
        self.table = klora_table(covered, p.gamma, p.time_pattern, p.alpha, p.beta, p.alpha_star, p.beta_star, p.top_k,
                                 gamma_layers)
        gates = {l.name: l.weight * p.lora_scale for l in ctx.loras}
        self.routing = Routing.uniform(gates)
        self.cond = cfg_pair(ctx.encode([gates if p.text_encoder else {}])[0])
        names = self.subject_names + self.style_names
        self._fixed = {path: {n: 0.0 for n in names} for path in uncovered} if p.other_layers == "off" else {}
        self._on_subject = {n: 1.0 for n in self.subject_names} | {n: 0.0 for n in self.style_names}
        self._on_style = {n: 0.0 for n in self.subject_names} | {n: 1.0 for n in self.style_names}
        self._gates_cache: dict[bytes, dict] = {}
        self.extras = {"klora": {"gamma": self.table.gamma, "gamma_layers": len(gamma_layers or covered),
                                 "layers": len(self.table.paths), "other_layers": len(uncovered),
                                 "subject": self.subject_names, "style": self.style_names, "subject_layers_per_step": []}}

    def layer_gates(self, tau: float) -> dict[str, dict[str, float]]:
        """{module path: {adapter: 0/1}} at tau, from the table (cached per distinct selection)."""
        mask = self.table.subject_mask(tau)
        key = mask.numpy().tobytes()
        gates = self._gates_cache.get(key)
        if gates is None:
            gates = dict(self._fixed)
            for path, use_subject in zip(self.table.paths, mask.tolist()):
                gates[path] = self._on_subject if use_subject else self._on_style
            self._gates_cache[key] = gates
        self.extras["klora"]["subject_layers_per_step"].append(int(mask.sum()))
        return gates

    def denoise(self, ctx: DenoiseContext, latents: torch.Tensor, step: Step) -> torch.Tensor:
        gates = self.layer_gates(step.fraction)
        eps_u, eps_c = ctx.predict(torch.cat([latents, latents]), step, self.cond, self.routing, layer_gates=gates).chunk(2)
        return classifier_free_guidance(eps_u, eps_c, ctx.guidance_scale)
