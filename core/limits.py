"""What each chat platform accepts, and the one way MuseSpark fits text and pictures into it.

Every adapter and deliverer reads its limits from here and splits text / shrinks pictures with
the functions below, so the bot process and the workers agree on where a long answer is cut.

* Telegram counts message and caption lengths in UTF-16 code units (an emoji outside the BMP
  counts two): 4096 per message, 1024 per caption; photos up to 10 MB whose width + height is
  at most 10,000 px.
* Discord counts characters: 2000 per message content; uploads up to 10 MiB (without boost).
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = ["DISCORD", "TELEGRAM", "ImageTooBig", "Limits", "fit", "measure", "shrink_image",
           "split_text", "truncate"]

log = logging.getLogger(__name__)

Units = Literal["chars", "utf16"]


@dataclass(frozen=True, slots=True)
class Limits:
    """One platform's limits. ``units``: how it counts text length."""

    message_chars: int
    units: Units
    caption_chars: int | None = None
    upload_bytes: int = 10 * 1024 * 1024
    #: Largest width + height of a photo, when the platform has such a rule.
    photo_sides_sum: int | None = None


TELEGRAM = Limits(message_chars=4096, caption_chars=1024, units="utf16",
                  upload_bytes=10 * 1000 * 1000, photo_sides_sum=10_000)
DISCORD = Limits(message_chars=2000, units="chars", upload_bytes=10 * 1024 * 1024)


class ImageTooBig(ValueError):
    """A picture could not be brought under a platform's limit."""


def measure(text: str, units: Units = "chars") -> int:
    """``text``'s length as a platform counts it."""
    if units == "utf16":
        return len(text.encode("utf-16-le")) // 2
    return len(text)


def fit(text: str, limit: int, units: Units = "chars") -> int:
    """How many leading characters of ``text`` fit in ``limit`` units."""
    if measure(text, units) <= limit:
        return len(text)
    if units == "chars":
        return limit
    used = 0
    for index, char in enumerate(text):
        used += 2 if ord(char) > 0xFFFF else 1
        if used > limit:
            return index
    return len(text)


def split_text(text: str, limit: int, units: Units = "chars") -> list[str]:
    """Split ``text`` into pieces of at most ``limit`` units each.

    Cuts at the last paragraph break, else line break, else space inside the limit; a word
    longer than the limit is cut hard. Whitespace at the cuts is dropped; no piece is empty;
    empty text gives ``[""]``.
    """
    pieces: list[str] = []
    rest = text.strip()
    while rest:
        end = fit(rest, limit, units)
        if end >= len(rest):
            pieces.append(rest)
            break
        window = rest[:end]
        cut = -1
        for separator in ("\n\n", "\n", " "):
            cut = window.rfind(separator)
            if cut > limit // 4:  # a cut too near the start would make tiny pieces
                break
        if cut <= 0:
            cut = end
        piece = rest[:cut].rstrip()
        pieces.append(piece or rest[:end])
        rest = rest[cut:].lstrip() if piece else rest[end:].lstrip()
    return pieces or [""]


def truncate(text: str, limit: int, units: Units = "chars") -> str:
    """``text`` cut to ``limit`` units, ending with an ellipsis when it was cut."""
    if measure(text, units) <= limit:
        return text
    return text[:fit(text, limit - 1, units)] + "…"


def shrink_image(data: bytes, filename: str, *, max_bytes: int,
                 max_sides_sum: int | None = None) -> tuple[str, bytes]:
    """Return ``(filename, data)`` within ``max_bytes`` (and ``max_sides_sum`` px, width +
    height, when given); the picture as it is when it already fits.

    Tries, in order: an optimised PNG; JPEG at falling quality; then JPEG at 3/4 of the size,
    again and again. The recipe text chunk of our PNGs is lost on re-encoding, which is
    acceptable: the artifact on disk keeps it.

    Raises:
        ImageTooBig: not even a 16 px picture fits.
    """
    from PIL import Image

    stem = Path(filename).stem
    with Image.open(io.BytesIO(data)) as opened:
        width, height = opened.size
        if len(data) <= max_bytes and (max_sides_sum is None or width + height <= max_sides_sum):
            return filename, data
        image = opened.convert("RGB")
    if max_sides_sum is not None and width + height > max_sides_sum:
        scale = max_sides_sum / (width + height)
        image = image.resize((max(16, int(width * scale)), max(16, int(height * scale))))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    if buffer.tell() <= max_bytes:
        return f"{stem}.png", buffer.getvalue()
    while True:
        for quality in (90, 80, 70, 60):
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=quality, optimize=True)
            if buffer.tell() <= max_bytes:
                log.info("%s shrunk from %d to %d bytes (%dx%d)", filename, len(data),
                         buffer.tell(), *image.size)
                return f"{stem}.jpg", buffer.getvalue()
        width, height = image.size
        if width <= 16 or height <= 16:
            raise ImageTooBig(f"{filename} cannot be shrunk under {max_bytes} bytes")
        image = image.resize((max(16, width * 3 // 4), max(16, height * 3 // 4)))
