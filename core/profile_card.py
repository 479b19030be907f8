"""What ``/profile`` shows: the learned taste in words and as a small bar chart (PNG)."""

from __future__ import annotations

from pathlib import Path

from core import taste

__all__ = ["render_profile", "summarize"]

CHART_WIDTH_PX = 560
ROW_HEIGHT_PX = 18
BAR_MAX_PX = 260
LABEL_WIDTH_PX = 200


def _best(kind: str, stats: taste.Posterior) -> dict[str, tuple[str, float, float]]:
    best: dict[str, tuple[str, float, float]] = {}
    for dim, value, liked, evidence in taste.describe(kind, stats):
        if dim not in best and evidence >= 1:
            best[dim] = (value, liked, evidence)
    return best


def summarize(mine: dict[str, taste.Posterior], community: dict[str, taste.Posterior], *,
              opted_out: bool) -> str:
    """A few plain sentences about what was learned, yours and your community's."""
    lines = []
    if opted_out:
        lines.append("You opted out of learning: I don't learn from your reactions "
                     "(/settings learning on to change that).")
    for kind, noun in (("image", "pictures"), ("text", "writing")):
        best = _best(kind, mine.get(kind, {}))
        # Every reaction counts once in each dimension; the lead one (style, tone) also holds
        # the "passed over" evidence of takes, so count in another.
        counted = next(d for d in taste.CATALOGUE[kind] if d != taste.LEAD_DIMENSION[kind])
        n = taste.evidence({counted: mine.get(kind, {}).get(counted, {})})
        if best:
            parts = ", ".join(f"{dim} {value} ({liked:.0%} liked)"
                              for dim, (value, liked, _) in best.items())
            lines.append(f"Your {noun}: {parts} — from {n:.1f} weighted reactions.")
        else:
            lines.append(f"Your {noun}: nothing learned yet; react with 👍 or 👎 to teach me.")
        group = _best(kind, community.get(kind, {}))
        if group:
            group_dim, (group_value, _, _) = next(iter(group.items()))
            lines.append(f"  Here, people like {noun} with {group_dim} {group_value}.")
    lines.append("Every result has a “why this?” button; /forget feedback erases what I learned.")
    return "\n".join(lines)


def render_profile(mine: dict[str, taste.Posterior], path: Path, *, title: str) -> Path | None:
    """Draw one bar per catalogue value: the share of reactions that liked it.

    Returns None when Pillow is not installed (the words still go out).
    """
    try:
        from PIL import Image, ImageDraw
    except ImportError:
        return None
    rows = [(kind, *row) for kind in ("image", "text")
            for row in taste.describe(kind, mine.get(kind, {}))]
    height = 40 + ROW_HEIGHT_PX * len(rows)
    image = Image.new("RGB", (CHART_WIDTH_PX, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 10), f"Taste of {title}: share liked (grey: no reactions yet)", fill="black")
    y = 34
    for kind, dim, value, liked, evidence in rows:
        draw.text((10, y), f"{kind} {dim}: {value}", fill="black")
        colour = (60, 140, 220) if evidence >= 1 else (200, 200, 200)
        draw.rectangle((LABEL_WIDTH_PX, y + 3, LABEL_WIDTH_PX + int(BAR_MAX_PX * liked),
                        y + ROW_HEIGHT_PX - 4), fill=colour)
        draw.text((LABEL_WIDTH_PX + BAR_MAX_PX + 10, y), f"{liked:.0%} ({evidence:.1f})",
                  fill="black")
        y += ROW_HEIGHT_PX
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path
