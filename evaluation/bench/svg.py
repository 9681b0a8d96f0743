"""Two small chart kinds as inline SVG (no plotting library): lines with 95% error bars, and 100% stacked bars."""

from __future__ import annotations

import math
from html import escape

PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac")
OUTCOME_COLOURS = {"win": "#59a14f", "tie": "#bab0ac", "lose": "#e15759"}
FONT = 'font-family="system-ui, -apple-system, Segoe UI, Helvetica, Arial, sans-serif"'


def colours(labels: list[str]) -> dict[str, str]:
    return {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(labels)}


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    if not math.isfinite(lo) or not math.isfinite(hi):
        return [0.0, 1.0]
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks, v = [], start
    while v <= hi + step * 1e-9:
        ticks.append(round(v, 10))
        v += step
    if ticks[-1] < hi:
        ticks.append(round(ticks[-1] + step, 10))
    return ticks


def _fmt(v: float) -> str:
    v = 0.0 if abs(v) < 1e-12 else v
    return f"{v:.0f}" if abs(v - round(v)) < 1e-9 and abs(v) >= 1 else f"{v:.3g}"


def line_chart(title: str, series: dict[str, list[tuple[float, float, float]]], x_label: str, y_label: str,
               colour_of: dict[str, str] | None = None, width: int = 460, height: int = 300,
               y_floor: float | None = None, y_ceil: float | None = None) -> str:
    """`series`: label -> [(x, y, half-width of the interval)]; x are categories (numbers of LoRAs). The axis and
    the error bars are clipped to [y_floor, y_ceil] when given (a share cannot leave 0..100)."""
    colour_of = colour_of or colours(list(series))
    xs = sorted({x for pts in series.values() for x, _, _ in pts})
    lo_clip = -math.inf if y_floor is None else y_floor
    hi_clip = math.inf if y_ceil is None else y_ceil
    series = {k: [(x, y, h) for x, y, h in pts] for k, pts in series.items()}
    ys = [min(max(v, lo_clip), hi_clip) for pts in series.values() for _, y, h in pts if math.isfinite(y)
          for v in ((y - h, y + h) if math.isfinite(h) else (y,))]
    left, right, top, bottom = 56, 12, 30, 64
    pw, ph = width - left - right, height - top - bottom
    lo, hi = min(ys, default=0.0), max(ys, default=1.0)
    if hi - lo < 1e-9:  # a flat line: show a sensible band around it
        lo, hi = (lo - 1, hi + 1) if y_ceil is None else (max(lo - 0.1 * y_ceil, lo_clip), min(hi + 0.1 * y_ceil, hi_clip))
    ticks = [t for t in nice_ticks(lo, hi)]
    ticks = [t for t in ticks if lo_clip - 1e-9 <= t <= hi_clip + 1e-9] or ticks
    y0, y1 = min(ticks[0], lo), max(ticks[-1], hi)
    sx = (lambda x: left + pw * (xs.index(x) + 0.5) / len(xs)) if xs else (lambda x: left)
    sy = lambda y: top + ph * (1 - (y - y0) / ((y1 - y0) or 1))  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" {FONT} font-size="11">',
           f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13" font-weight="600">{escape(title)}</text>']
    for t in ticks:
        y = sy(t)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" stroke="#e6e6e6"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" fill="#555">{_fmt(t)}</text>')
    out.append(f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="#888"/>')
    for x in xs:
        out.append(f'<text x="{sx(x):.1f}" y="{top + ph + 16}" text-anchor="middle" fill="#555">{x}</text>')
    out.append(f'<text x="{left + pw / 2}" y="{top + ph + 32}" text-anchor="middle" fill="#333">{escape(x_label)}</text>')
    out.append(f'<text transform="translate(14 {top + ph / 2}) rotate(-90)" text-anchor="middle" fill="#333">{escape(y_label)}</text>')
    n = len(series)
    for i, (label, pts) in enumerate(series.items()):
        c = colour_of.get(label, "#333")
        shift = (i - (n - 1) / 2) * 4  # small horizontal dodge so error bars do not overlap
        pts = [(x, y, h) for x, y, h in sorted(pts) if math.isfinite(y)]
        if not pts:
            continue
        path = " ".join(f"{'M' if j == 0 else 'L'}{sx(x) + shift:.1f},{sy(y):.1f}" for j, (x, y, _) in enumerate(pts))
        out.append(f'<path d="{path}" fill="none" stroke="{c}" stroke-width="2"/>')
        for x, y, h in pts:
            cx = sx(x) + shift
            if math.isfinite(h) and h > 0:
                a, b = max(y - h, lo_clip, y0), min(y + h, hi_clip, y1)
                out.append(f'<line x1="{cx:.1f}" y1="{sy(a):.1f}" x2="{cx:.1f}" y2="{sy(b):.1f}" stroke="{c}" stroke-width="1.2"/>')
            out.append(f'<circle cx="{cx:.1f}" cy="{sy(y):.1f}" r="3.2" fill="{c}"><title>{escape(label)}, N={x}: '
                       f'{y:.4g}' + (f' ± {h:.3g}' if math.isfinite(h) else '') + '</title></circle>')
    # legend below the axis label
    lx = left
    for label in series:
        out.append(f'<rect x="{lx}" y="{height - 16}" width="10" height="10" fill="{colour_of.get(label, "#333")}"/>')
        out.append(f'<text x="{lx + 14}" y="{height - 7}" fill="#333">{escape(label)}</text>')
        lx += 22 + 7 * len(label)
    out.append("</svg>")
    return "\n".join(out)


def stacked_bars(title: str, rows: list[tuple[str, float, float, float]], width: int = 460) -> str:
    """100% horizontal bars: rows of (label, win, tie, lose) shares (0..1)."""
    left, right, top, bar_h, gap = 170, 12, 30, 18, 8
    height = top + len(rows) * (bar_h + gap) + 28
    pw = width - left - right
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" {FONT} font-size="11">',
           f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13" font-weight="600">{escape(title)}</text>']
    for i, (label, *shares) in enumerate(rows):
        y = top + i * (bar_h + gap)
        out.append(f'<text x="{left - 6}" y="{y + bar_h - 5}" text-anchor="end" fill="#333">{escape(label)}</text>')
        x = left
        for name, share in zip(("win", "tie", "lose"), shares):
            if not math.isfinite(share) or share <= 0:
                continue
            w = pw * share
            out.append(f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{OUTCOME_COLOURS[name]}">'
                       f'<title>{escape(label)}: {name} {100 * share:.0f}%</title></rect>')
            if w > 26:
                out.append(f'<text x="{x + w / 2:.1f}" y="{y + bar_h - 5}" text-anchor="middle" fill="#fff">{100 * share:.0f}%</text>')
            x += w
    ly = height - 12
    for j, name in enumerate(("win", "tie", "lose")):
        out.append(f'<rect x="{left + j * 60}" y="{ly - 9}" width="10" height="10" fill="{OUTCOME_COLOURS[name]}"/>')
        out.append(f'<text x="{left + j * 60 + 14}" y="{ly}" fill="#333">{name}</text>')
    out.append("</svg>")
    return "\n".join(out)
