"""`loraloom generate`: spec files, resume, atomic writes, PNG metadata, reproduction from a PNG."""

from __future__ import annotations

import json
import shutil
from contextlib import nullcontext
from pathlib import Path

import pytest
import yaml
from PIL import Image

from loraloom.app.cli import main
from loraloom.pipelines.batch import expand, load_batch_spec, run_specs
from loraloom.pipelines.spec import GenerationSpec, read_png_spec

EXAMPLE = Path(__file__).resolve().parents[1] / "assets" / "examples" / "tiny_sd1.yaml"


def _spec(tmp_path, lora_files, **extra):
    data = {
        "model": "tiny:sd1",
        "loras": [{"path": str(lora_files["char"]), "weight": 1.0}, {"path": str(lora_files["style"]), "weight": 0.5}],
        "prompts": ["a portrait, {triggers}", "plain"],
        "methods": ["merge", "composite"],
        "seeds": [0, 1],
        "steps": 2,
        "height": 64,
        "width": 64,
        "out": str(tmp_path / "out"),
        **extra,
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_expand_grid_triggers_and_sidecar(tmp_path, lora_files):
    specs = expand(load_batch_spec(_spec(tmp_path, lora_files)))
    assert len(specs) == 2 * 2 * 2
    assert specs[0].prompt == "a portrait, ohwx, inkwash"
    assert specs[0].loras[0].category == "character" and specs[0].loras[1].triggers == ["inkwash"]
    assert len({s.identity() for s in specs}) == 8


def test_cli_overrides(tmp_path, lora_files):
    batch = load_batch_spec(_spec(tmp_path, lora_files), {"methods": ["switch"], "seeds": [7], "steps": 3})
    assert batch.methods == ["switch"] and batch.seeds == [7] and batch.template.steps == 3


@pytest.mark.parametrize("bad,msg", [
    ({"colour": "red"}, "unknown field"),
    ({"methods": ["nonsense"]}, "unknown method"),
    ({"methods": ["composite"], "method_params": {"composite": 5}}, "must map a method name"),
    ({"methods": ["composite"], "method_params": {"composite": {"max_btch": 2}}}, "no parameter.*max_btch"),
    ({"methods": ["merge"], "method_params": {"composte": {"max_batch": 2}}}, "unknown method 'composte'"),
    ({"methods": ["merge"], "method_params": {"composite": {"max_btch": 2}}}, "no parameter.*max_btch"),
    ({"steps": 0}, "steps must be between 1 and 1000"),
    ({"guidance_scale": "high"}, "guidance_scale must be a number"),
    ({"height": 64.5}, "height must be a whole number"),
    ({"height": 100000}, "height must be between 8 and 8192"),
    ({"height": 4096, "width": 4096}, "more than the limit"),
    ({"height": 100}, "height must be a multiple of 8"),
    ({"scheduler": "FlowMatchEulerDiscreteScheduler"}, "does not sample Stable Diffusion"),
    ({"scheduler": "warp-drive"}, "unknown scheduler"),
    ({"loras": [{"path": "x.safetensors", "weight": "heavy"}]}, "weight must be a number"),
    ({"dtype": "float8"}, "dtype 'float8' is not one of"),
    ({"prompts": ["a portrait <lora:chr:1>"]}, r"prompt: tag <lora:chr:1>: the spec has no LoRA named 'chr'; its LoRAs: char, style"),
    ({"prompts": ["x <lora:char:1:lbw=SOME>"]}, r"tag <lora:char:1:lbw=SOME>: lbw=SOME is neither a preset"),
    ({"loras": [{"path": "x.safetensors", "lbw": [1, 2, "R"]}]}, r"LoRA x: lbw value 'R' is not a number"),
    ({"regions": [{"mask": "left", "loras": ["nobody"]}]}, r"region 1 \(left\): LoRA 'nobody' is not one of this spec's LoRAs"),
    ({"regions": [{"mask": "elsewhere.png", "prompt": "x"}]}, r"region 1 \(elsewhere.png\): mask image .*: no such file"),
    ({"regions": [{"mask": "left", "prompt": "x"}], "methods": ["cmlora"]}, r"method 'cmlora' has no meaning for regions"),
])
def test_bad_spec_errors(tmp_path, lora_files, bad, msg, monkeypatch):
    """Refused when the spec is read, before any model loads."""
    from loraloom.composition.errors import SpecError
    from loraloom.pipelines import ComposedPipeline

    monkeypatch.setattr(ComposedPipeline, "from_pretrained", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises((SpecError, ValueError), match=msg):
        load_batch_spec(_spec(tmp_path, lora_files, **bad))


def test_missing_lora_file_is_reported(tmp_path, lora_files, capsys):
    spec = _spec(tmp_path, lora_files)
    data = yaml.safe_load(spec.read_text())
    data["loras"][0]["path"] = "nowhere.safetensors"
    spec.write_text(yaml.safe_dump(data))
    assert main(["generate", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "nowhere.safetensors" in err and "no such LoRA file" in err


def test_generate_resume_and_png_metadata(tmp_path, lora_files, capsys):
    spec = _spec(tmp_path, lora_files, prompts=["a portrait, {triggers}"], methods=["merge", "switch"], seeds=[0])
    assert main(["generate", str(spec)]) == 0
    out = tmp_path / "out"
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 2 and "2 image(s) written" in capsys.readouterr().out
    im = Image.open(pngs[0])
    assert im.size == (64, 64)
    meta = json.loads(im.text["loraloom"])
    assert meta["prompt"] == "a portrait, ohwx, inkwash" and len(meta["loras"]) == 2 and meta["loras"][0]["sha256"]
    params = im.text["parameters"]
    # the tag carries the strength applied: weight 1 x merge's lora_scale 0.8
    assert "<lora:char:0.8>" in params and "Negative prompt:" in params and "Steps: 2" in params and "Seed: 0" in params
    # rerun: nothing regenerated, files untouched
    mtimes = {p: p.stat().st_mtime_ns for p in pngs}
    assert main(["generate", str(spec)]) == 0
    assert "0 image(s) written, 2 already there" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in pngs} == mtimes
    # a deleted image is regenerated alone, identically
    data = pngs[1].read_bytes()
    pngs[1].unlink()
    assert main(["generate", str(spec)]) == 0
    assert "1 image(s) written" in capsys.readouterr().out and pngs[1].read_bytes() == data


def test_interrupted_write_leaves_no_partial_file(tmp_path, lora_files, monkeypatch):
    specs = expand(load_batch_spec(_spec(tmp_path, lora_files, prompts=["x"], methods=["merge"], seeds=[0, 1])))
    real_save = Image.Image.save
    calls = {"n": 0}

    def flaky(self, fp, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            with open(fp, "wb") if isinstance(fp, (str, Path)) else nullcontext(fp) as f:
                f.write(b"\x89PNG partial")
            raise KeyboardInterrupt
        return real_save(self, fp, *a, **k)

    monkeypatch.setattr(Image.Image, "save", flaky)
    out = tmp_path / "atomic"
    with pytest.raises(KeyboardInterrupt):
        run_specs(specs, out, progress=False)
    files = list(out.iterdir())
    assert len(files) == 1 and files[0].suffix == ".png"  # the finished image only: no temp file, no partial PNG
    Image.open(files[0]).verify()
    monkeypatch.setattr(Image.Image, "save", real_save)
    paths, skipped = run_specs(specs, out, progress=False)
    assert skipped == 1 and len(list(out.glob("*.png"))) == 2


def test_from_png_reproduces_identically(tmp_path, lora_files, capsys):
    spec = _spec(tmp_path, lora_files, prompts=["x"], methods=["composite"], seeds=[5])
    main(["generate", str(spec)])
    png = next((tmp_path / "out").glob("*.png"))
    capsys.readouterr()
    assert main(["generate", "--from-png", str(png), "--out", str(tmp_path / "again")]) == 0
    assert "identical to the source" in capsys.readouterr().out
    assert read_png_spec(png).seed == 5


def test_from_png_rejects_foreign_png(tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    assert main(["generate", "--from-png", str(tmp_path / "x.png")]) == 2
    assert "not made by loraloom" in capsys.readouterr().err


def test_spec_json_roundtrip():
    s = GenerationSpec(model="m", prompt="p", loras=[], method="switch", method_params={"switch_interval": 3})
    assert GenerationSpec.from_dict(json.loads(s.to_json())) == s


def test_shipped_example_spec_runs(tmp_path):
    """The `make run` example: its relative LoRA paths resolve from the spec's folder."""
    work = tmp_path / "examples"
    shutil.copytree(EXAMPLE.parent, work)
    specs = expand(load_batch_spec(work / EXAMPLE.name, {"seeds": [0], "methods": ["composite"], "steps": 2}))
    assert len(specs) == 1 and "ohwx person" in specs[0].prompt
    paths, _ = run_specs(specs, tmp_path / "o", progress=False)
    assert Image.open(paths[0]).size == (64, 64)


def test_pipeline_cache_reuses_model_and_forgets_loras(tmp_path, lora_files):
    from loraloom.pipelines.batch import PipelineCache

    specs = expand(load_batch_spec(_spec(tmp_path, lora_files, prompts=["x"], methods=["merge"], seeds=[0])))
    cache = PipelineCache()
    cp = cache.get(specs[0])
    assert set(cp.loras) == {"char", "style"}
    cache.forget("char")
    assert set(cp.loras) == {"style"}
    assert cache.get(specs[0]) is cp and set(cp.loras) == {"char", "style"}
