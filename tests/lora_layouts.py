"""Helpers that rewrite a PEFT-layout LoRA into the layouts and key spellings users bring (for loader tests).

Text-encoder names follow the producers: sd-scripts/A1111 and every trainer on transformers 4 write the
`text_model.` level of `CLIPTextModel` (`lora_te_text_model_encoder_layers_0_…`, `text_encoder.text_model.…`);
a trainer on transformers 5 writes what its model has (`CLIPTextModel` without the level, SDXL's
`CLIPTextModelWithProjection` with it). `text_model=True` gives the first, `False` the module names as given,
`"strip"` removes the level everywhere.
"""

from __future__ import annotations

import torch

TEXT = ("text_encoder", "text_encoder_2")


def te_spelling(comp: str, module: str, text_model) -> str:
    """A text-encoder module path spelled with the `text_model.` level (True), without it ("strip"), or as is (False)."""
    if comp not in TEXT or text_model is False:
        return module
    bare = module.removeprefix("text_model.")
    return "text_model." + bare if text_model is True else bare


def respell_peft(state_dict: dict[str, torch.Tensor], text_model) -> dict[str, torch.Tensor]:
    """PEFT keys with the text-encoder modules respelled (see `te_spelling`)."""
    out = {}
    for key, value in state_dict.items():
        comp, rest = key.split(".", 1)
        module, kind = rest.rsplit(".lora_", 1)
        out[f"{comp}.{te_spelling(comp, module, text_model)}.lora_{kind}"] = value
    return out


def peft_to_kohya(state_dict: dict[str, torch.Tensor], alpha: float | None = None, sgm=None, text_model=True) -> dict[str, torch.Tensor]:
    """`unet.a.b.lora_A.weight` -> `lora_unet_a_b.lora_down.weight` (+ `.alpha`); text encoders as sd-scripts names them.

    `sgm` optionally maps a diffusers UNet module path to its SGM (original SDXL) name and marks the file SDXL
    (text encoders `lora_te1_`/`lora_te2_`, else `lora_te_`).
    """
    out = {}
    for key, value in state_dict.items():
        comp, rest = key.split(".", 1)
        module, kind = rest.rsplit(".lora_", 1)
        module = sgm(module) if (sgm and comp == "unet") else te_spelling(comp, module, text_model)
        prefix = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if sgm else "lora_te_", "text_encoder_2": "lora_te2_"}[comp]
        name = prefix + module.replace(".", "_")
        out[f"{name}.{'lora_down' if kind.startswith('A') else 'lora_up'}.weight"] = value
        if alpha is not None:
            out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def peft_to_old_diffusers(state_dict: dict[str, torch.Tensor], text_model=False) -> dict[str, torch.Tensor]:
    """diffusers < 0.26 names: UNet `<module>.lora.down.weight`, text encoder `<module>.lora_linear_layer.down.weight`."""
    out = {}
    for key, value in state_dict.items():
        comp, rest = key.split(".", 1)
        module, kind = rest.rsplit(".lora_", 1)
        updown = "down" if kind.startswith("A") else "up"
        if comp == "unet":
            out[f"unet.{module}.lora.{updown}.weight"] = value
        else:
            out[f"{comp}.{te_spelling(comp, module, text_model)}.lora_linear_layer.{updown}.weight"] = value
    return out


# Resnet sub-layers in the SGM UNet that sd-scripts trains SDXL on (its LoCon keys carry these names).
SGM_RESNET = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}


def sdxl_sgm_name(module: str, layers_per_block: int = 2) -> str:
    """diffusers SDXL UNet path -> the SGM name kohya uses (`down_blocks.1.attentions.0` -> `input_blocks.4.1`,
    `down_blocks.0.resnets.1.conv1` -> `input_blocks.2.0.in_layers.2`)."""
    parts = module.split(".")
    if len(parts) == 5 and parts[2] == "resnets" and parts[4] in SGM_RESNET:
        parts = [*parts[:4], *SGM_RESNET[parts[4]].split(".")]
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
    if parts[0] == "mid_block" and parts[1] == "resnets":
        return ".".join(["middle_block", str(2 * int(parts[2])), *parts[3:]])
    return module
