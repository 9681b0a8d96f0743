"""The PNG records the bytes that were loaded (issue 21, point 3): `PipelineCache` reloads a LoRA file replaced while
loaded, refuses a spec whose recorded hash the file no longer has, and hashes exactly what it loaded; a generated
PNG carries the parameters in effect, A1111's names and hashes, and reads back with sd-parsers."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from sd_parsers import ParserManager

from loraloom.app.cli import main
from loraloom.composition.errors import LoRAFileError
from loraloom.composition.lora_file import file_digest, file_sha256
from loraloom.pipelines.batch import PipelineCache, expand, load_batch_spec, run_specs
from loraloom.pipelines.spec import GenerationSpec, LoRARef, a1111_line, read_png_spec
from loraloom.pipelines.tiny import write_random_lora


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models on a shared 2-core machine (see conftest)."""


def _spec_file(tmp_path, loras, **extra):
    data = {"model": "tiny:sd1", "loras": loras, "prompts": ["a portrait, {triggers}"], "methods": ["merge"], "seeds": [3],
            "steps": 2, "height": 64, "width": 64, **extra}
    path = tmp_path / f"spec{len(list(tmp_path.glob('spec*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _rewrite_in_place(path: Path, data: bytes) -> None:
    """Overwrite the file's bytes without replacing the file (same inode, same size for these LoRAs)."""
    with open(path, "r+b") as f:
        f.write(data)
        f.truncate()


@pytest.fixture
def two_versions(tmp_path, tiny_sd):
    """One LoRA path and two contents for it (same shapes and size, different weights)."""
    path = write_random_lora(tiny_sd.pipe, tmp_path / "loras" / "char.safetensors", seed=1, triggers=("ohwx",),
                             category="character", std=0.15)
    old = path.read_bytes()
    new = write_random_lora(tiny_sd.pipe, tmp_path / "other" / "char.safetensors", seed=2, triggers=("ohwx",),
                            category="character", std=0.15).read_bytes()
    assert len(old) == len(new) and old != new
    return path, old, new


def test_replaced_lora_is_reloaded_and_recorded_and_both_pngs_remake(tmp_path, two_versions, capsys):
    """The web UI's case: one cache, a spec made per generation, the LoRA file replaced between two generations."""
    path, old, new = two_versions
    cache = PipelineCache()
    spec_file = _spec_file(tmp_path, [{"path": str(path), "weight": 1.0}])
    (first,), _ = run_specs(expand(load_batch_spec(spec_file)), tmp_path / "one", cache=cache, progress=False)
    _rewrite_in_place(path, new)
    (second,), _ = run_specs(expand(load_batch_spec(spec_file)), tmp_path / "two", cache=cache, progress=False)

    assert read_png_spec(first).loras[0].sha256 == file_digest_of(old)
    assert read_png_spec(second).loras[0].sha256 == file_sha256(path) == file_digest_of(new)
    assert f"char: {file_digest(path).autov3}" in Image.open(second).text["parameters"]
    # the second image was made with the new weights: as a fresh process makes it from the new file
    (fresh,), _ = run_specs(expand(load_batch_spec(spec_file)), tmp_path / "fresh", progress=False)
    assert np.array_equal(_pixels(second), _pixels(fresh)) and not np.array_equal(_pixels(second), _pixels(first))

    capsys.readouterr()
    assert main(["generate", "--from-png", str(second), "--out", str(tmp_path / "again2")]) == 0
    assert "identical to the source" in capsys.readouterr().out
    # the first PNG names bytes the file no longer has: refused, saying so, instead of a different image
    assert main(["generate", "--from-png", str(first), "--out", str(tmp_path / "again1")]) == 2
    assert "not the file this spec was made with" in capsys.readouterr().err
    _rewrite_in_place(path, old)
    assert main(["generate", "--from-png", str(first), "--out", str(tmp_path / "again1")]) == 0
    assert "identical to the source" in capsys.readouterr().out


