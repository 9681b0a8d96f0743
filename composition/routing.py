"""The routing layer: every loaded LoRA stays resident as factors; gates say how much of each applies per batch row.

A `LoRARouter` owns one model (UNet or text encoder). It installs a routed forward on each targeted
`nn.Linear`/`nn.Conv2d` (and, for LyCORIS norm diffs, `LayerNorm`/`GroupNorm`) once (the module object, its
parameters and its state-dict keys are untouched) and computes

    y = base(x) + sum_k gate[row, k] * layer_gate[layer, k] * delta_k(x)

for the rows each adapter is routed to, where delta_k is the adapter's change of the layer's output
(`composition.adapters`): (alpha_k / r_k) * up_k(down_k(x)) for LoRA/LoCon (and LoHa in its exact rank-r² form),
the adapter's own `term` for the other types (LoKr through reshapes, Tucker through its three convolutions, dense
diffs, and for the multiplicative types DoRA/OFT/BOFT y' - y computed from the base output). Spatial gates multiply
every type's delta alike. Methods change the routing between steps with `set_routing`, which
only rebuilds small per-layer lists: no module surgery, no `set_adapters` walk over the model.
Rows are given as contiguous blocks (`RowBlock`), so a batch whose rows use different LoRAs computes each
adapter on its own rows only.

Per-call cost is kept to what the active adapters need (it matters on small models, where dispatch overhead
is a large share of a step): a module with no active adapter runs its own forward (the routed forward is
installed only while something is active), the scale is folded into one in-place `addmm_`, and equal-sized
single-adapter row blocks (Composite's branches) run as two batched matmuls over all branches instead of a
loop. Several terms on the same rows with small factors (Merge unfused, masked LoRAs) run as one stacked term
(`Stacked`). Setting the same routing again is free.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import Adapter
from .errors import AdapterNameError, IncompatibleLoRA
from .fuse_cost import fusing_pays
from .lora import LoRA
from .module_paths import resolve_module_path
from .spatial import resize_mask, token_grid


@dataclass(frozen=True)
class RowBlock:
    """Adapters (name -> gate) applied to a contiguous block of batch rows (`rows=None`: every row)."""

    rows: slice | None
    gates: tuple[tuple[str, float], ...]

    @staticmethod
    def of(rows: slice | None, gates: Mapping[str, float]) -> RowBlock:
        return RowBlock(rows, tuple((k, float(v)) for k, v in gates.items()))


@dataclass(frozen=True)
class Routing:
    """Which adapters apply to which rows of a batch. Build with `Routing.uniform` or `Routing.from_blocks`."""

    blocks: tuple[RowBlock, ...] = ()

    @staticmethod
    def none() -> Routing:
        return Routing(())

    @staticmethod
    def uniform(gates: Mapping[str, float]) -> Routing:
        """Every row gets the same adapters (Merge, Switch)."""
        return Routing((RowBlock.of(None, gates),))

    @staticmethod
    def from_blocks(sizes_and_gates: Sequence[tuple[int, Mapping[str, float]]]) -> Routing:
        """Consecutive row blocks, e.g. [(2, {"a": .8}), (2, {"b": .8})] for two CFG pairs (Composite)."""
        out, start = [], 0
        for n, gates in sizes_and_gates:
            out.append(RowBlock.of(slice(start, start + n), gates))
            start += n
        return Routing(tuple(out))

    @property
    def num_rows(self) -> int | None:
        stops = [b.rows.stop for b in self.blocks if b.rows is not None]
        return max(stops) if stops else None

    def rows(self, start: int, stop: int) -> Routing:
        """The routing of rows [start, stop), renumbered from 0 (for chunked batches)."""
        out = []
        for b in self.blocks:
            if b.rows is None:
                out.append(b)
                continue
            lo, hi = max(b.rows.start, start), min(b.rows.stop, stop)
            if lo < hi:
                out.append(RowBlock(slice(lo - start, hi - start), b.gates))
        return Routing(tuple(out))


# Layers whose input is the text conditioning (the cross-attention keys and values), not the image's tokens.
TEXT_INPUT_LAYERS = ("attn2.to_k", "attn2.to_v")


class SpatialGate:
    """Where one adapter acts: a mask over the latent (H, W), and for layers that read the prompt, the spans of
    the (concatenated) conditioning the adapter may change (`spans`; None: all of it).

    `on(delta, reads_text, stream)` gives the multiplier for a delta of a layer: (1, 1, h, w) for a feature map,
    (1, n, 1) for n image tokens (the latent downsampled to h·w = n), (1, t, 1) for t text positions, or None (no gate).
    A layer without positions (the time embedding, a resnet's time projection, a DiT block's modulation: (batch,
    features)) has no inside or outside: a masked adapter's delta there is scaled by the mask's mean (the share of the
    image it covers; exact for an empty or full mask, an approximation in between: that change reaches every position).
    Resized masks are cached per shape.

    Diffusion transformers (FLUX.1, SD 3/3.5) name each layer's tokens (`stream`, from the family's `token_stream`):
    'image' (the packed/patchified image tokens only, on the `grid` (h, w) the family gives for the run's size),
    'text' (the prompt's tokens only) or 'joint' (FLUX's single-stream blocks: the text tokens, then the image
    tokens; the text count is what the grid leaves). Image tokens take the mask resized to the grid, as a UNet's
    attention layers do. Text tokens have no position; they take `text`: one factor for every text token (None:
    ungated, the adapter acts there fully). A run's masked LoRA gets the smallest value of its mask on the grid
    (`Run`): every image token attends to every text token, so a change of the text tokens reaches all image tokens
    alike, and the most that keeps "outside the mask, the layer's output is the base output" is what the least-covered
    image token allows. A mask with an outside (a 0 somewhere) leaves the text side untouched, so the image tokens
    outside it attend to exactly the base model's text keys and values, as on a UNet, where a masked LoRA's change of
    the cross-attention keys and values reaches only its own region's prompt copy; a full mask acts fully, so it
    equals the unmasked LoRA. (What this gives up: inside a partial mask the LoRA's text-side change is missing, where
    the UNet has it in the region's copy; the joint attention has no per-region copy of the prompt to put it in.)
    """

    def __init__(self, mask: torch.Tensor, spans: Sequence[slice] | None = None, grid: tuple[int, int] | None = None,
                 text: float | None = None):
        self.mask = mask.float()
        self.spans = list(spans) if spans is not None else None
        self.grid = (int(grid[0]), int(grid[1])) if grid is not None else None
        self.text = None if text is None else float(text)
        self._cache: dict[tuple, torch.Tensor] = {}

    def on(self, delta: torch.Tensor, reads_text: bool, stream: str | None = None) -> torch.Tensor | None:
        if stream is not None and delta.ndim == 3:
            key = (stream, delta.shape[1])
            if key not in self._cache:
                g = self._tokens(stream, delta.shape[1])
                if g is None:
                    return None
                self._cache[key] = g
        elif reads_text:
            if self.spans is None:
                return None
            key = ("text", delta.shape[1])
            if key not in self._cache:
                g = torch.zeros(delta.shape[1])
                for span in self.spans:
                    g[span] = 1.0
                self._cache[key] = g.view(1, -1, 1)
        elif delta.ndim == 2:
            key = ("none",)
            if key not in self._cache:
                self._cache[key] = self.mask.mean().reshape(1, 1)
        elif delta.ndim == 4:
            key = ("map", delta.shape[2], delta.shape[3])
            if key not in self._cache:
                self._cache[key] = resize_mask(self.mask, delta.shape[2], delta.shape[3]).view(1, 1, delta.shape[2], delta.shape[3])
        else:
            key = ("tokens", delta.shape[1])
            if key not in self._cache:
                h, w = self.grid if self.grid is not None and self.grid[0] * self.grid[1] == delta.shape[1] else \
                    token_grid(delta.shape[1], tuple(self.mask.shape))
                self._cache[key] = resize_mask(self.mask, h, w).reshape(1, h * w, 1)
        g = self._cache[key]
        if g.device != delta.device or g.dtype != delta.dtype:
            g = self._cache[key] = g.to(delta.device, delta.dtype)
        return g

    def _tokens(self, stream: str, n: int) -> torch.Tensor | None:
        """The (1, n, 1) gate of a transformer layer over n tokens of `stream` ('image', 'text', 'joint')."""
        if stream == "text":
            return None if self.text is None else torch.full((1, 1, 1), self.text)
        if stream not in ("image", "joint"):
            raise ValueError(f"unknown token stream {stream!r}; a layer's tokens are 'image', 'text' or 'joint'")
        if self.grid is None:
            if stream == "joint":
                raise ValueError(f"a layer over text and image tokens ({n} in all) needs the image token grid to tell "
                                 "them apart; build the gate with SpatialGate(mask, grid=family.attention_grid(latent_hw)).")
            h, w = token_grid(n, tuple(self.mask.shape))
        else:
            h, w = self.grid
        image = resize_mask(self.mask, h, w).reshape(-1)
        texts = n - h * w
        if texts < 0 or (stream == "image" and texts != 0):
            raise ValueError(f"a layer of {stream} tokens has {n} tokens, but the image token grid is {h}x{w} = {h * w}; "
                             "the gate was built for another image size. Fix: build the gate for this run's size.")
        if texts:
            image = torch.cat([torch.full((texts,), 1.0 if self.text is None else self.text), image])
        return image.view(1, n, 1)


class Stacked:
    """Several low-rank terms on the same rows of one layer as one term of rank r_1 + … + r_k (Merge unfused, masked
    LoRAs): y += (g ⊙ (x [A_1; …; A_k]^T)) [w_1 B_1, …, w_k B_k]^T, where g repeats each term's spatial gate over
    its r_i columns of the intermediate (1 for an ungated term). Equal to the sum of the terms (the blocks of the
    product are the terms' own products), in one matmul pair and one gate multiply instead of k of each: on small
    models the per-call dispatch is a large share of a step. Convolutions stack the same way when every up-projection
    is 1x1 (the downs share the module's kernel).

    On large layers the win is memory traffic, not dispatch: each rank-r term's addmm reads and writes the whole
    (tokens × out) output, so k terms pass over it k times, and k down-projections read the input k times; stacked,
    each happens once (FLUX.1's 3072-wide projections, 768 tokens, three rank-16 LoRAs: the routed overhead goes from
    5.0 % to 1.9 % of the base matmul, `benchmarks/bench_dit.py`'s merge_vs_base).

    The stacked factors are a copy, held while the routing is set, so only layers whose factors together are small
    are stacked: at most `MAX_ELEMENTS` (e.g. three rank-8 LoRAs on a 1280-wide SD 1.5 layer) or `MAX_SHARE` of the
    layer's own weight, whichever is larger. The copy then adds at most that share of the routed weights' memory
    during a run, and nothing while the LoRAs only sit loaded."""

    MAX_ELEMENTS = 1 << 17  # 512 KB of float32 per layer
    MAX_SHARE = 1 / 16  # of the layer's weight elements

    def __init__(self, terms: list, is_conv: bool):
        self.ids = {id(t) for t in terms}
        self.terms = terms
        self.rows = terms[0][3]
        self.ranks = [t[0].shape[0] for t in terms]
        self.gates = [t[4] for t in terms]
        self.down = torch.cat([t[0] for t in terms])
        ups = [t[1] * t[2] for t in terms]
        self.up = torch.cat(ups, dim=1)
        self.is_conv = is_conv
        self._gate_cache: dict[tuple, torch.Tensor | None] = {}

    @staticmethod
    def of(terms: list, is_conv: bool, weight_elements: int = 0) -> Stacked | None:
        low = [t for t in terms if t[0] is not None and (t[0].ndim == 4 if is_conv else t[0].ndim == 2)
               and (not is_conv or t[1].shape[-2:] == (1, 1))]
        if len(low) < 2:
            return None
        rows = low[0][3]
        same = [t for t in low if t[3] == rows]
        limit = max(Stacked.MAX_ELEMENTS, int(weight_elements * Stacked.MAX_SHARE))
        if len(same) < 2 or sum(t[0].numel() + t[1].numel() for t in same) > limit:
            return None
        return Stacked(same, is_conv)

    def takes(self, term) -> bool:
        return id(term) in self.ids

    def _gate(self, h: torch.Tensor, reads_text: bool, stream: str | None = None) -> torch.Tensor | None:
        """The combined gate over the stacked intermediate h (None: every gate open everywhere)."""
        key = (tuple(h.shape[1:]) if not self.is_conv else tuple(h.shape[2:]), h.device, h.dtype)
        if key not in self._gate_cache:
            parts, any_gate = [], False
            for gate, r in zip(self.gates, self.ranks, strict=True):
                g = None if gate is None else gate.on(h, reads_text, stream)
                any_gate = any_gate or g is not None
                if self.is_conv:  # (1, 1, h, w) per term -> (1, r, h, w)
                    shape = (1, r, *h.shape[2:])
                else:  # (1, n, 1) / (1, 1) per term -> (1, n, r) / (1, r)
                    shape = (*([1] * (h.ndim - 2)), *h.shape[1:-1], r) if h.ndim > 2 else (1, r)
                parts.append(torch.ones(shape, device=h.device, dtype=h.dtype) if g is None else g.expand(shape))
            self._gate_cache[key] = torch.cat(parts, dim=1 if self.is_conv else -1).contiguous() if any_gate else None
        return self._gate_cache[key]

    def add(self, layer: RoutedLayer, x: torch.Tensor, y: torch.Tensor) -> None:
        xs, ys = (x, y) if self.rows is None else (x[self.rows], y[self.rows])
        if self.is_conv:
            m = layer.module
            h = F.conv2d(xs, self.down, None, m.stride, m.padding, m.dilation, m.groups)
            g = self._gate(h, layer.reads_text, layer.stream)
            ys += F.conv2d(h if g is None else h.mul_(g), self.up)
            return
        h = F.linear(xs, self.down)
        g = self._gate(h, layer.reads_text, layer.stream)
        if g is not None:
            h.mul_(g)
        if ys.is_contiguous():
            ys.view(-1, ys.shape[-1]).addmm_(h.reshape(-1, self.down.shape[0]), self.up.t())
        else:
            ys += F.linear(h, self.up)


@dataclass
class RoutedLayer:
    """One routed module: the adapters that target it and the terms active for this call.

    A term is (down, up, weight, rows, gate) for an adapter applied through low-rank factors (the fast paths below),
    or (None, adapters.Term, weight, rows, gate) for every other type."""

    module: nn.Module
    name: str
    factors: dict[str, Adapter] = field(default_factory=dict)
    active: list = field(default_factory=list)  # [(down, up, weight, rows, gate or None)]
    grouped: tuple | None = None  # (lo, hi, k, down^T stacked [k, in, r], weight * up^T stacked [k, r, out])
    stacked: Stacked | None = None  # several low-rank terms on the same rows as one wider low-rank term
    installed: bool = False
    needs_output: bool = False  # some active term reads the base output (DoRA, OFT, BOFT)
    stream: str | None = None  # a transformer layer's tokens: 'image', 'text', 'joint' (`SpatialGate`); None on a UNet

    def __post_init__(self):
        self.is_conv = isinstance(self.module, nn.Conv2d)
        self.base_forward = type(self.module).forward.__get__(self.module)
        # Cross-attention keys/values read the prompt's tokens, not the image: their gates run over text positions.
        self.reads_text = self.name.endswith(TEXT_INPUT_LAYERS)

    def install(self, on: bool) -> None:
        """Shadow the module's forward with the routed one only while some adapter is active on it.

        A module that carries an accelerate hook (`enable_sequential_cpu_offload` hooks every leaf module: its
        `forward` is accelerate's wrapper, which loads the weights onto the accelerator, calls `_old_forward`, and
        offloads them again) keeps that wrapper: the routed forward goes in as `_old_forward`, so the hook still
        runs around it. `enable_model_cpu_offload` hooks only the top-level components (the UNet/transformer, text
        encoders, VAE), never a layer routed here, and moves the whole component, routed layers' weights included."""
        hooked = getattr(self.module, "_hf_hook", None) is not None and hasattr(self.module, "_old_forward")
        if on and not self.installed:
            if hooked:
                self._hook_forward = self.module._old_forward
                self.module._old_forward = self
            else:
                self.module.forward = self  # instance attribute shadows the class forward
        elif not on and self.installed:
            if getattr(self, "_hook_forward", None) is not None:
                self.module._old_forward, self._hook_forward = self._hook_forward, None
            else:
                del self.module.forward
        self.installed = on

    def set_terms(self, terms: list) -> None:
        """Active terms [(down, up, weight, rows, gate)]; equal-sized one-adapter row blocks of low-rank Linear terms
        without gates become one grouped term."""
        self.active, self.grouped, self.stacked = terms, None, None
        self.needs_output = any(t[0] is None and t[1].reads_output for t in terms)
        weight = getattr(self.module, "weight", None)
        self.stacked = Stacked.of(terms, self.is_conv, weight.numel() if isinstance(weight, torch.Tensor) else 0)
        if self.stacked is not None:
            self.active = [t for t in terms if not self.stacked.takes(t)]
        if len(terms) >= 2 and not self.is_conv and all(t[4] is None and t[0] is not None and t[0].ndim == 2 for t in terms):
            rows = [t[3] for t in terms]
            ranks = {t[0].shape[0] for t in terms}
            if all(r is not None and r.step in (None, 1) for r in rows) and len(ranks) == 1:
                size = rows[0].stop - rows[0].start
                if size > 0 and all(r.start == rows[0].start + i * size and r.stop == r.start + size for i, r in enumerate(rows)):
                    self.grouped = (rows[0].start, rows[-1].stop, len(terms),
                                    torch.stack([t[0].t() for t in terms]),
                                    torch.stack([t[1].t() * t[2] for t in terms]))
        self.install(bool(terms))

    def low_rank(self, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, weight: float) -> torch.Tensor:
        if self.is_conv:
            m = self.module
            h = F.conv2d(x, down, None, m.stride, m.padding, m.dilation, m.groups)
            return F.conv2d(h * weight, up)
        return F.linear(F.linear(x, down) * weight, up)

    def _add_gated(self, xs: torch.Tensor, ys: torch.Tensor, down: torch.Tensor, up: torch.Tensor, weight: float,
                   gate: SpatialGate) -> None:
        """ys += gate ⊙ (weight · up(down(xs))), with the gate applied to the rank-r intermediate: a gate is one
        number per position (token, text position or feature-map pixel) and up is per position (a linear, or a 1x1
        convolution), so up(g ⊙ h) = g ⊙ up(h); where g = 0 nothing is added (the base output exactly), where g = 1
        it is the ungated term's own fused op. Costs one r-wide multiply instead of an out-wide one and a copy."""
        if self.is_conv:
            m = self.module
            h = F.conv2d(xs, down, None, m.stride, m.padding, m.dilation, m.groups)
            if up.shape[-2:] != (1, 1):  # a spatial up-projection mixes positions: gate its output instead
                delta = F.conv2d(h * weight, up)
                g = gate.on(delta, self.reads_text, self.stream)
                ys += delta if g is None else delta * g
                return
            g = gate.on(h, self.reads_text, self.stream)
            ys += F.conv2d(h * weight if g is None else h * (g * weight), up)
            return
        h = F.linear(xs, down)
        g = gate.on(h, self.reads_text, self.stream)
        if g is not None:
            h.mul_(g)
        if ys.is_contiguous():
            ys.view(-1, ys.shape[-1]).addmm_(h.reshape(-1, down.shape[0]), up.t(), alpha=weight)
        else:
            ys += F.linear(h * weight, up)

    def _base_output(self, y: torch.Tensor) -> torch.Tensor:
        """y0: the base output without its bias (a new tensor: deltas are added into y in place)."""
        bias = getattr(self.module, "bias", None)
        if bias is None:
            return y.clone()
        return y - (bias.view(1, -1, 1, 1) if y.ndim == 4 else bias)

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base_forward(x, *args, **kwargs)
        if self.grouped is not None and y.is_contiguous():
            # Branch i's rows times adapter i, all branches at once: (k, rows*tokens, in) @ (k, in, r) @ (k, r, out).
            lo, hi, k, down_t, up_t = self.grouped
            xs, ys = x[lo:hi], y[lo:hi]
            h = torch.bmm(xs.reshape(k, -1, xs.shape[-1]), down_t)
            ys.view(k, -1, ys.shape[-1]).baddbmm_(h, up_t)
            return y
        y0 = self._base_output(y) if self.needs_output else None
        if self.stacked is not None:
            self.stacked.add(self, x, y)
        for down, up, weight, rows, gate in self.active:
            xs, ys = (x, y) if rows is None else (x[rows], y[rows])
            if down is None:  # another adapter type: its own term (up)
                y0s = None if y0 is None else (y0 if rows is None else y0[rows])
                if gate is None:
                    up.add_(xs, ys, y0s)
                    continue
                delta = up.delta(xs, y0s)
                g = gate.on(delta, self.reads_text, self.stream)
                ys += delta if g is None else delta * g
                continue
            if gate is not None:  # the delta only where the gate is open: outside it the output is the base's exactly
                self._add_gated(xs, ys, down, up, weight, gate)
            elif self.is_conv or not ys.is_contiguous():
                ys += self.low_rank(xs, down, up, weight)
            else:  # y += weight * (x A^T) B^T in one fused in-place op
                ys.view(-1, ys.shape[-1]).addmm_(F.linear(xs, down).reshape(-1, down.shape[0]), up.t(), alpha=weight)
        return y


def _underscored(modules) -> dict[str, str]:
    """{module path with `.` as `_`: path} of a model, to match kohya/LyCORIS module names diffusers cannot spell."""
    return {name.replace(".", "_"): name for name in modules if name}


def reads_text(modules: Mapping[str, nn.Module], path: str) -> bool:
    """True for a layer whose input is the text conditioning, not the image's tokens: the keys and values of a
    cross-attention module (`attn2`, and `attn1` of diffusers' `only_cross_attention` blocks, which attend to the
    prompt instead of the image)."""
    parent, _, leaf = path.rpartition(".")
    attention = modules.get(parent)
    if attention is not None and hasattr(attention, "is_cross_attention"):
        return bool(attention.is_cross_attention) and leaf in ("to_k", "to_v")
    return path.endswith(TEXT_INPUT_LAYERS)


def _fits_matrix(low, weight: torch.Tensor) -> bool:
    """True for low-rank factors (down, up, scale) whose product is the weight's matrix: a Linear's, or a convolution's
    with a 1x1 up-projection (up (out, r) times down (r, in·kh·kw))."""
    if low is None:
        return False
    down, up, _ = low
    return up.shape[0] == weight.shape[0] and (up.ndim == 2 or up.shape[2:] == (1, 1)) and down.shape[0] == up.shape[1]


def _fused_low_rank(weight: torch.Tensor, terms) -> torch.Tensor:
    """W + sum_i g_i s_i up_i down_i in float32, as one matmul over the stacked factors (ranks side by side):
    a new tensor, the original untouched. Terms whose factors do not multiply into the weight's matrix (`_fits_matrix`)
    are skipped. One product of rank r_1 + … + r_k written straight into the result costs a fraction of k separate
    (out x in) deltas summed and added (it is what makes fusing cheap on the large DiT layers)."""
    low = [(lr, g) for lr, g in terms if _fits_matrix(lr, weight)]
    base = weight.float().reshape(weight.shape[0], -1)
    if not low:
        return base.clone().reshape(weight.shape) if base.data_ptr() == weight.data_ptr() else base.reshape(weight.shape)
    ups = torch.cat([up.reshape(up.shape[0], up.shape[1]).float() * (g * scale) for (_, up, scale), g in low], dim=1)
    downs = torch.cat([down.reshape(down.shape[0], -1).float() for (down, _, _), _ in low], dim=0)
    return torch.addmm(base, ups, downs).reshape(weight.shape)


class LoRARouter:
    """Routes the resident LoRAs of one model (a UNet or a text encoder)."""

    def __init__(self, model: nn.Module, component: str):
        self.model = model
        self.component = component
        # Where the adapters' factors live: the model's weights' device, or the accelerator that runs an offloaded
        # model (`ComposedPipeline.enable_offload`; its weights sit on the CPU or the meta device between calls).
        self.execution_device: torch.device | None = None
        self.layers: dict[str, RoutedLayer] = {}
        self.adapters: dict[str, LoRA] = {}
        self._fused: dict[str, torch.Tensor] | None = None
        self._routing: Routing = Routing.none()
        self._routing_key = None  # (routing, layer_gates) last applied; None forces a rebuild
        self.scales: dict[str, dict[str, float]] = {}  # adapter -> module path -> factor (strengths, block weights)
        self.gates: dict[str, SpatialGate] = {}  # adapter -> where it acts
        # A diffusion transformer's {module path -> 'image' | 'text' | 'joint' | None}: which tokens each layer sees
        # (the family's `token_stream`, set by `ComposedPipeline`); None on a UNet and the text encoders.
        self.token_stream: Callable[[str], str | None] | None = None
        self.keep_fused = False  # `fused` leaves its weights in place on exit (ComposedPipeline.keep_fused)
        self._kept: tuple | None = None  # (key, original weights, original biases) of weights left fused

    # --- adapters -------------------------------------------------------------------------------------------
    def bind(self, lora: LoRA) -> tuple[dict[str, str], list[str]]:
        """Map each of the LoRA's module paths for this model to the model's own name for that module.

        Returns ({LoRA path: model path}, problems). Naming variants (`text_model.` or not) are bridged by
        `module_paths.resolve_module_path`; a kohya/LyCORIS module whose path diffusers' converter could not spell
        (norm layers, some embeddings) is found by its file name (`source`) among the model's module names. A module
        that is missing or that the adapter does not fit (`Adapter.check`) is a problem.
        """
        problems: list[str] = []
        names: dict[str, str] = {}
        taken: set[str] = set()
        modules = dict(self.model.named_modules())
        underscored = None
        for path, layer in lora.layers.get(self.component, {}).items():
            resolved = resolve_module_path(path, modules)
            if resolved is None and getattr(layer, "source", None):
                underscored = underscored if underscored is not None else _underscored(modules)
                src = layer.source
                resolved = next((underscored[c] for c in (src, src.removeprefix("text_model_"), "text_model_" + src)
                                 if c in underscored), None)
            if resolved is None:
                problems.append(f"{path}: no such module")
                continue
            if resolved in taken:
                problems.append(f"{path}: a second LoRA layer for module {resolved}")
                continue
            names[path] = resolved
            taken.add(resolved)
            problem = layer.check(modules[resolved])
            if problem:
                problems.append(f"{path}: {problem}")
        return names, problems

    def check(self, lora: LoRA, model_family: str | None = None, lora_family: str | None = None) -> dict[str, str]:
        """Refuse a LoRA whose modules are missing or shaped differently, before anything is changed.

        `model_family` and `lora_family` (display names: what this model is, what the LoRA's keys look like)
        make the refusal say which families clash. Returns `bind`'s {LoRA path: model path}.
        """
        names, problems = self.bind(lora)
        if problems:
            total = len(lora.layers.get(self.component, {}))
            shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
            model = f"this {model_family} model" if model_family else "this model"
            if lora_family and lora_family != model_family:
                looks, fix = f" The LoRA's keys look like {lora_family}.", f"use a LoRA made for {model_family or 'this model'}."
            else:
                looks = (f" The LoRA's keys look like {lora_family} too, so a layer layout loraloom does not map is possible."
                         if lora_family else " The LoRA's keys and header do not say which model family it is for.")
                fix = ("use a LoRA trained on this model's architecture; if other tools load this file on this model, "
                       "report its key names to loraloom.")
            raise IncompatibleLoRA(
                lora.path,
                f"{len(problems)} of {total} {self.component} layers do not fit {model} ({shown}).{looks}",
                fix,
            )
        return names

    def add(self, lora: LoRA, model_family: str | None = None, lora_family: str | None = None) -> None:
        """Make a LoRA resident (checked first; on error nothing changes). Its factors are moved to the model.

        The LoRA's layers are re-keyed by the model's module names (see `bind`)."""
        self.release()
        if lora.name in self.adapters:
            raise AdapterNameError(f"an adapter named {lora.name!r} is already loaded in the {self.component}; pick another name.")
        names = self.check(lora, model_family, lora_family)
        layers = lora.layers.get(self.component, {})
        if not layers:
            return
        if any(path != names[path] for path in layers):  # from here on the LoRA uses the model's module names
            layers = lora.layers[self.component] = {names[path]: layer for path, layer in layers.items()}
        modules = dict(self.model.named_modules())
        for path, layer in layers.items():
            module = modules[path]
            weight = module.weight
            layer.to(device=self.execution_device or weight.device, dtype=weight.dtype)
            # Types that depend on the base weight (DoRA, OFT) are taken against the weights as loaded, not fused ones.
            base = self._fused[path] if self._fused and path in self._fused else weight.data
            layer.bind(module, base)
            routed = self.layers.get(path)
            if routed is None:
                routed = RoutedLayer(module, path)
                routed.reads_text = reads_text(modules, path)
                routed.stream = self.token_stream(path) if self.token_stream is not None else None
                self.layers[path] = routed
            routed.factors[lora.name] = layer
        self.adapters[lora.name] = lora
        self.invalidate()
        self.set_routing(self._routing)

    def remove(self, name: str) -> None:
        if name not in self.adapters:
            return
        self.release()
        for path in list(self.layers):
            routed = self.layers[path]
            layer = routed.factors.pop(name, None)
            if layer is not None:
                layer.unbind()  # its caches (LoHa's dense form, DoRA/OFT vectors) go with it
            if not routed.factors:
                routed.set_terms([])
                del self.layers[path]
        del self.adapters[name]
        self.invalidate()
        self.set_routing(Routing(tuple(
            RowBlock(b.rows, tuple((k, w) for k, w in b.gates if k != name)) for b in self._routing.blocks
        )))

    def detach(self) -> None:
        """Remove every adapter and restore every module's own forward."""
        for name in list(self.adapters):
            self.remove(name)

    # --- per-adapter controls (strengths, block weights, masks) --------------------------------------------------
    def set_controls(self, scales: Mapping[str, Mapping[str, float]] | None = None,
                     gates: Mapping[str, SpatialGate] | None = None) -> None:
        """Per-adapter factors by module path and spatial gates, applied to every routing and fused merge until
        changed (`composition.controls`); `set_controls()` clears them."""
        # Weights kept fused (`keep_fused`) stay: the next `fused` compares the controls it would fuse with theirs.
        self.scales = {k: dict(v) for k, v in (scales or {}).items()}
        self.gates = dict(gates or {})
        self.invalidate()
        self.set_routing(self._routing)

    # --- routing --------------------------------------------------------------------------------------------
    def invalidate(self) -> None:
        """Rebuild the routing on the next `set_routing`: call after replacing a resident adapter's factors."""
        self._routing_key = None

    @property
    def routing(self) -> Routing:
        return self._routing

    def set_routing(self, routing: Routing | None, layer_gates: Mapping[str, Mapping[str, float]] | None = None) -> None:
        """Set which adapters apply to which rows; `layer_gates[module path][adapter]` multiplies per layer.

        Adapters unknown to this model are ignored (a LoRA may have no text-encoder part).
        """
        routing = routing or Routing.none()
        if routing.blocks and self._kept is not None:  # adapters routed again: the base weights come back first
            self.release()
        if self._routing_key is not None and self._routing_key[0] == routing and self._routing_key[1] is layer_gates:
            return  # the same routing again (e.g. every step of Composite): nothing to rebuild
        terms: dict[str, list] = {path: [] for path in self.layers}
        for block in routing.blocks:
            for name, gate in block.gates:
                if name not in self.adapters or gate == 0.0:
                    continue
                for path, routed in self.layers.items():
                    layer = routed.factors.get(name)
                    if layer is None:
                        continue
                    g = gate * self.scales.get(name, {}).get(path, 1.0)
                    if layer_gates is not None:
                        g *= layer_gates.get(path, {}).get(name, 1.0)
                    if g == 0.0:
                        continue
                    low = layer.lowrank()
                    if low is not None:
                        terms[path].append((low[0], low[1], g * low[2], block.rows, self.gates.get(name)))
                    else:
                        terms[path].append((None, layer.term(routed.module, g), g, block.rows, self.gates.get(name)))
        for path, routed in self.layers.items():
            routed.set_terms(terms[path])
        self._routing = routing
        self._routing_key = (routing, layer_gates)

    # --- fusing ---------------------------------------------------------------------------------------------
    @contextmanager
    def fused(self, gates: Mapping[str, float], paths: frozenset[str] | None = None):
        """Run with gate * delta of the given adapters added into the base weights (and biases, for full and norm
        diffs); restore them bit-exactly on exit.

        The fused weight is a new tensor swapped in for the run; the original tensor is kept aside untouched and
        swapped back, so no fuse/unfuse drift is possible. While fused, routing is cleared (the adapters are in
        the weights). Every adapter's ΔW is taken against the original weights (DoRA and OFT depend on them).

        `paths`: fuse only these layers (`worth_fusing`); the caller routes the adapters on the others. None: all.

        With `keep_fused` set (`ComposedPipeline.keep_fused`: a batch of generations), the fused weights stay in
        place on a clean exit, and the next `fused` with the same adapters, gates and controls reuses them instead of
        fusing again (diffusers' `fuse_lora` keeps its fused weights the same way). Anything else that needs the
        base weights — other gates, a routing with adapters, adding or removing an adapter, other controls,
        `release` — swaps the originals back first.
        """
        if self._fused is not None:
            raise RuntimeError(f"{self.component}: already fused")
        masked = sorted(n for n in gates if n in self.gates)
        if masked:
            raise ValueError(f"{', '.join(masked)}: a LoRA with a mask acts only in part of the image and cannot be fused "
                             "into the weights; run unfused.")
        key = self._fuse_key(gates, paths)
        self.release_unless(gates, paths)
        saved_routing = self._routing
        biases: dict[str, torch.Tensor] = {}
        keep = False
        try:
            if self._kept is not None:  # the same fused weights as the last generation: reused as they are
                _, self._fused, biases = self._kept
                self._kept = None
            else:
                self._fused = {}
                self._fuse_into_weights(gates, biases, paths)
            self.invalidate()
            self.set_routing(None)
            yield self
            keep = self.keep_fused and not saved_routing.blocks
        finally:
            if keep:
                self._kept = (key, self._fused, biases)
                self._fused = None
            else:
                self._restore(self._fused or {}, biases)
                self._fused = None
                self.invalidate()
                self.set_routing(saved_routing)

    def _fuse_into_weights(self, gates: Mapping[str, float], biases: dict, paths: frozenset[str] | None = None) -> None:
        """Swap a fused weight (and bias) tensor into every layer an adapter of `gates` targets (of `paths`, when
        given); the originals go to `self._fused` and `biases`."""
        with torch.no_grad():
            for path, routed in self.layers.items():
                if paths is not None and path not in paths:
                    continue
                terms = [(routed.factors[n], g * self.scales.get(n, {}).get(path, 1.0)) for n, g in gates.items()
                         if n in routed.factors and g != 0.0]
                terms = [(layer, g) for layer, g in terms if g != 0.0]
                if not terms:
                    continue
                module = routed.module
                weight = module.weight
                original = weight.data
                fused = _fused_low_rank(original, [(layer.lowrank(), g) for layer, g in terms])
                others = [(layer, g) for layer, g in terms if not _fits_matrix(layer.lowrank(), original)]
                if others:
                    fused = fused + sum(g * layer.delta(torch.float32, original).reshape(original.shape) for layer, g in others)
                bias_terms = [(g, d) for layer, g in terms if (d := layer.bias_delta(torch.float32)) is not None]
                self._fused[path] = original
                weight.data = fused.to(weight.dtype)
                if bias_terms:
                    bias = module.bias
                    biases[path] = bias.data
                    bias.data = (bias.data.float() + sum(g * d for g, d in bias_terms)).to(bias.dtype)

    def _restore(self, weights: Mapping[str, torch.Tensor], biases: Mapping[str, torch.Tensor]) -> None:
        for path, original in weights.items():
            self.layers[path].module.weight.data = original
        for path, original in biases.items():
            self.layers[path].module.bias.data = original

    def _fuse_key(self, gates: Mapping[str, float], paths: frozenset[str] | None = None) -> tuple:
        """What fused weights depend on: each adapter's gate and its per-layer factors (the spatial gates refuse), and
        which layers are fused."""
        return (tuple(sorted((n, float(g)) for n, g in gates.items())),
                tuple(sorted((n, tuple(sorted(self.scales.get(n, {}).items()))) for n in gates)),
                None if paths is None else tuple(sorted(paths)))

    def worth_fusing(self, gates: Mapping[str, float], token_rows: Callable[[str], int]) -> frozenset[str]:
        """The layers adapted by `gates` where fusing costs less than routing over the run's `token_rows(path)`
        (`composition.fuse_cost`). A convolution, and a layer with an adapter that has no low-rank form (LoHa, LoKr,
        DoRA, full diffs), is always fused, as before."""
        chosen = set()
        for path, routed in self.layers.items():
            layers = [routed.factors[n] for n, g in gates.items() if g != 0.0 and n in routed.factors]
            if not layers:
                continue
            lows = [layer.lowrank() for layer in layers]
            weight = routed.module.weight
            if weight.ndim != 2 or any(low is None or not _fits_matrix(low, weight) for low in lows):
                chosen.add(path)
                continue
            rank = sum(int(low[0].shape[0]) for low in lows)
            if fusing_pays(weight.shape[0], weight[0].numel(), rank, token_rows(path)):
                chosen.add(path)
        return frozenset(chosen)

    @property
    def kept_fused(self) -> bool:
        """True while weights are left fused between generations (`keep_fused`)."""
        return self._kept is not None

    def release(self) -> None:
        """Swap the base weights back in where fused weights were kept (`keep_fused`); bit-exact, as `fused`'s exit."""
        if self._kept is None:
            return
        _, weights, biases = self._kept
        self._kept = None
        self._restore(weights, biases)
        self.invalidate()

    def release_unless(self, gates: Mapping[str, float] | None, paths: frozenset[str] | None = None) -> None:
        """`release`, unless the kept weights are those `fused(gates, paths)` would make."""
        if self._kept is not None and (gates is None or self._fuse_key(gates, paths) != self._kept[0]):
            self.release()
