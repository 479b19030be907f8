"""The text model's half of reading free text (the rules' half is core/understanding.py).

The model scores every label that could complete a few-shot prompt (no sampling), and
:func:`core.understanding.combine` adds the rules' weak evidence. Shared by the worker
(``runner._understand``) and ``bench/intent_accuracy.py``, so the bench measures what runs.

Tried and left out: contextual calibration (dividing out the labels' probabilities for a
content-free "N/A" message, Zhao et al. 2021) made SmolLM2-135M worse on the labelled set
(help and text requests drifted to "ideas" and "picture").
"""

from __future__ import annotations

from typing import Any

from core.understanding import INTENTS, LABEL_WORDS, Understanding, combine, model_messages

__all__ = ["read"]


def read(generator: Any, text: str, *, replying: bool) -> Understanding:
    """What the model (with the rules' weak evidence) makes of a message."""
    logprobs = generator.score_choices(model_messages(text, replying=replying),
                                       {intent: LABEL_WORDS[intent] for intent in INTENTS})
    return combine(text, logprobs, replying=replying)
