"""Adapter types: one small class per kind of weight update a LoRA file can hold (ComfyUI's `weight_adapter/` pattern).

Every class has the same small surface, so the routing layer, fusing and the weight-space methods never look at a
file format:

- `check(module)`: why this adapter does not fit a model layer (None when it does);
- `bind(module, weight)` / `unbind()`: called when the LoRA becomes resident in a router / leaves it; builds the
  per-layer cache the type needs (below), from the layer's *base* weight;
- `term(module, weight)`: a callable for the routed forward: the adapter's change of that layer's output at gate
  `weight`, for the rows and positions the routing layer gives it; `apply(x, module)` is the same for one call;
- `lowrank()`: (down, up, scale) where the update is exactly `up @ down` (the routing layer's fast paths);
- `delta(dtype)` / `bias_delta(dtype)`: the dense ΔW (Δb), only for fusing and weight-space methods;
- `rank`, `scale`, `alpha`, `kind`, `nbytes` (the factors), `cache_nbytes` (what `bind` built), `tensors`.

How each applies (x: the layer input, y0: the base output without bias, g: the gate):

| type | `kind` | update | applied through |
|---|---|---|---|
| LoRA / LoCon (`LoRALayer`) | LoRA | ΔW = α/r · up @ down | its factors (fast paths) |
| LoRA with a bias diff (`LoRABias`) | LoRA+bias | ΔW = α/r · up @ down, Δb = diff_b (not scaled by α/r) | its factors plus the bias, as a term (no fast path) |
| LoCon with Tucker mid | LoCon-Tucker | ΔW = α/r · mid ×₁ up ×₂ down | 1×1, k×k, 1×1 convolutions |
| LoHa (incl. Tucker) | LoHa | ΔW = α/r · (w1a w1b) ⊙ (w2a w2b) | exact rank-r² factors (Khatri–Rao) when smaller than ΔW, else a cached dense ΔW |
| LoKr | LoKr | ΔW = α/r · w1 ⊗ w2 (α/r = 1 when neither side is factorised) | reshapes: (w1 ⊗ w2) x = vec(w1 X w2ᵀ), ΔW never formed |
| DoRA (kohya `dora_scale`, PEFT magnitude) | DoRA | W' = m ⊙ (W + ΔW) / ‖W + ΔW‖ | per output row: y' − y = c ⊙ y0 + (c + 1) ⊙ ΔW x with c = m/‖·‖ − 1 cached (a vector); per input column (LyCORIS `wd_on_output=False`): a cached dense W' − W |
| OFT (LyCORIS diag-oft) | OFT | W' = rescale ⊙ Rᵀ W, R = Cayley(blocks) | R − I cached, applied to y0 block by block |
| BOFT | BOFT | W' = rescale ⊙ B W, B = butterfly(R₁…R_m) | the stages, applied to y0 |
| full diff | full | ΔW = diff, Δb = diff_b | the diff as a dense layer |
| norm diff | norm | Δγ = w_norm, Δβ = b_norm (LayerNorm, GroupNorm) | `layer_norm(x, Δγ, Δβ)` |

Conventions follow the producer (LyCORIS 3.x/4.x training forward, PEFT, kohya): alpha missing = rank (scale 1);
LoKr's rank is the factorised side's (scale 1 when both sides are full matrices); OFT/BOFT's constraint is
alpha × out_features (LyCORIS `constraint * out_dim`); LyCORIS DoRA divides by ‖W + ΔW‖ + ε (float32 ε) per output
row (or per input column), PEFT's DoRA by ‖W + ΔW‖ per output row without ε.

Multiplicative types (DoRA, OFT, BOFT) are defined relative to the base weight W the LoRA was trained on; their
"delta" is W' − W (or y' − y), computed against the model's base weights when the LoRA becomes resident. At gate g
the routed layer adds g · (y' − y): exact at g = 1, linear in g (ComfyUI's strength for DoRA; LyCORIS's multiplier
interpolates the rotation instead). Two multiplicative adapters on one layer add their deltas, each taken against
the base weight — an approximation (the producers apply them in turn, each to the weight the previous one left).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

Kind = str
F32_EPS = float(torch.finfo(torch.float32).eps)


# --- helpers ---------------------------------------------------------------------------------------------------
def _conv_kw(module) -> dict:
    return {"stride": module.stride, "padding": module.padding, "dilation": module.dilation, "groups": module.groups}


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _cast(t: torch.Tensor | None, dtype) -> torch.Tensor | None:
    return t if t is None or dtype is None else t.to(dtype)


def _weight_shape(module) -> tuple[int, ...] | None:
    w = getattr(module, "weight", None)
    return tuple(w.shape) if w is not None else None


def _channels(y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A per-output-channel vector shaped to broadcast over a layer output (channels last, or dim 1 of a map)."""
    return v.view(1, -1, 1, 1) if y.ndim == 4 else v


