"""An invisible watermark that carries the job id, for pictures whose metadata was stripped.

Telegram recompresses photos (JPEG, at most 1280 px) and drops every metadata chunk, so the
C2PA manifest does not survive there; this watermark is meant to. It uses invisible-watermark's
``dwtDctSvd`` method (the one Stable Diffusion's reference scripts use; it survives JPEG far
better than ``dwtDct``), on the U (blue-difference) channel at twice the library's default
strength: ``bench/watermark_survival.py`` measures both strengths side by side after
Telegram-like recompression and a 50% resize.

Payload: a job id is 12 hex characters, 48 bits, so the watermark holds the id itself. Random
bits read from a picture without our mark name a job that does not exist (2^48 ids), so a
decoded id counts only when the store knows it (:func:`read_job_id`'s ``known``).

The method needs at least 256 x 256 pixels (area); smaller pictures (the tiny demo pipeline's
64 px ones) get no watermark and their recipe says so.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import cv2
import numpy as np
import PIL.Image
from imwatermark import WatermarkDecoder, WatermarkEncoder

__all__ = ["METHOD", "MIN_PIXELS", "PAYLOAD_BITS", "SCALES", "embed", "fits", "read_job_id",
           "why_not"]

METHOD = "dwtDctSvd"
#: Strength per YUV channel (Y, U); the library's default is (0, 36).
SCALES = (0, 72)
PAYLOAD_BITS = 48
MIN_PIXELS = 256 * 256
#: Sides the models render (demo and real), tried when a picture was resized after posting.
KNOWN_SIDES = (256, 384, 512, 640, 768, 1024, 1280, 1536, 2048)


def fits(width: int, height: int) -> bool:
    return width * height >= MIN_PIXELS


def why_not(width: int, height: int) -> str:
    return (f"no invisible watermark: {width}x{height} px is below the 256x256 px the "
            f"{METHOD} watermark needs")


def _payload(job_id: str) -> bytes:
    data = bytes.fromhex(job_id)
    if len(data) * 8 != PAYLOAD_BITS:
        raise ValueError(f"job id {job_id!r} is not {PAYLOAD_BITS // 4} hex characters")
    return data


def embed(image: PIL.Image.Image, job_id: str, *, scales: tuple[int, int] = SCALES
          ) -> PIL.Image.Image:
    """``image`` with ``job_id`` watermarked into it (RGB). The caller checks :func:`fits`."""
    encoder = WatermarkEncoder()
    encoder.set_watermark("bytes", _payload(job_id))
    bgr = cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2BGR)
    marked = encoder.encode(bgr, METHOD, scales=list(scales) + [0])
    return PIL.Image.fromarray(cv2.cvtColor(marked, cv2.COLOR_BGR2RGB))


def _decode(bgr: np.ndarray, scales: tuple[int, int]) -> str:
    decoder = WatermarkDecoder("bytes", PAYLOAD_BITS)
    return bytes(decoder.decode(bgr, METHOD, scales=list(scales) + [0])).hex()


#: Scaling a picture back up by more than this finds nothing the original size would not.
MAX_UPSCALE = 2.0


def _candidates(width: int, height: int) -> Iterable[tuple[int, int]]:
    """The picture as it is, then scaled back to each side the models render (largest side),
    up to twice its size (a 50% resize; Telegram's 1280 px cap on a 2048 px picture)."""
    yield width, height
    for side in KNOWN_SIDES:
        scale = side / max(width, height)
        size = round(width * scale), round(height * scale)
        if size != (width, height) and fits(*size) and scale <= MAX_UPSCALE:
            yield size


def read_job_id(image: PIL.Image.Image, known: Callable[[str], bool], *,
                scales: tuple[int, int] = SCALES) -> str | None:
    """The job id watermarked into ``image``, if ``known`` says it is a real job.

    A picture a chat app made smaller is scaled back to each size the models render and read
    again; the first id ``known`` accepts wins.
    """
    bgr = cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2BGR)
    height, width = bgr.shape[:2]
    for size in _candidates(width, height):
        if not fits(*size):
            continue
        resized = bgr if size == (width, height) else cv2.resize(
            bgr, size, interpolation=cv2.INTER_CUBIC)
        job_id = _decode(resized, scales)
        if known(job_id):
            return job_id
    return None