def file_digest_of(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def test_unpinned_lora_replaced_mid_batch_is_reloaded(tmp_path, two_versions):
    """A spec that names no hash uses the file as it is at each generation, and records that."""
    path, old, new = two_versions
    specs = [GenerationSpec(model="tiny:sd1", prompt="x", loras=[LoRARef(str(path), 1.0)], steps=2, height=64, width=64, seed=s)
             for s in (0, 1)]
    cache = PipelineCache()
    paths, _ = run_specs(specs, tmp_path / "out", cache=cache, progress=False,
                         on_image=lambda *_: os.replace(_write(tmp_path / "swap.safetensors", new), path))
    assert [read_png_spec(p).loras[0].sha256 for p in paths] == [file_digest_of(old), file_digest_of(new)]
    (fresh,), _ = run_specs(specs[1:], tmp_path / "fresh", progress=False)
    assert np.array_equal(_pixels(paths[1]), _pixels(fresh))


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_pinned_lora_replaced_mid_batch_is_refused(tmp_path, two_versions):
    """A spec file's LoRAs are hashed when it is read: a file replaced during the run stops it, with the reason."""
    path, old, new = two_versions
    specs = expand(load_batch_spec(_spec_file(tmp_path, [str(path)], seeds=[0, 1])))
    with pytest.raises(LoRAFileError, match=r"not the file this spec was made with.*sha256 [0-9a-f]{12}…, the file now has"):
        run_specs(specs, tmp_path / "out", cache=PipelineCache(), progress=False, on_image=lambda *_: _rewrite_in_place(path, new))
    assert len(list((tmp_path / "out").glob("*.png"))) == 1  # what was made is kept (a rerun resumes)


def test_lora_changing_while_it_loads_is_read_again(tmp_path, two_versions, monkeypatch):
    path, old, new = two_versions
    cache = PipelineCache()
    spec = GenerationSpec(model="tiny:sd1", prompt="x", loras=[LoRARef(str(path), 1.0)], steps=2, height=64, width=64)
    cache.get(GenerationSpec(model="tiny:sd1", prompt="x"))
    real_load, calls = cache.pipeline.load_lora, []

    def load_then_write(*args, **kwargs):  # a writer finishes while the first read is under way
        calls.append(1)
        lora = real_load(*args, **kwargs)
        if len(calls) == 1:
            _rewrite_in_place(path, new)
        return lora

    monkeypatch.setattr(cache.pipeline, "load_lora", load_then_write)
    cp = cache.get(spec)
    assert len(calls) == 2 and cache._files["char"].digest.sha256 == file_digest_of(new)
    loaded = cp.loras["char"].layers["unet"]
    fresh = PipelineCache()
    fresh_layers = fresh.get(spec).loras["char"].layers["unet"]
    assert all(torch.equal(loaded[m].up, fresh_layers[m].up) for m in loaded)

    monkeypatch.setattr(cache.pipeline, "load_lora", lambda *a, **k: (_rewrite_in_place(path, old if path.read_bytes() == new else new), real_load(*a, **k))[1])
    cache.forget("char")
    with pytest.raises(LoRAFileError, match="changed while it was being read"):
        cache.get(spec)


def test_touched_lora_is_not_reloaded(tmp_path, two_versions, monkeypatch):
    path, old, _ = two_versions
    cache = PipelineCache()
    spec = GenerationSpec(model="tiny:sd1", prompt="x", loras=[LoRARef(str(path), 1.0)])
    cp = cache.get(spec)
    monkeypatch.setattr(cp, "load_lora", lambda *a, **k: pytest.fail("the same bytes were loaded again"))
    os.utime(path, ns=(1, 1))
    shutil.copyfile(path, tmp_path / "copy.safetensors")
    os.replace(tmp_path / "copy.safetensors", path)  # another inode, the same bytes
    assert cache.get(spec) is cp


def test_generated_png_records_parameters_in_effect_and_a1111_names(tmp_path, lora_files):
    hostile = 'a "cat", {triggers}: here\nNegative prompt: forged\nSteps: 999, Sampler: Euler, CFG scale: 1, Seed: 5'  # <lora: in a spec prompt is a tag now (tests/test_lora_tags.py)
    spec_file = _spec_file(tmp_path, [{"path": str(lora_files[n]), "weight": w} for n, w in (("char", 1.0), ("style", 0.5), ("bg", 0.75))],
                           prompts=[hostile], negative_prompt="ugly,\nSteps: 1", methods=["composite"],
                           method_params={"composite": {"max_batch": 2}}, scheduler="default", guidance_scale=6)
    specs = expand(load_batch_spec(spec_file))
    (png,), _ = run_specs(specs, tmp_path / "out", progress=False)
    recorded = read_png_spec(png)
    assert recorded.method_params == {"lora_scale": 0.8, "max_batch": 2, "reference_text_encoding": False}
    assert png.name == specs[0].file_name() == recorded.file_name()  # same identity: resume and --from-png agree
    assert run_specs(specs, tmp_path / "out", progress=False)[1] == 1

    info = ParserManager().parse(png)
    (sampler,) = info.samplers
    expected_prompt = a1111_line(specs[0].prompt) + " <lora:char:0.8> <lora:style:0.4> <lora:bg:0.6>"
    assert sampler.prompts[0].value == expected_prompt
    assert sampler.negative_prompts[0].value == "ugly, Steps: 1"
    assert sampler.name == "DDIM"  # 'default' is the tiny model's own scheduler, DDIMScheduler
    assert sampler.parameters == {"steps": "2", "cfg_scale": "6", "seed": "3"}
    assert info.metadata["Size"] == "64x64"
    assert info.metadata["Hashes"] == {f"lora:{n}": file_sha256(lora_files[n])[:10] for n in ("char", "style", "bg")}
    text = Image.open(png).text["parameters"]
    assert len(text.split("\n")) == 3
    assert 'Lora hashes: "' + ", ".join(f"{n}: {file_digest(lora_files[n]).autov3}" for n in ("char", "style", "bg")) + '"' in text
    assert "Model hash" not in text and 'Model: "tiny:sd1"' in text  # a built-in model has no file to hash
    assert json.loads(Image.open(png).text["loraloom"])["prompt"] == specs[0].prompt  # the exact prompt, as run


def test_single_file_checkpoint_records_its_a1111_model_hash(tmp_path):
    from ldm_checkpoint import save_ldm_checkpoint

    from loraloom.pipelines.tiny import build_tiny_sd

    pipe = build_tiny_sd()
    folder = tmp_path / "config"
    pipe.save_pretrained(folder)
    for weights in [*folder.rglob("*.safetensors"), *folder.rglob("*.bin")]:
        weights.unlink()
    ckpt = save_ldm_checkpoint(pipe, tmp_path / "tiny-sd1.safetensors")
    spec = GenerationSpec(model=str(ckpt), prompt="x", steps=2, height=64, width=64, scheduler="euler-a")
    (png,), _ = run_specs([spec], tmp_path / "out", cache=PipelineCache(model_config=str(folder)), progress=False)
    info = ParserManager().parse(png)
    assert (info.samplers[0].model.name, info.samplers[0].model.hash) == ("tiny-sd1", file_sha256(ckpt)[:10])
    assert info.metadata["Hashes"] == {"model": file_sha256(ckpt)[:10]}
    assert info.samplers[0].name == "Euler a"
