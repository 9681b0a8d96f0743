"""`bench tune` / `bench run --tuned` (issue 25, point 4): the grid, the held-out sets and seeds, the choice (checked
against the stores' own scores, recomputed here), and a tuned run that runs each method at its setting and never on
a tuning set or seed."""

from __future__ import annotations

import json
import random
import sqlite3
from collections import defaultdict

import pytest

from loraloom.composition.errors import LoraloomError, SpecError
from loraloom.evaluation.bench.manifest import load_manifest
from loraloom.evaluation.bench.plan import parse_methods
from loraloom.evaluation.bench.tiny_bench import torch_threads, write_tiny_benchmark
from loraloom.evaluation.bench.tune import (
    TUNE_SEED_BASE,
    TuneOptions,
    choose,
    parse_grid,
    read_tuned,
    setting_name,
    tune,
    tuning_seeds,
    tuning_sets,
)
from loraloom.evaluation.toyworld import ASSETS, MODEL
from loraloom.pipelines.batch import PipelineCache

assets_needed = pytest.mark.skipif(not (MODEL / "model_index.json").exists(), reason="toy-world assets not trained")


def test_grid_is_every_combination_cheapest_first():
    grid = parse_grid(["cfg=7,2", "steps=50,25"])
    assert grid == [{"guidance_scale": 2.0, "steps": 25}, {"guidance_scale": 7.0, "steps": 25},
                    {"guidance_scale": 2.0, "steps": 50}, {"guidance_scale": 7.0, "steps": 50}]
    assert setting_name(grid[1]) == "cfg=7_steps=25"
    for bad, word in ((["seed=1,2"], "KEY"), (["steps=0"], "1 to 1000"), (["cfg=nan"], "0 to 100"), (["cfg=2,2"], "twice"),
                      (["cfg=2", "guidance_scale=3"], "twice"), ([], "empty"), (["steps="], "no values")):
        with pytest.raises(SpecError, match=word):
            parse_grid(bad)


def test_choice_is_the_best_mean_and_the_cheapest_among_equals():
    settings = parse_grid(["cfg=2,4,7"])
    means = {"merge": {"cfg=2": 0.5, "cfg=4": 0.7, "cfg=7": 0.6},
             "switch": {"cfg=2": 0.4, "cfg=4": 0.4, "cfg=7": 0.4},  # a tie: the lowest CFG
             "composite": {"cfg=2": float("nan"), "cfg=4": 0.1, "cfg=7": 0.9},
             "never": {"cfg=2": float("nan")}}
    assert choose(means, settings) == {"merge": "cfg=4", "switch": "cfg=2", "composite": "cfg=7"}


def test_tuning_sets_are_per_group_and_n_and_do_not_depend_on_order(tmp_path):
    m = load_manifest(ASSETS / "benchmark.yaml")
    chosen = tuning_sets(m, m.sets, 2)
    cells = defaultdict(int)
    for s in chosen:
        cells[(s.group, s.n)] += 1
    assert set(cells.values()) == {2} and set(cells) == {(s.group, s.n) for s in m.sets}
    shuffled = list(m.sets)
    random.Random(0).shuffle(shuffled)
    assert {s.id for s in tuning_sets(m, shuffled, 2)} == {s.id for s in chosen}
    assert not set(tuning_seeds(3)) & {seed for s in m.sets for seed in m.settings(s).seeds}
    assert tuning_seeds(2) == (TUNE_SEED_BASE, TUNE_SEED_BASE + 1)


def _scores(folder):
    """{method label: mean over sets of the per-set mean checker.all}, read from the store without loraloom's code."""
    db = sqlite3.connect(folder / "bench.sqlite")
    rows = db.execute("SELECT i.method_label, i.set_id, s.value FROM items i JOIN scores s ON s.item_id = i.item_id "
                      "WHERE s.metric = 'checker.all' AND i.status = 'done'").fetchall()
    per = defaultdict(lambda: defaultdict(list))
    for label, set_id, value in rows:
        per[label][set_id].append(value)
    return {label: sum(sum(v) / len(v) for v in sets.values()) / len(sets) for label, sets in per.items()}


