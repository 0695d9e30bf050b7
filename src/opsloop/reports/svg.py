"""Inline SVG charts for the self-contained HTML reports: no scripts, fonts or network assets.

Every chart is an ``<svg class="chart" data-chart="<id>">`` whose bars are ``<rect class="bar">``
elements with a ``<title>`` tooltip, so a browser test can find and measure them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from html import escape

PALETTE = {"BigQuery": "#4285f4", "compute": "#34a853", "API": "#fbbc04"}
FALLBACK = ("#7e57c2", "#ef6c00", "#00897b", "#c2185b", "#5d4037")
FONT = "font-family='DejaVu Sans, Arial, sans-serif'"


def nice_ticks(top: float, n: int = 5) -> list[float]:
    """0 and about ``n`` round tick values covering ``top`` (1/2/5 × 10^k steps)."""
    if top <= 0 or not math.isfinite(top):
        return [0.0, 1.0]
    raw = top / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    count = math.ceil(top / step - 1e-9)
    return [round(i * step, 12) for i in range(count + 1)]


def money(v: float) -> str:
    """A dollar amount with enough digits to be non-zero for tiny per-run costs."""
    if v == 0:
        return "$0"
    digits = max(2, min(8, 2 - math.floor(math.log10(abs(v)))))  # 3 significant digits for small sums
    return f"${v:,.{digits}f}"


def _color(name: str, i: int) -> str:
    return PALETTE.get(name, FALLBACK[i % len(FALLBACK)])


def _legend(names: Sequence[str], x: float, y: float) -> list[str]:
    out = []
    for i, name in enumerate(names):
        cx = x + i * 120
        out.append(f"<rect x='{cx}' y='{y - 10}' width='12' height='12' fill='{_color(name, i)}'/>")
        out.append(f"<text x='{cx + 16}' y='{y}' font-size='12' {FONT}>{escape(name)}</text>")
    return out


def stacked_bars(
    chart_id: str,
    title: str,
    labels: Sequence[str],
    series: Mapping[str, Sequence[float]],
    width: int = 900,
    height: int = 320,
    fmt: str = "money",
) -> str:
    """Vertical bars, one per label, stacked by series (e.g. BigQuery / compute / API per day)."""
    names = list(series)
    totals = [sum(series[s][i] for s in names) for i in range(len(labels))]
    ticks = nice_ticks(max(totals, default=0.0))
    top = ticks[-1] or 1.0
    left, right, head, foot = 80, 20, 40, 90
    plot_w, plot_h = width - left - right, height - head - foot
    slot = plot_w / max(len(labels), 1)
    bar_w = max(min(slot * 0.7, 60), 2)
    out = _open(chart_id, title, width, height)
    for t in ticks:
        y = head + plot_h - t / top * plot_h
        out.append(f"<line x1='{left}' x2='{width - right}' y1='{y:.1f}' y2='{y:.1f}' stroke='#e0e0e0'/>")
        label = money(t) if fmt == "money" else f"{t:g}"
        out.append(f"<text x='{left - 6}' y='{y + 4:.1f}' font-size='11' text-anchor='end' {FONT}>{label}</text>")
    every = max(1, math.ceil(len(labels) / 16))
    for i, lab in enumerate(labels):
        x = left + i * slot + (slot - bar_w) / 2
        base = float(head + plot_h)
        for j, name in enumerate(names):
            v = series[name][i]
            if v <= 0:
                continue
            h = max(v / top * plot_h, 1.0)
            base -= h
            tip = f"{lab} · {name}: {money(v) if fmt == 'money' else f'{v:g}'}"
            out.append(
                f"<rect class='bar' data-series='{escape(name)}' x='{x:.1f}' y='{base:.1f}' width='{bar_w:.1f}' "
                f"height='{h:.1f}' fill='{_color(name, j)}'><title>{escape(tip)}</title></rect>"
            )
        if i % every == 0:
            lx, ly = x + bar_w / 2, head + plot_h + 14
            out.append(
                f"<text x='{lx:.1f}' y='{ly:.1f}' font-size='10' text-anchor='end' {FONT} "
                f"transform='rotate(-40 {lx:.1f} {ly:.1f})'>{escape(lab)}</text>"
            )
    out.append(f"<line x1='{left}' x2='{width - right}' y1='{head + plot_h}' y2='{head + plot_h}' stroke='#616161'/>")
    out += _legend(names, left, height - 6)
    out.append("</svg>")
    return "\n".join(out)


def hbars(chart_id: str, title: str, items: Sequence[tuple[str, float]], width: int = 900, fmt: str = "money") -> str:
    """Horizontal bars, one per (label, value): cost per pipeline, per model version, unit costs."""
    row_h, head, left, right = 28, 40, 220, 120
    height = head + row_h * max(len(items), 1) + 20
    top = max((v for _, v in items), default=0.0) or 1.0
    plot_w = width - left - right
    out = _open(chart_id, title, width, height)
    if not items:
        out.append(f"<text x='{left}' y='{head + 18}' font-size='12' {FONT}>no data in this period</text>")
    for i, (lab, v) in enumerate(items):
        y = head + i * row_h
        w = max(v / top * plot_w, 1.0) if v > 0 else 0.0
        shown = money(v) if fmt == "money" else f"{v:,.4g}"
        out.append(
            f"<text x='{left - 8}' y='{y + 17}' font-size='12' text-anchor='end' {FONT}>{escape(lab[:32])}</text>"
        )
        if w:
            out.append(
                f"<rect class='bar' x='{left}' y='{y + 4}' width='{w:.1f}' height='{row_h - 8}' "
                f"fill='{_color('', i)}'><title>{escape(lab)}: {shown}</title></rect>"
            )
        out.append(f"<text x='{left + w + 6:.1f}' y='{y + 17}' font-size='12' {FONT}>{shown}</text>")
    out.append("</svg>")
    return "\n".join(out)


def _open(chart_id: str, title: str, width: int, height: int) -> list[str]:
    return [
        f"<svg class='chart' data-chart='{escape(chart_id)}' xmlns='http://www.w3.org/2000/svg' "
        f"width='{width}' height='{height}' viewBox='0 0 {width} {height}' role='img' aria-label='{escape(title)}'>",
        f"<rect x='0' y='0' width='{width}' height='{height}' fill='#ffffff'/>",
        f"<text x='{width / 2}' y='16' font-size='14' font-weight='bold' text-anchor='middle' {FONT}>"
        f"{escape(title)}</text>",
    ]
