"""`loraloom bench report DIR`: one self-contained HTML file (inline CSS, SVG charts, images as data URIs) and a
Markdown summary of a benchmark folder.

Tables follow the ComposLoRA papers' layouts: methods × number of LoRAs with an "avg" column (CMLoRA's CLIPScore
table) for per-image metrics, and rows of N with "<method> comp. | <baseline> comp. | <method> img | <baseline> img"
and win/tie/lose columns (Multi-LoRA Composition's main results) for the MLLM judge.
"""

from __future__ import annotations

import base64
import datetime as _dt
import io
import json
import math
import os
import re
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

from .manifest import Manifest
from .stats import Table, WinTieLose, estimate, method_n_table, paired_outcomes
from .store import Store
from .svg import colours, line_chart, stacked_bars

METRICS = {  # metric -> (title, short name, is a share)
    "checker.all": ("Composition accuracy — every expected element found by the toy-world checker", "all elements", True),
    "checker.frac": ("Expected attributes found by the toy-world checker", "attributes", True),
    "clipscore": ("CLIPScore", "CLIPScore", False),
}
DIMENSIONS = {"composition": "comp.", "image_quality": "img"}


@dataclass
class Metric:
    metric: str
    scorer: str
    rows: list[dict]  # item rows with "value"

    @property
    def title(self) -> str:
        return METRICS.get(self.metric, (self.metric, self.metric, False))[0]

    @property
    def short(self) -> str:
        return METRICS.get(self.metric, (self.metric, self.metric, False))[1]

    @property
    def percent(self) -> bool:
        return METRICS.get(self.metric, ("", "", False))[2]


@dataclass
class ReportData:
    folder: Path
    meta: dict
    manifest: Manifest | None
    items: list[dict]  # done
    failed: list[dict]
    runs: list[dict]
    metrics: list[Metric]
    pairwise: list[dict]
    methods: list[str]
    baseline: str | None
    groups: list[str]
    facts: dict = field(default_factory=dict)


def _method_order(items: list[dict]) -> list[str]:
    first: dict[str, int] = {}
    for i, it in enumerate(items):
        first.setdefault(it["method_label"], i)
    labels = sorted(first, key=first.get)
    return (["merge"] if "merge" in labels else []) + [m for m in labels if m != "merge"]


def load_report_data(folder: str | Path, manifest: str | Path | None = None, baseline: str | None = None) -> ReportData:
    from .scoring import manifest_of

    store = Store(folder, create=False)
    try:
        meta = store.meta()
        try:
            m = manifest_of(store, manifest)
        except Exception:
            m = None
        items = store.items("done")
        failed = store.items("failed")
        by_id = {it["item_id"]: it for it in items}
        grouped: dict[tuple[str, str], list[dict]] = defaultdict(list)
        for s in store.scores():
            if s["item_id"] in by_id:
                grouped[(s["metric"], s["scorer"])].append({**by_id[s["item_id"]], "value": s["value"],
                                                             "detail": json.loads(s["detail"]) if s["detail"] else None})
        order = list(METRICS)
        metrics = [Metric(k[0], k[1], rows) for k, rows in sorted(grouped.items(),
                                                                  key=lambda kv: (order.index(kv[0][0]) if kv[0][0] in order else 99, kv[0]))]
        methods = _method_order(items)
        if baseline is not None and baseline not in methods:
            from loraloom.evaluation.errors import EvaluationError

            raise EvaluationError(f"baseline {baseline!r} is not among the methods {methods}")
        base = baseline or ("merge" if "merge" in methods else (methods[0] if methods else None))
        groups = list(dict.fromkeys(it["grp"] for it in items))
        data = ReportData(folder=Path(folder), meta=meta, manifest=m, items=items, failed=failed, runs=store.runs(),
                          metrics=metrics, pairwise=store.pairwise(), methods=methods, baseline=base, groups=groups)
        data.facts = _facts(data)
        return data
    finally:
        store.close()


