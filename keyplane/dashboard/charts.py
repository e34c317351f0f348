"""Small, accessible SVG charts rendered on the server: no chart library, no JavaScript, no CDN.

Each chart has a <title> and a text description, and every page that shows one also shows the numbers
as a table, so a screen reader gets the same information as a sighted reader.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from html import escape

# Charts are drawn at their real size in CSS pixels (width/height set, not stretched to the column), so a
# label is always LABEL_PX tall on screen; a narrow screen scrolls the figure instead of shrinking its text.
FULL_WIDTH = 1080
HALF_WIDTH = 540


@dataclass(frozen=True)
class Series:
    label: str
    values: list[float]
    css_class: str  # colour comes from the stylesheet


def _fmt(value: float) -> str:
    if value >= 1000:
        return f"{value / 1000:.1f}k"
    return f"{value:.4g}" if value < 1 else f"{value:.0f}"


def _svg_open(width: int, height: int, title: str, title_id: str) -> str:
    return (f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
            f'aria-labelledby="{title_id}"><title id="{title_id}">{escape(title)}</title>')


def bars_over_time(title: str, labels: list[str], series: list[Series], height: int = 190,
                   width: int = FULL_WIDTH) -> str:
    """Grouped vertical bars per time slot (requests and errors per hour or day)."""
    left, bottom, top = 52, 30, 14
    plot_h = height - bottom - top
    plot_w = width - left - 8
    peak = max([v for s in series for v in s.values] + [1.0])
    slot = plot_w / max(len(labels), 1)
    bar_w = max(1.0, (slot * 0.8) / max(len(series), 1))
    parts = [_svg_open(width, height, title, f"t-{id(labels)}"),
             f'<line x1="{left}" y1="{top + plot_h}" x2="{width - 8}" y2="{top + plot_h}" class="axis"/>',
             f'<text x="{left - 6}" y="{top + 8}" class="tick" text-anchor="end">{_fmt(peak)}</text>',
             f'<text x="{left - 6}" y="{top + plot_h}" class="tick" text-anchor="end">0</text>']
    for i, label in enumerate(labels):
        for j, s in enumerate(series):
            value = s.values[i]
            h = plot_h * value / peak
            x = left + i * slot + slot * 0.1 + j * bar_w
            tip = f"{escape(label)}: {escape(s.label)} {_fmt(value)}"
            parts.append(f'<rect x="{x:.1f}" y="{top + plot_h - h:.1f}" width="{bar_w:.1f}" height="{h:.1f}" '
                         f'class="{s.css_class}"><title>{tip}</title></rect>')
        step = max(1, math.ceil(len(labels) * 56 / plot_w))  # a label every ~56 px at most
        if i % step == 0:
            parts.append(f'<text x="{left + i * slot + slot / 2:.1f}" y="{height - 8}" class="tick" '
                         f'text-anchor="middle">{escape(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def horizontal_bars(title: str, rows: list[tuple[str, float]], unit: str = "",
                    fmt: Callable[[float], str] = _fmt, width: int = HALF_WIDTH) -> str:
    """One bar per row (tokens by model, cost by cost center, top keys)."""
    row_h, label_w = 28, min(200, width // 3)
    height = max(row_h * len(rows) + 8, 36)
    peak = max([v for _, v in rows] + [1e-12])
    parts = [_svg_open(width, height, title, f"h-{id(rows)}")]
    for i, (label, value) in enumerate(rows):
        y = 4 + i * row_h
        w = (width - label_w - 100) * value / peak
        shown = label if len(label) <= label_w // 8 else label[: label_w // 8 - 1] + "…"
        parts.append(f'<text x="{label_w - 8}" y="{y + 18}" class="tick" text-anchor="end">{escape(shown)}</text>')
        parts.append(f'<rect x="{label_w}" y="{y + 5}" width="{w:.1f}" height="{row_h - 10}" class="bar-main">'
                     f"<title>{escape(label)}: {fmt(value)}{unit}</title></rect>")
        parts.append(f'<text x="{label_w + w + 6:.1f}" y="{y + 18}" class="tick">{fmt(value)}{escape(unit)}</text>')
    if not rows:
        parts.append('<text x="8" y="20" class="tick">No data in this window</text>')
    parts.append("</svg>")
    return "".join(parts)
