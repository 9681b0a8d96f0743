"""`loraloom eval` without the network: model lookups are local only unless --allow-download, a missing model is one
line (what, where, the fix) with no connection attempted, a cached hub model loads without a request, and toy-world
images get the toy world's own CLIP. Every test here runs with sockets refused and an empty Hugging Face cache."""

import csv
import os
import shutil
import socket

import pytest
from PIL import Image

from loraloom.app.cli import main
from loraloom.composition.files import WritePolicy
from loraloom.evaluation import toyworld
from loraloom.evaluation.clipscore import CLIPScorer, OpenCLIPEmbedder, hub_offline
from loraloom.evaluation.errors import EvaluationError
from loraloom.evaluation.fakes import tiny_clip_folder
from loraloom.evaluation.scoring import TOYWORLD_IDENTITY, is_toyworld_model
from loraloom.pipelines.spec import GenerationSpec, LoRARef, save_png

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def no_network(monkeypatch):
    """Every name lookup and connection fails at once and is recorded."""
    attempts = []

    def refuse(*args, **kw):
        attempts.append(args[:2])
        raise OSError("network refused by the test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", lambda self, address: refuse(address))
    monkeypatch.setattr(socket.socket, "connect_ex", lambda self, address: refuse(address))
    return attempts


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face hub cache of this test's own, and the hub's offline mode off (conftest turns it on for
    the whole suite): what loraloom does offline is its own doing here, not the test environment's."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    return cache


def write_pngs(folder, models):
    """One small loraloom PNG per model name (merge, seed 0, 1 …), with a trigger word to score."""
    lora = LoRARef("loras/girl.safetensors", 1.0, "girl", "character", ["girl"])
    for seed, model in enumerate(models):
        spec = GenerationSpec(model=model, prompt="a girl", loras=[lora], method="merge", seed=seed)
        save_png(Image.new("RGB", (32, 32), (90 + seed, 60, 30)), folder / spec.file_name(), spec, WritePolicy.at(folder))
    return folder


def error_line(err: str) -> str:
    """The one line `loraloom: error: … Fix: …` the command printed (its last stderr line), checked to be alone of its kind."""
    assert "Traceback" not in err
    errors = [l for l in err.splitlines() if l.startswith("loraloom: error: ")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]) and "Fix: " in errors[0], err
    return errors[0]


def test_default_clip_missing_fails_at_once_with_one_line(tmp_path, no_network, hf_cache, capsys):
    folder = write_pngs(tmp_path / "gen", ["tiny:sd1", "tiny:sd1"])
    assert main(["eval", str(folder), "--device", "cpu"]) == 2
    line = error_line(capsys.readouterr().err)
    assert "'openai/clip-vit-base-patch16'" in line and str(hf_cache) in line  # what was looked for, and where
    assert "--clip" in line and "--allow-download" in line  # the fix
    assert no_network == []  # not one connection attempted (was: 6 HEAD requests and ~30 s of retries)
    assert not (folder / "loraloom_scores.csv").exists()


