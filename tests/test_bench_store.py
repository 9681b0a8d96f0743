"""The bench store is opened by several processes at once (`accelerate launch` shards): switching a fresh SQLite
file to WAL from two processes at the same moment makes SQLite answer "database is locked" without waiting (CI saw
it). The store must open in every process regardless."""

from __future__ import annotations

import multiprocessing as mp
import time

from loraloom.evaluation.bench.store import Store


def _open(folder, go, results):
    go.wait()
    try:
        Store(folder).close()
        results.put("ok")
    except Exception as e:  # noqa: BLE001 - the message is what the test reports
        results.put(f"{type(e).__name__}: {e}")


def test_two_processes_open_a_fresh_store_at_the_same_moment(tmp_path):
    ctx = mp.get_context("fork")
    outcomes = []
    for trial in range(20):  # without the retry about 60 % of trials failed on this machine
        folder = tmp_path / f"t{trial}"
        go, results = ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=_open, args=(folder, go, results)) for _ in range(2)]
        for p in procs:
            p.start()
        time.sleep(0.02)
        go.set()
        for p in procs:
            p.join(60)
        outcomes += [results.get(timeout=5) for _ in procs]
    assert outcomes == ["ok"] * 40, [o for o in outcomes if o != "ok"]
