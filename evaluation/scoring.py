"""Scoring a folder of loraloom PNGs (what `loraloom eval DIR` runs): read each image's spec, CLIPScore it,
optionally judge methods pairwise on the same set and seed, write CSV/JSONL next to the images, summarise.

A *set* is what a comparison holds fixed: the base model, the prompt and the LoRA list (file and weight). Images
of one set and one seed made by different methods are compared with each other.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import logging
import math
import os
import statistics
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

from loraloom.composition.lora_file import file_sha256
from loraloom.evaluation.errors import EvaluationError
from loraloom.evaluation.parsing import PAIRWISE_DIMENSIONS
from loraloom.evaluation.protocols import OUTCOMES, ComposLoRAPairwise, Element, PairwiseResult, win_tie_lose
from loraloom.pipelines.spec import GenerationSpec, read_png_spec

log = logging.getLogger(__name__)

SCORES_CSV, SCORES_JSONL = "loraloom_scores.csv", "loraloom_scores.jsonl"
PAIRWISE_CSV, PAIRWISE_JSONL = "loraloom_pairwise.csv", "loraloom_pairwise.jsonl"
JUDGE_CACHE = "loraloom_judge_cache.jsonl"
CLIP_TEXT_MODES = ("triggers", "prompt")
Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class GeneratedImage:
    path: Path
    spec: GenerationSpec

    @property
    def set_id(self) -> str:
        return set_id(self.spec)

    @property
    def method(self) -> str:
        return method_label(self.spec)


def set_id(spec: GenerationSpec) -> str:
    """12 hex digits naming the set: model + prompt + LoRAs (file hash, or path, and weight), in order."""
    loras = [[lora.sha256 or lora.path, lora.weight] for lora in spec.loras]
    blob = json.dumps({"model": spec.model, "prompt": spec.prompt, "loras": loras}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def method_label(spec: GenerationSpec) -> str:
    """The method's name, with the parameters that differ from its defaults (`switch(switch_interval=3)`), so
    variants are told apart while a PNG that records every parameter in effect keeps the plain name."""
    params = spec.changed_params()
    if not params:
        return spec.method
    return f"{spec.method}(" + ",".join(f"{k}={params[k]}" for k in sorted(params)) + ")"


def clip_text(spec: GenerationSpec, mode: str = "triggers") -> str | None:
    """The text an image is scored against: its LoRAs' trigger words, comma-joined in LoRA order (ComposLoRA,
    CMLoRA), or the full prompt. None when `triggers` is asked for and the spec has none."""
    if mode == "prompt":
        return spec.prompt
    if mode != "triggers":
        raise EvaluationError(f"CLIP text must be one of {CLIP_TEXT_MODES}, not {mode!r}")
    words = [t for lora in spec.loras for t in lora.triggers]
    return ", ".join(words) if words else None


TOYWORLD_IDENTITY = "unet/diffusion_pytorch_model.safetensors"  # the file whose bytes say "this is the shipped toy world"


@functools.lru_cache(maxsize=32)
def _sha256(path: str) -> str | None:
    try:
        return file_sha256(path)
    except OSError:
        return None


def is_toyworld_model(model: str) -> bool:
    """Whether a spec's `model` is the toy world loraloom ships (docs/evaluation.md, "The toy world's CLIP"):

    - it is the shipped model folder (`loraloom.evaluation.toyworld.MODEL`) of this installation; or
    - its path, with / or \\ separators, ends in `toyworld/model` and either no such folder exists here (a path
      written on another machine or by another installation) or the folder here holds the shipped model's UNet
      weights byte for byte (`TOYWORLD_IDENTITY`, compared by sha256), so a folder that is merely named so is not
      taken for it."""
    from loraloom.evaluation import toyworld

    shipped, here = Path(toyworld.MODEL), Path(model)
    try:
        if here.is_dir() and here.resolve() == shipped.resolve():
            return True
    except OSError:
        pass
    parts = [p for p in model.replace("\\", "/").split("/") if p]
    if parts[-2:] != ["toyworld", "model"]:
        return False
    if not here.exists():
        return True
    mine = _sha256(str(here / TOYWORLD_IDENTITY))
    return mine is not None and mine == _sha256(str(shipped / TOYWORLD_IDENTITY))


def toyworld_clip_for(images: Sequence[GeneratedImage]) -> tuple[Path | None, int]:
    """The toy world's CLIP folder when every image was made by the shipped toy world (else None), and how many
    of the images were: one CLIP scores a whole folder, so a mixed folder keeps the default CLIP."""
    from loraloom.evaluation import toyworld

    toy = sum(is_toyworld_model(img.spec.model) for img in images)
    return (Path(toyworld.CLIP) if images and toy == len(images) else None), toy


def elements_of(spec: GenerationSpec) -> list[Element]:
    return [Element(name=lora.adapter_name, category=lora.category, triggers=tuple(lora.triggers)) for lora in spec.loras]


def _unreadable(path: Path) -> str | None:
    """Why the image file cannot be read and decoded in full, or None when it can."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
    except Image.DecompressionBombError as err:
        return " ".join(str(err).split())
    except (OSError, SyntaxError, ValueError) as err:
        return " ".join((getattr(err, "strerror", None) or str(err) or type(err).__name__).split())
    return None


