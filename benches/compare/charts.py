"""Small SVG charts for docs/benchmarks.md, written by hand so the comparison needs
nothing beyond Python's standard library. Line charts (optionally log-scaled on x)
and horizontal bar charts, each with axes, ticks, a title and a legend."""

import math
from xml.sax.saxutils import escape

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf"]
W, H = 640, 360
LEFT, RIGHT, TOP, BOTTOM = 70, 150, 40, 50


def _nice_ticks(lo, hi, n=5):
    if hi <= lo:
        hi = lo + 1
    span = hi - lo
    step = 10 ** math.floor(math.log10(span / n))
    for m in (1, 2, 2.5, 5, 10):
        if span / (step * m) <= n:
            step *= m
            break
    first = math.floor(lo / step) * step
    ticks = []
    t = first
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 10))
        t += step
    return ticks


def _fmt(v):
    if v == 0:
        return "0"
    if abs(v) >= 1000:
        return f"{v / 1000:g}k"
    if abs(v) >= 1:
        return f"{v:g}"
    return f"{v:.2g}"


def _frame(title, xlabel, ylabel):
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
        f'viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">',
        f'<rect width="{W}" height="{H}" fill="white"/>',
        f'<text x="{W / 2 - RIGHT / 2 + LEFT / 2}" y="22" text-anchor="middle" '
        f'font-size="14" font-weight="bold">{escape(title)}</text>',
        f'<text x="{LEFT + (W - LEFT - RIGHT) / 2}" y="{H - 10}" '
        f'text-anchor="middle">{escape(xlabel)}</text>',
        f'<text x="16" y="{TOP + (H - TOP - BOTTOM) / 2}" text-anchor="middle" '
        f'transform="rotate(-90 16 {TOP + (H - TOP - BOTTOM) / 2})">{escape(ylabel)}</text>',
    ]
    return parts


def _legend(parts, names):
    x = W - RIGHT + 15
    for i, name in enumerate(names):
        y = TOP + 10 + i * 20
        color = PALETTE[i % len(PALETTE)]
        parts.append(f'<rect x="{x}" y="{y - 9}" width="12" height="12" fill="{color}"/>')
        parts.append(f'<text x="{x + 18}" y="{y + 1}">{escape(name)}</text>')


def line_chart(title, xlabel, ylabel, series, log_x=False, xticks=None):
    """series: [(name, [(x, y), ...])]. Returns the SVG text."""
    xs = [x for _, pts in series for x, _ in pts]
    ys = [y for _, pts in series for _, y in pts]
    if not xs:
        xs, ys = [0, 1], [0, 1]
    fx = (lambda v: math.log10(v)) if log_x else (lambda v: v)
    x_lo, x_hi = fx(min(xs)), fx(max(xs))
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    yt = _nice_ticks(0, max(ys) * 1.05 if max(ys) > 0 else 1)
    y_hi = yt[-1]
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM

    def px(v):
        return LEFT + (fx(v) - x_lo) / (x_hi - x_lo) * pw

    def py(v):
        return TOP + ph - v / y_hi * ph

    parts = _frame(title, xlabel, ylabel)
    for t in yt:
        y = py(t)
        parts.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{LEFT + pw}" y2="{y:.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{_fmt(t)}</text>')
    for t in xticks or sorted(set(xs)):
        x = px(t)
        parts.append(f'<line x1="{x:.1f}" y1="{TOP + ph}" x2="{x:.1f}" y2="{TOP + ph + 5}" stroke="black"/>')
        parts.append(f'<text x="{x:.1f}" y="{TOP + ph + 18}" text-anchor="middle">{_fmt(t)}</text>')
    parts.append(f'<line x1="{LEFT}" y1="{TOP + ph}" x2="{LEFT + pw}" y2="{TOP + ph}" stroke="black"/>')
    parts.append(f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{TOP + ph}" stroke="black"/>')
    for i, (_, pts) in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in sorted(pts))
        parts.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="2"/>')
        for x, y in pts:
            parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{color}"/>')
    _legend(parts, [name for name, _ in series])
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def bar_chart(title, xlabel, bars, target=None):
    """bars: [(name, value, (lo, hi) or None)]: horizontal bars with min-max whiskers,
    and an optional dashed target line at x = target[1] labelled target[0]."""
    hi = max([b[2][1] if b[2] else b[1] for b in bars] + [target[1] if target else 0])
    xt = _nice_ticks(0, hi * 1.05 if hi > 0 else 1)
    x_hi = xt[-1]
    pw = W - LEFT - 40
    row = (H - TOP - BOTTOM) / max(len(bars), 1)
    left = LEFT + 30

    def px(v):
        return left + v / x_hi * (pw - 30)

    parts = _frame(title, xlabel, "")
    for t in xt:
        x = px(t)
        parts.append(f'<line x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{H - BOTTOM}" stroke="#ddd"/>')
        parts.append(f'<text x="{x:.1f}" y="{H - BOTTOM + 16}" text-anchor="middle">{_fmt(t)}</text>')
    for i, (name, value, span) in enumerate(bars):
        y = TOP + i * row + row * 0.2
        color = PALETTE[i % len(PALETTE)]
        parts.append(
            f'<rect x="{left}" y="{y:.1f}" width="{max(px(value) - left, 0):.1f}" '
            f'height="{row * 0.6:.1f}" fill="{color}"/>'
        )
        parts.append(
            f'<text x="{left - 6}" y="{y + row * 0.35:.1f}" text-anchor="end">{escape(name)}</text>'
        )
        label_x = px(span[1] if span else value) + 6
        parts.append(f'<text x="{label_x:.1f}" y="{y + row * 0.35:.1f}">{value:.3g}</text>')
        if span:
            mid = y + row * 0.3
            parts.append(
                f'<line x1="{px(span[0]):.1f}" y1="{mid:.1f}" x2="{px(span[1]):.1f}" '
                f'y2="{mid:.1f}" stroke="black"/>'
            )
    if target:
        x = px(target[1])
        parts.append(
            f'<line x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{H - BOTTOM}" stroke="black" '
            f'stroke-dasharray="4 3"/>'
        )
        parts.append(f'<text x="{x + 4:.1f}" y="{TOP - 4}">{escape(target[0])}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
