"""core.limits: the one text splitter and picture shrinker every platform uses."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from core.limits import (DISCORD, TELEGRAM, ImageTooBig, measure, shrink_image, split_text,
                         truncate)


def test_telegram_counts_utf16_units_so_emoji_split_is_within_the_limit() -> None:
    text = "🎨" * 3000  # 6000 UTF-16 units, 3000 characters
    pieces = split_text(text, TELEGRAM.message_chars, TELEGRAM.units)
    assert len(pieces) == 2 and "".join(pieces) == text
    assert all(measure(p, "utf16") <= 4096 for p in pieces)
    assert split_text(text, DISCORD.message_chars, DISCORD.units) == [text[:2000], text[2000:]]


def test_split_prefers_paragraphs_then_lines_then_words() -> None:
    text = ("word " * 30).strip() + "\n\n" + ("more " * 30).strip()
    assert split_text(text, 200) == [("word " * 30).strip(), ("more " * 30).strip()]
    assert split_text("", 10) == [""] and split_text("  ", 10) == [""]


def test_truncate_ends_with_an_ellipsis_within_the_limit() -> None:
    assert truncate("short", 10) == "short"
    cut = truncate("🎨" * 10, 7, "utf16")
    assert cut.endswith("…") and measure(cut, "utf16") <= 7


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((width, height), 64).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def test_shrink_keeps_a_fitting_picture_and_fits_one_too_big() -> None:
    data = _png(300, 200)
    assert shrink_image(data, "a.png", max_bytes=len(data)) == ("a.png", data)
    name, small = shrink_image(data, "a.png", max_bytes=len(data) // 4)
    assert len(small) <= len(data) // 4 and name in ("a.png", "a.jpg")


def test_shrink_honours_telegrams_sides_sum() -> None:
    name, data = shrink_image(_png(900, 300), "wide.png", max_bytes=10**7, max_sides_sum=600)
    with Image.open(io.BytesIO(data)) as image:
        assert sum(image.size) <= 600


def test_a_picture_that_cannot_fit_says_so() -> None:
    with pytest.raises(ImageTooBig):
        shrink_image(_png(64, 64), "a.png", max_bytes=10)
