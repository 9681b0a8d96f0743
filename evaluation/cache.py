"""The judges' disk cache: an append-only JSONL file, one line per answer, so a re-run asks nothing twice.

A key is the sha256 of: the judge backend and model, its decoding parameters (temperature, max tokens, seed,
image resizing …), the template `name@version`, the sha256 of the rendered prompt, the sha256 of each image's
bytes (in order) and the sample index (re-asks after an unparseable answer are samples 1, 2, …). No secret
goes into a key or a line: judges never expose their API key.

Lines are appended and flushed one at a time (a crash loses at most the line being written; a torn last line is
skipped on load with a warning). Only answers are reused; a request that failed (timeout, HTTP 500 …) is written
as an `error` line for the record and asked again on the next run.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import threading
from pathlib import Path

log = logging.getLogger(__name__)


def request_key(*, backend: str, model: str, decoding: dict, template: str, prompt_sha256: str,
                image_sha256: list[str], sample: int = 0) -> str:
    payload = {"backend": backend, "model": model, "decoding": decoding, "template": template,
               "prompt": prompt_sha256, "images": list(image_sha256), "sample": int(sample)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class JudgeCache:
    """`get(key)` → the last answer line for `key` (or None); `put(record)` appends one line. `path=None` keeps
    it in memory only. Safe to share between threads of one process."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path is not None else None
        self._answers: dict[str, dict] = {}
        self._lock = threading.Lock()
        self.loaded_lines = 0
        if self.path is not None and self.path.exists():
            self._load()

    def _load(self) -> None:
        with open(self.path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    log.warning("%s:%d: unreadable cache line skipped (torn write?)", self.path, n)
                    continue
                self.loaded_lines += 1
                if rec.get("status") == "answer" and "key" in rec:
                    self._answers[rec["key"]] = rec

    def __len__(self) -> int:
        return len(self._answers)

    def get(self, key: str) -> dict | None:
        with self._lock:
            return self._answers.get(key)

    def put(self, record: dict) -> None:
        record = {"time": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"), **record}
        line = json.dumps(record, ensure_ascii=False, sort_keys=True)
        with self._lock:
            if record.get("status") == "answer":
                self._answers[record["key"]] = record
            if self.path is None:
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line + "\n")
                f.flush()
                os.fsync(f.fileno())