def scan_folder(folder: str | os.PathLike, recursive: bool = False) -> tuple[list[GeneratedImage], list[tuple[Path, str]]]:
    """The loraloom PNGs in `folder` (sorted by name) and the files skipped, with why. A readable PNG without a
    loraloom spec is skipped; a PNG that cannot be read or decoded raises `EvaluationError` (naming every such
    file), before any model loads: scoring a folder without some of its images would be a different number."""
    folder = Path(folder)
    if not folder.exists():
        raise EvaluationError(f"{folder}: not a folder: nothing of that name exists. Fix: pass the folder the images "
                              "were written to (the `out` of loraloom generate).")
    if not folder.is_dir():
        raise EvaluationError(f"{folder}: not a folder: it is a file. Fix: pass the folder that holds the PNGs "
                              f"({folder.parent}).")
    try:
        paths = sorted(folder.rglob("*.png") if recursive else folder.glob("*.png"))
    except OSError as err:
        raise EvaluationError(f"{folder}: cannot be listed ({err.strerror or err}). Fix: check its permissions.") from None
    found, skipped, broken = [], [], []
    for path in paths:
        if not path.is_file():
            skipped.append((path, f"{path}: not a regular file"))
            continue
        why = _unreadable(path)
        if why is not None:
            broken.append(f"{_relative(path, folder)} ({why})")
            continue
        try:
            found.append(GeneratedImage(path=path, spec=read_png_spec(path)))
        except Exception as err:  # SpecError: no loraloom spec, or a spec that is not valid: reported, not fatal
            skipped.append((path, str(err)))
    if broken:
        shown = "; ".join(broken[:3]) + (f"; and {len(broken) - 3} more" if len(broken) > 3 else "")
        raise EvaluationError(f"{len(broken)} PNG(s) in {folder} cannot be read: {shown}. Fix: regenerate or remove "
                              "them (or fix their permissions), then run again.")
    return found, skipped


def no_images_error(folder: str | os.PathLike, skipped: Sequence[tuple[Path, str]]) -> EvaluationError:
    other = f" ({len(skipped)} other PNGs skipped: {' '.join(skipped[0][1].split())})" if skipped else ""
    return EvaluationError(f"{folder}: no loraloom PNGs to evaluate{other}. Fix: pass the folder loraloom generate "
                           "wrote (--recursive for subfolders).")


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def clip_rows(images: Sequence[GeneratedImage], scorer, text_mode: str = "triggers", root: Path | None = None) -> list[dict]:
    """One row per image: what it is and its CLIPScore (empty with a note when it has no text to score against)."""
    rows, todo = [], []
    info = scorer.describe() if scorer is not None else {}
    for img in images:
        text = clip_text(img.spec, text_mode)
        row = {"file": _relative(img.path, root) if root else str(img.path), "method": img.method, "seed": img.spec.seed,
               "set": img.set_id, "loras": ", ".join(l.adapter_name for l in img.spec.loras), "model": img.spec.model,
               "clip_model": info.get("model"), "clip_scale": info.get("scale"), "clip_text": text,
               "clip_score": None, "clip_cosine": None, "clip_tokens": None, "clip_truncated": None, "note": None}
        if scorer is None:
            row["note"] = "CLIPScore not computed"
        elif text is None:
            row["note"] = "no trigger words in the spec; use the prompt as CLIP text to score it"
        else:
            todo.append((row, img.path, text))
        rows.append(row)
    if todo:
        details = scorer.score_details([p for _, p, _ in todo], [t for _, _, t in todo])
        for (row, _, _), d in zip(todo, details):
            row.update(clip_score=round(d.score, 4), clip_cosine=round(d.cosine, 6), clip_tokens=d.text_tokens,
                       clip_truncated=d.truncated)
            if d.truncated:
                row["note"] = "text longer than the CLIP context: only its first tokens were scored"
    return rows


