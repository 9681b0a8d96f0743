"""Hypernetwork merging (LoRA.rar, Shenaj et al., ICCV 2025, arXiv 2412.05148; docs/methods/hypernet.md): a trained hypernetwork
predicts ZipLoRA's per-column coefficients from the two LoRAs' columns in one forward pass per layer — no
per-pair optimisation — and the merged LoRA runs like Merge.

The network (`composition.hypernetwork`) is applied where LoRA.rar applies it, to_q and to_out.0 of every
attention module; to_k / to_v are summed (coefficients 1 and 1, as the code). Train one with
`loraloom hypernet train`; the default checkpoint is the one shipped for the toy world (assets/hypernet/).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...resources import asset
from ..hypernetwork import MergeHypernetwork, hypernet_coefficients
from ..lora import LoRA
from ..merging import merged_lora
from .base import ActiveLoRA, DenoiseContext, param, register
from .ziplora import MergedLoRAMethod, MergedLoRAParams

DEFAULT_CHECKPOINT = asset("hypernet", "toyworld_hypernet.safetensors")


def merge_with_hypernet(net: MergeHypernetwork, subject: LoRA, style: LoRA, w_c: float = 1.0, w_s: float = 1.0,
                        kv_merge: str = "sum", name: str | None = None) -> LoRA:
    """The merged LoRA of a pair: one hypernetwork forward per target layer (no gradient)."""
    device = next(l.down.device for mods in subject.layers.values() for l in mods.values())
    net = net.to(device)
    with torch.no_grad():
        coefs = hypernet_coefficients(net, subject, style, kv_merge)
    return merged_lora(name or f"hypernet:{subject.name}+{style.name}", subject, style, coefs, w_c, w_s,
                       description=f"LoRA.rar hypernetwork merge of {subject.name} (subject) and {style.name} (style)")


@dataclass
class HypernetParams(MergedLoRAParams):
    checkpoint: str = param("", "Hypernetwork checkpoint (.safetensors from `loraloom hypernet train`). Empty: the one "
                                "shipped for the toy world, assets/hypernet/toyworld_hypernet.safetensors.", path="file")
    kv_merge: str = param("sum", "to_k/to_v: 'sum' (coefficients 1, 1: LoRA.rar's code) or 'average' (0.5, 0.5: a "
                                 "second-hand reading of the paper).", choices=["sum", "average"])


@register
class HypernetMerge(MergedLoRAMethod):
    name = "hypernet"
    title = "Hypernetwork merging (LoRA.rar)"
    Params = HypernetParams
    description = "Subject and style merged column-wise with coefficients predicted by a trained hypernetwork."

    def build(self, ctx: DenoiseContext, subject: ActiveLoRA, style: ActiveLoRA) -> LoRA:
        checkpoint = self.params.checkpoint or DEFAULT_CHECKPOINT
        net = MergeHypernetwork.load(checkpoint)
        self.build_extras = {"checkpoint": str(checkpoint)}
        return merge_with_hypernet(net, subject.lora, style.lora, subject.weight, style.weight, self.params.kv_merge)
