"""Inline SVG charts: grouped bars, horizontal ratio bars, log-log roofline, trend lines.

Each function returns one `<svg class="chart">` string with a title, labelled
axes, a legend and `<title>` tooltips on every mark; nothing is fetched at view
time.  Values are escaped; sizes fit a laptop screen (720 x 340 by default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
W, H = 720, 340
M_LEFT, M_RIGHT, M_TOP, M_BOTTOM = 70, 180, 36, 56


@dataclass(frozen=True)
class Bar:
    group: str  # x-axis group, e.g. "pp128"
    series: str  # legend entry, e.g. "cpu"
    value: float
    low: float  # whisker bottom (min)
    high: float  # whisker top (max)
    note: str = ""


def color(series: str, order: list[str]) -> str:
    return PALETTE[order.index(series) % len(PALETTE)] if series in order else "#777"


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values covering [lo, hi]."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    return [start + i * step for i in range(int(math.ceil((hi - start) / step)) + 1)]


def log_ticks(lo: float, hi: float) -> list[float]:
    """Decades, with 2x and 5x steps added when the range spans fewer than three decades."""
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    steps = (1, 2, 5) if math.log10(hi / lo) < 3 else (1,)
    return [m * 10.0 ** e for e in decades for m in steps]


def fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-2:
        return f"{v:.0e}".replace("e+0", "e").replace("e-0", "e-")
    return f"{v:.3g}"


def _frame(title: str, xlabel: str, ylabel: str, body: list[str], legend: list[tuple[str, str]],
           kind: str) -> str:
    px, py = W - M_RIGHT, M_TOP + (H - M_TOP - M_BOTTOM) / 2
    parts = [f'<svg class="chart" data-kind="{kind}" xmlns="http://www.w3.org/2000/svg" width="{W}" '
             f'height="{H}" viewBox="0 0 {W} {H}" role="img" aria-label="{escape(title)}">',
             f'<rect width="{W}" height="{H}" fill="#fff"/>',
             f'<text x="{W / 2 - M_RIGHT / 2}" y="20" text-anchor="middle" class="ct">{escape(title)}</text>',
             f'<text x="{(M_LEFT + px) / 2}" y="{H - 12}" text-anchor="middle" class="al">{escape(xlabel)}</text>',
             f'<text transform="translate(16,{py}) rotate(-90)" text-anchor="middle" class="al">{escape(ylabel)}</text>',
             *body]
    for i, (name, col) in enumerate(legend):
        y = M_TOP + 8 + i * 20
        parts.append(f'<rect x="{px + 14}" y="{y - 9}" width="12" height="12" fill="{col}"/>'
                     f'<text x="{px + 32}" y="{y + 1}" class="lg">{escape(name)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def _y_axis(ticks: list[float], ymap, width_to: float, log: bool = False) -> list[str]:
    out = []
    for t in ticks:
        y = ymap(t)
        out.append(f'<line x1="{M_LEFT}" x2="{width_to}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                   f'<text x="{M_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" class="tk">{fmt(t)}</text>')
    out.append(f'<line x1="{M_LEFT}" x2="{M_LEFT}" y1="{M_TOP}" y2="{H - M_BOTTOM}" class="axis"/>'
               f'<line x1="{M_LEFT}" x2="{width_to}" y1="{H - M_BOTTOM}" y2="{H - M_BOTTOM}" class="axis"/>')
    return out


def bar_chart(title: str, ylabel: str, bars: list[Bar], series_order: list[str]) -> str:
    groups = list(dict.fromkeys(b.group for b in bars))
    series = [s for s in series_order if any(b.series == s for b in bars)]
    top = max([b.high for b in bars] + [b.value for b in bars] + [1e-9])
    ticks = nice_ticks(0.0, top)
    ymax = ticks[-1]
    plot_w, plot_h = W - M_LEFT - M_RIGHT, H - M_TOP - M_BOTTOM

    def ymap(v: float) -> float:
        return H - M_BOTTOM - plot_h * v / ymax

    body = _y_axis(ticks, ymap, W - M_RIGHT)
    gw = plot_w / max(len(groups), 1)
    bw = gw * 0.8 / max(len(series), 1)
    for gi, group in enumerate(groups):
        gx = M_LEFT + gi * gw
        lx, ly = gx + gw / 2, H - M_BOTTOM + 14
        turn = f' transform="rotate(-18 {lx:.1f} {ly})"' if len(groups) > 5 else ""
        anchor = "end" if turn else "middle"
        body.append(f'<text x="{lx:.1f}" y="{ly}" text-anchor="{anchor}" class="tk"{turn}>{escape(group)}</text>')
        for si, s in enumerate(series):
            b = next((b for b in bars if b.group == group and b.series == s), None)
            if b is None:
                continue
            x = gx + gw * 0.1 + si * bw
            y = ymap(b.value)
            tip = f"{s} {group}: median {fmt(b.value)} {ylabel} (min {fmt(b.low)}, max {fmt(b.high)}){b.note}"
            body.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bw * 0.92:.1f}" height="{ymap(0) - y:.1f}" '
                        f'fill="{color(s, series_order)}" class="mark"><title>{escape(tip)}</title></rect>')
            cx = x + bw * 0.46
            body.append(f'<line x1="{cx:.1f}" x2="{cx:.1f}" y1="{ymap(b.low):.1f}" y2="{ymap(b.high):.1f}" class="wh"/>')
            body.append(f'<text x="{cx:.1f}" y="{y - 4:.1f}" text-anchor="middle" class="vl">{fmt(b.value)}</text>')
    legend = [(s, color(s, series_order)) for s in series]
    return _frame(title, "test (min-max whiskers)", ylabel, body, legend, "bars")


def ratio_chart(title: str, rows: list[tuple[str, float, str]], series_order: list[str]) -> str:
    """Horizontal bars of ratio values (log scale, 1.0 marked); rows = (label, ratio, series)."""
    h = M_TOP + M_BOTTOM + 24 * len(rows) + 12
    lo = min([r for _, r, _ in rows] + [0.5]) / 1.5
    hi = max([r for _, r, _ in rows] + [2.0]) * 1.5
    ticks = [t for t in log_ticks(lo, hi) if lo <= t <= hi] or [1.0]
    left, plot_w = 250, W - 250 - 40

    def xmap(v: float) -> float:
        return left + plot_w * (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))

    body = []
    for t in ticks:
        body.append(f'<line x1="{xmap(t):.1f}" x2="{xmap(t):.1f}" y1="{M_TOP}" y2="{h - M_BOTTOM}" class="grid"/>'
                    f'<text x="{xmap(t):.1f}" y="{h - M_BOTTOM + 16}" text-anchor="middle" class="tk">{fmt(t)}x</text>')
    body.append(f'<line x1="{xmap(1):.1f}" x2="{xmap(1):.1f}" y1="{M_TOP}" y2="{h - M_BOTTOM}" class="one"/>')
    for i, (label, ratio, s) in enumerate(rows):
        y = M_TOP + 6 + i * 24
        x0, x1 = sorted((xmap(1.0), xmap(ratio)))
        tip = f"{label}: {ratio:.3g}x the peer"
        body.append(f'<text x="{left - 6}" y="{y + 13}" text-anchor="end" class="tk">{escape(label)}</text>'
                    f'<rect x="{x0:.1f}" y="{y}" width="{max(x1 - x0, 1):.1f}" height="17" '
                    f'fill="{color(s, series_order)}" class="mark"><title>{escape(tip)}</title></rect>'
                    f'<text x="{x1 + 4:.1f}" y="{y + 13}" class="vl">{ratio:.3g}x</text>')
    svg = (f'<svg class="chart" data-kind="ratio" xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" '
           f'viewBox="0 0 {W} {h}" role="img" aria-label="{escape(title)}"><rect width="{W}" height="{h}" fill="#fff"/>'
           f'<text x="{W / 2}" y="20" text-anchor="middle" class="ct">{escape(title)}</text>'
           f'<text x="{left + plot_w / 2}" y="{h - 12}" text-anchor="middle" class="al">'
           f'ukgpu / llama.cpp (log scale; 1x = same speed, right of the line = faster)</text>')
    return svg + "\n".join(body) + "</svg>"


def _log_map(lo: float, hi: float, a: float, b: float):
    span = math.log10(hi) - math.log10(lo)
    return lambda v: a + (b - a) * (math.log10(max(v, lo)) - math.log10(lo)) / span


def roofline_chart(title: str, points: list[tuple[str, float, float, str]], bw_gbs: float | None,
                   peak_tflops: float | None, series_order: list[str]) -> str:
    """points = (label, flops per byte, achieved GFLOP/s, series); roof = min(peak, AI x bandwidth)."""
    xs = [p[1] for p in points] or [1.0]
    ys = [p[2] for p in points] or [1.0]
    xlo, xhi = min(xs) / 3, max(xs) * 3
    roof_top = peak_tflops * 1e3 if peak_tflops else max(ys)
    ylo, yhi = min(ys + [roof_top]) / 10, max(ys + [roof_top]) * 3
    xmap = _log_map(xlo, xhi, M_LEFT, W - M_RIGHT)
    ymap = _log_map(ylo, yhi, H - M_BOTTOM, M_TOP)
    body = _y_axis([t for t in log_ticks(ylo, yhi) if ylo <= t <= yhi], ymap, W - M_RIGHT)
    for t in log_ticks(xlo, xhi):
        if xlo <= t <= xhi:
            body.append(f'<text x="{xmap(t):.1f}" y="{H - M_BOTTOM + 16}" text-anchor="middle" class="tk">{fmt(t)}</text>')
    legend = []
    if bw_gbs and peak_tflops:
        knee = peak_tflops * 1e3 / bw_gbs
        pts = [(x, min(peak_tflops * 1e3, x * bw_gbs)) for x in (xlo, min(max(knee, xlo), xhi), xhi)]
        path = " ".join(f"{xmap(x):.1f},{ymap(y):.1f}" for x, y in pts)
        body.append(f'<polyline points="{path}" class="roof"><title>roofline: copy {fmt(bw_gbs)} GB/s, '
                    f'GEMM {fmt(peak_tflops)} TFLOP/s</title></polyline>')
        legend += [(f"copy {fmt(bw_gbs)} GB/s", "#000"), (f"GEMM {fmt(peak_tflops)} TFLOP/s", "#000")]
    for label, x, y, s in points:
        body.append(f'<circle cx="{xmap(x):.1f}" cy="{ymap(y):.1f}" r="5" fill="{color(s, series_order)}" '
                    f'class="mark"><title>{escape(label)}: {fmt(y)} GFLOP/s at {fmt(x)} FLOP/byte</title></circle>')
    legend += [(s, color(s, series_order)) for s in series_order if any(p[3] == s for p in points)]
    return _frame(title, "arithmetic intensity (FLOP per byte moved, log)", "GFLOP/s (log)", body, legend, "roofline")


def line_chart(title: str, ylabel: str, xlabels: list[str], series: dict[str, list[float | None]],
               order: list[str]) -> str:
    """One line per series over the x positions (e.g. result files by time); gaps allowed."""
    vals = [v for vs in series.values() for v in vs if v is not None] or [1.0]
    ticks = nice_ticks(0.0, max(vals))
    plot_w, plot_h = W - M_LEFT - M_RIGHT, H - M_TOP - M_BOTTOM

    def xmap(i: int) -> float:
        return M_LEFT + 20 + (plot_w - 40) * (i / max(len(xlabels) - 1, 1))

    def ymap(v: float) -> float:
        return H - M_BOTTOM - plot_h * v / ticks[-1]

    body = _y_axis(ticks, ymap, W - M_RIGHT)
    for i, lab in enumerate(xlabels):
        body.append(f'<text x="{xmap(i):.1f}" y="{H - M_BOTTOM + 16}" text-anchor="middle" class="tk">{escape(lab)}</text>')
    for name, vs in series.items():
        col = color(name, order)
        pts = [(xmap(i), ymap(v)) for i, v in enumerate(vs) if v is not None]
        body.append(f'<polyline points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in pts)}" fill="none" '
                    f'stroke="{col}" stroke-width="2"/>')
        for (x, y), v in zip(pts, [v for v in vs if v is not None]):
            body.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{col}" class="mark">'
                        f'<title>{escape(name)}: {fmt(v)} {escape(ylabel)}</title></circle>')
    return _frame(title, "results file (by time)", ylabel, body, [(n, color(n, order)) for n in series], "trend")
