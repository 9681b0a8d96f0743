"""Controls and regions in specs (issue 23, point 6): LoRA entries with te/unet, lbw, schedules and masks, regions
and base_weight in spec files, checked when read; recorded in the PNG (mask images by path and sha256) and remade
byte for byte by `--from-png`; the names of specs without controls unchanged."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from PIL import Image

from loraloom.app.cli import main
from loraloom.composition.controls import Region
from loraloom.composition.errors import SpecError
from loraloom.pipelines.batch import expand, generate_image, load_batch_spec, pin_masks, run_specs
from loraloom.pipelines.spec import GenerationSpec, LoRARef, RegionRef, read_png_spec


def _mask_file(path: Path, left: int = 32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("L", (64, 64), 0)
    im.paste(255, (left, 0, 64, 64))
    im.save(path)
    return path


def _spec_file(tmp_path, lora_files, **fields) -> Path:
    _mask_file(tmp_path / "masks" / "right.png")
    data = {
        "model": "tiny:sd1",
        "loras": [{"path": lora_files["char"].name, "mask": "left"},
                  {"path": lora_files["style"].name, "weight": 0.5, "lbw": "OUTD", "start": 0.25},
                  {"path": lora_files["bg"].name}],
        "regions": [{"mask": "masks/right.png", "prompt": "a blue square", "loras": ["bg"], "feather": 0.05}],
        "base_weight": 0.2,
        "prompts": ["a portrait, {triggers} <lora:char:1:0.6:start=1:stop=3>"],
        "methods": ["merge"], "seeds": [0], "steps": 4, "height": 64, "width": 64, "out": str(tmp_path / "out"),
        **fields,
    }
    path = tmp_path / "spec.yaml"  # beside the LoRA files: their paths and the mask's are relative to it
    path.write_text(yaml.safe_dump(data))
    return path


# --- the names of specs without controls ----------------------------------------------------------------------
OLD_IDENTITIES = {  # GenerationSpec.identity() computed by the code before controls existed (commit 8cc6947)
    "plain": "86d1d0d53c22", "loras": "cca9b20b3af0", "params": "5f5447874378",
}


def _control_free_specs() -> dict[str, GenerationSpec]:
    return {
        "plain": GenerationSpec(model="tiny:sd1", prompt="a cat", version="x"),
        "loras": GenerationSpec(model="tiny:sd1", prompt="a portrait, ohwx, inkwash", negative_prompt="blurry",
                                loras=[LoRARef("/l/char.safetensors", 1.0, None, "character", ["ohwx"], "ab" * 32),
                                       LoRARef("/l/style.safetensors", 0.5, "style", "style", ["inkwash"])],
                                method="composite", steps=2, height=64, width=64, seed=3),
        "params": GenerationSpec(model="runwayml/stable-diffusion-v1-5", prompt="x", method="switch",
                                 method_params={"switch_interval": 3, "lora_scale": 0.8}, scheduler="euler-a", seed=7,
                                 dtype="float16", family="sd1"),
    }


@pytest.mark.parametrize("key", sorted(OLD_IDENTITIES))
def test_identity_of_specs_without_controls_is_unchanged(key):
    spec = _control_free_specs()[key]
    assert spec.identity() == OLD_IDENTITIES[key]
    d = spec.to_dict()  # written as before: no control keys at all
    assert not {"regions", "base_weight"} & set(d)
    assert all(set(lora) == {"path", "weight", "name", "category", "triggers", "sha256"} for lora in d["loras"])
    assert GenerationSpec.from_dict(json.loads(spec.to_json())) == spec
    assert not spec.has_controls


def test_controls_at_their_defaults_are_no_controls():
    plain = _control_free_specs()["loras"]
    spelled = GenerationSpec.from_dict({**plain.to_dict(), "regions": [], "base_weight": 0.0, "loras": [
        {**lora, "te": 1, "unet": 1.0, "lbw": None, "keyframes": [], "feather": 0} for lora in plain.to_dict()["loras"]]})
    assert spelled.identity() == plain.identity() and spelled.to_dict() == plain.to_dict()


def test_controls_change_the_identity_but_mask_hashes_do_not():
    base = GenerationSpec(model="m", prompt="p", loras=[LoRARef("/l/a.safetensors")])
    names = {base.identity()}
    for fields in ({"te": 0.5}, {"unet": 0.5}, {"lbw": "IND"}, {"start": 0.5}, {"stop": 10}, {"start": 0.5, "unit": "fraction"},
                   {"keyframes": [[0, 0], [1, 1]]}, {"mask": "left"}, {"mask": "left", "feather": 0.1}, {"mask": [0, 0, 0.5, 1]},
                   {"mask": "m.png"}):
        names.add(GenerationSpec(model="m", prompt="p", loras=[LoRARef("/l/a.safetensors", **fields)]).identity())
    names.add(GenerationSpec(model="m", prompt="p", loras=[LoRARef("/l/a.safetensors")], regions=[RegionRef("left", prompt="x")]).identity())
    assert len(names) == 13
    pinned = GenerationSpec(model="m", prompt="p", loras=[LoRARef("/l/a.safetensors", mask={"image": "m.png", "sha256": "a" * 64})])
    assert pinned.identity() == GenerationSpec(model="m", prompt="p", loras=[LoRARef("/l/a.safetensors", mask="m.png")]).identity()


def test_spec_with_controls_round_trips_through_json():
    spec = GenerationSpec(
        model="tiny:sd1", prompt="p", steps=20,
        loras=[LoRARef("/l/a.safetensors", te=0.5, unet=1.5, lbw=[1.0] * 12, start=2, stop=10, unit="steps",
                       keyframes=[[2, 0], [6, 1]], mask=[0, 0, 0.5, 1], feather=0.1),
               LoRARef("/l/b.safetensors", mask={"image": "/m/x.png", "sha256": "b" * 64})],
        regions=[RegionRef("right", prompt="q", negative_prompt="n", loras=[])], base_weight=0.3)
    again = GenerationSpec.from_dict(json.loads(spec.to_json()))
    assert again == spec and again.identity() == spec.identity()
    assert again.loras[0].schedule().in_steps and again.loras[1].mask == {"image": "/m/x.png", "sha256": "b" * 64}


# --- spec files: read, checked, tags merged ------------------------------------------------------------------------
def test_spec_file_controls_regions_and_tags(tmp_path, lora_files):
    batch = load_batch_spec(_spec_file(tmp_path, lora_files))
    region = batch.template.regions[0]
    mask = tmp_path / "masks" / "right.png"
    assert region.mask == {"image": str(mask.resolve()), "sha256": __import__("hashlib").sha256(mask.read_bytes()).hexdigest()}
    (spec,) = expand(batch)
    assert spec.prompt == "a portrait, ohwx, inkwash, forest"  # the tag is out, {triggers} expanded
    char, style, bg = spec.loras
    assert (char.weight, char.te, char.unet, char.start, char.stop, char.unit, char.mask) == (1.0, 1.0, 0.6, 1.0, 3.0, "steps", "left")
    assert (style.weight, style.lbw, style.start) == (0.5, "OUTD", 0.25) and not bg.has_controls
    assert spec.base_weight == 0.2 and spec.regions[0].loras == ["bg"] and spec.regions[0].prompt == "a blue square"


def test_cli_prompt_override_reads_tags(tmp_path, lora_files, capsys):
    spec = _spec_file(tmp_path, lora_files)
    assert main(["generate", str(spec), "--dry-run", "--prompt", "a dog <lora:style:0.3:stop=2>"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("| a dog")
    assert main(["generate", str(spec), "--dry-run", "--prompt", "a dog <lora:nobody:0.3>"]) == 2
    assert "prompt: tag <lora:nobody:0.3>: the spec has no LoRA named 'nobody'; its LoRAs: char, style, bg" in capsys.readouterr().err


@pytest.mark.parametrize("fields,message", [
    ({"regions": [{"mask": "lefft", "prompt": "x"}]}, r"region 1: mask 'lefft' is neither a named region"),
    ({"regions": [{"mask": [0.5, 0, 0.2, 1], "prompt": "x"}]}, r"region 1: mask box .* x0 < x1"),
    ({"regions": [{"mask": [0, 0, 1.5, 1], "prompt": "x"}]}, r"region 1: mask box value must be between 0 and 1"),
    ({"regions": [{"mask": [0, 0, 1], "prompt": "x"}]}, r"region 1: mask must be a named region"),
    ({"regions": [{"mask": "masks/none.png", "prompt": "x"}]}, r"region 1 \(none.png\): mask image .*none.png: no such file"),
    ({"regions": [{"mask": "masks", "prompt": "x"}]}, r"region 1: mask 'masks' is neither"),
    ({"regions": [{"mask": "notes.png", "prompt": "x"}]}, r"region 1 \(notes.png\): mask image .* cannot be read as an image"),
    ({"regions": [{"mask": "left", "loras": ["nobody"]}]}, r"region 1 \(left\): LoRA 'nobody' is not one of this spec's LoRAs \(char, style, bg\)"),
    ({"regions": [{"mask": "left", "loras": ["bg"]}, {"mask": "right", "loras": ["bg"]}]}, r"LoRA 'bg' is in region 1 and region 2"),
    ({"regions": [{"mask": "right", "loras": ["char"]}]}, r"LoRA 'char' has a mask of its own and is in region 1"),
    ({"regions": [{"mask": "left"}]}, r"region 1 \(left\): changes nothing"),
    ({"regions": [{"prompt": "x"}]}, r"region 1: a region needs a mask"),
    ({"regions": ["left"]}, r"region 1 must be a mapping with a mask, got 'left'"),
    ({"regions": [{"mask": "left", "prompt": "x", "colour": "red"}]}, r"region 1: unknown key\(s\) \['colour'\]; known: mask, prompt"),
    ({"regions": [{"mask": "left", "prompt": "x <lora:bg:1>"}]}, r"region 1 \(left\): its prompt has a LoRA tag"),
    ({"regions": [{"mask": "left", "prompt": "x", "feather": 0.9}]}, r"region 1 \(left\): feather must be between 0 and 0.5"),
    ({"regions": "left"}, r"regions must be a list"),
    ({"base_weight": 1.5}, r"base_weight must be between 0 and 1"),
    ({"negative_prompt": "ugly <lora:char:1>"}, r"the negative prompt has a LoRA tag"),
    ({"methods": ["merge", "klora"]}, r"method 'klora' has no meaning for regions or masked LoRAs"),
    ({"prompts": ["<lora:char:1:stop=1>", "<lora:chr:1>"]}, r"prompt 2: tag <lora:chr:1>: the spec has no LoRA named 'chr'"),
    ({"prompts": ["x <lora:style:1:lbw=NOPE>"]}, r"prompt: tag <lora:style:1:lbw=NOPE>: lbw=NOPE is neither a preset"),
    ({"steps": 2, "prompts": ["x <lora:char:1:start=3>"]}, r"LoRA char: start 3 / stop none leave no step of 2"),
])
def test_bad_regions_masks_and_tags_are_refused_when_the_file_is_read(tmp_path, lora_files, monkeypatch, fields, message):
    from loraloom.pipelines import ComposedPipeline

    (tmp_path / "notes.png").write_text("not an image")
    monkeypatch.setattr(ComposedPipeline, "from_pretrained", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SpecError, match=message) as err:
        load_batch_spec(_spec_file(tmp_path, lora_files, **fields))
    assert str(err.value).startswith(str(tmp_path / "spec.yaml"))


@pytest.mark.parametrize("entry,message", [
    ({"te": "strong"}, r"LoRA char: te must be a number, got 'strong'"),
    ({"unet": 1000}, r"LoRA char: unet must be between -100 and 100"),
    ({"lbw": "MOSTLY"}, r"LoRA char: lbw 'MOSTLY' is not a preset nor a list of numbers"),
    ({"lbw": []}, r"LoRA char: lbw: block weights: an empty list"),  # the length: the loaded model's to check
    ({"start": 0.8, "stop": 0.2}, r"LoRA char: schedule start 0.8 / stop 0.2: need 0 <= start < stop"),
    ({"start": 2, "unit": "fraction"}, r"LoRA char: schedule .* fractions of the run lie between 0 and 1"),
    ({"unit": "seconds", "start": 1}, r"LoRA char: unit 'seconds' is not one of steps, fraction"),
    ({"keyframes": [[0.5, 1], [0.2, 0]]}, r"LoRA char: schedule keyframes must be in increasing position order"),
    ({"keyframes": [0.5, 1]}, r"LoRA char: keyframes must be a list of \[position, factor\] pairs"),
    ({"feather": 0.1}, r"LoRA char: feather softens a mask's edge; this LoRA has no mask"),
    ({"mask": {"image": "x.png", "sha256": "nope"}}, r"LoRA char: mask sha256 must be 64 hex digits"),
    ({"mask": {"image": "/etc/passwd"}}, r"LoRA char: mask image '/etc/passwd' is not an image file"),
    ({"unit": "steps"}, r"LoRA char: unit says how start, stop and keyframes count; this LoRA has none"),
    ({"colour": "red"}, r"bad LoRA entry .*colour"),
])
def test_bad_lora_controls_name_the_lora_and_the_field(tmp_path, lora_files, entry, message):
    path = _spec_file(tmp_path, lora_files, regions=[], base_weight=0,
                      loras=[{"path": lora_files["char"].name, **entry}], prompts=["x"])
    with pytest.raises(SpecError, match=message):
        load_batch_spec(path)


def test_methods_that_merge_the_loras_refuse_controls():
    with pytest.raises(SpecError, match=r"method 'ziplora' merges the LoRAs into one, so per-LoRA .* \(a\)"):
        GenerationSpec(model="m", prompt="p", method="ziplora", loras=[LoRARef("/l/a.safetensors", start=0.5), LoRARef("/l/b.safetensors")])
    GenerationSpec(model="m", prompt="p", method="switch", loras=[LoRARef("/l/a.safetensors", start=0.5, mask="left")])


# --- generation: the spec's controls reach the pipeline, the PNG records them, --from-png remakes the bytes ----------
def test_generate_image_passes_what_the_python_api_takes(tmp_path, lora_files, tiny_sd, one_thread):
    (spec,) = expand(load_batch_spec(_spec_file(tmp_path, lora_files)))
    for name, path in lora_files.items():
        tiny_sd.load_lora(path, name)
    got = generate_image(tiny_sd, pin_masks(spec), tmp_path / "o").latents
    mask = Image.open(tmp_path / "masks" / "right.png")
    expected = tiny_sd(
        "a portrait, ohwx, inkwash, forest", method="merge", num_inference_steps=4, height=64, width=64, seed=0,
        loras=[{"name": "char", "weight": 1.0, "unet": 0.6, "start": 1, "stop": 3, "mask": "left"},
               {"name": "style", "weight": 0.5, "lbw": "OUTD", "start": 0.25}, ("bg", 1.0)],
        regions=[Region(mask, prompt="a blue square", loras=("bg",), feather=0.05)], base_weight=0.2, progress_bar=False,
    ).latents
    assert (got - expected).abs().max() == 0
    plain = tiny_sd("a portrait, ohwx, inkwash, forest", method="merge", num_inference_steps=4, height=64, width=64, seed=0,
                    loras=["char", ("style", 0.5), "bg"], progress_bar=False).latents
    assert (got - plain).abs().max() > 1e-3  # the controls did something


@pytest.mark.parametrize("method", ["merge", "composite"])
def test_png_records_everything_and_from_png_remakes_the_same_bytes(tmp_path, lora_files, capsys, one_thread, method):
    spec = _spec_file(tmp_path, lora_files, methods=[method])
    assert main(["generate", str(spec)]) == 0
    (png,) = (tmp_path / "out").glob("*.png")
    recorded = read_png_spec(png)
    (made,) = expand(load_batch_spec(spec))
    assert png.name == made.file_name()  # the PNG keeps the name of the spec as written
    char, style, bg = recorded.loras
    assert (char.unet, char.start, char.stop, char.unit, char.mask) == (0.6, 1.0, 3.0, "steps", "left")
    assert (style.lbw, style.start) == ("OUTD", 0.25)
    region = recorded.regions[0]
    assert region.prompt == "a blue square" and region.loras == ["bg"] and region.feather == 0.05
    assert region.mask["image"] == str((tmp_path / "masks" / "right.png").resolve()) and len(region.mask["sha256"]) == 64
    assert recorded.base_weight == 0.2
    # the A1111 text carries the tags in A1111's and the extension's spelling (strength x lora_scale 0.8)
    first_line = Image.open(png).text["parameters"].split("\n")[0]
    assert first_line == ("a portrait, ohwx, inkwash, forest <lora:char:0.8:0.48:start=1:stop=3> "
                          "<lora:style:0.4:lbw=OUTD:start=1> <lora:bg:0.8>")
    capsys.readouterr()
    assert main(["generate", "--from-png", str(png), "--out", str(tmp_path / "again")]) == 0
    assert "identical to the source" in capsys.readouterr().out
    assert (tmp_path / "again" / png.name).read_bytes() == png.read_bytes()
    # the mask image changed: refused before any model loads, naming the region, the file and the fix
    _mask_file(tmp_path / "masks" / "right.png", left=40)
    assert main(["generate", "--from-png", str(png), "--out", str(tmp_path / "third")]) == 2
    err = capsys.readouterr().err
    assert "region 1 (right.png): mask image" in err and "is not the file this spec was made with" in err and "Fix:" in err
    assert not (tmp_path / "third").exists() or not list((tmp_path / "third").glob("*.png"))


def test_a_mask_image_path_in_a_png_that_is_no_file_is_refused(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    spec = GenerationSpec(model="tiny:sd1", prompt="p", regions=[RegionRef({"image": str(fifo)}, prompt="x")])
    with pytest.raises(SpecError, match="is not a regular file"):
        pin_masks(spec)
    with pytest.raises(SpecError, match="no such file"):
        pin_masks(GenerationSpec(model="tiny:sd1", prompt="p", regions=[RegionRef({"image": str(tmp_path / "gone.png")}, prompt="x")]))
    big = tmp_path / "big.png"
    Image.new("L", (9000, 8000)).save(big)
    with pytest.raises(SpecError, match="too large for a mask"):
        pin_masks(GenerationSpec(model="tiny:sd1", prompt="p", regions=[RegionRef(str(big), prompt="x")]))


def test_run_specs_pins_masks_of_a_spec_made_in_python(tmp_path, lora_files, one_thread):
    mask = _mask_file(tmp_path / "m.png")
    spec = GenerationSpec(model="tiny:sd1", prompt="p", loras=[LoRARef(str(lora_files["char"]), mask=str(mask))], steps=2,
                          height=64, width=64)
    (path,), _ = run_specs([spec], tmp_path / "out", progress=False)
    assert read_png_spec(path).loras[0].mask["sha256"] == __import__("hashlib").sha256(mask.read_bytes()).hexdigest()
