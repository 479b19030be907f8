"""The picture detector the test deployments' workers run (``MUSESPARK_PICTURE_DETECTOR``).

NudeNet runs for real on every picture; to its findings this adds one stand-in detection, a
partly covered breast at score 0.4, because the tiny demo pipeline draws noise that no real
detector flags and a test must not ship explicit pictures. Under the ``standard`` policy that
finding does not block (only exposed parts do); under ``strict`` it does (covered parts from
0.35 on). So the tests see both a picture posted and a picture refused, on real workers.
"""

from __future__ import annotations

from typing import Any

import PIL.Image

from workers.safety import detector

STAND_IN = {"class": "FEMALE_BREAST_COVERED", "score": 0.4, "box": [0, 0, 8, 8]}


def detect(image: PIL.Image.Image) -> list[dict[str, Any]]:
    return [*detector("nudenet")(image), dict(STAND_IN)]
