"""`bench run --regions` (issue 23, point 8) on the tiny benchmark: each LoRA bound to its set's region (the set's own
`regions:` entry, a regions file, or regions.yaml beside the manifest), labels NAME+regions beside the plain methods
in one store, the images those of a generation with the regions, methods without regions refused before anything
loads, and the report saying that regions were used."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest
import yaml
from PIL import Image

from loraloom.app.cli import main
from loraloom.composition.controls import Region
from loraloom.composition.errors import SpecError
from loraloom.evaluation.bench.manifest import load_manifest
from loraloom.evaluation.bench.plan import build_plan, parse_methods, with_regions
from loraloom.evaluation.bench.regions import group_regions, load_bench_regions
from loraloom.evaluation.bench.runner import RunOptions, run_benchmark
from loraloom.evaluation.bench.tiny_bench import torch_threads, write_tiny_benchmark
from loraloom.pipelines.batch import PipelineCache
from loraloom.pipelines.spec import read_png_spec

CACHE = PipelineCache()
REGIONS = {  # the tiny benchmark's sets (tiny_bench.tiny_sets)
    "n2-000": {"char_a": "left", "coat": [0.5, 0.0, 1.0, 1.0]},
    "n2-001": {"char_b": [0.0, 0.0, 0.5, 1.0], "ink": "full"},
    "n3-000": {"char_a": "left", "coat": "right", "ink": "left"},
    "n3-001": {"char_b": "top", "ink": "full", "forest": "bottom"},
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    path = write_tiny_benchmark(tmp_path_factory.mktemp("tiny"), size=16)
    (path.parent / "regions.yaml").write_text(yaml.safe_dump({"format": "test", "sets": REGIONS}), encoding="utf-8")
    return path


def _plan(manifest, methods="merge", **kw):
    m = load_manifest(manifest)
    variants = with_regions(parse_methods(methods))
    return build_plan(m, m.sets, variants, seeds=1, regions=load_bench_regions(m, m.sets, kw.pop("path", None)),
                      hashes=lambda p: None, **kw)


def test_plan_binds_each_lora_to_its_region_and_labels_the_variant(bench):
    items = _plan(bench, "merge,switch")
    assert [it.item_id for it in items][:2] == ["n2-000|merge+regions|0", "n2-000|switch+regions|0"]
    by_set = {it.set.id: it.spec for it in items if it.variant.name == "merge"}
    assert [(r.mask, r.loras) for r in by_set["n2-000"].regions] == [("left", ["char_a"]), ([0.5, 0.0, 1.0, 1.0], ["coat"])]
    assert [(r.mask, r.loras) for r in by_set["n2-001"].regions] == [([0.0, 0.0, 0.5, 1.0], ["char_b"])]  # ink: everywhere
    assert [(r.mask, r.loras) for r in by_set["n3-000"].regions] == [("left", ["char_a", "ink"]), ("right", ["coat"])]
    assert all(r.prompt is None for s in by_set.values() for r in s.regions)
    m = load_manifest(bench)
    plain = build_plan(m, m.sets, parse_methods("merge"), seeds=1, hashes=lambda p: None)
    assert not any(it.spec.regions for it in plain)
    assert {it.fingerprint for it in plain}.isdisjoint(it.fingerprint for it in items)
    assert group_regions(["a", "b", "c"], {"a": "full", "b": [0, 0, 0.5, 1]}) == (["a", "c"], [([0.0, 0.0, 0.5, 1.0], ["b"])])


def test_regions_come_from_the_set_entry_then_the_named_file_then_the_sibling_file(bench, tmp_path):
    own = {"char_a": "right", "coat": "left"}
    data = yaml.safe_load(bench.read_text())
    data["sets"][0]["regions"] = own
    manifest = tmp_path / "bench.yaml"
    manifest.write_text(yaml.safe_dump({**data, "lora_dir": str(bench.parent / "loras")}), encoding="utf-8")
    other = tmp_path / "elsewhere.yaml"
    other.write_text(yaml.safe_dump({"sets": {**REGIONS, "n2-001": {"char_b": "bottom", "ink": "top"}}}), encoding="utf-8")
    m = load_manifest(manifest)
    got = load_bench_regions(m, m.sets, other)
    assert got.sets["n2-000"] == own and got.sets["n2-001"] == {"char_b": "bottom", "ink": "top"}
    assert got.source == str(other.resolve()) and len(got.sha256) == 64
    with pytest.raises(SpecError, match=r"n2-001.* have no regions: no `regions:` entry .* no regions\.yaml beside it"):  # no sibling file here
        load_bench_regions(m, m.sets)
    assert load_bench_regions(m, m.sets[:1]).sets == {"n2-000": own}  # the set's own entry needs no file


def test_bad_regions_are_refused_with_what_to_fix(bench, tmp_path):
    m = load_manifest(bench)
    cases = [({"n2-000": {"char_a": "left"}}, "no region for coat"),
             ({"n2-000": {"char_a": "left", "coat": "left", "ink": "left"}}, "ink is not a LoRA of the set"),
             ({"n2-000": {"char_a": "middle", "coat": "left"}}, "'middle' is neither a named region"),
             ({"n2-000": {"char_a": [0.5, 0, 0.2, 1], "coat": "left"}}, "x0 < x1")]
    for sets, message in cases:
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump({"sets": sets}), encoding="utf-8")
        with pytest.raises(SpecError, match=message.replace("(", r"\(")):
            load_bench_regions(m, m.sets[:1], path)
    with pytest.raises(SpecError, match="is not a file"):
        load_bench_regions(m, m.sets, tmp_path / "missing.yaml")
    data = yaml.safe_load(bench.read_text())
    data["sets"][0]["regions"] = {"char_a": "left"}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(data), encoding="utf-8")
    with pytest.raises(SpecError, match=r"sets\[0\] \(n2-000\)\.regions: no region for coat"):
        load_manifest(tmp_path / "m.yaml")


def test_methods_without_regions_are_refused_before_anything_loads(bench, tmp_path, capsys):
    with pytest.raises(SpecError, match=r"--regions: klora cannot bind.*composite, merge, switch"):
        with_regions(parse_methods("merge,klora"))
    rc = main(["bench", "run", str(bench), "--regions", "--methods", "merge,clora", "--out", str(tmp_path / "o")])
    assert rc == 2 and "clora cannot bind a LoRA to a region" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert main(["bench", "run", str(bench), "--regions", "--dry-run", "--seeds", "1", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "12 images" in out and "merge+regions, switch+regions, composite+regions" in out
    assert f"each LoRA in its region ({bench.parent.resolve() / 'regions.yaml'})" in out


def test_run_with_regions_makes_the_regional_images_beside_the_plain_ones(bench, tmp_path):
    """--regions is not ignored: the +regions images differ from the plain ones of the same seeds and equal a
    generation given the same regions; the PNG records them; the report says regions were used."""
    from loraloom.evaluation.bench.report import write_report

    m = load_manifest(bench)
    out = tmp_path / "out"
    sets = m.select(patterns=["n2-000", "n3-000"])
    common = dict(manifest=m, out=out, sets=sets, seeds=1, progress=False, device="cpu", cache=CACHE)
    run_benchmark(RunOptions(variants=parse_methods("merge,composite"), **common))
    s = run_benchmark(RunOptions(variants=with_regions(parse_methods("merge,composite")),
                                 regions=load_bench_regions(m, sets), **common))
    assert (s.generated, s.failed, s.done_total) == (4, 0, 4)
    db = sqlite3.connect(out / "bench.sqlite")
    db.row_factory = sqlite3.Row
    rows = {r["item_id"]: dict(r) for r in db.execute("SELECT * FROM items")}
    meta = {r["key"]: r["value"] for r in db.execute("SELECT key, value FROM meta")}
    assert len(rows) == 8 and meta["regions"] == str(bench.parent.resolve() / "regions.yaml")

    def pixels(item):
        return np.asarray(Image.open(out / rows[item]["png"]).convert("RGB")).astype(int)

    for sid in ("n2-000", "n3-000"):
        for method in ("merge", "composite"):
            plain, regional = pixels(f"{sid}|{method}|0"), pixels(f"{sid}|{method}+regions|0")
            assert np.abs(plain - regional).max() > 0, (sid, method)
    spec = read_png_spec(out / rows["n2-000|merge+regions|0"]["png"])
    assert [(r.mask, r.loras) for r in spec.regions] == [("left", ["char_a"]), ([0.5, 0.0, 1.0, 1.0], ["coat"])]
    cp = CACHE.get(spec)
    direct = cp(spec.prompt, loras=[(r.name, r.weight) for r in spec.loras], method="merge", method_params=spec.method_params,
                regions=[Region("left", loras=("char_a",)), Region([0.5, 0.0, 1.0, 1.0], loras=("coat",))],
                num_inference_steps=spec.steps, guidance_scale=spec.guidance_scale, height=spec.height, width=spec.width,
                seed=spec.seed, scheduler=spec.scheduler, progress_bar=False)
    assert np.array_equal(np.asarray(direct.images[0].convert("RGB")).astype(int), pixels("n2-000|merge+regions|0"))
    paths = write_report(out)
    summary = next(p for p in paths if p.name == "summary.md").read_text(encoding="utf-8")
    assert "Regions: merge+regions, composite+regions ran with each LoRA bound to its set's region from" in summary
    assert "merge+regions" in summary


def test_the_toy_worlds_regions_file_binds_the_loras_as_its_check_does():
    """`bench run assets/toyworld/benchmark.yaml --regions` reads the shipped regions.yaml beside it and makes the
    same regions as `toyworld check --regions` (evaluation/toyworld/regions.generation_regions)."""
    from loraloom.evaluation.toyworld import ASSETS
    from loraloom.evaluation.toyworld.regions import generation_regions, load_regions

    m = load_manifest(ASSETS / "benchmark.yaml")
    sets = m.select(patterns=["n2-00*", "n3-01*", "n4-02*", "n5-00*"])
    regions = load_bench_regions(m, sets)
    assert regions.source == str((ASSETS / "regions.yaml").resolve())
    items = build_plan(m, sets, with_regions(parse_methods("switch")), seeds=1, regions=regions, hashes=lambda p: None)
    toy = load_regions(ASSETS)
    assert len(items) == len(sets) > 20
    for it in items:
        want = generation_regions(it.set.lora_ids, toy[it.set.id])[1]
        assert [(r.mask, tuple(r.loras)) for r in it.spec.regions] == [(w.mask, w.loras) for w in want], it.set.id
