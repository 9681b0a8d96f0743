"""LoRA files: layouts, metadata, sidecars and every kind of bad input."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import weights_hash
from lora_layouts import peft_to_kohya, peft_to_old_diffusers, sdxl_sgm_name
from safetensors.torch import load_file, save_file

from loraloom.composition import (
    AdapterNameError,
    IncompatibleLoRA,
    LoRAFileError,
    UnsupportedLoRAFormat,
    load_lora,
    read_lora_info,
)
from loraloom.composition.metadata import family_from_metadata, read_sidecar, trigger_suggestions, write_sidecar
from loraloom.pipelines.tiny import random_lora_state_dict


def _flat(lora):
    return {(c, m): l for c, mods in lora.layers.items() for m, l in mods.items()}


def test_peft_layout_keeps_factors_alpha_and_metadata(lora_files):
    path = lora_files["style"]
    raw = load_file(str(path))
    lora = load_lora(path)
    assert lora.info.layout == "diffusers-peft"
    assert lora.info.family == "sd1" and lora.info.family_source == "modelspec.architecture"
    assert lora.category == "style" and lora.triggers == ["inkwash"]
    layer = lora.layers["unet"]["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert torch.equal(layer.down, raw["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"])
    assert torch.equal(layer.up, raw["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight"])
    assert layer.rank == 4 and layer.alpha == 3.0 and layer.scale == pytest.approx(0.75)
    assert "text_encoder" in lora.layers and lora.info.targets["unet"] == ["attn1.to_k", "attn1.to_out.0", "attn1.to_q", "attn1.to_v",
                                                                          "attn2.to_k", "attn2.to_out.0", "attn2.to_q", "attn2.to_v"]
    # factors only: memory is the size of the factors, never of dense deltas
    assert lora.nbytes == sum(t.numel() * t.element_size() for t in raw.values())


def test_kohya_layout_matches_peft_and_keeps_alpha(tmp_path, tiny_sd):
    unet_sd = {f"unet.{k}": v for k, v in random_lora_state_dict(tiny_sd.pipe.unet, 4, seed=3,
               targets=("to_q", "to_out.0", "proj_in", "conv1", "time_emb_proj")).items()}
    te_sd = {f"text_encoder.{k}": v for k, v in random_lora_state_dict(tiny_sd.pipe.text_encoder, 4, seed=4,
             targets=("q_proj", "out_proj", "fc1")).items()}
    peft = {**unet_sd, **te_sd}
    save_file(peft, str(tmp_path / "peft.safetensors"))
    save_file(peft_to_kohya(peft, alpha=2.0), str(tmp_path / "kohya.safetensors"))
    a, b = load_lora(tmp_path / "peft.safetensors"), load_lora(tmp_path / "kohya.safetensors")
    assert b.info.layout == "kohya"
    fa = _flat(a)
    fb = {(c, m.removeprefix("text_model.")): l for (c, m), l in _flat(b).items()}  # sd-scripts' transformers-4 names
    assert set(fa) == set(fb) and any(m.startswith("text_model.") for _, m in _flat(b))
    assert any(l.is_conv for l in fb.values()), "LoCon conv layers must load"
    for key in fa:
        assert torch.equal(fa[key].down, fb[key].down) and torch.equal(fa[key].up, fb[key].up)
        assert fb[key].alpha == 2.0 and fa[key].alpha == 4.0
    tiny_sd.add_lora(b)  # and it fits the model


def test_kohya_sdxl_sgm_names_are_remapped(tmp_path, tiny_sdxl):
    unet = tiny_sdxl.pipe.unet
    peft = {f"unet.{k}": v for k, v in random_lora_state_dict(unet, 4, seed=5, targets=("to_q", "to_v")).items()}
    peft.update({f"text_encoder_2.{k}": v for k, v in random_lora_state_dict(tiny_sdxl.pipe.text_encoder_2, 4, seed=6, targets=("q_proj",)).items()})
    kohya = peft_to_kohya(peft, alpha=4.0, sgm=sdxl_sgm_name)
    assert any("input_blocks" in k for k in kohya) and any("output_blocks" in k for k in kohya)
    save_file(kohya, str(tmp_path / "xl.safetensors"))
    lora = load_lora(tmp_path / "xl.safetensors", unet_config=unet.config)
    expected = {(k.split(".", 1)[0], k.split(".", 1)[1].rsplit(".lora_", 1)[0]) for k in peft}
    assert set(_flat(lora)) == expected
    assert lora.info.family == "sdxl"  # from the second text encoder
    tiny_sdxl.add_lora(lora)


def test_old_diffusers_layout(tmp_path, lora_files):
    peft = load_file(str(lora_files["char"]))
    save_file(peft_to_old_diffusers(peft), str(tmp_path / "old.safetensors"))
    a, b = load_lora(lora_files["char"]), load_lora(tmp_path / "old.safetensors")
    assert b.info.layout == "diffusers-old"
    assert set(_flat(a)) == set(_flat(b))
    for key, layer in _flat(a).items():
        assert torch.equal(layer.down, _flat(b)[key].down)


def test_attention_processor_layout(tmp_path, tiny_sd):
    """The oldest diffusers format (`processor.to_q_lora.down.weight`) loads through diffusers' converter."""
    m = "down_blocks.1.attentions.0.transformer_blocks.0.attn1"
    sd = {f"unet.{m}.processor.to_q_lora.down.weight": torch.randn(4, 64), f"unet.{m}.processor.to_q_lora.up.weight": torch.randn(64, 4),
          f"unet.{m}.processor.to_out_lora.down.weight": torch.randn(4, 64), f"unet.{m}.processor.to_out_lora.up.weight": torch.randn(64, 4)}
    save_file(sd, str(tmp_path / "procs.safetensors"))
    lora = load_lora(tmp_path / "procs.safetensors")
    assert set(lora.layers["unet"]) == {f"{m}.to_q", f"{m}.to_out.0"}
    tiny_sd.add_lora(lora)


