"""Hypernetwork merging (LoRA.rar): the column-wise network against its dense definition, where it applies,
checkpoints, the method, and the trainer (split by LoRA, validation, resume) through the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from loraloom.composition.errors import LoraloomError
from loraloom.composition.files import WritePolicy
from loraloom.composition.hypernetwork import MergeHypernetwork, delta_rms, hypernet_coefficients, read_info, widths_of
from loraloom.composition.lora import LoRALayer

pytestmark = pytest.mark.usefixtures("one_thread")


KW = dict(num_inference_steps=2, seed=1, scheduler="ddim", output_type="latent", progress_bar=False, height=32, width=32)


def _random_net(widths=(8, 32, 64), seed=0, input_scale=3.0):
    torch.manual_seed(seed)
    net = MergeHypernetwork(widths, hidden=16, input_scale=input_scale)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return net


def test_factor_form_equals_dense_columns():
    """coefficients() from the factors == forward() on the columns of [scaled dW_c; scaled dW_s] (docs/methods/hypernet.md#architecture)."""
    g = torch.Generator().manual_seed(1)
    c = LoRALayer(torch.randn(2, 5, generator=g), torch.randn(8, 2, generator=g), alpha=6.0)
    s = LoRALayer(torch.randn(4, 5, generator=g), torch.randn(8, 4, generator=g), alpha=1.0)
    net = _random_net()
    columns = torch.cat([c.delta(), s.delta()], 0).T  # row j = [dW_c[:, j]; dW_s[:, j]], length 2 * out
    dense = net(columns)
    m_c, m_s = net.coefficients(c, s)
    torch.testing.assert_close(torch.stack([m_c, m_s], 1), dense, atol=1e-5, rtol=1e-5)
    assert net.inputs["8"].in_features == 16 and net.head.out_features == 2
    with pytest.raises(LoraloomError, match="column widths"):
        net.coefficients(LoRALayer(torch.ones(1, 3), torch.ones(5, 1), 1.0), LoRALayer(torch.ones(1, 3), torch.ones(5, 1), 1.0))
    fresh = MergeHypernetwork([8], hidden=16)
    fresh.head.weight.data.zero_()
    torch.testing.assert_close(torch.stack(fresh.coefficients(c, s)), torch.ones(2, 5))  # bias (1, 1): direct merge


def test_delta_rms_from_factors():
    g = torch.Generator().manual_seed(2)
    from loraloom.composition.lora import LoRA

    layer = LoRALayer(torch.randn(3, 7, generator=g), torch.randn(6, 3, generator=g), alpha=1.5)
    lora = LoRA("x", {"unet": {"a.attn1.to_q": layer, "a.attn1.to_k": layer}}, None)
    assert delta_rms([lora], ("to_q",)) == pytest.approx(float(layer.delta().pow(2).mean().sqrt()), rel=1e-6)
    assert widths_of([lora], ("to_q", "to_out.0")) == [6]


@pytest.fixture
def pair(tiny_sd, tmp_path):
    from loraloom.pipelines.tiny import write_random_lora

    paths = {
        "sty": write_random_lora(tiny_sd.pipe, tmp_path / "sty.safetensors", seed=2, rank=4, alpha=8.0, category="style", std=0.15),
        "subj": write_random_lora(tiny_sd.pipe, tmp_path / "subj.safetensors", seed=1, rank=2, alpha=1.0, category="character", std=0.15),
    }
    for name, p in paths.items():
        tiny_sd.load_lora(p, name)
    return tiny_sd, paths


def test_applied_to_q_and_out_only(pair):
    cp, _ = pair
    subj, sty = cp.loras["subj"], cp.loras["sty"]
    net = _random_net(widths_of([subj, sty], ("to_q", "to_out.0")))
    coefs = hypernet_coefficients(net, subj, sty)["unet"]
    assert coefs and all(p.endswith(("attn1.to_q", "attn2.to_q", "to_out.0")) for p in coefs)
    assert len(coefs) == 6 * 2 * 2  # 6 transformer blocks x (attn1, attn2) x (to_q, to_out.0)
    avg = hypernet_coefficients(net, subj, sty, kv_merge="average")["unet"]
    kv = [p for p in avg if p.endswith(("to_k", "to_v"))]
    assert len(kv) == 24 and all(torch.equal(avg[p][0], torch.full_like(avg[p][0], 0.5)) for p in kv)


def test_method_equals_merge_of_the_merged_lora(pair, tmp_path):
    """The hypernet method == Merge (scale 1) of the LoRA `loraloom hypernet merge` writes; that file loads in
    diffusers' load_lora_weights with the same image."""
    from loraloom.app.cli import main
    from loraloom.pipelines.tiny import build_tiny_sd

    cp, paths = pair
    ckpt = _random_net(widths_of([cp.loras["subj"], cp.loras["sty"]], ("to_q", "to_out.0"))).save(tmp_path / "h.safetensors", WritePolicy.at(tmp_path), {"note": "test"})
    assert read_info(ckpt)["info"] == {"note": "test"}
    out = cp("a red star", loras=["sty", "subj"], method="hypernet", method_params={"checkpoint": str(ckpt)}, **KW)
    assert out.extras["hypernet"]["subject"] == "subj"
    merged_file = tmp_path / "merged.safetensors"
    assert main(["hypernet", "merge", str(paths["subj"]), str(paths["sty"]), "--checkpoint", str(ckpt), "-o", str(merged_file)]) == 0
    cp.load_lora(merged_file, "merged")
    plain = cp("a red star", loras=["merged"], method="merge", method_params={"lora_scale": 1.0}, **KW).latents
    torch.testing.assert_close(plain, out.latents, atol=1e-5, rtol=0)
    direct = cp("a red star", loras=["sty", "subj"], method="merge", method_params={"lora_scale": 1.0}, **KW).latents
    assert (direct - out.latents).abs().max() > 1e-4  # the coefficients changed something

    ref = build_tiny_sd()
    ref.set_progress_bar_config(disable=True)
    ref.load_lora_weights(str(tmp_path), weight_name="merged.safetensors", adapter_name="m")
    ours = cp("a red star", loras=["merged"], method="merge", method_params={"lora_scale": 1.0, "fuse": False},
              **{**KW, "scheduler": "default"}).latents
    want = ref("a red star", num_inference_steps=2, guidance_scale=7.5, height=32, width=32,
               generator=torch.Generator().manual_seed(1), output_type="latent").images
    torch.testing.assert_close(ours, want, atol=1e-4, rtol=0)
    with pytest.raises(LoraloomError, match="no hypernetwork checkpoint"):
        cp("x", loras=["sty", "subj"], method="hypernet", method_params={"checkpoint": str(tmp_path / "none.safetensors")}, **KW)


def test_trainer_cli_split_validation_and_resume(tiny_sd, tmp_path, capsys):
    """3 subject and 3 style LoRAs, one of each held out: training pairs never use them, validation only uses them;
    a run stopped after 2 epochs and resumed to 3 equals a straight 3-epoch run."""
    from loraloom.app.cli import main
    from loraloom.pipelines.tiny import write_random_lora

    for kind, cat in (("subjects", "character"), ("styles", "style")):
        for i in range(3):
            write_random_lora(tiny_sd.pipe, tmp_path / kind / f"{kind[:-1]}{i}.safetensors", seed=10 * i + len(kind), rank=2,
                              category=cat, triggers=(f"{kind[:3]}{i}",), text_encoder=False, std=0.15)
    from PIL import Image

    (tmp_path / "images" / "subject0").mkdir(parents=True)
    for i in range(2):  # training images for one LoRA: used instead of generated references
        Image.fromarray((torch.rand(40, 48, 3) * 255).byte().numpy()).save(tmp_path / "images" / "subject0" / f"{i}.png")
    common = ["hypernet", "train", "--model", "tiny:sd1", "--images", str(tmp_path / "images"), "--subjects", str(tmp_path / "subjects"), "--styles",
              str(tmp_path / "styles"), "--images-per-lora", "1", "--reference-steps", "1", "--height", "32", "--width", "32",
              "--val-subjects", "1", "--val-styles", "style2", "--val-every", "1", "--checkpoint-every", "1",
              "--hidden", "8", "--no-progress"]
    assert main([*common, "--epochs", "2", "--out", str(tmp_path / "a.safetensors"), "--work", str(tmp_path / "wa")]) == 0
    assert main([*common, "--epochs", "3", "--out", str(tmp_path / "a.safetensors"), "--work", str(tmp_path / "wa")]) == 0
    assert main([*common, "--epochs", "3", "--out", str(tmp_path / "b.safetensors"), "--work", str(tmp_path / "wb")]) == 0
    assert "validation loss" in capsys.readouterr().out
    a, b = MergeHypernetwork.load(tmp_path / "a.safetensors"), MergeHypernetwork.load(tmp_path / "b.safetensors")
    for (k, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(va, vb, msg=k)
    info = read_info(tmp_path / "b.safetensors")["info"]
    assert info["val_styles"] == ["style/style2"] and len(info["val_subjects"]) == 1
    held = set(info["val_subjects"] + info["val_styles"])
    assert not held & set(info["train_subjects"] + info["train_styles"])
    assert info["epochs"] == 3 and [v["epoch"] for v in info["validation"]] == [1, 2, 3]
    assert a.widths == [64] and a.input_scale > 1  # the tiny UNet attends at 64 channels only; 1 / RMS of small deltas
    from safetensors.torch import load_file

    refs = {p.stem: load_file(p)["latents"].shape for p in (tmp_path / "wb" / "references").glob("*.safetensors")}
    assert refs["subject__subject0"] == (2, 4, 16, 16) and refs["subject__subject1"] == (1, 4, 16, 16)
    state = torch.load(tmp_path / "wb" / "checkpoint.pt", weights_only=True)
    assert all(h["subject"] not in held and h["style"] not in held for h in state["history"])
    assert all(json.loads(json.dumps(h)) for h in state["history"])
    with pytest.raises(SystemExit):
        main(["hypernet", "train", "--model", "tiny:sd1"])


def test_all_three_methods_run_on_sdxl(tiny_sdxl, tmp_path):
    """SDXL (two text encoders, added time/text conditioning): K-LoRA, ZipLoRA and the hypernetwork all run."""
    from loraloom.pipelines.tiny import write_random_lora

    for name, cat, seed in (("subj", "character", 1), ("sty", "style", 2)):
        tiny_sdxl.load_lora(write_random_lora(tiny_sdxl.pipe, tmp_path / f"{name}.safetensors", seed=seed, category=cat,
                                              triggers=(name,), std=0.1), name)
    net = _random_net(widths_of([tiny_sdxl.loras["subj"], tiny_sdxl.loras["sty"]], ("to_q", "to_out.0")))
    ckpt = net.save(tmp_path / "h.safetensors", WritePolicy.at(tmp_path))
    kw = dict(num_inference_steps=1, seed=0, output_type="latent", progress_bar=False, height=32, width=32)
    base = tiny_sdxl("x", **kw).latents
    for method, params in (("klora", {}), ("ziplora", {"steps": 1, "reference_images": 1, "reference_steps": 1, "progress": False}),
                           ("hypernet", {"checkpoint": str(ckpt)})):
        out = tiny_sdxl("x", loras=["sty", "subj"], method=method, method_params=params, **kw).latents
        assert torch.isfinite(out).all() and (out - base).abs().max() > 1e-4, method
