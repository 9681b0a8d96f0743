"""Text-encoder key spellings as they exist in the wild load fully and generate what diffusers' own loader does.

Files are written the way their producers write them (see tests/lora_layouts.py): sd-scripts/A1111 with the
transformers-4 `text_model` level (`lora_te_text_model_…`, SDXL `lora_te1_/lora_te2_text_model_…`, SGM UNet
names), a trainer on transformers 5 (`lora_te_encoder_…`), diffusers/PEFT with and without the level, and the
older diffusers `lora_linear_layer` names; each as a plain LoRA (attention) and as a LoCon (convolutions too).
For each: every module in the file is resident in loraloom (none dropped, none refused), diffusers'
`load_lora_weights` also loads every module, and Merge (fused and unfused) gives diffusers' latents within 1e-4.
"""

from __future__ import annotations

import re

import pytest
import torch
from lora_layouts import peft_to_kohya, peft_to_old_diffusers, respell_peft, sdxl_sgm_name
from safetensors.torch import save_file

from loraloom.composition import IncompatibleLoRA, load_lora
from loraloom.pipelines import ComposedPipeline
from loraloom.pipelines.tiny import build_tiny_sd, build_tiny_sdxl, random_lora_state_dict

BUILDERS = {"sd1": build_tiny_sd, "sdxl": build_tiny_sdxl}
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
LOCON = (*ATTENTION, "conv1", "conv2", "proj_in", "proj_out")  # resnet convolutions (and SD 1.x's conv proj_in/out)
TEXT = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")  # what sd-scripts trains in a text encoder