def test_header_only_description_reads_no_weights(monkeypatch, lora_files):
    import safetensors

    calls = []
    real = safetensors.safe_open

    class Spy:
        def __init__(self, *a, **k):
            self.f = real(*a, **k)

        def __enter__(self):
            self.inner = self.f.__enter__()
            return self

        def __exit__(self, *a):
            return self.f.__exit__(*a)

        def get_tensor(self, k):
            calls.append(k)
            return self.inner.get_tensor(k)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    monkeypatch.setattr("loraloom.composition.lora_file.safe_open", Spy)
    info = read_lora_info(lora_files["bg"])
    assert calls == []
    assert info.rank == 4 and info.family == "sd1" and info.category == "background" and info.triggers == ["forest"]


@pytest.mark.parametrize("meta,family", [
    ({"ss_base_model_version": "sdxl_base_v1-0"}, "sdxl"),
    ({"ss_base_model_version": "sd_v1"}, "sd1"),
    ({"ss_base_model_version": "sd_v2_768_v"}, "sd2"),
    ({"ss_v2": "True"}, "sd2"),
    ({"ss_v2": "False"}, "sd1"),
    ({"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}, "sdxl"),
    ({"modelspec.architecture": "flux-1-dev/lora"}, "flux-1-dev"),
    ({}, None),
])
def test_family_from_header(meta, family):
    assert family_from_metadata(meta)[0] == family


@pytest.mark.parametrize("context,family", [(768, "sd1"), (1024, "sd2"), (2048, "sdxl")])
def test_family_from_shapes(tmp_path, context, family):
    m = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    save_file({f"unet.{m}.lora_A.weight": torch.zeros(4, context), f"unet.{m}.lora_B.weight": torch.zeros(640, 4)}, str(tmp_path / "x.safetensors"))
    info = read_lora_info(tmp_path / "x.safetensors")
    assert info.family == family and info.family_source == f"keys: cross-attention width {context}"
    assert info.key_families == (family,)


def test_trigger_suggestions_from_header():
    meta = {"modelspec.trigger_phrase": "sks dog, photo",
            "ss_tag_frequency": json.dumps({"10_dog": {"dog": 3, "grass": 7}, "5_x": {"grass": 1, "sks dog": 9}})}
    assert trigger_suggestions(meta) == ["sks dog", "photo", "grass", "dog"]


def test_sidecar_yaml_and_write_back(tmp_path, lora_files):
    path = tmp_path / "x.safetensors"
    path.write_bytes(lora_files["char"].read_bytes())
    (tmp_path / "x.yaml").write_text("category: Clothing\ntriggers: 'red hat, scarf'\nnote: keep me\n")
    assert read_sidecar(path) == {"category": "clothing", "triggers": ["red hat", "scarf"], "note": "keep me"}
    write_sidecar(path, category="object", triggers=["umbrella"])
    assert read_sidecar(path) == {"category": "object", "triggers": ["umbrella"], "note": "keep me"}
    (tmp_path / "x.yaml").write_text("category: spaceship\n")
    with pytest.raises(LoRAFileError, match="category 'spaceship'"):
        read_lora_info(path)


# --- bad input -------------------------------------------------------------------------------------------------
def test_truncated_file_names_file(tmp_path, lora_files):
    data = lora_files["char"].read_bytes()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(LoRAFileError) as err:
        load_lora(bad)
    assert str(bad) in str(err.value) and "truncated or corrupted" in str(err.value)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00\x01not a safetensors file at all" * 10)
    with pytest.raises(LoRAFileError, match="truncated or corrupted"):
        read_lora_info(junk)


def test_safetensors_that_is_not_a_lora(tmp_path, tiny_sd):
    path = tmp_path / "unet.safetensors"
    save_file({k: v.contiguous() for k, v in list(tiny_sd.pipe.unet.state_dict().items())[:20]}, str(path))
    with pytest.raises(LoRAFileError, match="does not contain LoRA weights"):
        load_lora(path)


@pytest.mark.parametrize("key,kind", [
    ("lora_unet_down_blocks_0_attentions_0_proj_in.on_input", "IA3"),
    ("lora_unet_down_blocks_0_attentions_0_proj_in.a1.weight", "GLoRA"),
    ("lora_unet_down_blocks_0_attentions_0_proj_in.lambda_layer", "T-LoRA"),
    ("unet.down_blocks.0.attentions.0.proj_in.oft_r", "OFT \\(PEFT\\)"),
    ("unet.down_blocks.0.attentions.0.proj_in.ia3_l", "IA3"),
])
def test_unsupported_adapter_types_are_named(tmp_path, key, kind):
    """Types loraloom cannot apply are refused by name, never dropped."""
    path = tmp_path / "x.safetensors"
    save_file({key: torch.zeros(2, 2), "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 2),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(UnsupportedLoRAFormat, match=kind) as err:
        load_lora(path)
    assert str(path) in str(err.value)
    with pytest.raises(UnsupportedLoRAFormat, match=kind):
        read_lora_info(path)


@pytest.mark.parametrize("key,kinds", [
    ("lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a", "LoRA and LoHa"),
    ("lora_unet_down_blocks_0_attentions_0_proj_in.lokr_w1", "LoRA and LoKr"),
    ("lora_unet_down_blocks_0_attentions_0_proj_in.diff", "LoRA and full-diff"),
])
def test_one_module_mixing_types_is_refused_naming_both(tmp_path, key, kinds):
    path = tmp_path / "x.safetensors"
    save_file({key: torch.zeros(2, 2), "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 2),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(LoRAFileError, match=kinds) as err:
        load_lora(path)
    assert str(path) in str(err.value) and "down_blocks_0_attentions_0_proj_in" in str(err.value)


def test_lycoris_keys_in_the_peft_layout_are_named(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"unet.down_blocks.0.attentions.0.proj_in.hada_w1_a": torch.zeros(2, 2),
               "unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(2, 2),
               "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(UnsupportedLoRAFormat, match="LoHa"):
        load_lora(path)


def test_dora_in_adapter_metadata_without_magnitudes_is_refused(tmp_path, lora_files):
    sd = load_file(str(lora_files["char"]))
    save_file(sd, str(tmp_path / "d.safetensors"), metadata={"lora_adapter_metadata": json.dumps({"unet.use_dora": True, "unet.r": 4})})
    with pytest.raises(LoRAFileError, match="DoRA.*lora_magnitude_vector"):
        load_lora(tmp_path / "d.safetensors")


def test_pickles_refused_unless_opted_in(tmp_path, lora_files):
    sd = load_file(str(lora_files["char"]))
    path = tmp_path / "old.ckpt"
    torch.save(sd, path)
    with pytest.raises(LoRAFileError, match="pickled checkpoint"):
        load_lora(path)
    with pytest.raises(LoRAFileError, match="pickled checkpoint"):
        read_lora_info(path)
    lora = load_lora(path, allow_pickle=True)
    assert set(_flat(lora)) == set(_flat(load_lora(lora_files["char"])))


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_opted_in_pickle_still_uses_weights_only(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"lora_unet_x.lora_down.weight": _Evil()}, path)
    with pytest.raises(LoRAFileError, match="weights_only=True"):
        load_lora(path, allow_pickle=True)


def test_duplicate_adapter_name(tiny_sd, lora_files):
    tiny_sd.load_lora(lora_files["char"], "a")
    with pytest.raises(AdapterNameError, match="already loaded"):
        tiny_sd.load_lora(lora_files["style"], "a")
    assert tiny_sd.loras["a"].category == "character"


def test_other_family_refused_before_any_weight_is_touched(tmp_path, tiny_sd, tiny_sdxl):
    from loraloom.pipelines.tiny import write_random_lora

    xl = write_random_lora(tiny_sdxl.pipe, tmp_path / "xl.safetensors", seed=1)
    before = weights_hash(tiny_sd.pipe.unet) + weights_hash(tiny_sd.pipe.text_encoder)
    with pytest.raises(IncompatibleLoRA) as err:
        tiny_sd.load_lora(xl)
    msg = str(err.value)
    assert "Stable Diffusion XL" in msg and str(xl) in msg and len(msg) < 600
    # an unlabelled file for another architecture is refused by what its keys show, naming both families
    sd = load_file(str(xl))
    save_file(sd, str(tmp_path / "nolabel.safetensors"))
    with pytest.raises(IncompatibleLoRA, match="its keys: several transformer blocks per attention layer") as err:
        tiny_sd.load_lora(tmp_path / "nolabel.safetensors")
    assert "Stable Diffusion XL" in str(err.value) and "Stable Diffusion 1.x" in str(err.value) and len(str(err.value)) < 800
    # and one whose keys show no family by the shape check, naming the model's family
    save_file({k: v for k, v in sd.items() if "transformer_blocks.1" not in k}, str(tmp_path / "nolabel2.safetensors"))
    with pytest.raises(IncompatibleLoRA, match="do not fit this Stable Diffusion 1.x model") as err:
        tiny_sd.load_lora(tmp_path / "nolabel2.safetensors")
    assert len(str(err.value)) < 800
    assert weights_hash(tiny_sd.pipe.unet) + weights_hash(tiny_sd.pipe.text_encoder) == before
    assert not tiny_sd.loras and all(not r.layers for r in tiny_sd.routers.values())
    assert all("forward" not in m.__dict__ for m in tiny_sd.pipe.unet.modules())


def test_keys_that_match_no_module_are_an_error(tmp_path, tiny_sd):
    """Never load 'nothing' silently: a LoRA whose modules the model lacks is refused."""
    save_file({"unet.not_a_block.to_q.lora_A.weight": torch.zeros(4, 32), "unet.not_a_block.to_q.lora_B.weight": torch.zeros(32, 4)},
              str(tmp_path / "x.safetensors"))
    with pytest.raises(IncompatibleLoRA, match="no such module"):
        tiny_sd.load_lora(tmp_path / "x.safetensors")


def test_converted_to_diffusers_keys_still_load(tmp_path, tiny_sd, lora_files):
    """`convert_state_dict_to_diffusers` output (which diffusers' own loader ignores) loads fully here."""
    from diffusers.utils import convert_state_dict_to_diffusers

    peft = load_file(str(lora_files["char"]))
    unet_part = convert_state_dict_to_diffusers({k[5:]: v for k, v in peft.items() if k.startswith("unet.")})
    save_file({f"unet.{k}": v for k, v in unet_part.items()}, str(tmp_path / "conv.safetensors"))
    lora = tiny_sd.load_lora(tmp_path / "conv.safetensors")
    assert len(lora.layers["unet"]) == len(load_lora(lora_files["char"]).layers["unet"])


def test_loras_cli_table_and_json(tmp_path, lora_files, capsys):
    from loraloom.app.cli import main

    (lora_files["char"].parent / "broken.safetensors").write_bytes(b"garbage")
    assert main(["loras", str(lora_files["char"].parent)]) == 0
    out = capsys.readouterr().out
    assert "char" in out and "character" in out and "ohwx" in out and "ERROR" in out
    assert main(["loras", str(lora_files["char"].parent), "--json"]) == 0
    rows = {r.get("name") or r["path"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["style"]["rank"] == 4 and rows["style"]["family"] == "sd1" and rows["style"]["category"] == "style"
    assert any(r["error"] and "truncated or corrupted" in r["error"] for r in rows.values())
