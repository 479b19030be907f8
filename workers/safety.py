"""The picture safety check: a detector runs on every rendered picture before it is kept.

The default detector is NudeNet's (its ONNX model ships inside the ``nudenet`` wheel; it runs on
CPU through onnxruntime and never touches the network). Which detections block a picture under
which policy is :func:`core.safety.picture_verdict`. ``MUSESPARK_PICTURE_DETECTOR`` may name
another detector as ``module:function`` taking a PIL image and returning NudeNet-style
``[{"class": ..., "score": ...}]`` detections (the tests use that for a stand-in, because the
tiny demo pipeline draws noise that no real detector flags).
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import PIL.Image

from core import safety
from core.errors import ConfigurationError

__all__ = ["Detections", "blocked_class", "detector"]

log = logging.getLogger(__name__)

Detections = list[dict[str, Any]]
_lock = threading.Lock()
_detectors: dict[str, Callable[[PIL.Image.Image], Detections]] = {}


def _nudenet() -> Callable[[PIL.Image.Image], Detections]:
    import numpy as np
    from nudenet import NudeDetector  # type: ignore[import-untyped]

    model = NudeDetector()  # the 320n ONNX model bundled with the wheel; CPU provider

    def detect(image: PIL.Image.Image) -> Detections:
        bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
        return [dict(found) for found in model.detect(bgr)]

    return detect


def detector(name: str) -> Callable[[PIL.Image.Image], Detections]:
    """The detector ``name`` (``nudenet`` or ``module:function``), loaded once per process."""
    with _lock:
        if name not in _detectors:
            if name == "nudenet":
                _detectors[name] = _nudenet()
            else:
                module, _, function = name.partition(":")
                try:
                    _detectors[name] = getattr(importlib.import_module(module), function)
                except (ImportError, AttributeError, ValueError) as exc:
                    raise ConfigurationError(
                        f"MUSESPARK_PICTURE_DETECTOR={name!r} cannot be loaded: {exc}") from exc
        return _detectors[name]


def blocked_class(images: Sequence[PIL.Image.Image], policy: str,
                  detector_name: str) -> str | None:
    """The detector class that keeps one of ``images`` from being posted, or None."""
    if policy not in safety.PICTURE_RULES:
        return None
    detect = detector(detector_name)
    for image in images:
        verdict = safety.picture_verdict(detect(image), policy)
        if verdict is not None:
            return verdict
    return None
