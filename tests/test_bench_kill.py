"""A real `loraloom bench run` killed with SIGKILL at random moments (during start-up and model loading, in the
middle of images and of writes) and resumed: the final store equals an uninterrupted run's — the same rows, the
same image bytes, nothing lost, nothing duplicated, no half-written file left."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loraloom.evaluation.bench.manifest import load_manifest
from loraloom.evaluation.bench.plan import parse_methods
from loraloom.evaluation.bench.runner import RunOptions, run_benchmark
from loraloom.evaluation.bench.tiny_bench import torch_threads, write_tiny_benchmark

ROOT = Path(__file__).resolve().parents[1]
METHODS = "merge,switch,composite"
# What must be equal between the two stores (timings, run ids and processes may differ).
COMPARED = ("item_id", "set_id", "method", "method_label", "seed_index", "seed_value", "seed", "reference_position",
            "n_loras", "grp", "base_model", "status", "png", "png_sha256", "width", "height", "unet_calls", "unet_rows",
            "error", "attempts", "fingerprint", "spec")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with torch_threads(1):
        yield


def _count(db_path: Path) -> int:
    if not db_path.exists():
        return -1
    try:
        db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)
        try:
            return db.execute("SELECT count(*) FROM items").fetchone()[0]
        finally:
            db.close()
    except sqlite3.OperationalError:  # schema not created yet
        return -1


def _rows(out: Path) -> dict[str, tuple]:
    db = sqlite3.connect(out / "bench.sqlite")
    try:
        return {r[0]: r for r in db.execute(f"SELECT {', '.join(COMPARED)} FROM items")}
    finally:
        db.close()


def _wait(pred, proc, deadline: float) -> bool:
    while time.monotonic() < deadline:
        if pred():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    raise AssertionError("the benchmark process made no progress in time")


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_equals_uninterrupted(tmp_path):
    manifest = write_tiny_benchmark(tmp_path / "bench", size=16)
    m = load_manifest(manifest)
    opts = dict(manifest=m, variants=parse_methods(METHODS), sets=m.sets, progress=False, device="cpu", threads=1)
    reference = run_benchmark(RunOptions(out=tmp_path / "reference", **opts))
    total = reference.planned
    assert reference.done_total == total == 4 * 3 * 2

    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    out = tmp_path / "killed"
    db = out / "bench.sqlite"
    cmd = [sys.executable, "-m", "loraloom", "bench", "run", str(manifest), "--methods", METHODS, "--out", str(out),
           "--device", "cpu", "--threads", "1", "--no-progress"]
    kills, done = [], 0
    for k in range(3):
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 180
            if k == 0:  # early: while the store is created and the model and LoRAs load
                _wait(lambda: db.exists(), proc, deadline)
                time.sleep(rng.uniform(0.0, 1.5))
            else:  # mid-run: a few images after the previous kill, at a random point of the next one
                target = done + rng.randint(1, 4)
                _wait(lambda target=target: _count(db) >= target, proc, deadline)
                time.sleep(rng.uniform(0.0, 0.3))
            alive = proc.poll() is None
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
        done = max(_count(db), 0)
        kills.append((alive, done))
    assert all(alive for alive, _ in kills), f"a run finished before its kill (seed {seed}): {kills}"
    assert 0 < done < total, f"the kills did not interrupt the run mid-way (seed {seed}): {kills}"

    resumed = run_benchmark(RunOptions(out=out, **opts))
    assert resumed.already_done == done and resumed.generated == total - done and resumed.done_total == total

    ref_rows, rows = _rows(tmp_path / "reference"), _rows(out)
    assert rows.keys() == ref_rows.keys() and len(rows) == total
    for item_id, row in rows.items():
        assert row == ref_rows[item_id], f"{item_id} differs after kills {kills} (seed {seed})"
    ref_files = sorted(p.relative_to(tmp_path / "reference") for p in (tmp_path / "reference" / "images").rglob("*"))
    files = sorted(p.relative_to(out) for p in (out / "images").rglob("*"))
    assert files == ref_files, f"leftover or missing files (seed {seed})"
    for rel in files:
        if (out / rel).is_file():
            assert (out / rel).read_bytes() == (tmp_path / "reference" / rel).read_bytes(), rel
