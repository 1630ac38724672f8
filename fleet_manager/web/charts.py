"""Charts as inline SVG, drawn on the server: line charts over time and stacked progress bars.

No script and no inline style: colours come from classes in dashboard.css, so the page's
Content-Security-Policy can forbid inline styles.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from markupsafe import Markup, escape

MAX_POINTS = 240


@dataclass(frozen=True)
class Series:
    """One line: `(time, value)` points, oldest first; `css` names its colour class (s1, s2, ...)."""

    name: str
    points: Sequence[tuple[datetime, float]]
    css: str = "s1"


@dataclass(frozen=True)
class Segment:
    """One part of a stacked bar."""

    label: str
    count: int
    css: str


def _nice_max(value: float) -> float:
    if value <= 0 or not math.isfinite(value):
        return 1.0
    exponent = math.floor(math.log10(value))
    base = 10.0**exponent
    for step in (1.0, 2.0, 2.5, 5.0, 10.0):
        if value <= step * base:
            return step * base
    return 10.0 * base


def _fmt(value: float) -> str:
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}".rstrip("0").rstrip(".")
    return f"{value:.2f}".rstrip("0").rstrip(".")


def _thin(points: Sequence[tuple[datetime, float]]) -> list[tuple[datetime, float]]:
    """At most MAX_POINTS points: bucket means, keeping the newest point as it is."""
    if len(points) <= MAX_POINTS:
        return list(points)
    size = math.ceil(len(points) / MAX_POINTS)
    thinned = []
    for start in range(0, len(points) - 1, size):
        bucket = points[start : start + size]
        thinned.append((bucket[-1][0], sum(v for _, v in bucket) / len(bucket)))
    thinned.append(points[-1])
    return thinned


def line_chart(
    series: Sequence[Series], *, title: str, unit: str, width: int = 560, height: int = 170
) -> Markup:
    """A line chart of one or more series sharing the time axis; values from 0 up."""
    left, right, top, bottom = 46, 12, 24, 22
    plot_w, plot_h = width - left - right, height - top - bottom
    lines = [(s, _thin([(t, v) for t, v in s.points if math.isfinite(v)])) for s in series]
    parts = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'role="img" aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
        f'<text class="chart-title" x="{left}" y="14">{escape(title)} ({escape(unit)})</text>',
    ]
    legend_x = width - right
    for s, _ in reversed(lines):
        label = escape(s.name)
        parts.append(
            f'<text class="chart-legend {s.css}" x="{legend_x}" y="14" text-anchor="end">{label}</text>'
        )
        legend_x -= 10 + 7 * len(s.name)
    times = [t for _, pts in lines for t, _ in pts]
    if not times:
        parts.append(
            f'<text class="chart-empty" x="{left + plot_w / 2}" y="{top + plot_h / 2}" '
            'text-anchor="middle">no telemetry yet</text></svg>'
        )
        return Markup("".join(parts))
    t0, t1 = min(times), max(times)
    span = max((t1 - t0).total_seconds(), 1e-9)
    y_max = _nice_max(max(v for _, pts in lines for _, v in pts) * 1.05)

    def x(t: datetime) -> float:
        if t1 == t0:
            return left + plot_w / 2
        return left + plot_w * (t - t0).total_seconds() / span

    def y(v: float) -> float:
        return top + plot_h * (1 - max(0.0, v) / y_max)

    for i in range(4):
        value = y_max * i / 3
        gy = y(value)
        parts.append(
            f'<line class="chart-grid" x1="{left}" y1="{gy:.1f}" x2="{left + plot_w}" y2="{gy:.1f}"/>'
        )
        parts.append(
            f'<text class="chart-axis" x="{left - 6}" y="{gy + 4:.1f}" text-anchor="end">{_fmt(value)}</text>'
        )
    fmt = "%H:%M:%S" if span < 86_400 else "%m-%d %H:%M"
    parts.append(f'<text class="chart-axis" x="{left}" y="{height - 6}">{t0.strftime(fmt)}</text>')
    parts.append(
        f'<text class="chart-axis" x="{left + plot_w}" y="{height - 6}" text-anchor="end">'
        f"{t1.strftime(fmt)} UTC</text>"
    )
    for s, pts in lines:
        if not pts:
            continue
        coords = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in pts)
        parts.append(f'<polyline class="chart-line {s.css}" points="{coords}"/>')
        lt, lv = pts[-1]
        parts.append(
            f'<circle class="chart-dot {s.css}" cx="{x(lt):.1f}" cy="{y(lv):.1f}" r="3">'
            f"<title>{escape(s.name)}: {_fmt(lv)} {escape(unit)}</title></circle>"
        )
    parts.append("</svg>")
    return Markup("".join(parts))


def stacked_bar(segments: Sequence[Segment], *, total: int, width: int = 320, height: int = 14) -> Markup:
    """A horizontal bar split into segments (e.g. a wave's devices by phase); `total` is the full width."""
    parts = [
        f'<svg class="bar" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        'preserveAspectRatio="none" role="img" '
        f'aria-label="{escape(", ".join(f"{s.count} {s.label}" for s in segments if s.count))}">',
        f'<rect class="bar-bg" x="0" y="0" width="{width}" height="{height}" rx="3"/>',
    ]
    offset = 0.0
    for s in segments:
        if s.count <= 0 or total <= 0:
            continue
        w = width * s.count / total
        parts.append(
            f'<rect class="seg {s.css}" x="{offset:.2f}" y="0" width="{w:.2f}" height="{height}">'
            f"<title>{s.count} {escape(s.label)}</title></rect>"
        )
        offset += w
    parts.append("</svg>")
    return Markup("".join(parts))


def histogram(
    values: Sequence[float],
    *,
    title: str,
    unit: str,
    css: str = "s1",
    bins: int = 12,
    width: int = 440,
    height: int = 170,
) -> Markup:
    """How many values fall in each of `bins` equal ranges from 0 (e.g. devices by p95 latency)."""
    left, right, top, bottom = 46, 12, 24, 22
    plot_w, plot_h = width - left - right, height - top - bottom
    parts = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'role="img" aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
        f'<text class="chart-title" x="{left}" y="14">{escape(title)}</text>',
    ]
    finite = [v for v in values if math.isfinite(v) and v >= 0]
    if not finite:
        parts.append(
            f'<text class="chart-empty" x="{left + plot_w / 2}" y="{top + plot_h / 2}" '
            'text-anchor="middle">no telemetry yet</text></svg>'
        )
        return Markup("".join(parts))
    x_max = _nice_max(max(finite) * 1.0001)
    counts = [0] * bins
    for v in finite:
        counts[min(bins - 1, int(v / x_max * bins))] += 1
    y_max = max(counts)
    ticks = sorted({0, math.ceil(y_max / 2), y_max})
    for tick in ticks:
        gy = top + plot_h * (1 - tick / y_max)
        parts.append(
            f'<line class="chart-grid" x1="{left}" y1="{gy:.1f}" x2="{left + plot_w}" y2="{gy:.1f}"/>'
        )
        parts.append(
            f'<text class="chart-axis" x="{left - 6}" y="{gy + 4:.1f}" text-anchor="end">{tick}</text>'
        )
    bar_w = plot_w / bins
    for i, count in enumerate(counts):
        if not count:
            continue
        h = plot_h * count / y_max
        lo, hi = x_max * i / bins, x_max * (i + 1) / bins
        parts.append(
            f'<rect class="chart-bar {css}" x="{left + i * bar_w + 1:.1f}" y="{top + plot_h - h:.1f}" '
            f'width="{bar_w - 2:.1f}" height="{h:.1f}"><title>{count} device(s): {_fmt(lo)} to {_fmt(hi)} '
            f"{escape(unit)}</title></rect>"
        )
    for i in (0, bins // 2, bins):
        anchor = "start" if i == 0 else "end" if i == bins else "middle"
        label = f"{_fmt(x_max * i / bins)}" + (f" {escape(unit)}" if i == bins else "")
        parts.append(
            f'<text class="chart-axis" x="{left + i * bar_w:.1f}" y="{height - 6}" text-anchor="{anchor}">'
            f"{label}</text>"
        )
    parts.append("</svg>")
    return Markup("".join(parts))