def peft_state_dict(pipe, unet_targets, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random LoRA for `pipe` in PEFT keys, module paths exactly as the installed model names them."""
    sd = {f"unet.{k}": v for k, v in random_lora_state_dict(pipe.unet, 4, seed=seed, targets=unet_targets, std=0.2).items()}
    for i, comp in enumerate(("text_encoder", "text_encoder_2")):
        model = getattr(pipe, comp, None)
        if model is not None:
            sd.update({f"{comp}.{k}": v for k, v in random_lora_state_dict(model, 4, seed=seed + 1 + i, targets=TEXT, std=0.2).items()})
    return sd


# spelling -> how to write it from model-named PEFT keys (family, state dict) -> file state dict
SPELLINGS = {
    "kohya-text_model": lambda fam, sd: peft_to_kohya(sd, alpha=2.0, sgm=sdxl_sgm_name if fam == "sdxl" else None, text_model=True),
    "kohya-transformers5": lambda fam, sd: peft_to_kohya(sd, alpha=2.0, sgm=sdxl_sgm_name if fam == "sdxl" else None, text_model=False),
    "peft-text_model": lambda fam, sd: respell_peft(sd, True),
    "peft": lambda fam, sd: respell_peft(sd, False),
    "old-lora_linear_layer-text_model": lambda fam, sd: peft_to_old_diffusers(sd, True),
    "old-lora_linear_layer": lambda fam, sd: peft_to_old_diffusers(sd, False),
}


def file_modules(sd: dict[str, torch.Tensor]) -> dict[str, int]:
    """Adapted modules per component in a file of any of the spellings above."""
    counts: dict[str, int] = {}
    for key in sd:
        if not re.search(r"(lora_down|lora_A|lora\.down|lora_linear_layer\.down)\.weight$", key):
            continue
        if key.startswith("lora_"):
            comp = {"unet": "unet", "te": "text_encoder", "te1": "text_encoder", "te2": "text_encoder_2"}[key.split("_")[1]]
        else:
            comp = key.split(".", 1)[0]
        counts[comp] = counts.get(comp, 0) + 1
    return counts


def diffusers_modules(pipe, adapter: str) -> dict[str, int]:
    out = {}
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, comp, None)
        n = sum(1 for name, _ in model.named_parameters() if name.endswith(f"lora_A.{adapter}.weight")) if model is not None else 0
        if n:
            out[comp] = n
    return out


@pytest.fixture(scope="module")
def pipes():
    """Per family: diffusers' own pipeline (the reference) and ours, built from the same seed."""
    out = {}
    for fam, build in BUILDERS.items():
        reference = build()
        reference.set_progress_bar_config(disable=True)
        out[fam] = (reference, ComposedPipeline(build()))
    return out


def _reference_latents(pipe, adapter, weight=1.0, steps=3):
    pipe.set_adapters([adapter], [weight])
    g = torch.Generator("cpu").manual_seed(0)
    return pipe("a red star", num_inference_steps=steps, guidance_scale=7.5, generator=g, output_type="latent").images


@pytest.mark.parametrize("locon", [False, True], ids=["lora", "locon"])
@pytest.mark.parametrize("spelling", list(SPELLINGS))
@pytest.mark.parametrize("family", list(BUILDERS))
def test_spelling_loads_every_key_and_matches_diffusers(tmp_path, pipes, family, spelling, locon, one_thread):
    reference, ours = pipes[family]
    sd = SPELLINGS[spelling](family, peft_state_dict(ours.pipe, LOCON if locon else ATTENTION, seed=7))
    path = tmp_path / f"{spelling}.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    expected_modules = file_modules(sd)
    assert set(expected_modules) == ({"unet", "text_encoder", "text_encoder_2"} if family == "sdxl" else {"unet", "text_encoder"})

    adapter = f"a{abs(hash((family, spelling, locon))) % 10**8}"
    reference.load_lora_weights(str(tmp_path), weight_name=path.name, adapter_name=adapter)
    try:
        assert diffusers_modules(reference, adapter) == expected_modules, "diffusers' loader must load every module too"
        expected = _reference_latents(reference, adapter)
        base = _reference_latents(reference, adapter, weight=0.0)
    finally:
        reference.delete_adapters(adapter)

    lora = ours.load_lora(path, "x")
    try:
        resident = {c: sum("x" in layer.factors for layer in r.layers.values()) for c, r in ours.routers.items()}
        assert {c: n for c, n in resident.items() if n} == expected_modules
        assert all(set(lora.layers[c]) <= set(dict(ours.routers[c].model.named_modules())) for c in lora.layers)
        for fuse in (False, True):
            got = ours("a red star", loras=["x"], method="merge", method_params={"lora_scale": 1.0, "fuse": fuse},
                       num_inference_steps=3, guidance_scale=7.5, seed=0, scheduler="default", output_type="latent",
                       progress_bar=False).latents
            assert (expected - got).abs().max().item() < 1e-4, f"fuse={fuse}"
        assert (expected - base).abs().max().item() > 1e-2  # the LoRA matters at all
    finally:
        ours.remove_lora("x")


@pytest.mark.parametrize("family", list(BUILDERS))
def test_text_encoder_named_without_a_level_the_model_has(tmp_path, pipes, family):
    """SDXL's second encoder keeps `text_model.` under transformers 5; a file spelled without it (as a trainer on a
    flattened model would write it) lands on the same modules. diffusers only strips the level, never adds it, so
    the reference here is diffusers on the same weights spelled with the level."""
    reference, ours = pipes[family]
    peft = peft_state_dict(ours.pipe, ATTENTION, seed=11)
    bare, full = respell_peft(peft, "strip"), respell_peft(peft, True)
    save_file(bare, str(tmp_path / "bare.safetensors"))
    save_file(full, str(tmp_path / "full.safetensors"))
    a, b = ours.load_lora(tmp_path / "bare.safetensors", "bare"), ours.load_lora(tmp_path / "full.safetensors", "full")
    try:
        for comp in a.layers:
            assert set(a.layers[comp]) == set(b.layers[comp]) and len(a.layers[comp]) == file_modules(bare)[comp]
        runs = [ours("a red star", loras=[n], method="merge", method_params={"lora_scale": 1.0}, num_inference_steps=3,
                     seed=0, scheduler="default", output_type="latent", progress_bar=False).latents for n in ("bare", "full")]
        assert torch.equal(runs[0], runs[1])
    finally:
        ours.remove_lora("bare")
        ours.remove_lora("full")


def test_resident_lora_takes_the_models_module_names(tmp_path, pipes):
    """After loading, the LoRA's layers are keyed as the model names its modules (so merges pair layers by path)."""
    reference, ours = pipes["sd1"]
    sd = peft_to_kohya(peft_state_dict(ours.pipe, ATTENTION), alpha=2.0, text_model=True)
    save_file(sd, str(tmp_path / "k.safetensors"))
    loose = load_lora(tmp_path / "k.safetensors")
    assert all(m.startswith("text_model.") for m in loose.layers["text_encoder"])  # as the file spells them
    resident = ours.load_lora(tmp_path / "k.safetensors", "k")
    try:
        names = set(dict(ours.pipe.text_encoder.named_modules()))
        assert set(resident.layers["text_encoder"]) <= names
        assert all(l.alpha == 2.0 for mods in resident.layers.values() for l in mods.values())
    finally:
        ours.remove_lora("k")


# --- refusals that name both families ------------------------------------------------------------------------
def test_sd1_kohya_file_on_sdxl_is_refused_naming_both_families(tmp_path, pipes):
    _, sdxl = pipes["sdxl"]
    full = peft_to_kohya(peft_state_dict(pipes["sd1"][1].pipe, ATTENTION), alpha=2.0, text_model=True)
    te_only = {k: v for k, v in full.items() if k.startswith("lora_te_")}
    for name, sd in (("full", full), ("te_only", te_only)):
        save_file(sd, str(tmp_path / f"{name}.safetensors"))
        with pytest.raises(IncompatibleLoRA) as err:
            sdxl.load_lora(tmp_path / f"{name}.safetensors", name)
        msg = str(err.value)
        assert "Stable Diffusion 1.x" in msg and "Stable Diffusion XL" in msg and "lora_te_" in msg, msg
        assert "x" not in sdxl.loras and name not in sdxl.loras
        assert all(not r.layers for r in sdxl.routers.values())


def test_sdxl_kohya_file_on_sd1_is_refused_naming_both_families(tmp_path, pipes):
    _, sd1 = pipes["sd1"]
    sd = peft_to_kohya(peft_state_dict(pipes["sdxl"][1].pipe, ATTENTION), alpha=2.0, sgm=sdxl_sgm_name, text_model=True)
    save_file(sd, str(tmp_path / "xl.safetensors"))
    with pytest.raises(IncompatibleLoRA) as err:
        sd1.load_lora(tmp_path / "xl.safetensors", "xl")
    msg = str(err.value)
    assert "Stable Diffusion XL" in msg and "Stable Diffusion 1.x" in msg and len(msg) < 600, msg
    assert not sd1.loras and all(not r.layers for r in sd1.routers.values())


def test_layers_that_do_not_fit_name_the_model_family_and_what_the_keys_look_like(tmp_path, pipes):
    """A text encoder of another width (an SD 2.x-style 1024-wide encoder) under kohya `lora_te_` names on SD 1.x:
    the names fit, the shapes do not; the message names both families and no naming variant is blamed."""
    _, sd1 = pipes["sd1"]
    sd = {}
    for i in range(2):
        name = f"lora_te_text_model_encoder_layers_{i}_self_attn_q_proj"
        sd.update({f"{name}.lora_down.weight": torch.zeros(4, 1024), f"{name}.lora_up.weight": torch.zeros(1024, 4),
                   f"{name}.alpha": torch.tensor(4.0)})
    save_file(sd, str(tmp_path / "wide.safetensors"))
    with pytest.raises(IncompatibleLoRA) as err:
        sd1.load_lora(tmp_path / "wide.safetensors", "wide")
    msg = str(err.value)
    assert "Stable Diffusion 2.x" in msg and "Stable Diffusion 1.x" in msg and "text-encoder width 1024" in msg, msg
    assert not sd1.loras


def test_shape_mismatch_without_family_evidence_says_so(tmp_path, pipes):
    """When neither the header nor the keys name a family, the shape refusal names this model's family and says
    the keys are silent, instead of guessing."""
    _, sd1 = pipes["sd1"]
    module = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    save_file({f"{module}.lora_A.weight": torch.zeros(4, 48), f"{module}.lora_B.weight": torch.zeros(32, 4)},
              str(tmp_path / "odd.safetensors"))
    with pytest.raises(IncompatibleLoRA) as err:
        sd1.load_lora(tmp_path / "odd.safetensors", "odd")
    msg = str(err.value)
    assert "this Stable Diffusion 1.x model" in msg and "do not say which model family" in msg and "48->32" in msg, msg
