"""The numbers of a benchmark report: means with 95% confidence intervals per method × number of LoRAs, and
paired win/tie/lose counts.

The unit of a confidence interval is the composition set: an image's seeds are averaged first (images of one set
are not independent draws), then mean ± t(0.975, k−1)·sd/√k over the k sets. The "avg" column is the mean of the
per-N means (as CMLoRA's table: each N counts once whatever its number of sets), with the interval from the
per-N standard errors, √(Σ se²)/|N|.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass


@dataclass(frozen=True)
class Estimate:
    mean: float
    half: float  # half-width of the 95% interval (nan with fewer than 2 units)
    n: int  # units (sets)
    images: int = 0

    @property
    def se(self) -> float:
        return self.half / _t(self.n) if self.n > 1 and not math.isnan(self.half) else math.nan


def _t(k: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.975, k - 1))


def estimate(values: list[float], images: int | None = None) -> Estimate:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return Estimate(math.nan, math.nan, 0, images or 0)
    m = statistics.fmean(vals)
    if len(vals) < 2:
        return Estimate(m, math.nan, 1, images or 1)
    half = _t(len(vals)) * statistics.stdev(vals) / math.sqrt(len(vals))
    return Estimate(m, half, len(vals), images if images is not None else len(vals))


def combine(estimates: list[Estimate]) -> Estimate:
    """Mean of means with the interval of that mean (normal approximation)."""
    ok = [e for e in estimates if e.n > 0]
    if not ok:
        return Estimate(math.nan, math.nan, 0)
    m = statistics.fmean(e.mean for e in ok)
    ses = [e.se for e in ok]
    half = 1.96 * math.sqrt(sum(s * s for s in ses)) / len(ok) if all(not math.isnan(s) for s in ses) else math.nan
    return Estimate(m, half, sum(e.n for e in ok), sum(e.images for e in ok))


@dataclass
class Table:
    """rows (method labels) × columns (numbers of LoRAs) of estimates, plus the avg column."""

    title: str
    methods: list[str]
    ns: list[int]
    cells: dict[tuple[str, int], Estimate]
    avg: dict[str, Estimate]
    note: str = ""
    percent: bool = False  # values are shares (shown ×100)


def method_n_table(title: str, rows: list[dict], methods: list[str], value_key: str = "value", note: str = "",
                   percent: bool = False) -> Table:
    """`rows`: dicts with method_label, n_loras, set_id and a value; seeds of a set are averaged first."""
    per_set: dict[tuple[str, int, str], list[float]] = defaultdict(list)
    for r in rows:
        v = r.get(value_key)
        if v is not None:
            per_set[(r["method_label"], r["n_loras"], r["set_id"])].append(float(v))
    ns = sorted({k[1] for k in per_set})
    cells = {}
    for m in methods:
        for n in ns:
            groups = [vals for (mm, nn, _), vals in per_set.items() if mm == m and nn == n]
            cells[(m, n)] = estimate([statistics.fmean(v) for v in groups], images=sum(len(v) for v in groups))
    avg = {m: combine([cells[(m, n)] for n in ns]) for m in methods}
    return Table(title=title, methods=[m for m in methods if any(cells[(m, n)].n for n in ns)], ns=ns, cells=cells,
                 avg=avg, note=note, percent=percent)


@dataclass
class WinTieLose:
    win: int = 0
    tie: int = 0
    lose: int = 0

    @property
    def n(self) -> int:
        return self.win + self.tie + self.lose

    def rates(self) -> tuple[float, float, float]:
        return tuple(x / self.n if self.n else math.nan for x in (self.win, self.tie, self.lose))


def paired_outcomes(rows: list[dict], candidate: str, baseline: str, value_key: str = "value",
                    tolerance: float = 0.0) -> dict[int | str, WinTieLose]:
    """Per number of LoRAs (and "all"): how often the candidate's value beats the baseline's on the same set and
    seed (|difference| <= tolerance is a tie)."""
    by_key: dict[tuple, dict[str, float]] = defaultdict(dict)
    ns: dict[tuple, int] = {}
    for r in rows:
        if r.get(value_key) is None:
            continue
        key = (r["set_id"], r["seed_index"])
        by_key[key][r["method_label"]] = float(r[value_key])
        ns[key] = r["n_loras"]
    out: dict[int | str, WinTieLose] = defaultdict(WinTieLose)
    for key, vals in by_key.items():
        if candidate not in vals or baseline not in vals:
            continue
        d = vals[candidate] - vals[baseline]
        field_ = "win" if d > tolerance else "lose" if d < -tolerance else "tie"
        for bucket in (ns[key], "all"):
            setattr(out[bucket], field_, getattr(out[bucket], field_) + 1)
    return dict(out)
