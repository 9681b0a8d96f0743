"""Scale-out: `bench run` under `accelerate launch` with 2 CPU processes writes one store; every process takes its
deterministic shard (item i -> process i mod 2), and the union is the complete plan, identical to a one-process run."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from loraloom.evaluation.bench.manifest import load_manifest
from loraloom.evaluation.bench.plan import build_plan, parse_methods, shard
from loraloom.evaluation.bench.runner import RunOptions, run_benchmark
from loraloom.evaluation.bench.tiny_bench import torch_threads, write_tiny_benchmark

ROOT = Path(__file__).resolve().parents[1]
COMPARED = "item_id, status, png, png_sha256, seed, fingerprint, spec"

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with torch_threads(1):
        yield


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_under_accelerate_complete_the_plan(tmp_path):
    manifest = write_tiny_benchmark(tmp_path / "bench", size=16, seeds=[0, 1, 2])
    out = tmp_path / "sharded"
    # accelerate's multi-process launcher (torchrun underneath); on CPU the processes join a gloo group.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "loraloom", "bench", "run", str(manifest), "--methods", "merge,composite", "--out", str(out), "--limit", "3",
           "--device", "cpu", "--threads", "1", "--no-progress"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "process 1/2" in proc.stdout and "process 2/2" in proc.stdout
    assert "18/18 images of this plan done, 0 failed" in proc.stdout

    m = load_manifest(manifest)
    plan = build_plan(m, m.sets[:3], parse_methods("merge,composite"), hashes=lambda p: None)
    db = sqlite3.connect(out / "bench.sqlite")
    owner = dict(db.execute("SELECT item_id, process_index FROM items"))
    assert sorted(owner) == sorted(it.item_id for it in plan)  # the union is complete, nothing twice (primary key)
    for k in range(2):
        assert {it.item_id for it in shard(plan, k, 2)} == {i for i, p in owner.items() if p == k}
    runs = db.execute("SELECT process_index, num_processes, assigned, generated FROM runs ORDER BY process_index").fetchall()
    assert runs == [(0, 2, 9, 9), (1, 2, 9, 9)]
    sharded = {r[0]: r for r in db.execute(f"SELECT {COMPARED} FROM items")}

    single = run_benchmark(RunOptions(manifest=m, out=tmp_path / "single", variants=parse_methods("merge,composite"),
                                      sets=m.sets[:3], progress=False, device="cpu"))
    assert single.done_total == 18
    db1 = sqlite3.connect(tmp_path / "single" / "bench.sqlite")
    assert {r[0]: r for r in db1.execute(f"SELECT {COMPARED} FROM items")} == sharded
