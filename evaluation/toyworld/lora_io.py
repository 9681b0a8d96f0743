"""Writing toy-world LoRA files: diffusers/PEFT layout with header metadata, a sidecar, and a kohya/A1111 twin.

Keys are `unet.<module>.lora_A.weight` / `lora_B.weight` (and `text_encoder.…`) exactly as
`get_peft_model_state_dict` names the modules; they are *not* passed through `convert_state_dict_to_diffusers`
(that writes old-style keys which diffusers' loader then silently ignores).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .scenes import ConceptLoRA

ARCHITECTURE = "stable-diffusion-v1/lora"


def adapter_metadata(configs: dict) -> str:
    """diffusers' `lora_adapter_metadata` header: each component's LoraConfig, keys prefixed `<component>.`."""
    packed = {}
    for comp, cfg in configs.items():
        d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
        for k, v in d.items():
            packed[f"{comp}.{k}"] = sorted(v) if isinstance(v, set) else v
    return json.dumps(packed, indent=2, sort_keys=True, default=str)


def lora_header(spec: ConceptLoRA, configs: dict, extra: dict | None = None) -> dict[str, str]:
    meta = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": ARCHITECTURE,
        "modelspec.implementation": "https://github.com/huggingface/diffusers",
        "modelspec.title": f"toyworld {spec.id}: {spec.name}",
        "modelspec.trigger_phrase": spec.trigger,
        "modelspec.description": f"Toy-world concept LoRA ({spec.category}): {spec.attribute} = {spec.value}.",
        "lora_adapter_metadata": adapter_metadata(configs),
        "loraloom.toyworld.category": spec.category,
    }
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    return meta


def sidecar(spec: ConceptLoRA) -> dict:
    return {"category": spec.category, "triggers": [spec.trigger], "name": spec.name,
            "concept": {spec.attribute: spec.value}}


def save_peft_lora(path: Path, state_dicts: dict[str, dict[str, torch.Tensor]], configs: dict, spec: ConceptLoRA,
                   extra_meta: dict | None = None, dtype=torch.float16) -> Path:
    """`state_dicts[component]` as returned by `get_peft_model_state_dict`; writes `<path>` and `<path>.json`."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = {}
    for comp, sd in state_dicts.items():
        for key, value in sd.items():
            if ".lora_A." not in key and ".lora_B." not in key:
                raise ValueError(f"unexpected key {key!r} in the {comp} LoRA state dict")
            flat[f"{comp}.{key}"] = value.detach().to(dtype).contiguous()
    save_file(flat, str(path), metadata=lora_header(spec, configs, extra_meta))
    path.with_suffix(".json").write_text(json.dumps(sidecar(spec), indent=2) + "\n")
    return path


def save_kohya_twin(peft_path: Path, out_path: Path) -> Path:
    """The same LoRA in kohya/A1111 layout, named as sd-scripts writes it, plus its sidecar.

    `lora_unet_…` and `lora_te_text_model_…` with lora_down/lora_up/alpha: sd-scripts runs on transformers 4,
    whose `CLIPTextModel` has the `text_model` level that transformers 5 dropped, so real files carry it.
    """
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors import safe_open
    from safetensors.torch import save_file

    from loraloom.composition.module_paths import with_level

    with safe_open(str(peft_path), "pt") as f:
        meta = f.metadata() or {}
        sd = {k: f.get_tensor(k) for k in f.keys()}
    sd = {(f"text_encoder.{with_level(k.removeprefix('text_encoder.'))}" if k.startswith("text_encoder.") else k): v
          for k, v in sd.items()}
    cfg = json.loads(meta["lora_adapter_metadata"])
    kohya = convert_state_dict_to_kohya(sd)
    out = {}
    for key, value in kohya.items():
        key = key.replace("lora_te1_", "lora_te_")  # SD 1.x has one text encoder: A1111 names it lora_te_
        if key.endswith(".alpha"):
            comp = "unet" if key.startswith("lora_unet_") else "text_encoder"
            value = torch.tensor(float(cfg[f"{comp}.lora_alpha"]), dtype=torch.float16)
        out[key] = value.contiguous()
    kmeta = {k: v for k, v in meta.items() if k != "lora_adapter_metadata"}
    kmeta["ss_network_module"] = "networks.lora"
    kmeta["ss_base_model_version"] = "sd_v1"
    kmeta["ss_v2"] = "False"
    kmeta["ss_network_dim"] = str(cfg.get("unet.r"))
    kmeta["ss_network_alpha"] = str(cfg.get("unet.lora_alpha"))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(out_path), metadata=kmeta)
    side = Path(peft_path).with_suffix(".json")
    if side.exists():
        out_path.with_suffix(".json").write_text(side.read_text())
    return out_path