def _facts(d: ReportData) -> dict:
    by_run: dict[str, list[dict]] = defaultdict(list)
    for r in d.runs:
        by_run[r["run_id"]].append(r)
    wall = sum(max(r["wall_seconds"] or 0.0 for r in rs) for rs in by_run.values())
    generated = sum(r["generated"] or 0 for r in d.runs)
    devices = sorted({r["device"] for r in d.runs if r["device"]})
    procs = max((r["num_processes"] for r in d.runs), default=1)
    return {
        "images": len(d.items), "failed": len(d.failed), "sets": len({it["set_id"] for it in d.items}),
        "seeds": len({it["seed_index"] for it in d.items}), "runs": len(by_run), "wall_seconds": wall,
        "generated": generated, "images_per_second": generated / wall if wall else math.nan,
        "sampler_seconds": sum(it["seconds"] or 0.0 for it in d.items), "devices": ", ".join(devices) or "?",
        "processes": procs,
    }


# --- formatting -------------------------------------------------------------------------------------------------
def fmt_estimate(e, percent: bool = False, digits: int | None = None) -> str:
    if e.n == 0 or math.isnan(e.mean):
        return "–"
    k = 100.0 if percent else 1.0
    digits = digits if digits is not None else (1 if percent else 2)
    if math.isnan(e.half):
        return f"{k * e.mean:.{digits}f}"
    return f"{k * e.mean:.{digits}f} ± {k * e.half:.{digits}f}"


def table_rows(t: Table, digits: int | None = None) -> tuple[list[str], list[list[str]]]:
    header = ["method", *[f"N={n}" for n in t.ns], "avg"]
    rows = [[m, *[fmt_estimate(t.cells[(m, n)], t.percent, digits) for n in t.ns], fmt_estimate(t.avg[m], t.percent, digits)]
            for m in t.methods]
    return header, rows


