"""LoRA.rar's merge hypernetwork (Shenaj et al., ICCV 2025, arXiv 2412.05148;
docs/methods/hypernet.md#architecture).

Column-wise: for column j of a layer, x_j = concat(dW_c[:, j], dW_s[:, j]) in R^(2 out) -> (m_c[j], m_s[j]).
Architecture: one dimension-specific input layer Linear(2 out -> hidden) per distinct `out` width (LoRA.rar:
640 and 1280 for SDXL), ReLU, a shared Linear(hidden -> 2), no output activation. One network serves every
layer; it is applied to to_q and to_out.0 only, to_k / to_v get coefficients 1 and 1 (a plain sum, as the code;
a second-hand summary of the paper says "averaging": `kv_merge="average"` gives 0.5 and 0.5).

Two additions, both recorded in the checkpoint: `input_scale` multiplies the columns before the first layer (a
reparametrisation of that layer chosen at training start as 1 / RMS of the training deltas, so that Adam at
lr 0.01 can move it — raw delta elements are ~1e-3), and the head's bias starts at (1, 1), i.e. training starts
from the direct merge, as ZipLoRA's coefficients start at ones (no initialisation is given: docs/methods/hypernet.md#architecture).

`coefficients` computes the same numbers as `forward` on the dense columns without forming dW:
W1 [dW_c; dW_s] = (W1_c s_c B_c) A_c + (W1_s s_s B_s) A_s.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import LoraloomError
from .files import WritePolicy, write_file
from .lora import LoRA, LoRALayer
from .merging import Coefficients, is_attention_projection, projection

FORMAT = "loraloom-hypernet/1"
DEFAULT_TARGETS = ("to_q", "to_out.0")


class MergeHypernetwork(nn.Module):
    """Predicts per-column merge coefficients (m_c, m_s) of a subject and a style LoRA layer."""

    def __init__(self, widths: Iterable[int], hidden: int = 128, input_scale: float = 1.0,
                 targets: Sequence[str] = DEFAULT_TARGETS):
        super().__init__()
        self.widths = sorted({int(w) for w in widths})
        self.hidden = int(hidden)
        self.input_scale = float(input_scale)
        self.targets = tuple(targets)
        self.inputs = nn.ModuleDict({str(w): nn.Linear(2 * w, self.hidden) for w in self.widths})
        self.head = nn.Linear(self.hidden, 2)
        with torch.no_grad():
            self.head.bias.fill_(1.0)

    def input_layer(self, out: int) -> nn.Linear:
        layer = self.inputs[str(out)] if str(out) in self.inputs else None
        if layer is None:
            raise LoraloomError(
                f"this hypernetwork has input layers for column widths {self.widths}, but a layer here has {out} outputs. "
                "Fix: use a hypernetwork trained for this base model (`loraloom hypernet train`)."
            )
        return layer

    def forward(self, columns: torch.Tensor) -> torch.Tensor:
        """The paper's form: columns (n, 2 out) = [dW_c[:, j]; dW_s[:, j]] per row -> (n, 2) = (m_c[j], m_s[j])."""
        out = columns.shape[1] // 2
        h = F.relu(self.input_layer(out)(columns * self.input_scale))
        return self.head(h)

    def coefficients(self, c: LoRALayer, s: LoRALayer) -> tuple[torch.Tensor, torch.Tensor]:
        """(m_c, m_s), each of length `in`, from the factors (same values as `forward` on the dense columns)."""
        out = c.up.shape[0]
        if s.up.shape[0] != out or c.down.shape[1] != s.down.shape[1]:
            raise ValueError(f"subject and style layers differ in shape: {tuple(c.up.shape)} vs {tuple(s.up.shape)}")
        lin = self.input_layer(out)
        w = lin.weight * self.input_scale
        dtype = w.dtype
        h = (w[:, :out] @ (c.up.to(dtype) * c.scale)) @ c.down.to(dtype)
        h = h + (w[:, out:] @ (s.up.to(dtype) * s.scale)) @ s.down.to(dtype) + lin.bias[:, None]
        m = self.head.weight @ F.relu(h) + self.head.bias[:, None]
        return m[0], m[1]

    def config(self) -> dict:
        return {"widths": self.widths, "hidden": self.hidden, "input_scale": self.input_scale, "targets": list(self.targets)}

    def save(self, path: str | Path, policy: WritePolicy, info: dict | None = None) -> Path:
        """safetensors weights; config and training information as JSON in the header (through the write policy)."""
        from safetensors.torch import save_file

        meta = {"format": FORMAT, "config": json.dumps(self.config()), "info": json.dumps(info or {}, default=str)}
        tensors = {k: v.detach().float().contiguous().cpu() for k, v in self.state_dict().items()}
        return write_file(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta), policy, what="hypernetwork file")

    @classmethod
    def load(cls, path: str | Path, device=None) -> MergeHypernetwork:
        from safetensors import safe_open

        path = Path(path)
        if not path.exists():
            raise LoraloomError(f"{path}: no hypernetwork checkpoint there. Fix: train one with `loraloom hypernet train` "
                                "or pass `checkpoint` to the hypernet method.")
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("format") != FORMAT:
            raise LoraloomError(f"{path}: not a loraloom hypernetwork (format {meta.get('format')!r}, expected {FORMAT!r}).")
        net = cls(**json.loads(meta["config"]))
        net.load_state_dict(state)
        net.info = json.loads(meta.get("info") or "{}")
        return net.to(device) if device is not None else net