def test_a_cached_hub_model_loads_without_a_request(tmp_path, no_network, hf_cache):
    from huggingface_hub import constants

    repo = hf_cache / "models--loraloom-test--tiny-clip"
    tiny_clip_folder(repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    scorer = CLIPScorer.load("loraloom-test/tiny-clip", device="cpu")
    assert scorer.describe()["model"] == "loraloom-test/tiny-clip"
    assert len(scorer.score([Image.new("RGB", (32, 32))], ["girl"])) == 1
    assert no_network == []  # transformers' side lookups (adapter_config.json …) answered from the cache too
    assert constants.HF_HUB_OFFLINE is False and "HF_HUB_OFFLINE" not in os.environ  # offline only while loading


def test_hub_offline_nests_and_restores(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with hub_offline():
        with hub_offline():
            assert constants.is_offline_mode() and os.environ["HF_HUB_OFFLINE"] == "1"
        assert constants.is_offline_mode()
    assert not constants.is_offline_mode() and "HF_HUB_OFFLINE" not in os.environ
    with hub_offline(False):  # --allow-download: nothing changes
        assert not constants.is_offline_mode()


def test_open_clip_weights_missing_fail_at_once(no_network, hf_cache):
    with pytest.raises(EvaluationError) as info:
        OpenCLIPEmbedder("ViT-B-16", "openai", device="cpu")
    msg = str(info.value)
    assert "\n" not in msg and "timm/vit_base_patch16_clip_224.openai" in msg and str(hf_cache) in msg
    assert "--allow-download" in msg
    with pytest.raises(EvaluationError, match="not in the local Hugging Face cache"):
        OpenCLIPEmbedder("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", device="cpu")
    with pytest.raises(EvaluationError, match="no checkpoint file"):
        OpenCLIPEmbedder("ViT-B-16", "/nowhere/ckpt.pt", device="cpu")
    assert no_network == []


def test_dino_and_vlm_missing_fail_at_once(tmp_path, no_network, hf_cache):
    from loraloom.evaluation.judges.local_vlm import TransformersVLMJudge
    from loraloom.evaluation.similarity import DinoEncoder

    with pytest.raises(EvaluationError, match="local Hugging Face cache") as info:
        DinoEncoder("facebook/dinov2-base", device="cpu")
    assert str(hf_cache) in str(info.value)
    with pytest.raises(EvaluationError, match="--allow-download"):
        TransformersVLMJudge("Qwen/Qwen2.5-VL-7B-Instruct", device="cpu")
    with pytest.raises(EvaluationError, match="no such folder"):
        TransformersVLMJudge(tmp_path / "nope", device="cpu")
    assert no_network == []


def test_allow_download_turns_local_only_off(tmp_path, monkeypatch, capsys):
    import loraloom.evaluation.clipscore as clipscore

    seen = []

    def fake_load(spec, device="auto", local_files_only=True, **kw):
        seen.append((spec, local_files_only))
        raise EvaluationError("stop here. Fix: none needed")

    monkeypatch.setattr(clipscore.CLIPScorer, "load", staticmethod(fake_load))
    folder = write_pngs(tmp_path / "gen", ["tiny:sd1"])
    assert main(["eval", str(folder)]) == 2
    assert main(["eval", str(folder), "--allow-download"]) == 2
    assert seen == [("openai/clip-vit-base-patch16", True), ("openai/clip-vit-base-patch16", False)]


# --- the toy world's CLIP -----------------------------------------------------------------------------------------

def test_toyworld_rule(tmp_path):
    assert is_toyworld_model(str(toyworld.MODEL))
    assert is_toyworld_model("/home/someone/else/loraloom/assets/toyworld/model")  # written on another machine
    assert is_toyworld_model("C:\\Users\\me\\site-packages\\loraloom\\assets\\toyworld\\model\\")
    assert is_toyworld_model("../toyworld/model/")
    for other in ("tiny:sd1", "runwayml/stable-diffusion-v1-5", "/x/toyworld/model2", "/x/toyworld-train/model",
                  "/x/toyworld/model/unet", "model", ""):
        assert not is_toyworld_model(other), other
    # a folder here that is only named toyworld/model is not the toy world; one holding its UNet weights is
    impostor = tmp_path / "a" / "toyworld" / "model"
    (impostor / "unet").mkdir(parents=True)
    (impostor / TOYWORLD_IDENTITY).write_bytes(b"other weights")
    assert not is_toyworld_model(str(impostor))
    copy = tmp_path / "b" / "toyworld" / "model"
    (copy / "unet").mkdir(parents=True)
    shutil.copyfile(toyworld.MODEL / TOYWORLD_IDENTITY, copy / TOYWORLD_IDENTITY)
    assert is_toyworld_model(str(copy))


def test_toyworld_images_get_the_toy_clip_and_say_so(tmp_path, no_network, hf_cache, capsys):
    folder = write_pngs(tmp_path / "gen", [str(toyworld.MODEL), "/elsewhere/loraloom/assets/toyworld/model"])
    assert main(["eval", str(folder), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"the toy world's own CLIP ({toyworld.CLIP})" in out and "--clip picks another" in out
    with open(folder / "loraloom_scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and {r["clip_model"] for r in rows} == {str(toyworld.CLIP)} and all(r["clip_score"] for r in rows)
    assert no_network == []


def test_toyworld_images_with_an_explicit_clip_use_it(tmp_path, capsys):
    clip = tiny_clip_folder(tmp_path / "clip")
    folder = write_pngs(tmp_path / "gen", [str(toyworld.MODEL)])
    assert main(["eval", str(folder), "--device", "cpu", "--clip", str(clip)]) == 0
    out = capsys.readouterr().out
    assert "toy world's own CLIP" not in out and f"transformers {clip}" in out


def test_a_mixed_folder_keeps_the_default_clip(tmp_path, no_network, hf_cache, capsys):
    folder = write_pngs(tmp_path / "gen", [str(toyworld.MODEL), "tiny:sd1"])
    assert main(["eval", str(folder), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "1 of 2 images come from the toy world" in err  # said, then the default CLIP is looked for …
    assert "'openai/clip-vit-base-patch16'" in error_line(err)  # … and is not cached here
