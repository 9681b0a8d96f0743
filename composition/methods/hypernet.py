"""Hypernetwork merging (LoRA.rar, Shenaj et al., ICCV 2025, arXiv 2412.05148; spec §4): a trained hypernetwork
predicts ZipLoRA's per-column coefficients from the two LoRAs' columns in one forward pass per layer — no
per-pair optimisation — and the merged LoRA runs like Merge.

The network (`composition.hypernetwork`) is applied where LoRA.rar applies it, to_q and to_out.0 of every
attention module; to_k / to_v are summed (coefficients 1 and 1, as the code). Train one with
`loraloom hypernet train`; the default checkpoint is the one shipped for the toy world (assets/hypernet/).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..hypernetwork import MergeHypernetwork, hypernet_coefficients
from ..lora import LoRA
from ..merging import merged_lora
from .base import ActiveLoRA, DenoiseContext, param, register
from .ziplora import MergedLoRAMethod

DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[2] / "assets" / "hypernet" / "toyworld_hypernet.safetensors"


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
class HypernetParams:
    checkpoint: str = param(str(DEFAULT_CHECKPOINT), "Hypernetwork checkpoint (.safetensors from `loraloom hypernet "
                                                     "train`). Default: the one trained on the toy world.")
    kv_merge: str = param("sum", "to_k/to_v: 'sum' (coefficients 1, 1: LoRA.rar's code) or 'average' (0.5, 0.5: a "
                                 "second-hand reading of the paper).", choices=["sum", "average"])
    save_merged: str = param("", "Also write the merged LoRA to this .safetensors path (diffusers layout; loads in "
                                 "loraloom and diffusers' load_lora_weights).")
    lora_scale: float = param(1.0, "Scale of the merged LoRA (the coefficients replace a merge scale; paper 1).")
    roles: str = param("category", "Which LoRA is the subject: 'category' (character/clothing/object vs "
                                    "style/background; given order when undecided) or 'given' (first = subject).",
                       choices=["category", "given"])
    fuse: bool = param(True, "Fuse the merged LoRA into the UNet weights for the run (restored bit-exactly after).")


@register
class HypernetMerge(MergedLoRAMethod):
    name = "hypernet"
    title = "Hypernetwork merging (LoRA.rar)"
    Params = HypernetParams
    description = "Subject and style merged column-wise with coefficients predicted by a trained hypernetwork."

    def build(self, ctx: DenoiseContext, subject: ActiveLoRA, style: ActiveLoRA) -> LoRA:
        net = MergeHypernetwork.load(self.params.checkpoint)
        self.build_extras = {"checkpoint": self.params.checkpoint}
        return merge_with_hypernet(net, subject.lora, style.lora, subject.weight, style.weight, self.params.kv_merge)
