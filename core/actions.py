"""The buttons under results: one vocabulary, defined once, rendered by every platform.

An action travels as ``action:job_id`` (Telegram ``callback_data`` <= 64 bytes, Discord
``custom_id`` <= 100 characters); everything else stays server-side, so a button works after a
restart. Which result carries which buttons is decided here (:func:`buttons_for`); deliverers
only lay them out (Telegram: rows of 3, Discord: rows of 5).
"""

from __future__ import annotations

import re

from core.outbound import Button

__all__ = [
    "ACTION_PATTERN",
    "ASK_PREFIX",
    "LABELS",
    "QUIET_ACTIONS",
    "buttons_for",
    "is_action",
    "label",
]

LABELS: dict[str, str] = {
    "reroll": "🔁 Reroll",
    "more": "✨ More like this",
    "upscale": "⬆️ Bigger",
    "refine": "✏️ Refine",
    "why": "❓ Why this?",
    "up": "👍",
    "down": "👎",
    "delete": "🗑️",
    "ideas": "💡 More ideas",
    "original": "📎 Original file",
}
#: ``varyN`` redraws picture N; ``pickN`` renders brainstorm idea N; ``as-INTENT`` answers the
#: "what did you mean?" question for a message the bot could not place.
ASK_PREFIX = "as-"
ACTION_PATTERN = re.compile(r"(?:reroll|more|upscale|refine|why|up|down|delete|ideas|original|"
                            r"vary[1-9]|pick[1-9]|as-(?:imagine|write|story|brainstorm))")
#: Buttons answered privately that make no new job (platforms acknowledge them quietly).
QUIET_ACTIONS = frozenset({"delete", "up", "down", "why"})
#: Variation buttons offered under a picture result.
VARIATIONS_SHOWN = 2


def is_action(action: str) -> bool:
    return bool(ACTION_PATTERN.fullmatch(action))


def label(action: str) -> str:
    """A button's label, from its action alone (adapters that keep only ``action:job_id``)."""
    if action.startswith("vary"):
        return f"V{action[4:]}"
    if action.startswith("pick"):
        return action[4:]
    if action.startswith(ASK_PREFIX):
        from core.understanding import ASK_CHOICES

        return dict(ASK_CHOICES).get(action[len(ASK_PREFIX):], action)
    return LABELS.get(action, action)


def _make(job_id: str, actions: list[str]) -> tuple[Button, ...]:
    out = []
    for action in actions:
        if action.startswith("vary"):
            label = f"V{action[4:]}"
        else:
            label = LABELS[action]
        out.append(Button(action, label, job_id))
    return tuple(out)


def buttons_for(job_id: str, *, kind: str, intent: str, ideas: int = 0) -> tuple[Button, ...]:
    """The buttons a result of this kind carries, in display order.

    Args:
        kind: the job's kind ("image" or "text").
        intent: the job's intent ("imagine", "story", "scene", "brainstorm", ...).
        ideas: brainstorm ideas listed (one pick button each).
    """
    if intent == "brainstorm":
        return (*(Button(f"pick{n}", str(n), job_id) for n in range(1, ideas + 1)),
                *_make(job_id, ["ideas", "why"]))
    if intent == "story":
        return _make(job_id, ["reroll", "why", "up", "down"])
    if intent == "scene":  # a story's picture: its original file too (see below)
        return _make(job_id, ["refine", "why", "original", "up", "down"])
    if kind == "image":
        # Two variations even of one picture: V1 and V2 move it with different seeds.
        variations = [f"vary{n}" for n in range(1, VARIATIONS_SHOWN + 1)]
        # "original": the PNG as a file, whose signed manifest survives where photos do not.
        return _make(job_id, ["reroll", *variations, "upscale", "more", "refine", "why",
                              "original", "up", "down", "delete"])
    return _make(job_id, ["reroll", "more", "refine", "why", "up", "down", "delete"])
