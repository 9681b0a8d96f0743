"""`loraloom toyworld compose-check` (issue 25, point 6): the fixed subset, and lines that equal the checker's own
reading of the images it made (recomputed here from the PNGs), resumable, pair methods on N = 2 only."""

from __future__ import annotations

import sqlite3

import pytest
from PIL import Image

from loraloom.evaluation.bench.manifest import load_manifest
from loraloom.evaluation.bench.tiny_bench import torch_threads
from loraloom.evaluation.toyworld import ASSETS, MODEL
from loraloom.evaluation.toyworld.compose_check import compose_sets, run_compose_check
from loraloom.pipelines.batch import PipelineCache

assets_needed = pytest.mark.skipif(not (MODEL / "model_index.json").exists(), reason="toy-world assets not trained")


@assets_needed
def test_subset_is_evenly_spaced_per_n():
    m = load_manifest(ASSETS / "benchmark.yaml")
    chosen = compose_sets(m.sets, 4)
    for n in (2, 3, 4):
        of_n = [s for s in m.sets if s.n == n]
        picked = [s for s in chosen if s.n == n]
        assert len(picked) == 4 and picked[0] is of_n[0] and picked[-1] is of_n[-1]
    assert not [s for s in chosen if s.n == 5]
    assert [s.index for s in chosen] == sorted(s.index for s in chosen)


@assets_needed
def test_lines_are_the_checkers_reading_of_the_images(tmp_path):
    from loraloom.evaluation.toyworld.checker import Checker

    printed = []
    cache = PipelineCache()
    with torch_threads(1):
        lines = run_compose_check(ASSETS, ("merge", "klora"), seed_offset=7, out=tmp_path / "cc", per_n=1, seeds=1,
                                  progress=False, cache=cache, printer=printed.append)
    assert [c.line().split()[0] for c in lines] == ["compose_merge_2", "compose_merge_3", "compose_merge_4", "compose_klora_2"]
    assert printed[-4:] == [c.line() for c in lines]
    m = load_manifest(ASSETS / "benchmark.yaml")
    sets = {s.id: s for s in m.sets}
    db = sqlite3.connect(tmp_path / "cc" / "bench.sqlite")
    rows = db.execute("SELECT method_label, set_id, n_loras, seed_value, png FROM items WHERE status = 'done'").fetchall()
    assert len(rows) == 4 and {r[3] for r in rows} == {7}
    checker = Checker.load(ASSETS / "checker")
    preds = checker.predict([Image.open(tmp_path / "cc" / r[4]).convert("RGB") for r in rows])
    expect = {(r[0], r[2]): float(all(p.get(a) == v for a, v in sets[r[1]].expected.items())) for r, p in zip(rows, preds)}
    assert {(c.method, c.n): c.rate for c in lines} == expect
    with torch_threads(1):  # a rerun makes nothing new and prints the same lines
        again = run_compose_check(ASSETS, ("merge", "klora"), seed_offset=7, out=tmp_path / "cc", per_n=1, seeds=1,
                                  progress=False, cache=cache, printer=lambda s: None)
    assert [c.line() for c in again] == [c.line() for c in lines]
    assert db.execute("SELECT COUNT(*) FROM items").fetchone()[0] == 4
