"""The benchmark store: one SQLite database (`bench.sqlite`, WAL journal) in the output folder, next to the PNGs.

- `items`: one row per (set, method, seed) that was attempted — `done` with its PNG path and hash, or `failed`
  with the error. The primary key is the item id, so a row is never duplicated; a failed item that succeeds on a
  rerun has its row replaced; a done row is never rewritten.
- `runs`: one row per process of each `bench run` (arguments, device, counts, wall time).
- `scores`: (item, metric, scorer) → value and details (CLIPScore, toy-world checker …).
- `pairwise`: MLLM judgements of two methods' images of the same set and seed.
- `meta`: what the folder was made from (manifest path and hash, seeding mode).

A PNG is written atomically (temp file + rename) before its row is committed, so a crash leaves either nothing,
or a PNG without a row (made again, byte-identical, on the next run), never a row without its image. Several
processes may write at once (WAL, one writer at a time, `busy_timeout`); this needs a local file system — SQLite
locks are unreliable on network file systems.
"""

from __future__ import annotations

import datetime as _dt
import json
import sqlite3
import time
from pathlib import Path

DB_NAME = "bench.sqlite"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    item_id TEXT PRIMARY KEY,
    set_id TEXT NOT NULL,
    method TEXT NOT NULL,
    method_label TEXT NOT NULL,
    seed_index INTEGER NOT NULL,
    seed_value INTEGER NOT NULL,
    seed INTEGER NOT NULL,
    reference_position INTEGER,
    n_loras INTEGER NOT NULL,
    grp TEXT NOT NULL,
    base_model TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('done', 'failed')),
    png TEXT,
    png_sha256 TEXT,
    width INTEGER,
    height INTEGER,
    seconds REAL,
    unet_calls INTEGER,
    unet_rows INTEGER,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 1,
    fingerprint TEXT NOT NULL,
    spec TEXT NOT NULL,
    run_id TEXT,
    process_index INTEGER,
    finished_at TEXT
);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT NOT NULL,
    process_index INTEGER NOT NULL,
    num_processes INTEGER NOT NULL,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    argv TEXT,
    device TEXT,
    host TEXT,
    assigned INTEGER,
    already_done INTEGER,
    generated INTEGER DEFAULT 0,
    failed INTEGER DEFAULT 0,
    generation_seconds REAL DEFAULT 0,
    wall_seconds REAL,
    PRIMARY KEY (run_id, process_index)
);
CREATE TABLE IF NOT EXISTS scores (
    item_id TEXT NOT NULL,
    metric TEXT NOT NULL,
    scorer TEXT NOT NULL,
    value REAL,
    detail TEXT,
    scored_at TEXT,
    PRIMARY KEY (item_id, metric, scorer)
);
CREATE TABLE IF NOT EXISTS pairwise (
    set_id TEXT NOT NULL,
    seed_index INTEGER NOT NULL,
    method_a TEXT NOT NULL,
    method_b TEXT NOT NULL,
    judge TEXT NOT NULL,
    composition_a REAL, composition_b REAL, composition_outcome TEXT,
    image_quality_a REAL, image_quality_b REAL, image_quality_outcome TEXT,
    error TEXT,
    record TEXT,
    judged_at TEXT,
    PRIMARY KEY (set_id, seed_index, method_a, method_b, judge)
);
"""

ITEM_COLUMNS = ("item_id", "set_id", "method", "method_label", "seed_index", "seed_value", "seed", "reference_position",
                "n_loras", "grp", "base_model", "status", "png", "png_sha256", "width", "height", "seconds", "unet_calls",
                "unet_rows", "error", "attempts", "fingerprint", "spec", "run_id", "process_index", "finished_at")


def now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


class Store:
    """A connection to `DIR/bench.sqlite`. One per process (connections are not shared across processes)."""

    def __init__(self, folder: str | Path, create: bool = True):
        self.folder = Path(folder)
        self.path = self.folder / DB_NAME
        if not create and not self.path.exists():
            from loraloom.composition.errors import SpecError

            raise SpecError(f"{self.folder}: no {DB_NAME} here; run `loraloom bench run MANIFEST --out {self.folder}` first")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=120, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA busy_timeout=120000")
        self._enable_wal()
        self.db.execute("PRAGMA synchronous=NORMAL")  # durable against process crashes in WAL mode
        with self.tx():
            for stmt in filter(str.strip, SCHEMA.split(";")):
                self.db.execute(stmt)

    def _enable_wal(self, wait_s: float = 120.0) -> None:
        """Switch to WAL. SQLite answers "database is locked" at once, without its busy handler, when another
        process is creating or switching the same file at that moment, so retry with a short back-off."""
        deadline = time.monotonic() + wait_s
        delay = 0.01
        while True:
            try:
                self.db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as e:
                lock_error = "locked" in str(e) or "busy" in str(e)
                if not lock_error or time.monotonic() > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.5)

    def close(self) -> None:
        self.db.close()

    def tx(self):
        """A write transaction (BEGIN IMMEDIATE: take the write lock up front, so concurrent writers queue)."""
        store = self

        class _Tx:
            def __enter__(self):
                store.db.execute("BEGIN IMMEDIATE")
                return store.db

            def __exit__(self, exc_type, exc, tb):
                store.db.execute("ROLLBACK" if exc_type else "COMMIT")
                return False

        return _Tx()

    # --- meta -------------------------------------------------------------------------------------------------
    def meta(self) -> dict[str, str]:
        return {r["key"]: r["value"] for r in self.db.execute("SELECT key, value FROM meta")}

    def claim_meta(self, values: dict[str, str]) -> dict[str, str]:
        """Write each of `values` whose key is not set yet (first run wins); return the stored meta."""
        with self.tx() as db:
            for k, v in values.items():
                db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)", (k, str(v)))
        return self.meta()

    def set_meta(self, key: str, value: str) -> None:
        with self.tx() as db:
            db.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value", (key, value))

    # --- items ------------------------------------------------------------------------------------------------
    def item_states(self) -> dict[str, sqlite3.Row]:
        return {r["item_id"]: r for r in self.db.execute("SELECT item_id, status, png, fingerprint, attempts FROM items")}

    def record_item(self, row: dict) -> None:
        """Insert an item row; a failed row is replaced (attempts counted), a done row never is."""
        cols = [c for c in ITEM_COLUMNS if c in row]
        with self.tx() as db:
            old = db.execute("SELECT status, attempts FROM items WHERE item_id = ?", (row["item_id"],)).fetchone()
            if old is not None and old["status"] == "done":
                return
            values = dict(row)
            values["attempts"] = (old["attempts"] + 1) if old is not None else 1
            cols = [c for c in ITEM_COLUMNS if c in values]
            db.execute(f"INSERT OR REPLACE INTO items ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                       [values[c] for c in cols])

    def forget_item(self, item_id: str) -> None:
        with self.tx() as db:
            db.execute("DELETE FROM items WHERE item_id = ?", (item_id,))
            db.execute("DELETE FROM scores WHERE item_id = ?", (item_id,))

    def items(self, status: str | None = "done") -> list[dict]:
        q = "SELECT * FROM items" + (" WHERE status = ?" if status else "") + " ORDER BY rowid"
        return [dict(r) for r in self.db.execute(q, (status,) if status else ())]

    # --- runs -------------------------------------------------------------------------------------------------
    def start_run(self, run_id: str, process_index: int, num_processes: int, argv: list[str], device: str, host: str,
                  assigned: int, already_done: int) -> None:
        with self.tx() as db:
            db.execute("INSERT OR REPLACE INTO runs (run_id, process_index, num_processes, started_at, argv, device, host, "
                       "assigned, already_done) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (run_id, process_index, num_processes, now(), json.dumps(argv), device, host, assigned, already_done))

    def update_run(self, run_id: str, process_index: int, **fields) -> None:
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self.tx() as db:
            db.execute(f"UPDATE runs SET {sets} WHERE run_id = ? AND process_index = ?", [*fields.values(), run_id, process_index])

    def runs(self) -> list[dict]:
        return [dict(r) for r in self.db.execute("SELECT * FROM runs ORDER BY started_at, process_index")]

    # --- scores -----------------------------------------------------------------------------------------------
    def scored(self, metric: str, scorer: str) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT item_id FROM scores WHERE metric = ? AND scorer = ?", (metric, scorer))}

    def put_scores(self, rows: list[tuple[str, str, str, float | None, dict | None]]) -> None:
        """(item_id, metric, scorer, value, detail) rows, in one transaction."""
        t = now()
        with self.tx() as db:
            db.executemany("INSERT OR REPLACE INTO scores (item_id, metric, scorer, value, detail, scored_at) VALUES (?, ?, ?, ?, ?, ?)",
                           [(i, m, s, v, json.dumps(d, sort_keys=True) if d is not None else None, t) for i, m, s, v, d in rows])

    def scores(self) -> list[dict]:
        return [dict(r) for r in self.db.execute("SELECT * FROM scores ORDER BY metric, scorer, item_id")]

    # --- pairwise ---------------------------------------------------------------------------------------------
    def judged(self, judge: str) -> set[tuple]:
        return {(r[0], r[1], r[2], r[3]) for r in self.db.execute(
            "SELECT set_id, seed_index, method_a, method_b FROM pairwise WHERE judge = ? AND error IS NULL", (judge,))}

    def put_pairwise(self, row: dict) -> None:
        cols = list(row)
        with self.tx() as db:
            db.execute(f"INSERT OR REPLACE INTO pairwise ({', '.join(cols)}, judged_at) VALUES ({', '.join('?' * len(cols))}, ?)",
                       [row[c] for c in cols] + [now()])

    def pairwise(self) -> list[dict]:
        return [dict(r) for r in self.db.execute("SELECT * FROM pairwise ORDER BY judge, method_a, method_b, set_id, seed_index")]
