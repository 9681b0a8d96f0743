"""`bench run` on a tiny random model: resume without duplicates, failures recorded while the run goes on, stale
settings refused, images regenerated alone from their PNG, and reference seeding equal to the reference's loop."""

from __future__ import annotations

import dataclasses
import sqlite3

import numpy as np
import pytest
import torch
from PIL import Image

from loraloom.evaluation.bench.manifest import load_manifest
from loraloom.evaluation.bench.plan import build_plan, derived_seed, parse_methods
from loraloom.evaluation.bench.runner import RunOptions, StaleStoreError, run_benchmark
from loraloom.evaluation.bench.tiny_bench import torch_threads, write_tiny_benchmark
from loraloom.pipelines.batch import PipelineCache, run_specs
from loraloom.pipelines.spec import read_png_spec

CACHE = PipelineCache()  # one tiny model for the whole module (RunOptions.cache)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return write_tiny_benchmark(tmp_path_factory.mktemp("tiny"), size=16)


def _opts(manifest_path, out, methods="merge,switch,composite", **kw):
    m = load_manifest(manifest_path)
    limit = kw.pop("limit", None)
    return RunOptions(manifest=m, out=out, variants=parse_methods(methods), sets=m.select(limit=limit), progress=False,
                      device="cpu", cache=CACHE, **kw)


def _rows(out):
    db = sqlite3.connect(out / "bench.sqlite")
    db.row_factory = sqlite3.Row
    return [dict(r) for r in db.execute("SELECT * FROM items ORDER BY item_id")]


def test_run_resumes_and_never_duplicates(bench, tmp_path):
    out = tmp_path / "out"
    s = run_benchmark(_opts(bench, out, "merge,composite", limit=1, seeds=1))
    assert (s.generated, s.failed, s.done_total) == (2, 0, 2)
    s = run_benchmark(_opts(bench, out, "merge,composite", limit=2, seeds=1))
    assert (s.already_done, s.generated, s.done_total, s.planned) == (2, 2, 4, 4)
    s = run_benchmark(_opts(bench, out, "merge,composite", limit=2))
    assert (s.already_done, s.generated, s.done_total) == (4, 4, 8)
    s = run_benchmark(_opts(bench, out, "merge,composite", limit=2))
    assert (s.already_done, s.generated) == (8, 0)
    rows = _rows(out)
    assert len(rows) == 8 and len({r["item_id"] for r in rows}) == 8 and {r["status"] for r in rows} == {"done"}
    assert len(list((out / "images").rglob("*.png"))) == 8
    row = next(r for r in rows if r["item_id"] == "n2-001|composite|1")
    assert row["seed"] == derived_seed("n2-001", 1) and row["n_loras"] == 2 and row["unet_calls"] == 2
    spec = read_png_spec(out / row["png"])
    assert spec.seed == row["seed"] and spec.method == "composite" and spec.method_params["lora_scale"] == 1.0
    assert spec.prompt == "a picture, sks, inkwash" and [l.name for l in spec.loras] == ["char_b", "ink"]
    assert [l.category for l in spec.loras] == ["character", "style"]
    # the same set and seed gets the same seed in every method: images differ only by the method
    by_method = {(r["set_id"], r["seed_index"], r["method"]): r["seed"] for r in rows}
    assert all(by_method[(s_, k, "merge")] == by_method[(s_, k, "composite")] for s_, k, _ in by_method)


def test_any_image_regenerates_alone_from_its_png(bench, tmp_path):
    out = tmp_path / "out"
    run_benchmark(_opts(bench, out, "switch", limit=1, seeds=2))
    png = out / "images" / "switch" / "n2-000_s1.png"
    paths, _ = run_specs([read_png_spec(png)], tmp_path / "again", skip_existing=False, progress=False, cache=CACHE)
    a, b = (np.asarray(Image.open(p).convert("RGB")) for p in (png, paths[0]))
    assert np.array_equal(a, b)