@assets_needed
def test_tune_then_tuned_run_on_the_toy_world(tmp_path, capsys):
    from loraloom.app.cli import main

    m = load_manifest(ASSETS / "benchmark.yaml")
    variants = parse_methods("merge,composite")
    settings = parse_grid(["cfg=1,5", "steps=4"])
    pool = m.select(patterns=["n2-*", "n3-*"])
    with torch_threads(1):
        result = tune(TuneOptions(manifest=m, out=tmp_path / "tune", variants=variants, settings=settings, sets=pool,
                                  per_group=1, seeds=1, device="cpu", progress=False, cache=PipelineCache()))
    assert result.metric == "checker.all"
    record = json.loads((tmp_path / "tune" / "tuned.json").read_text())
    tuning = record["tuning_sets"]
    assert len(tuning) == 2 and record["tuning_seeds"] == [TUNE_SEED_BASE]
    for setting in settings:  # each grid point ran at its setting, on the tuning sets and seeds only
        folder = tmp_path / "tune" / "grid" / setting_name(setting)
        db = sqlite3.connect(folder / "bench.sqlite")
        specs = [json.loads(s) for (s,) in db.execute("SELECT spec FROM items WHERE status = 'done'")]
        ids = {i for (i,) in db.execute("SELECT set_id FROM items")}
        seeds = {v for (v,) in db.execute("SELECT seed_value FROM items")}
        assert len(specs) == 4 and ids == set(tuning) and seeds == {TUNE_SEED_BASE}
        assert {(s["guidance_scale"], s["steps"]) for s in specs} == {(setting["guidance_scale"], setting["steps"])}
        for label, mean in _scores(folder).items():
            assert record["means"][label][setting_name(setting)] == pytest.approx(mean)
    for label in ("merge", "composite"):  # the choice is the best of the recomputed means, cheapest among equals
        by = {setting_name(s): _scores(tmp_path / "tune" / "grid" / setting_name(s))[label] for s in settings}
        best = max(by.values())
        assert setting_name(record["choices"][label]) == next(n for n in (setting_name(s) for s in settings) if by[n] == best)

    out = tmp_path / "run"
    code = main(["bench", "run", str(ASSETS / "benchmark.yaml"), "--methods", "merge,composite", "--sets", "n2-*,n3-*",
                 "--limit", "6", "--seeds", "1", "--tuned", str(tmp_path / "tune" / "tuned.json"), "--out", str(out),
                 "--device", "cpu", "--threads", "1", "--no-progress"])
    assert code == 0
    assert "tuning set(s) left out" in capsys.readouterr().out
    db = sqlite3.connect(out / "bench.sqlite")
    rows = db.execute("SELECT method_label, set_id, spec FROM items").fetchall()
    assert rows and not {r[1] for r in rows} & set(tuning)
    for label, _, spec in rows:
        spec = json.loads(spec)
        assert (spec["guidance_scale"], spec["steps"]) == (record["choices"][label]["guidance_scale"], record["choices"][label]["steps"])
    from loraloom.evaluation.bench.report import load_report_data, settings_table

    header, table = settings_table(load_report_data(out))  # the report says which settings each method ran at
    assert header[:3] == ["method", "steps", "CFG"]
    assert {r[0]: (r[1], r[2]) for r in table} == {label: (str(c["steps"]), str(c["guidance_scale"]))
                                                   for label, c in record["choices"].items()}


def test_tuned_file_errors_name_the_problem(tmp_path):
    m = load_manifest(write_tiny_benchmark(tmp_path / "b"))
    variants = parse_methods("merge,switch")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(LoraloomError, match="cannot be read"):
        read_tuned(bad, m, variants)
    bad.write_text(json.dumps({"format": "other"}))
    with pytest.raises(LoraloomError, match="not a `loraloom bench tune` result"):
        read_tuned(bad, m, variants)
    good = {"format": "loraloom-bench-tuned/1", "manifest_sha256": m.sha256, "choices": {"merge": {"guidance_scale": 2.0}}}
    bad.write_text(json.dumps(good))
    with pytest.raises(LoraloomError, match="no tuned settings for switch"):
        read_tuned(bad, m, variants)
    bad.write_text(json.dumps({**good, "manifest_sha256": "0" * 64}))
    with pytest.raises(LoraloomError, match="another version of manifest"):
        read_tuned(bad, m, parse_methods("merge"))
    bad.write_text(json.dumps({**good, "choices": {"merge": {"lora_path": "/etc/passwd"}}}))
    with pytest.raises(LoraloomError, match="not sampler settings"):
        read_tuned(bad, m, parse_methods("merge"))
    bad.write_text(json.dumps({**good, "choices": {"merge": {"steps": "abc"}}}))
    with pytest.raises(LoraloomError, match="steps 'abc' is not a whole number"):
        read_tuned(bad, m, parse_methods("merge"))
    bad.write_text(json.dumps(good))
    assert read_tuned(bad, m, parse_methods("merge")).choices == {"merge": {"guidance_scale": 2.0}}


def test_tuned_run_refuses_an_override_of_a_tuned_setting(tmp_path, capsys):
    from loraloom.app.cli import main

    path = write_tiny_benchmark(tmp_path / "b")
    m = load_manifest(path)
    tuned = tmp_path / "tuned.json"
    tuned.write_text(json.dumps({"format": "loraloom-bench-tuned/1", "manifest_sha256": m.sha256,
                                 "choices": {"merge": {"guidance_scale": 2.0}}, "tuning_sets": ["n2-000"]}))
    code = main(["bench", "run", str(path), "--methods", "merge", "--tuned", str(tuned), "--guidance-scale", "3",
                 "--out", str(tmp_path / "o"), "--dry-run"])
    assert code == 2 and "--guidance-scale would replace" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv", [["bench", "run", "{m}", "--methods", "bogus", "--out", "{o}"],
                                  ["bench", "tune", "{m}", "--methods", "merge,bogus", "--grid", "cfg=2", "--out", "{o}"],
                                  ["toyworld", "compose-check", "--methods", "bogus", "--out", "{o}"]])
def test_an_unknown_method_is_one_clear_line(tmp_path, capsys, argv):
    from loraloom.app.cli import main

    path = write_tiny_benchmark(tmp_path / "b")
    code = main([a.format(m=path, o=tmp_path / "o") for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and "unknown method 'bogus'. Fix: use one of" in err and "unexpected" not in err
    assert not (tmp_path / "o").exists()
