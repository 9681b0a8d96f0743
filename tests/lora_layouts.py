"""Helpers that rewrite a PEFT-layout LoRA into the other layouts users bring (for loader tests)."""

from __future__ import annotations

import torch


def peft_to_kohya(state_dict: dict[str, torch.Tensor], alpha: float | None = None, sgm=None) -> dict[str, torch.Tensor]:
    """`unet.a.b.lora_A.weight` -> `lora_unet_a_b.lora_down.weight` (+ `.alpha`); `text_encoder.` -> `lora_te_`.

    `sgm` optionally maps a diffusers module path to its SGM (original SDXL) name.
    """
    out = {}
    for key, value in state_dict.items():
        comp, rest = key.split(".", 1)
        module, kind = rest.rsplit(".lora_", 1)
        module = sgm(module) if (sgm and comp == "unet") else module
        prefix = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if sgm else "lora_te_", "text_encoder_2": "lora_te2_"}[comp]
        name = prefix + module.replace(".", "_")
        out[f"{name}.{'lora_down' if kind.startswith('A') else 'lora_up'}.weight"] = value
        if alpha is not None:
            out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def peft_to_old_diffusers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers < 0.26 names: UNet `<module>.lora.down.weight`, text encoder `<module>.lora_linear_layer.down.weight`."""
    out = {}
    for key, value in state_dict.items():
        comp, rest = key.split(".", 1)
        module, kind = rest.rsplit(".lora_", 1)
        updown = "down" if kind.startswith("A") else "up"
        if comp == "unet":
            out[f"unet.{module}.lora.{updown}.weight"] = value
        else:
            out[f"{comp}.{module}.lora_linear_layer.{updown}.weight"] = value
    return out


def sdxl_sgm_name(module: str, layers_per_block: int = 2) -> str:
    """diffusers SDXL UNet path -> the SGM name kohya uses (`down_blocks.1.attentions.0` -> `input_blocks.4.1`)."""
    parts = module.split(".")
    if parts[0] == "down_blocks" and parts[2] in ("attentions", "resnets"):
        b, kind, j = int(parts[1]), parts[2], int(parts[3])
        idx = 1 + b * (layers_per_block + 1) + j
        return ".".join(["input_blocks", str(idx), "1" if kind == "attentions" else "0", *parts[4:]])
    if parts[0] == "up_blocks" and parts[2] in ("attentions", "resnets"):
        b, kind, j = int(parts[1]), parts[2], int(parts[3])
        idx = b * (layers_per_block + 1) + j
        return ".".join(["output_blocks", str(idx), "1" if kind == "attentions" else "0", *parts[4:]])
    if parts[0] == "mid_block" and parts[1] == "attentions":
        return ".".join(["middle_block", "1", *parts[3:]])
    return module
