"""Taste plots as SVG, drawn on the server (no charting library, no JavaScript).

A plot shows one dimension of a profile (style, guidance, aspect, ...) over the feedback that
moved it: after each reaction or pick, each value's liked share (the posterior mean core's
``taste.describe`` reports). The x axis counts those feedback events; the page lists what each
one was.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

from core import taste

__all__ = ["Series", "line_plot", "series_for"]

WIDTH_PX, HEIGHT_PX = 420, 220
MARGIN_LEFT_PX, MARGIN_RIGHT_PX, MARGIN_TOP_PX, MARGIN_BOTTOM_PX = 40, 110, 14, 28
#: Lines drawn at most (the values with the most evidence); the rest stay in the table.
LINES_MAX = 6
PALETTE = ("#4a3aa8", "#c2410c", "#15803d", "#0369a1", "#a21caf", "#854d0e", "#475569")


@dataclass(frozen=True, slots=True)
class Series:
    """One value's liked share after each feedback event (None before any evidence on it)."""

    value: str
    points: tuple[float, ...]
    evidence: float


def series_for(kind: str, dimension: str, snapshots: Sequence[taste.Posterior]) -> list[Series]:
    """The lines of one dimension, from the profile after each feedback event."""
    if not snapshots:
        return []
    rows_after = [{(d, v): (share, n) for d, v, share, n in taste.describe(kind, stats)}
                  for stats in snapshots]
    values = [v for v in taste.CATALOGUE[kind].get(dimension, {})]
    out = []
    for value in values:
        last_evidence = rows_after[-1].get((dimension, value), (0.5, 0.0))[1]
        if last_evidence <= 0 and not any(r.get((dimension, value), (0, 0))[1] for r in rows_after):
            continue
        points = tuple(r.get((dimension, value), (0.5, 0.0))[0] for r in rows_after)
        out.append(Series(value, points, last_evidence))
    out.sort(key=lambda s: -s.evidence)
    return out[:LINES_MAX]


def line_plot(title: str, series: Sequence[Series], *, plot_id: str) -> str:
    """An accessible SVG line plot (role img, a title and a description of the last values)."""
    inner_w = WIDTH_PX - MARGIN_LEFT_PX - MARGIN_RIGHT_PX
    inner_h = HEIGHT_PX - MARGIN_TOP_PX - MARGIN_BOTTOM_PX
    steps = max((len(s.points) for s in series), default=0)
    summary = "; ".join(f"{s.value} liked {s.points[-1]:.0%}" for s in series) or "no feedback yet"
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH_PX} {HEIGHT_PX}" '
             f'role="img" aria-labelledby="{plot_id}-t {plot_id}-d" id="{plot_id}" '
             f'data-points="{steps}">',
             f'<title id="{plot_id}-t">{escape(title)}</title>',
             f'<desc id="{plot_id}-d">After {steps} feedback event(s): {escape(summary)}.</desc>']

    def x(i: int) -> float:
        return MARGIN_LEFT_PX + (inner_w * i / (steps - 1) if steps > 1 else inner_w / 2)

    def y(share: float) -> float:
        return MARGIN_TOP_PX + inner_h * (1 - share)

    for share in (0.0, 0.5, 1.0):
        parts.append(f'<line x1="{MARGIN_LEFT_PX}" x2="{MARGIN_LEFT_PX + inner_w}" '
                     f'y1="{y(share):.1f}" y2="{y(share):.1f}" stroke="#ddd"/>'
                     f'<text x="{MARGIN_LEFT_PX - 6}" y="{y(share) + 4:.1f}" font-size="11" '
                     f'text-anchor="end" fill="#555">{share:.0%}</text>')
    parts.append(f'<text x="{MARGIN_LEFT_PX + inner_w / 2:.1f}" y="{HEIGHT_PX - 6}" '
                 f'font-size="11" text-anchor="middle" fill="#555">feedback events '
                 f'({steps})</text>')
    if not series:
        parts.append(f'<text x="{MARGIN_LEFT_PX + inner_w / 2:.1f}" y="{y(0.5) - 8:.1f}" '
                     'font-size="13" text-anchor="middle" fill="#555">no feedback yet</text>')
    for n, line in enumerate(series):
        colour = PALETTE[n % len(PALETTE)]
        coords = " ".join(f"{x(i):.1f},{y(p):.1f}" for i, p in enumerate(line.points))
        parts.append(f'<polyline class="series" data-value="{escape(line.value)}" '
                     f'fill="none" stroke="{colour}" stroke-width="2" points="{coords}"/>')
        last = line.points[-1]
        parts.append(f'<circle cx="{x(len(line.points) - 1):.1f}" cy="{y(last):.1f}" r="3" '
                     f'fill="{colour}"/>')
        parts.append(f'<text x="{WIDTH_PX - MARGIN_RIGHT_PX + 8}" '
                     f'y="{MARGIN_TOP_PX + 12 + 15 * n}" font-size="12" fill="{colour}">'
                     f'{escape(line.value)} {last:.0%}</text>')
    parts.append("</svg>")
    return "".join(parts)
