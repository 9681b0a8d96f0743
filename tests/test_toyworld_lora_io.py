"""Toy-world LoRA files as the trainer writes them: PEFT keys, header metadata, sidecar, kohya twin; checked on
a freshly built (untrained) toy UNet so these tests do not need the shipped assets."""

from __future__ import annotations

import json

import pytest
import torch

from loraloom.evaluation.toyworld import scenes as S


@pytest.fixture(scope="module")
def peft_unet():
    from peft import LoraConfig

    from loraloom.evaluation.toyworld.models import build_unet

    unet = build_unet(seed=0)
    cfg = LoraConfig(r=4, lora_alpha=2.0, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    unet.add_adapter(cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return unet, cfg


def test_saved_lora_loads_every_key_with_alpha_family_and_triggers(tmp_path, peft_unet):
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open

    from loraloom.composition import load_lora, read_lora_info
    from loraloom.evaluation.toyworld.lora_io import save_peft_lora

    unet, cfg = peft_unet
    spec = S.LORA_BY_ID["style_1"]
    sd = get_peft_model_state_dict(unet)
    path = save_peft_lora(tmp_path / "style_1.safetensors", {"unet": sd}, {"unet": cfg}, spec)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.trigger_phrase"] == "stripo" and "style_1" in meta["modelspec.title"]
    adapter = json.loads(meta["lora_adapter_metadata"])
    assert adapter["unet.r"] == 4 and adapter["unet.lora_alpha"] == 2.0
    assert all(k.startswith("unet.") and (".lora_A.weight" in k or ".lora_B.weight" in k) for k in keys)
    assert len(keys) == len(sd)

    info = read_lora_info(path)
    assert (info.family, info.category, info.triggers) == ("sd1", "style", ["stripo"])
    lora = load_lora(path)
    assert 2 * lora.info.num_modules == len(keys)
    for layer in lora.layers["unet"].values():
        assert layer.alpha == 2.0 and layer.rank == 4
    # the factors are the trained ones (fp16-rounded)
    some = next(k for k in sd if k.endswith("lora_B.weight"))
    module = some[: -len(".lora_B.weight")]
    assert torch.allclose(lora.layers["unet"][module].up.float(), sd[some].float(), atol=1e-3)
    assert json.loads(path.with_suffix(".json").read_text())["category"] == "style"


def test_kohya_twin_has_the_same_factors_and_alpha(tmp_path, peft_unet):
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open

    from loraloom.composition import load_lora
    from loraloom.evaluation.toyworld.lora_io import save_kohya_twin, save_peft_lora

    unet, cfg = peft_unet
    spec = S.LORA_BY_ID["character_1"]
    path = save_peft_lora(tmp_path / "character_1.safetensors", {"unet": get_peft_model_state_dict(unet)}, {"unet": cfg}, spec)
    twin = save_kohya_twin(path, tmp_path / "kohya" / "character_1.safetensors")
    with safe_open(str(twin), "pt") as f:
        keys = list(f.keys())
        assert float(f.get_tensor(next(k for k in keys if k.endswith(".alpha")))) == 2.0
    assert all(k.startswith("lora_unet_") for k in keys)
    a, b = load_lora(path), load_lora(twin)
    assert b.info.layout == "kohya" and b.info.family == "sd1" and b.triggers == ["stellu"]
    assert set(a.layers["unet"]) == set(b.layers["unet"])
    for m, la in a.layers["unet"].items():
        lb = b.layers["unet"][m]
        assert la.alpha == lb.alpha
        assert torch.equal(la.down, lb.down) and torch.equal(la.up, lb.up)


def test_unknown_keys_are_refused(tmp_path, peft_unet):
    from loraloom.evaluation.toyworld.lora_io import save_peft_lora

    unet, cfg = peft_unet
    with pytest.raises(ValueError, match="unexpected key"):
        save_peft_lora(tmp_path / "x.safetensors", {"unet": {"conv_in.weight": torch.zeros(1)}}, {"unet": cfg}, S.LORAS[0])