def read_info(path: str | Path) -> dict:
    """The training information stored in a checkpoint's header."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    return {"config": json.loads(meta.get("config") or "{}"), "info": json.loads(meta.get("info") or "{}")}


def target_layers(subject: LoRA, style: LoRA, targets: Sequence[str], component: str = "unet") -> list[str]:
    """Attention projections named in `targets` that both LoRAs adapt with Linear factors."""
    c, s = subject.layers.get(component, {}), style.layers.get(component, {})
    return [p for p in c if p in s and is_attention_projection(p) and projection(p) in targets
            and not c[p].is_conv and not s[p].is_conv]


def hypernet_coefficients(net: MergeHypernetwork, subject: LoRA, style: LoRA, kv_merge: str = "sum",
                          component: str = "unet") -> Coefficients:
    """The coefficients of a merge: the hypernetwork's on its target projections, fixed ones on to_k/to_v
    ('sum': 1, 1 as the code; 'average': 0.5, 0.5), none (a plain sum) elsewhere. One forward per layer."""
    if kv_merge not in ("sum", "average"):
        raise ValueError(f"kv_merge must be 'sum' or 'average', got {kv_merge!r}")
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for path in target_layers(subject, style, net.targets, component):
        c, s = subject.layers[component][path], style.layers[component][path]
        out[path] = net.coefficients(c, s)
    if kv_merge == "average":
        for path in target_layers(subject, style, ("to_k", "to_v"), component):
            n = subject.layers[component][path].down.shape[1]
            half = torch.full((n,), 0.5, device=subject.layers[component][path].down.device)
            out.setdefault(path, (half, half))
    return {component: out}


def delta_rms(loras: Iterable[LoRA], targets: Sequence[str], component: str = "unet") -> float:
    """RMS of the elements of the scaled deltas of the target layers, from the factors (no dense delta):
    ||s B A||_F^2 = s^2 sum((B^T B) * (A A^T))."""
    total, count = 0.0, 0
    for lora in loras:
        for path, layer in lora.layers.get(component, {}).items():
            if layer.is_conv or not is_attention_projection(path) or projection(path) not in targets:
                continue
            b, a = layer.up.double(), layer.down.double()
            total += float((layer.scale**2) * ((b.T @ b) * (a @ a.T)).sum())
            count += b.shape[0] * a.shape[1]
    if count == 0:
        raise LoraloomError(f"no {'/'.join(targets)} layers in these LoRAs: nothing for the hypernetwork to merge.")
    return (total / count) ** 0.5


def widths_of(loras: Iterable[LoRA], targets: Sequence[str], component: str = "unet") -> list[int]:
    """Distinct `out` widths of the target layers (one input layer each)."""
    return sorted({int(l.up.shape[0]) for lora in loras for p, l in lora.layers.get(component, {}).items()
                   if is_attention_projection(p) and projection(p) in targets and not l.is_conv})