def comparison_pairs(images: Sequence[GeneratedImage], baseline: str | None = None) -> list[tuple[GeneratedImage, GeneratedImage]]:
    """(candidate, baseline) pairs of images of the same set and seed. With `baseline`, every other method against
    it; without, against "merge" when there is one (ComposLoRA's setting), else every pair of methods."""
    groups: dict[tuple, dict[str, GeneratedImage]] = defaultdict(dict)
    for img in images:
        slot = groups[(img.set_id, img.spec.seed)]
        if img.method in slot:
            log.warning("%s: another image of method %s for the same set and seed (%s) is used for comparisons",
                        img.path, img.method, slot[img.method].path.name)
            continue
        slot[img.method] = img
    methods = {img.method for img in images}
    if baseline is None and "merge" in methods:
        baseline = "merge"
    elif baseline is not None and baseline not in methods:
        raise EvaluationError(f"baseline method {baseline!r} is not among the images' methods {sorted(methods)}")
    pairs = []
    for key in sorted(groups, key=lambda k: (k[0], k[1])):
        slot = groups[key]
        if baseline is not None:
            pairs += [(slot[m], slot[baseline]) for m in sorted(slot) if m != baseline and baseline in slot]
        else:
            pairs += [(slot[a], slot[b]) for a, b in combinations(sorted(slot), 2)]
    return pairs


def pairwise_row(a: GeneratedImage, b: GeneratedImage, result: PairwiseResult, root: Path | None = None) -> dict:
    rel = (lambda p: _relative(p, root)) if root else str
    row = {"set": a.set_id, "seed": a.spec.seed, "method_a": a.method, "method_b": b.method,
           "file_a": rel(a.path), "file_b": rel(b.path)}
    for d in PAIRWISE_DIMENSIONS:
        row[f"{d}_a"] = result.scores_a[d] if result.ok else None
        row[f"{d}_b"] = result.scores_b[d] if result.ok else None
        row[f"{d}_outcome"] = result.outcome[d] if result.ok else None
    row["orders"] = len(result.orders)
    row["error"] = result.error
    return row


def run_pairwise(pairs: Sequence[tuple[GeneratedImage, GeneratedImage]], protocol: ComposLoRAPairwise,
                 root: Path | None = None, progress: Progress | None = None, workers: int = 1) -> tuple[list[dict], list[dict]]:
    """Compare each (candidate, baseline) pair. Returns the CSV rows and the full JSONL records (raw answers), in
    the order of `pairs`. `workers` > 1 sends that many comparisons at once (remote judges; keep 1 for a local VLM)."""

    def one(pair):
        a, b = pair
        result = protocol.compare(a.path, b.path, elements_of(a.spec))
        row = pairwise_row(a, b, result, root)
        return row, {**row, "result": result.to_dict(), "judge": protocol.judge.model, "template": protocol.template.id}

    done = []
    if workers <= 1:
        for i, pair in enumerate(pairs, 1):
            done.append(one(pair))
            if progress:
                progress(i, len(pairs), f"{pair[0].method} vs {pair[1].method}")
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for i, got in enumerate(pool.map(one, pairs), 1):
                done.append(got)
                if progress:
                    progress(i, len(pairs), f"{got[0]['method_a']} vs {got[0]['method_b']}")
    return [r for r, _ in done], [rec for _, rec in done]


def method_summary(rows: Iterable[dict]) -> list[dict]:
    """Per method: images, images scored, mean and standard deviation of CLIPScore, truncated texts."""
    by_method: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_method[r["method"]].append(r)
    out = []
    for method in sorted(by_method):
        scores = [r["clip_score"] for r in by_method[method] if r["clip_score"] is not None]
        out.append({"method": method, "images": len(by_method[method]), "scored": len(scores),
                    "clip_mean": statistics.fmean(scores) if scores else math.nan,
                    "clip_std": statistics.stdev(scores) if len(scores) > 1 else math.nan,
                    "truncated": sum(bool(r["clip_truncated"]) for r in by_method[method])})
    return out