def html_table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    h = "".join(f"<th>{escape(c)}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>'


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _best_per_column(t: Table) -> set[tuple[str, int | str]]:
    best = set()
    for n in [*t.ns, "avg"]:
        vals = [(t.avg[m] if n == "avg" else t.cells[(m, n)]).mean for m in t.methods]
        vals = [v for v in vals if not math.isnan(v)]
        if len(vals) > 1 and max(vals) > min(vals):
            top = max(vals)
            best |= {(m, n) for m in t.methods if (t.avg[m] if n == "avg" else t.cells[(m, n)]).mean == top}
    return best


def html_metric_table(t: Table, digits: int | None = None) -> str:
    header, rows = table_rows(t, digits)
    best = _best_per_column(t)
    cols = [*t.ns, "avg"]
    h = "".join(f"<th>{escape(c)}</th>" for c in header)
    body = []
    for m, r in zip(t.methods, rows):
        cells = [f"<td class='method'>{escape(r[0])}</td>"]
        for c, text in zip(cols, r[1:]):
            e = t.avg[m] if c == "avg" else t.cells[(m, c)]
            cls = " class='best'" if (m, c) in best else ""
            cells.append(f"<td{cls} title='{e.n} sets, {e.images} images'>{escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table class='metric'><thead><tr>{h}</tr></thead><tbody>{''.join(body)}</tbody></table>"


# --- content ----------------------------------------------------------------------------------------------------
def metric_tables(d: ReportData) -> list[tuple[Metric, Table, dict[str, Table]]]:
    out = []
    for m in d.metrics:
        t = method_n_table(m.title, m.rows, d.methods, percent=m.percent)
        per_group = {}
        if len(d.groups) > 1:
            for g in d.groups:
                per_group[g] = method_n_table(f"{m.title} — {g}", [r for r in m.rows if r["grp"] == g], d.methods, percent=m.percent)
        out.append((m, t, per_group))
    return out


def time_table(d: ReportData) -> Table:
    return method_n_table("Seconds per image (sampler, model loading excluded)", [{**it, "value": it["seconds"]} for it in d.items],
                          d.methods)


def win_rates(d: ReportData) -> list[tuple[Metric, str, dict]]:
    """(metric, candidate, {N or 'all': WinTieLose}) against the baseline, paired on set and seed."""
    out = []
    if d.baseline is None:
        return out
    for m in d.metrics:
        for cand in d.methods:
            if cand != d.baseline:
                out.append((m, cand, paired_outcomes(m.rows, cand, d.baseline)))
    return out


def judge_sections(d: ReportData) -> list[dict]:
    """Per (judge, baseline): MLC's tables — mean scores and win/tie/lose per N and dimension."""
    by_judge: dict[tuple[str, str], list[dict]] = defaultdict(list)
    n_of = {(it["set_id"]): it["n_loras"] for it in d.items}
    for r in d.pairwise:
        if r["error"] is None and r["set_id"] in n_of:
            by_judge[(r["judge"], r["method_b"])].append({**r, "n": n_of[r["set_id"]]})
    sections = []
    for (judge, base), rows in sorted(by_judge.items()):
        cands = [m for m in d.methods if any(r["method_a"] == m for r in rows)]
        ns = sorted({r["n"] for r in rows})
        scores_header = ["N"] + [f"{c} {short}" if side == "a" else f"{base} {short}" for c in cands
                                 for dim, short in DIMENSIONS.items() for side in ("a", "b")]
        wtl_header = ["N"] + [f"{c} {short}" for c in cands for short in DIMENSIONS.values()]
        scores_rows, wtl_rows, bars = [], [], []
        for n in [*ns, "all"]:
            srow, wrow = [str(n)], [str(n)]
            for c in cands:
                sub = [r for r in rows if r["method_a"] == c and (n == "all" or r["n"] == n)]
                for dim in DIMENSIONS:
                    for side in ("a", "b"):
                        e = estimate([r[f"{dim}_{side}"] for r in sub])
                        srow.append(fmt_estimate(e))
                    w = WinTieLose(*(sum(r[f"{dim}_outcome"] == k for r in sub) for k in ("win", "tie", "lose")))
                    wrow.append(_wtl_text(w))
                    if n == "all":
                        bars.append((f"{c} vs {base}: {DIMENSIONS[dim]}", *w.rates()))
            scores_rows.append(srow)
            wtl_rows.append(wrow)
        sections.append({"judge": judge, "baseline": base, "scores": (scores_header, scores_rows),
                         "wtl": (wtl_header, wtl_rows), "bars": bars, "comparisons": len(rows),
                         "failed": sum(1 for r in d.pairwise if r["judge"] == judge and r["error"] is not None)})
    return sections


def _wtl_text(w: WinTieLose) -> str:
    if not w.n:
        return "–"
    return " / ".join(f"{100 * x:.0f}" for x in w.rates()) + f" (n={w.n})"


def grid_rows(d: ReportData, per_n: int = 2) -> list[dict]:
    """Same set and seed across methods: the first `per_n` sets of each N (in manifest order) at seed index 0,
    in each group."""
    by_key: dict[tuple[str, int], dict[str, dict]] = defaultdict(dict)
    for it in d.items:
        by_key[(it["set_id"], it["seed_index"])][it["method_label"]] = it
    order = {s.id: s.index for s in d.manifest.sets} if d.manifest else {}
    keys = sorted((k for k in by_key if k[1] == min(i for (s, i) in by_key if s == k[0])),
                  key=lambda k: (order.get(k[0], 0), k[0]))
    picked, counts = [], defaultdict(int)
    for k in keys:
        any_item = next(iter(by_key[k].values()))
        bucket = (any_item["grp"], any_item["n_loras"])
        if counts[bucket] < per_n:
            counts[bucket] += 1
            picked.append({"set_id": k[0], "seed_index": k[1], "n": any_item["n_loras"], "group": any_item["grp"],
                           "prompt": json.loads(any_item["spec"])["prompt"], "cells": by_key[k]})
    return sorted(picked, key=lambda p: (d.groups.index(p["group"]), p["n"], order.get(p["set_id"], 0)))


def image_data_uri(path: Path, max_side: int = 256) -> tuple[str, int, int]:
    from PIL import Image

    with Image.open(path) as im:
        w, h = im.size
        if max(w, h) <= max_side:
            return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode(), w, h
        im = im.convert("RGB")
        im.thumbnail((max_side, max_side))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=85)
        return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode(), im.width, im.height


CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:24px 32px;color:#222;max-width:1340px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:14px;margin:16px 0 6px} .sub{color:#666;font-size:12px;margin-bottom:14px}
.facts{display:flex;flex-wrap:wrap;gap:10px;margin:10px 0 6px}
.fact{background:#f5f7fa;border:1px solid #e3e7ee;border-radius:6px;padding:6px 12px;min-width:110px}
.fact b{display:block;font-size:18px} .fact span{font-size:11px;color:#666}
table{border-collapse:collapse;font-size:13px;margin:6px 0 4px} th,td{border:1px solid #dde1e7;padding:4px 9px;text-align:right}
th{background:#f0f3f7;font-weight:600} td.method,td:first-child{text-align:left;font-weight:600}
td.best{background:#e7f4e4;font-weight:600} .note{font-size:12px;color:#666;margin:2px 0 10px}
.charts{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start} .metricrow{display:grid;grid-template-columns:660px 480px;gap:24px;align-items:start}
.grid td{text-align:center;vertical-align:top;font-weight:normal} .grid img{display:block;margin:0 auto}
.grid .pix{image-rendering:pixelated} .cap{font-size:11px;color:#444;margin-top:2px}
.ok{color:#2e7d32;font-weight:600} .bad{color:#c62828;font-weight:600} .prompt{font-size:11px;color:#555;max-width:260px;text-align:left}
details{margin:6px 0} summary{cursor:pointer;font-size:13px;color:#345}
code{background:#f3f3f3;padding:1px 4px;border-radius:3px;font-size:12px}
"""


def _ceiling(m: Metric) -> float | None:
    """The largest value a metric can take: 100 for shares, the scale for CLIPScore (w·max(cos, 0) <= w)."""
    if m.percent:
        return 100.0
    if m.metric == "clipscore" and (found := re.search(r"scale=([0-9.]+)", m.scorer)):
        return float(found.group(1))
    return None


def _non_negative(rows: list[dict]) -> bool:
    return all(r["value"] is None or r["value"] >= 0 for r in rows)


def _fact(value: str, label: str) -> str:
    return f"<div class='fact'><b>{escape(value)}</b><span>{escape(label)}</span></div>"


def _seconds(s: float) -> str:
    if not math.isfinite(s):
        return "–"
    if s < 120:
        return f"{s:.1f} s"
    return f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.2f} h"


def _report_name(d: ReportData) -> str:
    """The benchmark's name: the manifest's, else the one the store recorded."""
    return d.manifest.name if d.manifest else d.meta.get("manifest_name", "benchmark")


def regions_note(d: ReportData) -> str:
    """'regions: ...' when some method ran with each LoRA in its region (`bench run --regions`: labels NAME+regions),
    naming where the regions came from; '' otherwise."""
    labels = [m for m in d.methods if m.endswith("+regions")]
    if not labels:
        return ""
    sha = d.meta.get("regions_sha256") or ""
    return (f"regions: {', '.join(labels)} ran with each LoRA bound to its set's region from "
            f"{d.meta.get('regions', 'the sets regions')}" + (f" (sha256 {sha[:12]})" if sha else ""))


SETTING_KEYS = (("steps", "steps"), ("guidance_scale", "CFG"), ("scheduler", "sampler"), ("size", "size"))


def settings_table(d: ReportData) -> tuple[list[str], list[list[str]]]:
    """Which sampler settings each method ran at, read from its images' specs (`bench run --tuned` gives each method
    its own; a method that ran at several shows them all, with their image counts)."""
    seen: dict[str, dict[str, dict[str, int]]] = {m: defaultdict(lambda: defaultdict(int)) for m in d.methods}
    for it in d.items:
        spec = json.loads(it["spec"]) if it.get("spec") else {}
        spec["size"] = f"{spec.get('width')}x{spec.get('height')}"
        for key, _ in SETTING_KEYS:
            seen[it["method_label"]][key][f"{spec.get(key)}"] += 1
    rows = []
    for m in d.methods:
        cells = []
        for key, _ in SETTING_KEYS:
            values = seen[m][key]
            cells.append(next(iter(values)) if len(values) == 1 else ", ".join(f"{v} ({k} images)" for v, k in values.items()))
        rows.append([m, *cells])
    return ["method", *(title for _, title in SETTING_KEYS)], rows


def _html_settings(d: ReportData) -> list[str]:
    if not d.items:
        return []
    return ["<h2>Sampler settings per method</h2>", html_table(*settings_table(d)),
            "<div class='note'>from each image's spec (<code>bench run --tuned</code> runs each method at the settings "
            "<code>bench tune</code> chose)</div>"]


def _html_header(d: ReportData) -> list[str]:
    """The document head with the CSS, the title and the line naming the folder, manifest and time of writing."""
    name = _report_name(d)
    return [f"<!doctype html><html><head><meta charset='utf-8'><title>loraloom bench — {escape(name)}</title>"
            f"<style>{CSS}</style></head><body>",
            f"<h1>loraloom benchmark — {escape(name)}</h1>",
            f"<div class='sub'>{escape(str(d.folder.resolve()))} · manifest {escape(d.meta.get('manifest_path', '?'))} "
            f"(sha256 {escape(d.meta.get('manifest_sha256', '?')[:12])}) · seeding: {escape(d.meta.get('seeding', '?'))} · "
            + (f"{escape(regions_note(d))} · " if regions_note(d) else "") + f"report written {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}</div>"]


def _html_facts(d: ReportData) -> list[str]:
    """The row of boxes: images, failures, sets, methods, seeds, wall time, speed, devices."""
    f = d.facts
    return ["<div class='facts'>",
            _fact(f"{f['images']}", "images"), _fact(f"{f['failed']}", "failed"), _fact(f"{f['sets']}", "sets"),
            _fact(", ".join(d.methods) or "–", "methods"), _fact(f"{f['seeds']}", "seeds per set"),
            _fact(_seconds(f["wall_seconds"]), f"wall time ({f['runs']} run(s))"),
            _fact(f"{f['images_per_second']:.2f}" if math.isfinite(f["images_per_second"]) else "–", "images / s"),
            _fact(f"{f['devices']} × {f['processes']}", "device × processes"), "</div>"]


def _html_metric_row(m: Metric, t: Table, per_group: dict[str, Table], cmap: dict) -> str:
    """One metric: its table (and per-group tables, folded) beside its chart over the number of LoRAs."""
    k = 100 if t.percent else 1
    chart = line_chart(f"{m.short} vs number of LoRAs",
                       {meth: [(n, k * t.cells[(meth, n)].mean, k * t.cells[(meth, n)].half) for n in t.ns] for meth in t.methods},
                       "number of LoRAs", m.short + (" (%)" if m.percent else ""), cmap,
                       y_floor=0.0 if _non_negative(m.rows) else None, y_ceil=_ceiling(m))
    block = [f"<h3>{escape(m.title)}" + (" (%)" if m.percent else "") + "</h3>",
             f"<div class='note'>scorer: <code>{escape(m.scorer)}</code></div>", html_metric_table(t)]
    block += [f"<details><summary>{escape(g)} only</summary>{html_metric_table(gt)}</details>" for g, gt in per_group.items()]
    return "<div class='metricrow'><div>" + "".join(block) + f"</div><div>{chart}</div></div>"


def _html_scores(d: ReportData, cmap: dict) -> list[str]:
    """Per metric, methods × number of LoRAs; a hint to score first when there are no scores."""
    tables = metric_tables(d)
    if not tables:
        return ["<h2>Scores</h2><div class='note'>No scores yet: run <code>loraloom bench score DIR</code>.</div>"]
    parts = ["<h2>Scores per method and number of LoRAs</h2>",
             "<div class='note'>mean ± 95% CI over composition sets (each set's seeds averaged first); "
             "avg = mean of the per-N means. The best mean of each column is shaded.</div>"]
    return parts + [_html_metric_row(m, t, per_group, cmap) for m, t, per_group in tables]


def _html_judges(d: ReportData) -> list[str]:
    """Per MLLM judge and baseline: mean scores and win / tie / lose, as tables and bars."""
    parts = []
    for sec in judge_sections(d):
        parts.append(f"<h2>MLLM judge: every method against {escape(sec['baseline'])}</h2>")
        parts.append(f"<div class='note'>judge <code>{escape(sec['judge'])}</code>; {sec['comparisons']} comparisons, "
                     f"{sec['failed']} failed; scores 0–10 averaged over both image orders (mean ± 95% CI).</div>")
        parts.append(html_table(*sec["scores"]))
        parts.append("<div class='note'>win / tie / lose (%) of each method against the baseline</div>")
        parts.append(html_table(*sec["wtl"]))
        parts.append("<div class='charts'>" + stacked_bars("judge win / tie / lose, all N", sec["bars"]) + "</div>")
    return parts


def _win_rate_tables(d: ReportData, rates: list[tuple[Metric, str, dict]]) -> list[tuple[Metric, list[str], list[list[str]]]]:
    """Per metric, (header, rows) of win / tie / lose against the baseline: a row per N and one for all."""
    ns = sorted({n for _, _, o in rates for n in o if n != "all"})
    out = []
    for m in d.metrics:
        sub = [(cand, o) for mm, cand, o in rates if mm is m]
        header = ["N"] + [f"{cand} vs {d.baseline}" for cand, _ in sub]
        rows = [[str(n)] + [_wtl_text(o.get(n, WinTieLose())) for _, o in sub] for n in [*ns, "all"]]
        out.append((m, header, rows))
    return out


def _html_win_rates(d: ReportData) -> list[str]:
    """Paired win rates of every method against the baseline, per metric, with bars over all N."""
    rates = win_rates(d)
    if not rates:
        return []
    parts = [f"<h2>Paired win rates against {escape(d.baseline)}</h2>",
             "<div class='note'>per set and seed, a method wins when its score is higher than the baseline's on "
             "the same set and seed; win / tie / lose in %.</div>"]
    parts += [f"<h3>{escape(m.short)}</h3>" + html_table(header, rows) for m, header, rows in _win_rate_tables(d, rates)]
    bars = [(f"{cand}: {m.short}", *o.get("all", WinTieLose()).rates()) for m, cand, o in rates]
    parts.append("<div class='charts'>" + stacked_bars(f"win / tie / lose against {d.baseline}, all N", bars, width=560) + "</div>")
    return parts


def _html_time(d: ReportData, cmap: dict) -> list[str]:
    """Sampler seconds per image and UNet calls per image, by method and number of LoRAs."""
    if not d.items:
        return []
    t = time_table(d)
    calls = method_n_table("UNet calls", [{**it, "value": it["unet_calls"]} for it in d.items], d.methods)
    return ["<h2>Time per image</h2>", html_metric_table(t, digits=3),
            "<div class='note'>seconds in the sampler per image (mean ± 95% CI over sets); UNet calls per image: " +
            ", ".join(f"{m} {fmt_estimate(calls.avg[m], digits=1)}" for m in calls.methods) + "</div>",
            "<div class='charts'>" + line_chart("seconds per image vs number of LoRAs",
                                                {m: [(n, t.cells[(m, n)].mean, t.cells[(m, n)].half) for n in t.ns] for m in t.methods},
                                                "number of LoRAs", "seconds", cmap, y_floor=0.0) + "</div>"]


def _html_grid_cell(d: ReportData, it: dict | None, values: dict[tuple[str, str], float]) -> str:
    """One image of the grid (small images scaled up, pixelated) with its checker verdict and CLIPScore."""
    if it is None:
        return "<td>–</td>"
    uri, w, h = image_data_uri(d.folder / it["png"])
    scale = max(1, 96 // max(w, h)) if max(w, h) < 96 else 1
    cls = " class='pix'" if scale > 1 else ""
    cap = []
    if (it["item_id"], "checker.all") in values:
        ok = values[(it["item_id"], "checker.all")] == 1.0
        cap.append(f"<span class='{'ok' if ok else 'bad'}'>{'✓ all' if ok else '✗'}</span>")
    if (it["item_id"], "clipscore") in values:
        cap.append(f"CLIP {values[(it['item_id'], 'clipscore')]:.1f}")
    return (f"<td><img{cls} src='{uri}' width='{w * scale}' height='{h * scale}' alt='{escape(it['item_id'])}'>"
            f"<div class='cap'>{' · '.join(cap)}</div></td>")


def _html_grid(d: ReportData, grid_sets: int) -> list[str]:
    """Image grids: a row per picked set and seed, a column per method."""
    grid = grid_rows(d, grid_sets)
    if not grid:
        return []
    values = {(r["item_id"], m.metric): r["value"] for m in d.metrics for r in m.rows}
    head = "<tr><th>set</th>" + "".join(f"<th>{escape(m)}</th>" for m in d.methods) + "</tr>"
    body = []
    for row in grid:
        cells = [f"<td class='prompt'><b>{escape(row['set_id'])}</b> · seed {row['seed_index']}<br>{escape(row['prompt'])}</td>"]
        cells += [_html_grid_cell(d, row["cells"].get(meth), values) for meth in d.methods]
        body.append("<tr>" + "".join(cells) + "</tr>")
    return ["<h2>Image grids: the same set and seed across methods</h2>", f"<table class='grid'>{head}{''.join(body)}</table>"]


def _html_failed(d: ReportData) -> list[str]:
    """The failed items (the first 100) with the first line of their error."""
    if not d.failed:
        return []
    rows = [[it["item_id"], str(it["attempts"]), (it["error"] or "").splitlines()[0][:200]] for it in d.failed[:100]]
    return [f"<h2>Failed items ({len(d.failed)})</h2>", html_table(["item", "attempts", "error"], rows)]


def render_html(d: ReportData, grid_sets: int = 2) -> str:
    """The self-contained HTML report: facts, score tables and charts, judges, win rates, time, grids, failures."""
    cmap = colours(d.methods)
    parts = [*_html_header(d), *_html_facts(d), *_html_settings(d), *_html_scores(d, cmap), *_html_judges(d), *_html_win_rates(d),
             *_html_time(d, cmap), *_html_grid(d, grid_sets), *_html_failed(d)]
    parts.append("<div class='note' style='margin-top:24px'>Written by <code>loraloom bench report</code>; data in "
                 "<code>bench.sqlite</code> next to the images.</div></body></html>")
    return "\n".join(parts)


def render_markdown(d: ReportData) -> str:
    f = d.facts
    name = _report_name(d)
    lines = [f"# loraloom benchmark — {name}", "",
             f"{f['images']} images ({f['failed']} failed), {f['sets']} sets, methods {', '.join(d.methods)}, "
             f"{f['seeds']} seed(s) per set; seeding: {d.meta.get('seeding', '?')}."
             + (f" {regions_note(d)[0].upper()}{regions_note(d)[1:]}." if regions_note(d) else ""),
             f"Generation: {_seconds(f['wall_seconds'])} wall over {f['runs']} run(s), "
             + (f"{f['images_per_second']:.2f} images/s" if math.isfinite(f['images_per_second']) else "– images/s")
             + f", {f['devices']} × {f['processes']} process(es).", "",
             "Means ± 95% CI over composition sets (seeds of a set averaged first); avg = mean of the per-N means.", ""]
    if d.items:
        lines += ["## Sampler settings per method", "", md_table(*settings_table(d)), ""]
    for m, t, per_group in metric_tables(d):
        lines += [f"## {m.title}" + (" (%)" if m.percent else ""), "", f"scorer: `{m.scorer}`", "", md_table(*table_rows(t)), ""]
        for g, gt in per_group.items():
            lines += [f"{g} only:", "", md_table(*table_rows(gt)), ""]
    for sec in judge_sections(d):
        lines += [f"## MLLM judge against {sec['baseline']}", "", f"judge `{sec['judge']}`, {sec['comparisons']} comparisons", "",
                  md_table(*sec["scores"]), "", "win / tie / lose (%):", "", md_table(*sec["wtl"]), ""]
    rates = win_rates(d)
    if rates:
        lines += [f"## Paired win rates against {d.baseline} (win / tie / lose %)", ""]
        for m, header, rows in _win_rate_tables(d, rates):
            lines += [f"{m.short}:", "", md_table(header, rows), ""]
    if d.items:
        lines += ["## Seconds per image (sampler)", "", md_table(*table_rows(time_table(d), 3)), ""]
    if d.failed:
        lines += [f"## Failed items: {len(d.failed)}", ""] + [f"- `{it['item_id']}`: {(it['error'] or '').splitlines()[0][:200]}"
                                                            for it in d.failed[:50]] + [""]
    lines += ["Full report with plots and image grids: `report.html`.", ""]
    return "\n".join(lines)


def _atomic_write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_report(folder: str | Path, out: str | Path | None = None, manifest: str | Path | None = None,
                 baseline: str | None = None, grid_sets: int = 2) -> list[Path]:
    d = load_report_data(folder, manifest, baseline)
    out = Path(out) if out else Path(folder) / "report"
    return [_atomic_write(out / "report.html", render_html(d, grid_sets)), _atomic_write(out / "summary.md", render_markdown(d))]