def layer_op(module: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The layer's own operation with another weight (a dense ΔW): F.linear or F.conv2d with its geometry."""
    if isinstance(module, nn.Conv2d):
        return F.conv2d(x, weight, bias, **_conv_kw(module))
    return F.linear(x, weight, bias)


def base_output(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """y0 = the base layer's output without its bias (what multiplicative adapters act on)."""
    return layer_op(module, x, module.weight, None)


def describe_module(module) -> str:
    if isinstance(module, nn.Linear):
        return f"Linear {module.in_features}->{module.out_features}"
    if isinstance(module, nn.Conv2d):
        return f"Conv2d {tuple(module.weight.shape)}"
    return type(module).__name__


# --- terms: what the routed forward calls ----------------------------------------------------------------------
class Term:
    """One adapter on one layer at one gate: `delta(x, y0)` -> the gated change of the output; `add_(x, y, y0)` adds it
    into `y` (in place where the type can). `reads_output`: needs y0, the base output without bias."""

    reads_output = False

    def delta(self, x: torch.Tensor, y0: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def add_(self, x: torch.Tensor, y: torch.Tensor, y0: torch.Tensor | None) -> None:
        y += self.delta(x, y0)


class LowRankTerm(Term):
    """weight · up(down(x)) for Linear or Conv2d factors (LoRA/LoCon, LoHa's rank-r² form)."""

    def __init__(self, module, down, up, weight):
        self.conv = down.ndim == 4
        self.kw = _conv_kw(module) if self.conv else None
        self.down, self.up, self.weight = down, up, float(weight)

    def delta(self, x, y0=None):
        if self.conv:
            return F.conv2d(F.conv2d(x, self.down, None, **self.kw) * self.weight, self.up)
        return F.linear(F.linear(x, self.down) * self.weight, self.up)

    def add_(self, x, y, y0=None):
        if self.conv or not y.is_contiguous():
            y += self.delta(x)
        else:
            y.view(-1, y.shape[-1]).addmm_(F.linear(x, self.down).reshape(-1, self.down.shape[0]), self.up.t(), alpha=self.weight)


class LowRankBiasTerm(LowRankTerm):
    """weight · (scale · up(down(x)) + Δb): a LoRA with a bias diff (`LoRABias`); the bias is not scaled by α/r."""

    def __init__(self, module, down, up, bias, scale, weight):
        super().__init__(module, down, up, weight * scale)
        self.b, self.gate = bias, float(weight)

    def delta(self, x, y0=None):
        d = super().delta(x)
        return d + _channels(d, self.b) * self.gate

    def add_(self, x, y, y0=None):
        if self.conv or not y.is_contiguous():
            y += self.delta(x)
            return
        super().add_(x, y)  # the factors in place (LowRankTerm's addmm_), then the bias
        y.add_(self.b, alpha=self.gate)


class DenseTerm(Term):
    """weight · (ΔW x + Δb) with a dense ΔW (full diffs, LoHa's dense form, DoRA per input column)."""

    def __init__(self, module, weight_delta, bias_delta, weight):
        self.module, self.w, self.b, self.weight = module, weight_delta, bias_delta, float(weight)
        self.conv = isinstance(module, nn.Conv2d)

    def delta(self, x, y0=None):
        return layer_op(self.module, x, self.w, self.b) * self.weight

    def add_(self, x, y, y0=None):
        if self.conv or not y.is_contiguous():
            y += self.delta(x)
            return
        y.view(-1, y.shape[-1]).addmm_(x.reshape(-1, self.w.shape[1]), self.w.t(), alpha=self.weight)
        if self.b is not None:
            y.add_(self.b, alpha=self.weight)


class TuckerTerm(Term):
    """weight · up(mid(down(x))): 1×1 conv, the layer's k×k geometry, 1×1 conv (LoCon-Tucker, LoHa-Tucker)."""

    def __init__(self, module, down, mid, up, weight):
        self.kw = _conv_kw(module)
        self.down, self.mid, self.up = down, mid, up * weight

    def delta(self, x, y0=None):
        return F.conv2d(F.conv2d(F.conv2d(x, self.down), self.mid, None, **self.kw), self.up)


class KronTerm(Term):
    """weight · (w1 ⊗ w2) x without forming the Kronecker product (LoKr).

    Linear: x viewed as (…, b, d) (in = b·d), h = x w2ᵀ → (…, b, c), out = w1 h → (…, a, c), flattened to a·c.
    Conv2d: the b input-channel groups of d channels each go through w2's convolution as a batch, then w1 mixes the
    groups: the same (w1 ⊗ w2) over channels, w2 keeping the kernel."""

    def __init__(self, module, w1, w2, w2a, w2b, t2, weight):
        self.conv = isinstance(module, nn.Conv2d)
        self.kw = _conv_kw(module) if self.conv else None
        self.w1 = w1 * weight  # (a, b), scale already folded in by the adapter
        self.w2, self.w2a, self.w2b, self.t2 = w2, w2a, w2b, t2

    def _linear(self, x):
        a, b = self.w1.shape
        xr = x.reshape(-1, b, x.shape[-1] // b)
        if self.w2 is not None:
            h = torch.matmul(xr, self.w2.t())
        else:
            h = torch.matmul(torch.matmul(xr, self.w2b.t()), self.w2a.t())
        return torch.matmul(self.w1, h).reshape(*x.shape[:-1], -1)

    def add_(self, x, y, y0=None):
        if self.conv or not y.is_contiguous():
            y += self.delta(x)
            return
        # Both contractions as plain GEMMs over all tokens (no per-token batched matmul): contract w1 over the b
        # groups of the input, then w2 over each group's d channels; the (a, tokens, c) result is added in place.
        a, b = self.w1.shape
        d = x.shape[-1] // b
        m = x.numel() // x.shape[-1]
        z = self.w1 @ x.reshape(m, b, d).transpose(0, 1).reshape(b, m * d)  # (a, m·d)
        z = z.view(a * m, d)
        h = z @ self.w2.t() if self.w2 is not None else (z @ self.w2b.t()) @ self.w2a.t()  # (a·m, c)
        y.view(m, a, -1).add_(h.view(a, m, -1).transpose(0, 1))

    def _conv(self, x):
        a, b = self.w1.shape
        n = x.shape[0]
        xr = x.reshape(n * b, x.shape[1] // b, *x.shape[2:])
        if self.w2 is not None:
            h = F.conv2d(xr, self.w2, None, **self.kw)
        elif self.t2 is not None:
            h = F.conv2d(F.conv2d(F.conv2d(xr, self.w2b), self.t2, None, **self.kw), self.w2a)
        else:
            h = F.conv2d(F.conv2d(xr, self.w2b, None, **self.kw), self.w2a)
        hw = h.shape[2:]
        out = torch.matmul(self.w1, h.reshape(n, b, -1))  # (n, a, c·H·W)
        return out.reshape(n, -1, *hw)

    def delta(self, x, y0=None):
        return self._conv(x) if self.conv else self._linear(x)


class RowScaleTerm(Term):
    """DoRA per output row: weight · (c ⊙ y0 + (c + 1) ⊙ inner(x))."""

    reads_output = True

    def __init__(self, inner: Term, c: torch.Tensor, weight: float):
        self.inner = inner
        self.cw, self.c1w = c * weight, (c + 1) * weight

    def delta(self, x, y0):
        d = self.inner.delta(x, None)
        return torch.addcmul(y0 * _channels(y0, self.cw), d, _channels(d, self.c1w))


class BlockRotationTerm(Term):
    """OFT: weight · (rescale ⊙ Rᵀ y0 − y0) with R block-diagonal on the output channels; M = R − I cached."""

    reads_output = True

    def __init__(self, m: torch.Tensor, rescale: torch.Tensor | None, weight: float):
        self.k, self.n, _ = m.shape
        self.weight = float(weight)
        self.rs = rescale
        self.m = m * weight if rescale is None else m

    def _rotate(self, y0):  # (R - I)^T y0 blockwise
        if y0.ndim == 4:
            b, c, h, w = y0.shape
            return torch.einsum("bknhw,knm->bkmhw", y0.reshape(b, self.k, self.n, h, w), self.m).reshape(b, c, h, w)
        return torch.einsum("...kn,knm->...km", y0.reshape(*y0.shape[:-1], self.k, self.n), self.m).reshape(y0.shape)

    def delta(self, x, y0):
        d = self._rotate(y0)
        if self.rs is None:
            return d
        rs = _channels(y0, self.rs)
        return ((rs - 1) * y0 + rs * d) * self.weight


def butterfly(z: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """BOFT's butterfly product on the last axis of z (LyCORIS functional.boft, its bypass form): m stages, stage i
    rotating pairs of channels 2^i·b/2 apart with the blocks r[i] (r: (m, blocks, b, b))."""
    m, _, b, _ = r.shape
    half = b // 2
    for i in range(m):
        k = 2**i * half
        z = z.unflatten(-1, (-1, 2, k)).transpose(-2, -1).flatten(-3).unflatten(-1, (-1, b))
        z = torch.einsum("bij,...bj->...bi", r[i], z)
        z = z.flatten(-2).unflatten(-1, (-1, k, 2)).transpose(-2, -1).flatten(-3)
    return z


class ButterflyTerm(Term):
    """BOFT: weight · (rescale ⊙ B y0 − y0), the butterfly stages on the output channels."""

    reads_output = True

    def __init__(self, r, rescale, weight):
        self.r, self.rs, self.weight = r, rescale, float(weight)

    def delta(self, x, y0):
        z = y0.movedim(1, -1) if y0.ndim == 4 else y0
        out = butterfly(z, self.r)
        if self.rs is not None:
            out = out * self.rs
        out = out - z
        if y0.ndim == 4:
            out = out.movedim(-1, 1)
        return out * self.weight


class NormTerm(Term):
    """weight · (x̂ ⊙ Δγ + Δβ) of a LayerNorm or GroupNorm: the norm with the diffs as its affine parameters."""

    def __init__(self, module, w, b, weight):
        self.module = module
        self.w = w * weight
        self.b = None if b is None else b * weight

    def delta(self, x, y0=None):
        m = self.module
        if isinstance(m, nn.GroupNorm):
            return F.group_norm(x, m.num_groups, self.w, self.b, m.eps)
        return F.layer_norm(x, m.normalized_shape, self.w, self.b, m.eps)


# --- adapters ---------------------------------------------------------------------------------------------------
class Adapter:
    """The interface every adapter type implements (see the module docstring)."""

    kind: Kind = "adapter"
    additive = True  # the update does not depend on the base weight
    reads_output = False  # applied from the base output (multiplicative types)
    source: str | None = None  # the file's module name (kohya-style), for naming errors and resolving paths

    # shapes and sizes
    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        return _nbytes(*self.tensors)

    @property
    def cache_nbytes(self) -> int:
        return _nbytes(*getattr(self, "_cache", {}).values())

    def cache_elements(self) -> int:
        """Elements `bind` will cache, from the shapes alone (for listings that read only a header)."""
        return 0

    @property
    def producer_rank(self) -> int | None:
        """The rank the producer names (LoRA dim), or None for types without one."""
        return None

    @property
    def rank(self) -> int:
        return self.producer_rank or 1

    @property
    def scale(self) -> float:
        return 1.0

    @property
    def is_conv(self) -> bool:
        s = getattr(self, "_shape", None)
        return s is not None and len(s) == 4

    def family_shape(self) -> tuple[int, ...]:
        """(rank, in, *kernel) as a LoRA's down factor would be shaped, for telling model families apart."""
        return (self.rank, self.in_features())

    def in_features(self) -> int:
        raise NotImplementedError

    def to(self, device=None, dtype=None):
        for name in self._tensor_names:
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.to(device=device, dtype=dtype))
        return self

    # model binding
    def check(self, module) -> str | None:
        raise NotImplementedError

    def bind(self, module, weight: torch.Tensor) -> None:
        self._module = module
        self._shape = _weight_shape(module)

    def unbind(self) -> None:
        self._cache = {}
        self._module = None

    def _bound(self, what: str):
        if getattr(self, "_module", None) is None:
            raise RuntimeError(f"{self.kind} adapter {self.source or ''}: {what} needs the model layer; make the LoRA "
                               "resident (load it into a pipeline) first.")
        return self._module

    # applying
    def lowrank(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        return None

    def term(self, module, weight: float = 1.0) -> Term:
        raise NotImplementedError

    def apply(self, x: torch.Tensor, module=None, y0: torch.Tensor | None = None, weight: float = 1.0) -> torch.Tensor:
        """The change of the layer's output for input x (at gate `weight`); y0 (base output without bias) is computed
        when the type needs it and it is not given."""
        module = module if module is not None else self._bound("apply")
        t = self.term(module, weight)
        if t.reads_output and y0 is None:
            y0 = base_output(module, x)
        return t.delta(x, y0)

    def delta(self, dtype: torch.dtype | None = None, base: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def bias_delta(self, dtype: torch.dtype | None = None) -> torch.Tensor | None:
        return None

    def _reshaped(self, d: torch.Tensor) -> torch.Tensor:
        s = getattr(self, "_shape", None)
        return d.reshape(s) if s is not None and d.numel() == math.prod(s) else d


def _check_weight_layer(adapter, module, out: int, in_flat: int, kernel: tuple | None, what: str) -> str | None:
    """Shape check for adapters of Linear/Conv2d layers. `kernel` None: the file does not say (a flattened conv)."""
    if isinstance(module, nn.Linear):
        if kernel:
            return f"{what} has conv factors for a Linear layer"
        if (out, in_flat) != (module.out_features, module.in_features):
            return f"{what} is {in_flat}->{out}, model layer is {module.in_features}->{module.out_features}"
        return None
    if isinstance(module, nn.Conv2d):
        w = tuple(module.weight.shape)
        if kernel is not None and not kernel and w[2:] != (1, 1):
            return f"{what} has linear factors for a Conv2d layer"
        if kernel:
            if (out, in_flat, *kernel) != w:
                return f"{what} shape {(out, in_flat, *kernel)} does not fit conv {w}"
        elif (out, in_flat) != (w[0], math.prod(w[1:])):
            return f"{what} shape {(out, in_flat)} does not fit conv {w}"
        return None
    return f"is a {type(module).__name__}, not Linear/Conv2d"


@dataclass(eq=False)
class LoRALayer(Adapter):
    """Factors of one adapted Linear/Conv2d: update = (alpha / rank) * up @ down (LoRA, Hu et al. 2021, eq. 3).

    LoCon: a k×k `down` convolution and a 1×1 `up` (kohya / LyCORIS `lora_down`/`lora_up`)."""

    down: torch.Tensor  # (r, in) for Linear; (r, in, kh, kw) for Conv2d (LoCon)
    up: torch.Tensor  # (out, r) for Linear; (out, r, 1, 1) for Conv2d
    alpha: float
    source: str | None = field(default=None, compare=False, repr=False)

    kind = "LoRA"
    _tensor_names = ("down", "up")

    @property
    def tensors(self):
        return (self.down, self.up)

    @property
    def producer_rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    @property
    def is_conv(self) -> bool:
        return self.down.ndim == 4

    def in_features(self) -> int:
        return int(self.down.shape[1])

    def family_shape(self):
        return tuple(self.down.shape)

    def check(self, module) -> str | None:
        if isinstance(module, nn.Linear):
            expected = (module.out_features, module.in_features)
            got = (self.up.shape[0], self.down.shape[1])
            if self.is_conv:
                return "conv factors for a Linear layer"
            if got != expected:
                return f"LoRA is {got[1]}->{got[0]}, model layer is {expected[1]}->{expected[0]}"
            return None
        if isinstance(module, nn.Conv2d):
            expected = (module.out_channels, module.in_channels // module.groups)
            if not self.is_conv:
                return "linear factors for a Conv2d layer"
            if (self.up.shape[0], self.down.shape[1]) != expected or tuple(self.down.shape[2:]) != tuple(module.kernel_size):
                return f"LoRA shape {tuple(self.down.shape)} does not fit conv {tuple(module.weight.shape)}"
            return None
        return f"is a {type(module).__name__}, not Linear/Conv2d"

    def bind(self, module, weight):
        pass  # nothing to cache: applied through its factors

    def unbind(self):
        pass

    def lowrank(self):
        return self.down, self.up, self.scale

    def term(self, module, weight=1.0):
        return LowRankTerm(module, self.down, self.up, weight * self.scale)

    def apply(self, x, module=None, y0=None, weight=1.0):
        if module is None:
            if self.is_conv:
                raise RuntimeError("a LoCon layer needs its module (stride, padding) to be applied")
            return F.linear(F.linear(x, self.down) * (weight * self.scale), self.up)
        return self.term(module, weight).delta(x)

    def delta(self, dtype: torch.dtype | None = None, base: torch.Tensor | None = None) -> torch.Tensor:
        """The dense update scale * up @ down in the base weight's layout. Only for fusing and weight-space methods."""
        down = self.down if dtype is None else self.down.to(dtype)
        up = self.up if dtype is None else self.up.to(dtype)
        if self.is_conv:
            return self.scale * torch.einsum("or,rikl->oikl", up.flatten(1), down)
        return self.scale * (up @ down)

    @property
    def nbytes(self) -> int:
        return self.down.numel() * self.down.element_size() + self.up.numel() * self.up.element_size()

    @property
    def cache_nbytes(self) -> int:
        return 0


@dataclass(eq=False)
class LoRABias(LoRALayer):
    """A LoRA/LoCon with a bias diff beside its factors: ΔW = (alpha / rank) · up @ down, Δb = diff_b (a vector of
    out_features, not scaled by alpha / rank). ComfyUI's "Extract and Save Lora" with `bias_diff` writes it
    (`<module>.lora_down.weight`, `.lora_up.weight`, `.alpha`, `.diff_b`), as do trainers that train the biases beside
    a LoRA; ComfyUI applies W += s · (α/r) · up @ down and b += s · diff_b at strength s (diffusers drops diff_b).

    Applied as a term (`lowrank()` is None: the routing layer's low-rank fast paths would skip the bias); fusing adds
    `bias_delta()` to the layer's bias. It has no plain low-rank form: column-wise merges and the diffusers-layout
    writer refuse it."""

    diff_b: torch.Tensor | None = None

    kind = "LoRA+bias"
    _tensor_names = ("down", "up", "diff_b")

    def __post_init__(self):
        if self.diff_b is None:
            raise ValueError("LoRABias needs its bias diff (diff_b)")

    @property
    def tensors(self):
        return (self.down, self.up, self.diff_b)

    @property
    def nbytes(self) -> int:
        return _nbytes(self.down, self.up, self.diff_b)

    def check(self, module) -> str | None:
        problem = super().check(module)
        if problem is not None:
            return problem
        if getattr(module, "bias", None) is None:
            return ("LoRA has a bias diff (diff_b), the model layer has no bias; re-export the LoRA without bias diffs "
                    "(ComfyUI: Extract and Save Lora with bias_diff off) or for a model whose layer has one")
        if self.diff_b.numel() != module.bias.numel():
            return f"LoRA's bias diff (diff_b) has {self.diff_b.numel()} values, the model layer's bias {module.bias.numel()}"
        return None

    def lowrank(self):
        return None

    def term(self, module, weight=1.0):
        return LowRankBiasTerm(module, self.down, self.up, self.diff_b.flatten(), self.scale, weight)

    def apply(self, x, module=None, y0=None, weight=1.0):
        if module is None:
            if self.is_conv:
                raise RuntimeError("a LoCon layer needs its module (stride, padding) to be applied")
            return F.linear(F.linear(x, self.down) * (weight * self.scale), self.up, self.diff_b.flatten() * weight)
        return self.term(module, weight).delta(x)

    def bias_delta(self, dtype=None):
        return _cast(self.diff_b.flatten(), dtype)


@dataclass(eq=False)
class TuckerLoCon(Adapter):
    """LoCon with a Tucker core (LyCORIS `use_tucker`): ΔW = (alpha/r) · mid ×₁ up ×₂ down, applied as 1×1 → k×k → 1×1."""

    down: torch.Tensor  # (r, in, 1, 1)
    mid: torch.Tensor  # (r, r, kh, kw)
    up: torch.Tensor  # (out, r, 1, 1)
    alpha: float | None = None
    source: str | None = field(default=None, compare=False, repr=False)

    kind = "LoCon-Tucker"
    _tensor_names = ("down", "mid", "up")

    @property
    def tensors(self):
        return (self.down, self.mid, self.up)

    @property
    def producer_rank(self):
        return int(self.down.shape[0])

    @property
    def scale(self):
        return 1.0 if self.alpha is None else float(self.alpha) / self.producer_rank

    @property
    def is_conv(self):
        return True

    def in_features(self):
        return int(self.down.shape[1])

    def family_shape(self):
        return (self.producer_rank, self.in_features(), *self.mid.shape[2:])

    def check(self, module):
        return _check_weight_layer(self, module, self.up.shape[0], self.down.shape[1], tuple(self.mid.shape[2:]), "LoCon-Tucker")

    def term(self, module, weight=1.0):
        return TuckerTerm(module, self.down, self.mid, self.up, weight * self.scale)

    def delta(self, dtype=None, base=None):
        d, m, u = (_cast(t, dtype) for t in (self.down, self.mid, self.up))
        return self.scale * torch.einsum("ij...,pi,jq->pq...", m, u.flatten(1), d.flatten(1))

    def as_locon(self) -> LoRALayer:
        """The same update as a plain LoCon of rank r (down = mid ∘ down): exact, for weight-space merges."""
        down = torch.einsum("ij...,jq->iq...", self.mid, self.down.flatten(1))
        return LoRALayer(down, self.up, float(self.producer_rank) * self.scale, source=self.source)


@dataclass(eq=False)
class LoHa(Adapter):
    """LyCORIS LoHa (Hadamard product; FedPara): ΔW = (alpha/r) · (w1a w1b) ⊙ (w2a w2b), or with Tucker cores
    (hada_t1/t2 for k×k convolutions). The Hadamard product of two rank-r matrices is exactly a rank-r² product of
    their row-wise and column-wise Khatri–Rao products; `bind` keeps that form when it is smaller than ΔW, else ΔW."""

    w1a: torch.Tensor  # (out, r); Tucker: (r, out)
    w1b: torch.Tensor  # (r, in·kh·kw); Tucker: (r, in)
    w2a: torch.Tensor
    w2b: torch.Tensor
    t1: torch.Tensor | None = None  # (r, r, kh, kw)
    t2: torch.Tensor | None = None
    alpha: float | None = None
    source: str | None = field(default=None, compare=False, repr=False)

    kind = "LoHa"
    _tensor_names = ("w1a", "w1b", "w2a", "w2b", "t1", "t2")

    @property
    def tensors(self):
        return tuple(t for t in (self.w1a, self.w1b, self.w2a, self.w2b, self.t1, self.t2) if t is not None)

    @property
    def tucker(self) -> bool:
        return self.t1 is not None

    @property
    def producer_rank(self):
        return int(self.w1b.shape[0])

    @property
    def scale(self):
        return 1.0 if self.alpha is None else float(self.alpha) / self.producer_rank

    @property
    def out_features(self) -> int:
        return int(self.w1a.shape[1] if self.tucker else self.w1a.shape[0])

    def in_features(self):
        return int(self.w1b.shape[1])

    def family_shape(self):
        return (self.producer_rank, self.in_features(), *(self.t1.shape[2:] if self.tucker else ()))

    def check(self, module):
        kernel = tuple(self.t1.shape[2:]) if self.tucker else None
        return _check_weight_layer(self, module, self.out_features, self.in_features(), kernel, "LoHa")

    def _sizes(self):
        r = self.w1b.shape[0] * self.w2b.shape[0]
        out, inn = self.out_features, self.in_features()
        if self.tucker:
            kk = math.prod(self.t1.shape[2:])
            return r * (out + inn) + r * r * kk, out * inn * kk
        return r * (out + inn), out * inn

    def cache_elements(self):
        return min(self._sizes())

    def _khatri_rao(self, dtype=None):
        """(down, up, mid or None) of the exact rank-r² form, unscaled."""
        w1a, w1b, w2a, w2b, t1, t2 = (_cast(t, dtype) for t in (self.w1a, self.w1b, self.w2a, self.w2b, self.t1, self.t2))
        down = (w1b[:, None, :] * w2b[None, :, :]).flatten(0, 1)  # (r², in) or (r², in·k·k)
        if self.tucker:
            up = (w1a.t()[:, :, None] * w2a.t()[:, None, :]).flatten(1)  # (out, r²)
            mid = (t1[:, None, :, None] * t2[None, :, None, :]).flatten(2, 3).flatten(0, 1)  # (r², r², k, k)
            return down, up, mid
        return down, (w1a[:, :, None] * w2a[:, None, :]).flatten(1), None

    def bind(self, module, weight):
        super().bind(module, weight)
        factors, dense = self._sizes()
        dt = weight.dtype
        with torch.no_grad():
            if factors >= dense:
                self._cache = {"dense": self.delta(torch.float32).to(dt)}
                return
            down, up, mid = self._khatri_rao(torch.float32)
            r = down.shape[0]
            if mid is not None:
                self._cache = {"down": down.to(dt).view(r, -1, 1, 1), "mid": mid.to(dt), "up": up.to(dt).view(-1, r, 1, 1)}
            elif self.is_conv:
                self._cache = {"down": down.to(dt).view(r, *self._shape[1:]), "up": up.to(dt).view(-1, r, 1, 1)}
            else:
                self._cache = {"down": down.to(dt), "up": up.to(dt)}

    def lowrank(self):
        c = getattr(self, "_cache", {})
        if "down" in c and "mid" not in c:
            return c["down"], c["up"], self.scale
        return None

    def term(self, module, weight=1.0):
        c = getattr(self, "_cache", None) or {}
        if not c:
            self.bind(module, module.weight)
            c = self._cache
        if "dense" in c:
            return DenseTerm(module, c["dense"], None, weight)
        if "mid" in c:
            return TuckerTerm(module, c["down"], c["mid"], c["up"], weight * self.scale)
        return LowRankTerm(module, c["down"], c["up"], weight * self.scale)

    def delta(self, dtype=None, base=None):
        w1a, w1b, w2a, w2b, t1, t2 = (_cast(t, dtype) for t in (self.w1a, self.w1b, self.w2a, self.w2b, self.t1, self.t2))
        if self.tucker:
            r1 = torch.einsum("ij...,jq,ip->pq...", t1, w1b, w1a)
            r2 = torch.einsum("ij...,jq,ip->pq...", t2, w2b, w2a)
            return r1 * r2 * self.scale
        return self._reshaped((w1a @ w1b) * (w2a @ w2b) * self.scale)

    def as_lora_layer(self) -> LoRALayer:
        """The exact rank-r² LoRA/LoCon with the same ΔW (scale folded into up), for weight-space merges."""
        down, up, mid = self._khatri_rao()
        r = down.shape[0]
        if mid is not None:
            down = torch.einsum("ij...,jq->iq...", mid, down)  # (r², in, k, k)
            return LoRALayer(down, (up * self.scale).view(up.shape[0], r, 1, 1), float(r), source=self.source)
        if self.is_conv:
            return LoRALayer(down.view(r, *self._shape[1:]), (up * self.scale).view(up.shape[0], r, 1, 1), float(r), source=self.source)
        return LoRALayer(down, up * self.scale, float(r), source=self.source)


@dataclass(eq=False)
class LoKr(Adapter):
    """LyCORIS LoKr (Kronecker product): ΔW = s · w1 ⊗ w2, w1 = w1a w1b or full, w2 = w2a w2b, full, or Tucker
    (t2 with w2a (r, c), w2b (r, d)). s = alpha / r with r the factorised side's rank; 1 when both are full."""

    w1: torch.Tensor | None = None  # (a, b)
    w1a: torch.Tensor | None = None  # (a, r)
    w1b: torch.Tensor | None = None  # (r, b)
    w2: torch.Tensor | None = None  # (c, d) or (c, d, kh, kw)
    w2a: torch.Tensor | None = None  # (c, r); Tucker: (r, c)
    w2b: torch.Tensor | None = None  # (r, d) or (r, d·kh·kw); Tucker: (r, d)
    t2: torch.Tensor | None = None  # (r, r, kh, kw)
    alpha: float | None = None
    source: str | None = field(default=None, compare=False, repr=False)

    kind = "LoKr"
    _tensor_names = ("w1", "w1a", "w1b", "w2", "w2a", "w2b", "t2")

    @property
    def tensors(self):
        return tuple(t for t in (self.w1, self.w1a, self.w1b, self.w2, self.w2a, self.w2b, self.t2) if t is not None)

    @property
    def producer_rank(self):
        if self.w2 is None:
            return int(self.w2b.shape[0])
        if self.w1 is None:
            return int(self.w1b.shape[0])
        return None

    @property
    def rank(self):
        return self.producer_rank or min(self._ab()) * min(self._cd()[:2])

    @property
    def scale(self):
        r = self.producer_rank
        return 1.0 if self.alpha is None or r is None else float(self.alpha) / r

    def _ab(self):
        return tuple(self.w1.shape) if self.w1 is not None else (int(self.w1a.shape[0]), int(self.w1b.shape[1]))

    def _cd(self):
        """(c, d_flat, kernel or None if unknown)."""
        if self.w2 is not None:
            return int(self.w2.shape[0]), int(self.w2.shape[1]), tuple(self.w2.shape[2:])
        if self.t2 is not None:
            return int(self.w2a.shape[1]), int(self.w2b.shape[1]), tuple(self.t2.shape[2:])
        return int(self.w2a.shape[0]), int(self.w2b.shape[1]), None

    def in_features(self):
        return self._ab()[1] * self._cd()[1]

    def family_shape(self):
        kernel = self._cd()[2]
        return (self.rank, self.in_features(), *(kernel or ()))

    def check(self, module):
        (a, b), (c, d, kernel) = self._ab(), self._cd()
        return _check_weight_layer(self, module, a * c, b * d, kernel, "LoKr")

    def cache_elements(self):
        return math.prod(self._ab()) if self.w1 is None else 0

    def _w2_dense(self, dtype=None):
        w2, w2a, w2b, t2 = (_cast(t, dtype) for t in (self.w2, self.w2a, self.w2b, self.t2))
        if w2 is not None:
            return w2
        if t2 is not None:
            return torch.einsum("ij...,ip,jq->pq...", t2, w2a, w2b)
        return w2a @ w2b

    def bind(self, module, weight):
        super().bind(module, weight)
        self._cache = {}
        if self.w1 is None:
            self._cache["w1"] = (self.w1a.float() @ self.w1b.float()).to(weight.dtype)
        if isinstance(module, nn.Conv2d) and self.w2 is None and self.t2 is None:
            b = self._ab()[1]
            r = self.w2b.shape[0]
            self._cache["w2b"] = self.w2b.reshape(r, self._shape[1] // b, *self._shape[2:])
            self._cache["w2a"] = self.w2a.reshape(*self.w2a.shape, 1, 1)
        elif self.t2 is not None:
            self._cache["w2b"] = self.w2b.reshape(*self.w2b.shape, 1, 1)
            self._cache["w2a"] = self.w2a.t().reshape(self.w2a.shape[1], self.w2a.shape[0], 1, 1)

    @property
    def cache_nbytes(self):
        c = getattr(self, "_cache", {})
        return _nbytes(c.get("w1"))  # the reshaped w2 factors are views of the file's tensors

    def term(self, module, weight=1.0):
        c = getattr(self, "_cache", None)
        if c is None or getattr(self, "_module", None) is not module:
            self.bind(module, module.weight)
            c = self._cache
        w1 = c.get("w1", self.w1)
        return KronTerm(module, w1 * self.scale, self.w2, c.get("w2a", self.w2a), c.get("w2b", self.w2b), self.t2, weight)

    def delta(self, dtype=None, base=None):
        w1 = _cast(self.w1, dtype) if self.w1 is not None else _cast(self.w1a, dtype) @ _cast(self.w1b, dtype)
        w2 = self._w2_dense(dtype)
        if w2.ndim == 4:
            w1 = w1[:, :, None, None]
        return self._reshaped(torch.kron(w1, w2.contiguous()) * self.scale)


@dataclass(eq=False)
class DoRA(Adapter):
    """Weight-decomposed low-rank adaptation (Liu et al. 2024): W' = m ⊙ (W + ΔW) / ‖W + ΔW‖, the norm per output row
    (PEFT's magnitude vector; LyCORIS `dora_scale` of shape (out, 1, …)) or per input column (LyCORIS
    `wd_on_output=False`, `dora_scale` of shape (1, in, …)). ΔW is the inner adapter's (LoRA, LoHa or LoKr)."""

    inner: Adapter
    magnitude: torch.Tensor
    per_row: bool = True  # norm per output row (PEFT; LyCORIS wd_on_output=True) or per input column
    eps: float = 0.0  # LyCORIS adds float32 eps to the norm; PEFT does not
    source: str | None = field(default=None, compare=False, repr=False)

    kind = "DoRA"
    additive = False
    _tensor_names = ("magnitude",)

    def __post_init__(self):
        self.kind = "DoRA" if isinstance(self.inner, LoRALayer) else f"{self.inner.kind}+DoRA"

    @property
    def alpha(self):
        return self.inner.alpha

    @property
    def tensors(self):
        bound = getattr(self, "_module", None)
        return (*self.inner.tensors, self.magnitude, *((bound.weight,) if bound is not None else ()))

    @property
    def nbytes(self):
        return self.inner.nbytes + _nbytes(self.magnitude)

    @property
    def cache_nbytes(self):
        return self.inner.cache_nbytes + _nbytes(*getattr(self, "_cache", {}).values())

    @property
    def producer_rank(self):
        return self.inner.producer_rank

    @property
    def rank(self):
        return self.inner.rank

    @property
    def scale(self):
        return self.inner.scale

    def in_features(self):
        return self.inner.in_features()

    def family_shape(self):
        return self.inner.family_shape()

    @property
    def reads_output(self):
        return self.per_row

    def cache_elements(self):
        if self.per_row:
            return self.magnitude.numel() + self.inner.cache_elements()
        out = self.magnitude.numel()  # unknown without the layer; the dense W' - W is out x in
        return out * self.inner.in_features() + self.inner.cache_elements()

    def to(self, device=None, dtype=None):
        self.inner.to(device, dtype)
        self.magnitude = self.magnitude.to(device=device, dtype=dtype)
        return self

    def check(self, module):
        problem = self.inner.check(module)
        if problem:
            return problem
        w = _weight_shape(module)
        n = self.magnitude.numel()
        if self.per_row and n != w[0]:
            return f"DoRA magnitude has {n} values, the layer {w[0]} outputs"
        if not self.per_row and n != w[1]:
            return f"DoRA magnitude has {n} values, the layer {w[1]} inputs"
        return None

    def _norm_scale(self, base: torch.Tensor, inner_delta: torch.Tensor) -> torch.Tensor:
        """m / (‖W + ΔW‖ + eps), per row (out,) or per column (in,), float32."""
        v = base.float() + inner_delta.reshape(base.shape)
        m = self.magnitude.float().flatten()
        if self.per_row:
            n = v.reshape(v.shape[0], -1).norm(dim=1)
        else:
            n = v.transpose(0, 1).reshape(v.shape[1], -1).norm(dim=1)
        return m / (n + self.eps)

    def bind(self, module, weight):
        super().bind(module, weight)
        self.inner.bind(module, weight)
        with torch.no_grad():
            inner = self.inner.delta(torch.float32).reshape(weight.shape)
            s = self._norm_scale(weight, inner)
            if self.per_row:
                self._cache = {"c": s - 1.0}  # float32: a vector
            else:
                v = weight.float() + inner
                dense = v * s.view(1, -1, *([1] * (v.ndim - 2))) - weight.float()
                self._cache = {"dense": dense.to(weight.dtype)}

    def unbind(self):
        super().unbind()
        self.inner.unbind()

    def term(self, module, weight=1.0):
        if not getattr(self, "_cache", None):
            self.bind(module, module.weight.data)
        c = self._cache
        if "dense" in c:
            return DenseTerm(module, c["dense"], None, weight)
        return RowScaleTerm(self.inner.term(module, 1.0), c["c"].to(module.weight.dtype), weight)

    def delta(self, dtype=None, base=None):
        module = self._bound("DoRA's ΔW")
        w = (base if base is not None else module.weight).detach().float()
        inner = self.inner.delta(torch.float32).reshape(w.shape)
        s = self._norm_scale(w, inner)
        if self.per_row:
            view = s.view(-1, *([1] * (w.ndim - 1)))
        else:
            view = s.view(1, -1, *([1] * (w.ndim - 2)))
        out = (w + inner) * view - w
        return out if dtype is None else out.to(dtype)


def get_r(blocks: torch.Tensor, constraint: float) -> torch.Tensor:
    """R = (I + Q)(I − Q)⁻¹ with Q = B − Bᵀ (Cayley), Q scaled to norm `constraint` when larger (LyCORIS get_r)."""
    b = blocks.float()
    eye = torch.eye(b.shape[-1], device=b.device)
    q = b - b.transpose(-1, -2)
    if constraint > 0:
        q_norm = torch.norm(q) + 1e-8
        if q_norm > constraint:
            q = q * constraint / q_norm
    return (eye + q) @ torch.linalg.inv(eye - q)


@dataclass(eq=False)
class _Orthogonal(Adapter):
    """Shared by OFT and BOFT: rotations of the output channels from Cayley-transformed blocks, an optional rescale,
    the constraint alpha × out (LyCORIS `constraint * out_dim`)."""

    blocks: torch.Tensor
    rescale: torch.Tensor | None = None  # (out, 1, ...)
    alpha: float | None = None
    source: str | None = field(default=None, compare=False, repr=False)

    additive = False
    reads_output = True
    _tensor_names = ("blocks", "rescale")

    @property
    def tensors(self):
        bound = getattr(self, "_module", None)
        return (self.blocks, *((self.rescale,) if self.rescale is not None else ()), *((bound.weight,) if bound is not None else ()))

    @property
    def nbytes(self):
        return _nbytes(self.blocks, self.rescale)

    @property
    def out_features(self) -> int:
        return int(self.blocks.shape[-3] * self.blocks.shape[-2])

    @property
    def rank(self):
        return self.out_features

    def in_features(self):
        return self.out_features  # not in the file: only the output side is rotated

    def family_shape(self):
        return (self.out_features,)

    def cache_elements(self):
        return self.blocks.numel() + (self.out_features if self.rescale is not None else 0)

    @property
    def constraint(self) -> float:
        return float(self.alpha or 0.0) * self.out_features

    def check(self, module):
        if not isinstance(module, nn.Linear | nn.Conv2d):
            return f"is a {type(module).__name__}, not Linear/Conv2d"
        w = _weight_shape(module)
        if w[0] != self.out_features:
            return f"{self.kind} rotates {self.out_features} outputs, the layer has {w[0]}"
        return None

    def _r(self) -> torch.Tensor:
        return get_r(self.blocks, self.constraint)

    def _cache_rescale(self, dtype):
        if self.rescale is not None:
            self._cache["rescale"] = self.rescale.flatten().to(dtype)

    def _rotate_rows(self, w: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def delta(self, dtype=None, base=None):
        module = self._bound(f"{self.kind}'s ΔW")
        w = (base if base is not None else module.weight).detach().float()
        rotated = self._rotate_rows(w, self._r().to(w.device))
        if self.rescale is not None:
            rotated = rotated * self.rescale.float().reshape(-1, *([1] * (w.ndim - 1)))
        out = rotated - w
        return out if dtype is None else out.to(dtype)


@dataclass(eq=False)
class OFT(_Orthogonal):
    """LyCORIS diag-OFT: W' = rescale ⊙ Rᵀ W with R block-diagonal (blocks: (k, n, n), k·n = out)."""

    kind = "OFT"

    def bind(self, module, weight):
        super().bind(module, weight)
        with torch.no_grad():
            r = self._r()
            self._cache = {"m": (r - torch.eye(r.shape[-1], device=r.device)).to(weight.dtype)}
            self._cache_rescale(weight.dtype)

    def term(self, module, weight=1.0):
        if not getattr(self, "_cache", None):
            self.bind(module, module.weight.data)
        return BlockRotationTerm(self._cache["m"], self._cache.get("rescale"), weight)

    def _rotate_rows(self, w, r):
        k, n, _ = r.shape
        return torch.einsum("knm,kn...->km...", r, w.reshape(k, n, *w.shape[1:])).reshape(w.shape)


@dataclass(eq=False)
class BOFT(_Orthogonal):
    """LyCORIS BOFT (butterfly OFT, Liu et al. 2024): W' = rescale ⊙ B W, B the product of m butterfly stages of
    block rotations (blocks: (m, k, n, n))."""

    kind = "BOFT"

    def bind(self, module, weight):
        super().bind(module, weight)
        with torch.no_grad():
            self._cache = {"r": self._r().to(weight.dtype)}
            self._cache_rescale(weight.dtype)

    def term(self, module, weight=1.0):
        if not getattr(self, "_cache", None):
            self.bind(module, module.weight.data)
        return ButterflyTerm(self._cache["r"], self._cache.get("rescale"), weight)

    def _rotate_rows(self, w, r):
        cols = w.reshape(w.shape[0], -1).t()  # each column of W goes through B as an output vector does
        return butterfly(cols, r).t().reshape(w.shape)


@dataclass(eq=False)
class FullDiff(Adapter):
    """LyCORIS full fine-tuning difference: ΔW = diff, Δb = diff_b (optional)."""

    diff: torch.Tensor
    diff_b: torch.Tensor | None = None
    source: str | None = field(default=None, compare=False, repr=False)

    kind = "full"
    alpha = None
    _tensor_names = ("diff", "diff_b")

    @property
    def tensors(self):
        return tuple(t for t in (self.diff, self.diff_b) if t is not None)

    @property
    def rank(self):
        return min(int(self.diff.shape[0]), int(math.prod(self.diff.shape[1:])))

    def in_features(self):
        return int(self.diff.shape[1])

    def family_shape(self):
        return (self.rank, *self.diff.shape[1:])

    def check(self, module):
        kernel = tuple(self.diff.shape[2:])
        problem = _check_weight_layer(self, module, self.diff.shape[0], self.diff.shape[1], kernel, "full diff")
        if problem is None and self.diff_b is not None and getattr(module, "bias", None) is None:
            problem = "full diff has a bias diff (diff_b), the model layer has no bias"
        return problem

    def bind(self, module, weight):
        super().bind(module, weight)

    def term(self, module, weight=1.0):
        return DenseTerm(module, self.diff, self.diff_b, weight)

    def delta(self, dtype=None, base=None):
        return _cast(self.diff, dtype)

    def bias_delta(self, dtype=None):
        return _cast(self.diff_b, dtype)


@dataclass(eq=False)
class NormDiff(Adapter):
    """LyCORIS norm-layer training (`train_norm`): Δγ = w_norm, Δβ = b_norm of a LayerNorm or GroupNorm."""

    w_norm: torch.Tensor
    b_norm: torch.Tensor | None = None
    source: str | None = field(default=None, compare=False, repr=False)

    kind = "norm"
    alpha = None
    _tensor_names = ("w_norm", "b_norm")

    @property
    def tensors(self):
        return tuple(t for t in (self.w_norm, self.b_norm) if t is not None)

    @property
    def rank(self):
        return 1

    def in_features(self):
        return int(self.w_norm.numel())

    def family_shape(self):
        return (int(self.w_norm.numel()),)

    def check(self, module):
        if not isinstance(module, nn.LayerNorm | nn.GroupNorm):
            return f"norm diff for a {type(module).__name__}, not LayerNorm/GroupNorm"
        if getattr(module, "weight", None) is None:
            return "norm diff for a norm layer without affine parameters"
        if tuple(module.weight.shape) != (self.w_norm.numel(),):
            return f"norm diff has {self.w_norm.numel()} values, the layer {tuple(module.weight.shape)}"
        if self.b_norm is not None and getattr(module, "bias", None) is None:
            return "norm diff has a bias diff, the layer has no bias"
        return None

    def bind(self, module, weight):
        super().bind(module, weight)

    def term(self, module, weight=1.0):
        return NormTerm(module, self.w_norm, self.b_norm, weight)

    def delta(self, dtype=None, base=None):
        return _cast(self.w_norm, dtype)

    def bias_delta(self, dtype=None):
        return _cast(self.b_norm, dtype)


ADAPTER_TYPES = (LoRALayer, LoRABias, TuckerLoCon, LoHa, LoKr, DoRA, OFT, BOFT, FullDiff, NormDiff)


# --- from a file's parts -------------------------------------------------------------------------------------------
_PART_GROUPS = {
    "lora": {"down", "up", "mid"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"},
    "lokr": {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"},
    "oft": {"oft_blocks", "rescale"},
    "full": {"diff", "diff_b"},
    "norm": {"w_norm", "b_norm"},
}


class AdapterPartsError(ValueError):
    """A module's tensors do not make one adapter (missing or mixed parts, inconsistent shapes). `fix`: what to do,
    where the parts are well-formed but a combination loraloom does not apply (None: the file is damaged)."""

    def __init__(self, message: str, fix: str | None = None):
        super().__init__(message)
        self.fix = fix


def _require(parts, names, kind):
    missing = [n for n in names if n not in parts]
    if missing:
        raise AdapterPartsError(f"{kind} without {', '.join(missing)}")


def build_adapter(parts: dict[str, torch.Tensor], alpha: float | None = None, source: str | None = None) -> Adapter:
    """The adapter object for one module's tensors (part names as `lora_formats.KOHYA_PARTS` gives them, plus PEFT's
    `magnitude`). Raises AdapterPartsError naming what does not fit."""
    mag, dora_scale = parts.get("magnitude"), parts.get("dora_scale")
    keys = set(parts) - {"magnitude", "dora_scale"}
    groups = [g for g, names in _PART_GROUPS.items() if keys & names]
    bias_only = "diff_b" in keys and "diff" not in keys
    if bias_only and len(groups) == 2 and "full" in groups:  # a bias diff beside another adapter's factors
        other = next(g for g in groups if g != "full")
        if other != "lora" or "mid" in parts or mag is not None or dora_scale is not None:
            what = {"loha": "LoHa", "lokr": "LoKr", "oft": "OFT/BOFT", "norm": "norm-diff",
                    "lora": "Tucker LoCon" if "mid" in parts else "DoRA"}[other]
            raise AdapterPartsError(
                f"has a bias diff (diff_b) beside a {what} adapter; loraloom applies diff_b beside a LoRA "
                "(lora_down/lora_up) or a full diff only",
                "re-export the adapter without bias diffs, or as a plain LoRA (lora_down/lora_up) with them")
        _require(parts, ("down", "up"), "LoRA")
        down, up, diff_b = parts["down"], parts["up"], parts["diff_b"]
        if up.shape[1] != down.shape[0]:
            raise AdapterPartsError(f"up factor has rank {up.shape[1]} but down has {down.shape[0]}")
        if diff_b.numel() != up.shape[0]:
            raise AdapterPartsError(f"bias diff (diff_b) has {diff_b.numel()} values, the LoRA {up.shape[0]} output rows")
        return LoRABias(down, up, float(alpha) if alpha is not None else float(down.shape[0]), source=source, diff_b=diff_b)
    if len(groups) != 1:
        names = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr", "oft": "OFT", "full": "full-diff", "norm": "norm-diff"}
        raise AdapterPartsError(f"mixes the keys of {' and '.join(names[g] for g in groups)} adapters in one module"
                                if groups else "has no adapter weights")
    group = groups[0]
    if group == "lora":
        _require(parts, ("down", "up"), "LoRA")
        down, up = parts["down"], parts["up"]
        if "mid" in parts:
            if down.ndim != 4 or parts["mid"].ndim != 4:
                raise AdapterPartsError("Tucker LoCon (lora_mid) needs convolution factors")
            inner: Adapter = TuckerLoCon(down, parts["mid"], up, alpha, source=source)
        else:
            if up.shape[1] != down.shape[0]:
                raise AdapterPartsError(f"up factor has rank {up.shape[1]} but down has {down.shape[0]}")
            inner = LoRALayer(down, up, float(alpha) if alpha is not None else float(down.shape[0]), source=source)
    elif group == "loha":
        _require(parts, ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"), "LoHa")
        if ("hada_t1" in parts) != ("hada_t2" in parts):
            raise AdapterPartsError("LoHa with only one of hada_t1/hada_t2")
        inner = LoHa(parts["hada_w1_a"], parts["hada_w1_b"], parts["hada_w2_a"], parts["hada_w2_b"], parts.get("hada_t1"),
                     parts.get("hada_t2"), alpha, source=source)
        a, b = (parts["hada_w1_a"], parts["hada_w1_b"]) if not inner.tucker else (parts["hada_w1_a"].t(), parts["hada_w1_b"])
        if a.shape[1] != b.shape[0] or parts["hada_w1_b"].shape[1:] != parts["hada_w2_b"].shape[1:]:
            raise AdapterPartsError("LoHa factors of inconsistent shapes")
    elif group == "lokr":
        if "lokr_w1" not in parts:
            _require(parts, ("lokr_w1_a", "lokr_w1_b"), "LoKr")
        if "lokr_w2" not in parts:
            _require(parts, ("lokr_w2_a", "lokr_w2_b"), "LoKr")
        if "lokr_t2" in parts and "lokr_w2" in parts:
            raise AdapterPartsError("LoKr with both lokr_w2 and a Tucker core")
        inner = LoKr(parts.get("lokr_w1"), parts.get("lokr_w1_a"), parts.get("lokr_w1_b"), parts.get("lokr_w2"),
                     parts.get("lokr_w2_a"), parts.get("lokr_w2_b"), parts.get("lokr_t2"), alpha, source=source)
    elif group == "oft":
        _require(parts, ("oft_blocks",), "OFT")
        blocks = parts["oft_blocks"]
        if blocks.ndim == 3:
            inner = OFT(blocks, parts.get("rescale"), alpha, source=source)
        elif blocks.ndim == 4:
            inner = BOFT(blocks, parts.get("rescale"), alpha, source=source)
        else:
            raise AdapterPartsError(f"oft_blocks of shape {tuple(blocks.shape)} (OFT: 3 dimensions, BOFT: 4)")
    elif group == "full":
        _require(parts, ("diff",), "full diff")
        inner = FullDiff(parts["diff"], parts.get("diff_b"), source=source)
    else:
        _require(parts, ("w_norm",), "norm diff")
        inner = NormDiff(parts["w_norm"], parts.get("b_norm"), source=source)
    if mag is None and dora_scale is None:
        return inner
    if not isinstance(inner, LoRALayer | TuckerLoCon | LoHa | LoKr):
        raise AdapterPartsError(f"DoRA magnitude on a {inner.kind} adapter")
    if mag is not None:  # PEFT: (out,) for Linear, (1, out, 1, 1) for Conv2d; the norm per output row, no epsilon
        return DoRA(inner, mag, per_row=True, eps=0.0, source=source)
    s = tuple(dora_scale.shape)  # LyCORIS: (out, 1, ...) per output row, (1, in, ...) per input column
    per_row = not (len(s) >= 2 and s[0] == 1 and math.prod(s) > 1)
    return DoRA(inner, dora_scale, per_row=per_row, eps=F32_EPS, source=source)