def pairwise_summary(rows: Iterable[dict]) -> list[dict]:
    """Per (candidate, baseline): comparisons, failures, and per dimension win/tie/lose and mean scores."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["method_a"], r["method_b"])].append(r)
    out = []
    for (ma, mb), items in sorted(groups.items()):
        results = [PairwiseResult(orders=[], scores_a={d: r[f"{d}_a"] for d in PAIRWISE_DIMENSIONS},
                                  scores_b={d: r[f"{d}_b"] for d in PAIRWISE_DIMENSIONS},
                                  outcome={d: r[f"{d}_outcome"] for d in PAIRWISE_DIMENSIONS}, error=r["error"])
                   for r in items]
        table = win_tie_lose(results)
        entry = {"method_a": ma, "method_b": mb, "comparisons": len(items), "failed": sum(r["error"] is not None for r in items)}
        for d in PAIRWISE_DIMENSIONS:
            ok = [r for r in items if r["error"] is None]
            entry[d] = {**{k: getattr(table[d], k) for k in OUTCOMES}, **{f"{k}_rate": v for k, v in table[d].rates().items()},
                        "mean_a": statistics.fmean(r[f"{d}_a"] for r in ok) if ok else math.nan,
                        "mean_b": statistics.fmean(r[f"{d}_b"] for r in ok) if ok else math.nan}
        out.append(entry)
    return out


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_csv(path: Path, rows: Sequence[dict]) -> Path:
    buf = io.StringIO()
    columns = list(rows[0]) if rows else []
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in r.items()})
    _atomic_write(path, buf.getvalue())
    return path


def write_jsonl(path: Path, records: Iterable[dict]) -> Path:
    _atomic_write(path, "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records))
    return path


@dataclass
class FolderReport:
    images: list[GeneratedImage]
    skipped: list[tuple[Path, str]]
    rows: list[dict]
    methods: list[dict]
    pairwise_rows: list[dict] = field(default_factory=list)
    pairwise: list[dict] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    judge_answers: dict = field(default_factory=lambda: {"read": 0, "cached": 0})  # answers read / from the cache


def evaluate_folder(folder: str | os.PathLike, scorer=None, text_mode: str = "triggers",
                    protocol: ComposLoRAPairwise | None = None, baseline: str | None = None,
                    out_dir: str | os.PathLike | None = None, recursive: bool = False,
                    progress: Progress | None = None, workers: int = 1,
                    scanned: tuple[list[GeneratedImage], list[tuple[Path, str]]] | None = None) -> FolderReport:
    """Score every loraloom PNG in `folder` and write `loraloom_scores.{csv,jsonl}` (and, with a pairwise
    `protocol`, `loraloom_pairwise.{csv,jsonl}`) into `out_dir` (default: the folder itself). `scanned`: what
    `scan_folder(folder, recursive)` returned, when the caller has read the folder already."""
    folder = Path(folder)
    out_dir = Path(out_dir) if out_dir else folder
    images, skipped = scanned if scanned is not None else scan_folder(folder, recursive=recursive)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise EvaluationError(f"{out_dir}: cannot be made a folder for the score files ({err.strerror or err}). "
                              "Fix: pass --out with a folder you can write to.") from None
    for _path, why in skipped:
        log.warning("skipped %s", why)
    if not images:
        raise no_images_error(folder, skipped)
    rows = clip_rows(images, scorer, text_mode, root=folder)
    clip_info = scorer.describe() if scorer is not None else None
    report = FolderReport(images=images, skipped=skipped, rows=rows, methods=method_summary(rows))
    report.files.append(write_csv(out_dir / SCORES_CSV, rows))
    report.files.append(write_jsonl(out_dir / SCORES_JSONL, [{**r, "clip": clip_info, "spec": img.spec.to_dict()}
                                                            for r, img in zip(rows, images)]))
    if protocol is not None:
        pairs = comparison_pairs(images, baseline)
        if not pairs:
            log.warning("no two methods share a set and seed in %s: nothing to compare pairwise", folder)
        report.pairwise_rows, records = run_pairwise(pairs, protocol, root=folder, progress=progress,
                                                          workers=workers)
        report.pairwise = pairwise_summary(report.pairwise_rows)
        orders = [o for r in records for o in r["result"]["orders"]]
        report.judge_answers = {"read": sum(o["samples"] for o in orders), "cached": sum(o["cached"] for o in orders)}
        report.files.append(write_csv(out_dir / PAIRWISE_CSV, report.pairwise_rows))
        report.files.append(write_jsonl(out_dir / PAIRWISE_JSONL, records))
    return report


def format_table(rows: Sequence[Sequence], header: Sequence[str]) -> str:
    """A plain-text table with aligned columns."""
    cells = [list(map(str, header))] + [[("" if c is None else str(c)) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
