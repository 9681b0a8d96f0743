"""`bench score` (CLIPScore, the toy-world checker, a pairwise MLLM judge on a local HTTP server) into the store,
resumable; `bench report` (HTML with tables, SVG charts and inline images; Markdown in the papers' layouts)."""

from __future__ import annotations

import json
import re
import sqlite3
import statistics

import pytest
import torch
from PIL import Image

from loraloom.app.cli import main
from loraloom.evaluation.bench.manifest import load_manifest
from loraloom.evaluation.bench.plan import parse_methods
from loraloom.evaluation.bench.runner import RunOptions, run_benchmark
from loraloom.evaluation.bench.stats import estimate
from loraloom.evaluation.bench.tiny_bench import torch_threads, write_tiny_benchmark
from loraloom.evaluation.fakes import FakeChatServer, brightness_judge, tiny_clip_folder


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory):
    """24 images of a tiny benchmark whose manifest names a (random) toy-world checker and a tiny CLIP."""
    from loraloom.evaluation.toyworld.checker import Checker, CheckerNet

    root = tmp_path_factory.mktemp("report")
    torch.manual_seed(0)
    Checker(CheckerNet((8, 8, 8), 16)).save(root / "bench" / "checker", {"widths": [8, 8, 8], "hidden": 16})
    tiny_clip_folder(root / "bench" / "clip", words=("ohwx", "sks", "red", "coat", "inkwash", "forest"))
    manifest = write_tiny_benchmark(root / "bench", size=32, extra={"checker": "checker", "clip": "clip"})
    m = load_manifest(manifest)
    run_benchmark(RunOptions(manifest=m, out=root / "out", variants=parse_methods("merge,switch,composite"), sets=m.sets,
                             progress=False, device="cpu"))
    return root / "out", m


def test_score_is_stored_and_resumable(scored_run, capsys, monkeypatch):
    out, m = scored_run
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with FakeChatServer(brightness_judge) as server:
        argv = ["bench", "score", str(out), "--device", "cpu", "--no-progress", "--judge", "openai", "--judge-model", "fake",
                "--base-url", server.url, "--timeout", "10", "--workers", "2"]
        assert main(argv) == 0
        first = capsys.readouterr().out
        sent = len(server.requests)
        assert main(argv) == 0  # everything is in the store: nothing is scored or asked again
        second = capsys.readouterr().out
        assert len(server.requests) == sent == 16 * 2  # 2 candidates x 8 (set, seed) x both orders
    assert re.search(r"CLIPScore \(transformers:.*clip\|scale=100\|text=scoring\): 24 scored now, 24 in all", first)
    assert "toy-world checker" in first and "pairwise judge" in first
    assert "0 scored now, 24 in all" in second and "0 scored now, 16 in all" in second

    db = sqlite3.connect(out / "bench.sqlite")
    counts = dict(db.execute("SELECT metric, count(*) FROM scores GROUP BY metric"))
    assert counts == {"clipscore": 24, "checker.all": 24, "checker.frac": 24}
    detail = json.loads(db.execute("SELECT detail FROM scores WHERE metric='clipscore' AND item_id='n3-001|switch|1'").fetchone()[0])
    assert detail["text"] == "sks, inkwash, forest" and set(detail) == {"cosine", "tokens", "truncated", "text"}
    # the checker's verdict is what the checker says about the stored image
    from loraloom.evaluation.toyworld.checker import Checker

    png, = db.execute("SELECT png FROM items WHERE item_id='n3-000|merge|0'").fetchone()
    pred = Checker.load(m.checker).predict([Image.open(out / png).convert("RGB")])[0]
    value, = db.execute("SELECT value FROM scores WHERE metric='checker.all' AND item_id='n3-000|merge|0'").fetchone()
    assert value == float(pred["shape"] == "star" and pred["clothing"] == "hat")
    rows = db.execute("SELECT method_a, method_b, error, composition_outcome FROM pairwise").fetchall()
    assert len(rows) == 16 and {(a, b) for a, b, _, _ in rows} == {("switch", "merge"), ("composite", "merge")}
    assert all(e is None and o in ("win", "tie", "lose") for _, _, e, o in rows)


def test_report_tables_plots_and_grids(scored_run, tmp_path):
    out, m = scored_run
    assert main(["bench", "report", str(out), "--out", str(tmp_path / "r")]) == 0
    html = (tmp_path / "r" / "report.html").read_text()
    md = (tmp_path / "r" / "summary.md").read_text()
    # self-contained: inline SVG charts and images, no external resource
    assert html.count("<svg") >= 5 and "data:image/png;base64," in html
    assert not re.search(r"""(src|href)=['"](?!data:)""", html)
    for title in ("Composition accuracy", "CLIPScore", "MLLM judge", "Paired win rates", "Time per image", "Image grids"):
        assert title in html, title
    # the main table: methods x N with avg, mean ± CI over sets; check one cell against the store
    assert "| method | N=2 | N=3 | avg |" in md
    db = sqlite3.connect(out / "bench.sqlite")
    vals = db.execute("SELECT i.set_id, s.value FROM scores s JOIN items i USING (item_id) WHERE s.metric='clipscore' "
                      "AND i.method='composite' AND i.n_loras=3").fetchall()
    per_set = [statistics.fmean(v for s, v in vals if s == sid) for sid in sorted({s for s, _ in vals})]
    e = estimate(per_set)
    assert "| composite | " in md and f"{e.mean:.2f} ± {e.half:.2f} |" in md.split("## CLIPScore")[1].split("##")[0]
    # the judge tables in Multi-LoRA Composition's layout
    assert "| N | switch comp. | merge comp. | switch img | merge img |" in md
    assert "win / tie / lose" in md
    # grids: the same set and seed across the three methods
    grid = html.split("Image grids")[1]
    assert grid.count("<img") == 3 * 4  # 2 sets per N, N in {2, 3}: 4 rows x 3 methods
