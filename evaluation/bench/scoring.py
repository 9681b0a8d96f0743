"""`loraloom bench score DIR`: score every generated image of a benchmark folder into its store.

- **CLIPScore** (`evaluation.clipscore`): against the set's scoring text (trigger words by default, as ComposLoRA)
  or the full prompt; with the manifest's `clip` (the toy world ships its own) else ViT-B/16 from the local cache.
- **Toy-world checker** (`evaluation.toyworld.checker`), for manifests that name one: which attribute values the
  image shows, compared with the set's `expected` values. `checker.all` is 1 when every expected value is there,
  `checker.frac` the share that is.
- **MLLM judge** (`evaluation.protocols.ComposLoRAPairwise`), when one is configured: each method against the
  baseline on the same set and seed, both image orders.

A score row is keyed by (item, metric, scorer), so a rerun scores only what is missing, and another CLIP or judge
adds rows instead of replacing them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

from loraloom.evaluation.errors import EvaluationError

from .manifest import Manifest, load_manifest
from .store import Store

log = logging.getLogger(__name__)

JUDGE_CACHE = "judge_cache.jsonl"


@dataclass
class ScoreOptions:
    folder: str | Path
    manifest: str | Path | None = None  # default: the manifest recorded in the store
    clip: str | None = ""  # "" = the manifest's clip, else ViT-B/16; None = no CLIPScore
    clip_text: str = "scoring"  # "scoring" (the set's scoring text) or "prompt"
    clip_scale: float = 100.0
    checker: bool = True
    batch_size: int = 32
    device: str = "auto"
    allow_download: bool = False
    judge: object | None = None  # an `evaluation.judges` judge; enables pairwise judging
    baseline: str | None = None
    both_orders: bool = True
    workers: int = 1
    reask: int = 2
    progress: bool = True


@dataclass
class ScoreResult:
    done: dict[str, tuple[int, int]] = field(default_factory=dict)  # what -> (scored now, scored in all)
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"{what}: {new} scored now, {total} in all" for what, (new, total) in self.done.items()]
        return out + self.notes


def manifest_of(store: Store, override: str | Path | None = None) -> Manifest:
    path = override or store.meta().get("manifest_path")
    if not path:
        raise EvaluationError(f"{store.folder}: the store records no manifest; pass --manifest")
    try:
        return load_manifest(path)
    except Exception as err:
        raise EvaluationError(f"{path}: the manifest of {store.folder} cannot be read ({err}); pass --manifest") from None


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, dynamic_ncols=True)


def _batches(seq: list, size: int):
    for i in range(0, len(seq), size):
        yield seq[i:i + size]


def clip_spec(opts: ScoreOptions, manifest: Manifest) -> str:
    from loraloom.evaluation.clipscore import DEFAULT_CLIP

    spec = opts.clip or manifest.clip or DEFAULT_CLIP
    local = manifest.folder / spec
    return str(local.resolve()) if not opts.clip and manifest.clip and local.exists() else spec


def score_clip(store: Store, manifest: Manifest, items: list[dict], opts: ScoreOptions, result: ScoreResult) -> None:
    from loraloom.evaluation.clipscore import CLIPScorer

    spec = clip_spec(opts, manifest)
    scorer = CLIPScorer.load(spec, device=opts.device, local_files_only=not opts.allow_download, scale=opts.clip_scale,
                             batch_size=opts.batch_size)
    d = scorer.describe()
    scorer_id = f"{d['backend']}:{d['model']}|scale={d['scale']:g}|text={opts.clip_text}"
    sets = {s.id: s for s in manifest.sets}
    done = store.scored("clipscore", scorer_id)
    todo = [it for it in items if it["item_id"] not in done]
    bar = _bar(len(todo), "CLIPScore", opts.progress)
    for batch in _batches(todo, opts.batch_size):
        texts = [manifest.scoring_text(sets[it["set_id"]]) if opts.clip_text == "scoring" else json.loads(it["spec"])["prompt"]
                 for it in batch]
        details = scorer.score_details([store.folder / it["png"] for it in batch], texts)
        store.put_scores([(it["item_id"], "clipscore", scorer_id, round(x.score, 6),
                           {"cosine": round(x.cosine, 8), "tokens": x.text_tokens, "truncated": x.truncated, "text": t})
                          for it, x, t in zip(batch, details, texts)])
        bar.update(len(batch))
    bar.close()
    result.done[f"CLIPScore ({scorer_id})"] = (len(todo), len(done) + len(todo))


def checker_id(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.glob("*")):
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return f"toyworld-checker:{h.hexdigest()[:12]}"


def score_checker(store: Store, manifest: Manifest, items: list[dict], opts: ScoreOptions, result: ScoreResult) -> None:
    from PIL import Image

    from loraloom.evaluation.toyworld.checker import Checker

    checker = Checker.load(manifest.checker)
    scorer_id = checker_id(manifest.checker)
    sets = {s.id: s for s in manifest.sets}
    items = [it for it in items if sets[it["set_id"]].expected]
    done = store.scored("checker.all", scorer_id)
    todo = [it for it in items if it["item_id"] not in done]
    bar = _bar(len(todo), "checker", opts.progress)
    for batch in _batches(todo, max(opts.batch_size, 64)):
        images = []
        for it in batch:
            with Image.open(store.folder / it["png"]) as im:
                images.append(im.convert("RGB"))
        preds = checker.predict(images)
        rows = []
        for it, pred in zip(batch, preds):
            expected = sets[it["set_id"]].expected
            found = {a: pred.get(a) == v for a, v in expected.items()}
            detail = {"expected": expected, "predicted": pred, "found": found}
            rows.append((it["item_id"], "checker.all", scorer_id, float(all(found.values())), detail))
            rows.append((it["item_id"], "checker.frac", scorer_id, sum(found.values()) / len(found), None))
        store.put_scores(rows)
        bar.update(len(batch))
    bar.close()
    result.done[f"toy-world checker ({scorer_id})"] = (len(todo), len(done) + len(todo))


def judge_id(protocol) -> str:
    j = protocol.judge
    decoding = hashlib.sha256(json.dumps(j.decoding(), sort_keys=True).encode()).hexdigest()[:8]
    return f"{j.backend}:{j.model}|{protocol.template.id}|{'both' if protocol.both_orders else 'one'}-order|dec={decoding}"


def pairs_to_judge(items: list[dict], baseline: str | None) -> list[tuple[dict, dict]]:
    """(candidate, baseline) items of the same set and seed: every method against `baseline`, else against merge
    when present (as ComposLoRA), else every pair of methods."""
    slots: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for it in items:
        slots[(it["set_id"], it["seed_index"])][it["method_label"]] = it
    labels = sorted({it["method_label"] for it in items})
    if baseline is None and "merge" in labels:
        baseline = "merge"
    elif baseline is not None and baseline not in labels:
        raise EvaluationError(f"baseline {baseline!r} is not among the methods in the store {labels}")
    pairs = []
    for key in sorted(slots):
        slot = slots[key]
        if baseline is not None:
            pairs += [(slot[m], slot[baseline]) for m in sorted(slot) if m != baseline and baseline in slot]
        else:
            pairs += [(slot[a], slot[b]) for a, b in combinations(sorted(slot), 2)]
    return pairs


def score_judge(store: Store, manifest: Manifest, items: list[dict], opts: ScoreOptions, result: ScoreResult) -> None:
    from loraloom.evaluation.cache import JudgeCache
    from loraloom.evaluation.protocols import ComposLoRAPairwise, Element

    protocol = ComposLoRAPairwise(opts.judge, JudgeCache(store.folder / JUDGE_CACHE), reask=opts.reask,
                                  both_orders=opts.both_orders)
    jid = judge_id(protocol)
    sets = {s.id: s for s in manifest.sets}
    done = store.judged(jid)
    todo = [(a, b) for a, b in pairs_to_judge(items, opts.baseline)
            if (a["set_id"], a["seed_index"], a["method_label"], b["method_label"]) not in done]

    def one(pair):
        a, b = pair
        elements = [Element(name=manifest.loras[i].name or i, category=manifest.loras[i].category,
                            triggers=manifest.loras[i].triggers) for i in sets[a["set_id"]].lora_ids]
        return pair, protocol.compare(store.folder / a["png"], store.folder / b["png"], elements)

    failed = 0
    bar = _bar(len(todo), "judge", opts.progress)
    with ThreadPoolExecutor(max_workers=max(1, opts.workers)) as pool:
        for (a, b), r in pool.map(one, todo):
            row = {"set_id": a["set_id"], "seed_index": a["seed_index"], "method_a": a["method_label"],
                   "method_b": b["method_label"], "judge": jid, "error": r.error, "record": json.dumps(r.to_dict())}
            for dim in protocol.dimensions:
                row[f"{dim}_a"] = r.scores_a[dim] if r.ok else None
                row[f"{dim}_b"] = r.scores_b[dim] if r.ok else None
                row[f"{dim}_outcome"] = r.outcome[dim] if r.ok else None
            store.put_pairwise(row)
            failed += not r.ok
            bar.update(1)
    bar.close()
    result.done[f"pairwise judge ({jid})"] = (len(todo) - failed, len(done) + len(todo) - failed)
    if failed:
        result.notes.append(f"{failed} comparison(s) failed (recorded with their error; a rerun asks again)")


def score_folder(opts: ScoreOptions) -> ScoreResult:
    store = Store(opts.folder, create=False)
    try:
        manifest = manifest_of(store, opts.manifest)
        known = {s.id for s in manifest.sets}
        items = store.items("done")
        unknown = [it for it in items if it["set_id"] not in known]
        if unknown:
            log.warning("%d image(s) belong to sets the manifest no longer has; they are not scored", len(unknown))
        items = [it for it in items if it["set_id"] in known]
        result = ScoreResult()
        if not items:
            result.notes.append(f"{opts.folder}: no generated images to score")
            return result
        if opts.clip is not None:
            score_clip(store, manifest, items, opts, result)
        if opts.checker and manifest.checker is not None:
            if manifest.checker.is_dir():
                score_checker(store, manifest, items, opts, result)
            else:
                result.notes.append(f"the manifest's checker {manifest.checker} is not there: checker scores skipped")
        if opts.judge is not None:
            score_judge(store, manifest, items, opts, result)
        return result
    finally:
        store.close()
