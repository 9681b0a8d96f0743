"""The output folder as a history: every PNG loraloom wrote there (images and X/Y/Z grids), newest first, with a
caption (method, seed, LoRAs, when) read from the PNG itself, so the history survives reloads and restarts.

Plain Python (no Gradio). Summaries are cached by (path, size, mtime): a folder of thousands of PNGs is read once.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from loraloom.pipelines.grid import GRID_CHUNK
from loraloom.pipelines.spec import SPEC_CHUNK

MAX_ITEMS = 200


@dataclass
class HistoryItem:
    path: Path
    kind: str  # "image" or "grid"
    made: float  # mtime
    method: str = ""
    seed: int | None = None
    loras: list[str] = field(default_factory=list)
    data: dict = field(default_factory=dict)  # the spec (image) or the grid record (grid)

    @property
    def caption(self) -> str:
        when = time.strftime("%H:%M" if time.time() - self.made < 20 * 3600 else "%d %b %H:%M", time.localtime(self.made))
        if self.kind == "grid":
            axes = [a["text"].split("=")[0] for a in self.data.get("axes", []) if a]
            return f"X/Y/Z plot: {' × '.join(axes)} · {len(self.data.get('cells', []))} cells · {when}"
        loras = ", ".join(self.loras) or "no LoRA"
        return f"{self.method} · seed {self.seed} · {loras} · {when}"

    def row(self) -> list:
        return [self.path.name, self.kind, self.method, self.seed, ", ".join(self.loras),
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.made))]


HEADERS = ["file", "kind", "method", "seed", "LoRAs", "made"]


class History:
    """The PNGs of one output folder (and its grids/ folder)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._cache: dict[tuple, HistoryItem | None] = {}
        self._lock = threading.Lock()

    def items(self, limit: int = MAX_ITEMS) -> list[HistoryItem]:
        files = [p for d in (self.folder, self.folder / "grids") if d.is_dir() for p in d.glob("*.png")
                 if not p.name.startswith(".")]
        stats = []
        for p in files:
            try:
                st = p.stat()
            except OSError:
                continue
            stats.append((st.st_mtime, p, st.st_size))
        stats.sort(key=lambda t: (t[0], t[1].name), reverse=True)
        out = []
        with self._lock:
            for mtime, p, size in stats:
                key = (str(p), size, mtime)
                if key not in self._cache:
                    self._cache[key] = _summary(p, mtime)
                item = self._cache[key]
                if item is not None:
                    out.append(item)
                if len(out) >= limit:
                    break
        return out

    def find(self, name: str) -> HistoryItem | None:
        """The item whose file is called `name` (a file name, or a path inside the folder)."""
        name = Path(str(name)).name
        return next((i for i in self.items(limit=10**9) if i.path.name == name), None)


def _summary(path: Path, mtime: float) -> HistoryItem | None:
    """A PNG's history entry (None: not a loraloom PNG, or unreadable)."""
    try:
        with Image.open(path) as im:
            text = dict(getattr(im, "text", {}) or {})
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None
    try:
        if text.get(SPEC_CHUNK):
            spec = json.loads(text[SPEC_CHUNK])
            loras = [lora.get("name") or Path(lora.get("path", "?")).stem for lora in spec.get("loras") or []
                     if isinstance(lora, dict)]
            return HistoryItem(path, "image", mtime, str(spec.get("method", "")), spec.get("seed"), loras, spec)
        if text.get(GRID_CHUNK):
            record = json.loads(text[GRID_CHUNK])
            base = record.get("base") or {}
            loras = [lora.get("name") or Path(lora.get("path", "?")).stem for lora in base.get("loras") or []
                     if isinstance(lora, dict)]
            return HistoryItem(path, "grid", mtime, str(base.get("method", "")), base.get("seed"), loras, record)
    except (json.JSONDecodeError, AttributeError, TypeError):
        return None
    return None