def test_failed_item_recorded_and_run_goes_on(bench, tmp_path):
    folder = bench.parent
    broken = folder / "loras" / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file at all")
    data = load_manifest(bench)
    sets = [{"id": "ok", "loras": ["char_a", "coat"]}, {"id": "bad", "loras": ["char_a", "broken"]}]
    path = write_tiny_benchmark(tmp_path / "m", sets=sets, seeds=[0],
                                extra={"lora_dir": str(folder / "loras"),
                                       "loras": [*({"id": l.id, "category": l.category, "triggers": list(l.triggers), "file": l.file}
                                                   for l in data.loras.values()),
                                                 {"id": "broken", "category": "style", "file": "broken.safetensors"}]})
    out = tmp_path / "out"
    opts = _opts(path, out, "merge,composite")
    s = run_benchmark(opts)
    assert (s.generated, s.failed, s.failed_total) == (2, 2, 2)  # the run went on past the failures
    rows = {r["item_id"]: r for r in _rows(out)}
    assert {k: r["status"] for k, r in rows.items()} == {"ok|merge|0": "done", "ok|composite|0": "done",
                                                         "bad|merge|0": "failed", "bad|composite|0": "failed"}
    assert "broken.safetensors" in rows["bad|merge|0"]["error"] and rows["bad|merge|0"]["png"] is None
    s = run_benchmark(opts)  # a rerun retries the failed items only
    assert (s.already_done, s.failed) == (2, 2)
    rows = {r["item_id"]: r for r in _rows(out)}
    assert rows["bad|merge|0"]["attempts"] == 2 and rows["ok|merge|0"]["attempts"] == 1 and len(rows) == 4


def test_other_settings_in_the_same_folder_are_refused(bench, tmp_path):
    out = tmp_path / "out"
    run_benchmark(_opts(bench, out, "merge", limit=1, seeds=1))
    with pytest.raises(StaleStoreError, match="other settings"):
        run_benchmark(_opts(bench, out, "merge", limit=1, seeds=1, overrides={"steps": 3}))
    with pytest.raises(StaleStoreError, match="seeding"):
        run_benchmark(_opts(bench, out, "merge", limit=1, seeds=1, reference_seeding=True))


def test_reference_seeding_reproduces_the_reference_loop(bench, tmp_path):
    """The reference draws each image's latents from one generator seeded once per (style, n, method) run, in set
    order; our items fast-forward a fresh generator to their position. Same latents, same pixels."""
    out = tmp_path / "out"
    opts = _opts(bench, out, "merge", seeds=1, reference_seeding=True, overrides={"scheduler": "dpmsolver++"})
    opts.sets = [s for s in opts.sets if s.n == 3][::-1]  # made out of order, in the n=3 run only
    s = run_benchmark(opts)
    assert s.generated == 2
    m = opts.manifest
    plan = build_plan(m, [x for x in m.sets if x.n == 3], opts.variants, seeds=1, reference_seeding=True,
                      overrides={"scheduler": "dpmsolver++"})
    cp = CACHE.pipeline  # holds the model and every LoRA the run loaded
    g = torch.Generator("cpu").manual_seed(0)  # the manifest's seed value 0, seeded once for the run
    for it in plan:  # the reference loop, in run order
        spec = it.spec
        ref = cp(spec.prompt, negative_prompt=spec.negative_prompt, loras=[(r.name, r.weight) for r in spec.loras],
                 method="merge", method_params=spec.method_params, num_inference_steps=spec.steps,
                 guidance_scale=spec.guidance_scale, height=spec.height, width=spec.width, generator=g,
                 scheduler=spec.scheduler, progress_bar=False).images[0]
        ours = Image.open(out / it.png).convert("RGB")
        assert it.reference_position == [x.id for x in m.sets if x.n == 3].index(it.set.id)
        assert np.array_equal(np.asarray(ref), np.asarray(ours)), it.item_id
    with pytest.raises(Exception, match="draws noise"):
        run_benchmark(dataclasses.replace(opts, out=tmp_path / "o2", overrides={"scheduler": "euler-a"}))
