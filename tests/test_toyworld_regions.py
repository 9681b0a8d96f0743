"""The toy world's concept regions (evaluation/toyworld/regions.py): derived from the scene generator's layout, they
contain every pixel the generator draws for the concept (ground truth, no model); regions.yaml is what the writer
writes; the benchmark manifest is unchanged for its strict reader; `toyworld check --regions` runs end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from loraloom.evaluation.toyworld import ASSETS, MODEL
from loraloom.evaluation.toyworld import regions as R
from loraloom.evaluation.toyworld import scenes as S
from loraloom.evaluation.toyworld.manifest import benchmark_sets

assets_needed = pytest.mark.skipif(not (MODEL / "model_index.json").exists(), reason="toy-world assets not trained")
OTHER_COLOUR = {"red": "blue", "green": "yellow", "blue": "red", "yellow": "green"}


def drawn(scene: S.Scene, attribute: str) -> np.ndarray:
    """(32, 32) pixels where the concept changes the picture, from renders alone (not from the regions' masks): the
    shape's and style's by changing the colour (only the shape takes it), the others by taking the concept out."""
    if attribute in ("shape", "style"):
        other = scene.with_(colour=OTHER_COLOUR[scene.colour])
    else:
        other = scene.with_(**{attribute: S.BASE_VALUES[attribute][0]})
    if attribute == "background":
        other = scene.with_(background="black" if scene.background != "black" else "white")
    return (S.render(scene) != S.render(other)).any(axis=2)


def inside(mask: np.ndarray, region) -> bool:
    if region == R.FULL:
        return True
    x0, y0, x1, y1 = (round(v * S.SIZE) for v in region)
    outside = mask.copy()
    outside[y0:y1, x0:x1] = False
    return not outside.any()


def world_scenes(count: int, seed: int = 0) -> list[S.Scene]:
    """Scenes from the whole world with every concept category present (fresh draws of the generator's geometry)."""
    rng = np.random.default_rng(seed)
    return [S.sample_any_scene(rng, p_concept=1.0) for _ in range(count)]


def test_every_concepts_pixels_lie_inside_its_region():
    checked = dict.fromkeys(("shape", "style", "clothing", "background", "object"), 0)
    for scene in world_scenes(600):
        for attr in checked:
            value = getattr(scene, attr)
            spec = next((lo for lo in S.LORAS if (lo.attribute, lo.value) == (attr, value)), None)
            if spec is None:
                continue
            pixels = drawn(scene, attr)
            assert pixels.any(), (scene, attr)
            region = R.lora_region(spec, scene.shape)
            assert inside(pixels, region), (scene, spec.id, region, np.argwhere(pixels))
            checked[attr] += 1
    assert min(checked.values()) >= 100, checked


def test_extreme_geometries_stay_inside():
    lo, hi = (dict(zip(("cx", "cy", "r"), (S.GEOMETRY_RANGES[k][i] for k in ("cx", "cy", "r")))) for i in (0, 1))
    for geo in (lo, hi, {**lo, "r": hi["r"]}, {**hi, "r": lo["r"]}):
        for shape in S.ATTRIBUTES["shape"][3:]:
            for clothing in ("hat", "halo"):
                scene = S.Scene(shape, "red", "sunset", clothing, "striped", "moon", **geo)
                for attr in ("shape", "style", "clothing", "object"):
                    spec = next(lo for lo in S.LORAS if (lo.attribute, lo.value) == (attr, getattr(scene, attr)))
                    assert inside(drawn(scene, attr), R.lora_region(spec, shape)), (scene, attr)


def test_regions_are_where_the_layout_puts_the_concepts():
    def area(b):
        return (b[2] - b[0]) * (b[3] - b[1])

    def contains(outer, inner):
        return outer[0] <= inner[0] and outer[1] <= inner[1] and outer[2] >= inner[2] and outer[3] >= inner[3]

    for shape in ("star", "cross", "heart"):
        regions = {lo.id: R.lora_region(lo, shape) for lo in S.LORAS}
        char = regions[f"character_{('star', 'cross', 'heart').index(shape) + 1}"]
        assert regions["style_1"] == regions["style_2"] == char  # the style is drawn on the shape's pixels
        assert regions["background_1"] == regions["background_2"] == R.FULL
        assert regions["clothing_2"] == R.FULL  # the halo's ring (radius 1.25 r) spans the image
        moon, box, hat = regions["object_1"], regions["object_2"], regions["clothing_1"]
        assert moon[0] >= 0.5 and moon[3] <= 0.5 and box[2] <= 0.5 and box[1] >= 0.5  # top right, bottom left
        assert area(moon) < 0.25 and area(box) < 0.25 and area(char) < 0.8
        assert contains(hat, char) and hat[1] < char[1]  # the shape and above it
        for r in regions.values():
            if r != R.FULL:
                assert all(round(v * R.GRID) == v * R.GRID for v in r)  # on the latent grid


def test_regions_file_is_what_the_writer_writes_and_the_manifest_reader_still_loads(tmp_path):
    from loraloom.evaluation.bench.manifest import load_manifest
    from loraloom.evaluation.toyworld.manifest import write_manifest

    shipped = yaml.safe_load((ASSETS / "regions.yaml").read_text(encoding="utf-8"))
    assert shipped == yaml.safe_load(yaml.safe_dump(R.regions_document()))
    path = write_manifest(tmp_path / "benchmark.yaml")
    assert (tmp_path / "regions.yaml").read_text() == (ASSETS / "regions.yaml").read_text()
    assert path.read_text() == (ASSETS / "benchmark.yaml").read_text()
    manifest = load_manifest(ASSETS / "benchmark.yaml")
    loaded = R.load_regions(ASSETS)
    assert set(loaded) == {s.id for s in manifest.sets} == {s["id"] for s in benchmark_sets()}
    for s in manifest.sets:
        assert set(loaded[s.id]) == {lid for lid, _ in s.loras}


def test_generation_regions_group_shared_boxes_and_leave_full_ones_unmasked():
    ids = ["character_1", "clothing_1", "style_1", "background_1", "object_1"]
    plain, regions = R.generation_regions(ids, R.set_regions(ids))
    assert plain == ["background_1"]
    assert R.generation_regions(["character_2", "clothing_2"], R.set_regions(["character_2", "clothing_2"]))[0] == ["clothing_2"]
    # the subject's concepts share one region (the union of their boxes), the corner object has its own
    assert [r.loras for r in regions] == [("character_1", "clothing_1", "style_1"), ("object_1",)]
    subject = R.set_regions(ids)["character_1"]
    assert subject == R._union([R.lora_region(i, "star") for i in ("character_1", "clothing_1", "style_1")])
    assert R.set_regions(["character_1"])["character_1"] == R.lora_region("character_1", "star")  # alone: its own box
    assert all(r.prompt is None for r in regions)  # the run's prompt in every region


@assets_needed
def test_regions_run_on_the_toy_models_only_cross_attention_blocks():
    """The toy UNet's first down and last up block attend to the text in attn1 too (only_cross_attention); the library
    gives those modules the regional processor and reads their keys/values as text (commit 28023bb, no stopgap in the
    toy world): 1, 2 and 3 regions run, and a full region without LoRAs gives the plain image."""
    from loraloom.composition.controls import Region
    from loraloom.pipelines import ComposedPipeline
    from loraloom.pipelines.regions import cross_attention_modules

    cp = ComposedPipeline.from_pretrained(str(MODEL))
    for lid in ("character_1", "clothing_1", "object_1"):
        cp.load_lora(ASSETS / "loras" / f"{lid}.safetensors", name=lid)
    unet = cp.pipe.unet
    text_attn1 = [m for n, m in unet.named_modules() if n.endswith("attn1") and getattr(m, "is_cross_attention", False)]
    assert len(text_attn1) == 3
    listed = {id(m) for m in cross_attention_modules(unet)}
    assert all(id(m) in listed for m in text_attn1)
    kw = dict(num_inference_steps=2, guidance_scale=2.0, seed=0, scheduler="default", progress_bar=False, output_type="latent")
    ids = ["character_1", "clothing_1", "object_1"]
    plain = cp("a red stellu, topha, moona", loras=ids, **kw).latents
    same = cp("a red stellu, topha, moona", loras=ids, regions=[Region("full")], **kw).latents
    assert float((plain - same).abs().max()) < 1e-4
    for k in (1, 2, 3):
        _, regions = R.generation_regions(ids[:k], R.set_regions(ids[:k]))
        out = cp("a red stellu, topha, moona", loras=ids[:k], regions=regions, **kw).latents
        assert out.shape == plain.shape and bool(out.isfinite().all())
        assert float((out - cp("a red stellu, topha, moona", loras=ids[:k], **kw).latents).abs().max()) > 1e-4


@assets_needed
def test_region_check_runs_end_to_end_on_a_tiny_setting(tmp_path, capsys):
    from loraloom.app.cli import main

    records = tmp_path / "records.jsonl"
    rc = main(["toyworld", "check", "--regions", "--smoke", "--sizes", "2", "3", "--steps", "2", "--workers", "1",
               "--no-progress", "--records", str(records)])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    names = [line.split()[0] for line in lines[-4:]]
    assert names == ["plain_all_concepts_2", "plain_all_concepts_3", "regions_all_concepts_2", "regions_all_concepts_3"]
    rows = [json.loads(x) for x in records.read_text().splitlines()]
    assert len(rows) == 2 * 3 * 2  # sizes x methods x (plain, regions), one set and one seed each
    for n in (2, 3):
        for variant in ("plain", "regions"):
            same = [r for r in rows if r["n"] == n and r["variant"] == variant]
            assert {r["method"] for r in same} == {"merge", "switch", "composite"}
            assert len({(r["set"], r["seed"]) for r in same}) == 1  # the same probe for every method and variant


def test_region_check_options_are_refused_without_regions(capsys):
    from loraloom.app.cli import main

    with pytest.raises(SystemExit) as err:
        main(["toyworld", "check", "--sizes", "2"])
    assert "only go with --regions" in str(err.value)
    with pytest.raises(SystemExit) as err:
        main(["toyworld", "check", "--regions", "--methods", "merge,clora"])
    assert "methods that take regions" in str(err.value)


def test_region_summary_lines_take_the_best_method_and_the_table_pairs_by_probe():
    from loraloom.evaluation.toyworld.quality import region_table, summarize_regions, wilson

    recs = []
    for s in range(4):
        for method, plain_ok, region_ok in (("merge", s < 1, s < 3), ("switch", s < 2, s < 2)):
            for variant, ok in (("plain", plain_ok), ("regions", region_ok)):
                recs.append({"n": 3, "set": f"n3-{s:03d}", "seed": 7, "method": method, "variant": variant, "ok": ok,
                             "hits": {"shape": ok, "object": True}})
    out = []
    result = summarize_regions(recs, printer=out.append)
    assert result == {"plain_all_concepts_3": 0.5, "regions_all_concepts_3": 0.75}
    assert out[-2:] == ["plain_all_concepts_3 0.500", "regions_all_concepts_3 0.750"]
    table = region_table(recs)
    assert "| 3 | merge | 4 | 0.25 [" in table and "+0.50 ±" in table and "| 3 | switch | 4 | 0.50 [" in table
    lo, hi = wilson(1, 4)
    assert 0 < lo < 0.25 < hi < 1 and wilson(0, 10)[0] == 0.0
