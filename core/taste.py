"""Taste: what reactions mean, how they move profiles, and how the next result is chosen.

Everything here is pure (values in, values out), so the live path, the rebuild from the feedback
log, the tests and the simulated-users benchmark all run the same code.

The learner is factorised Thompson sampling. A result is described by a few independent
*dimensions* (for images: style, guidance, aspect; for text: tone, length, form), each
with a handful of named values. Every value keeps a Beta(alpha, beta) posterior of "people like
this". To choose, we draw one sample per value and take the best value of each dimension.

Why this learner, and not a contextual bandit over whole combinations:

* Data is scarce: a person reacts to a few results a day. 8 styles x 3 x 3 combinations
  would need hundreds of reactions to rank; factorised, 20 reactions already separate the best
  style of 8 because every reaction informs one value in *each* dimension.
* Exploration is automatic and fades by itself: a value with little evidence has a wide
  posterior and is sometimes drawn high; a value with much evidence is not. Controlled further
  by :data:`EXPLORATION` (posterior counts are scaled before sampling: >1 explores less).
* Priors compose: a newcomer's posterior starts from the community's counts (shrunk to at most
  :data:`COMMUNITY_PRIOR_WEIGHT` pseudo-reactions per value), so a person inherits their
  community's taste and their own reactions take over quickly.
* Profiles are plain sums of weighted signals, so they are rebuildable from the append-only
  log and identical to the live ones (a test checks this). A removed reaction subtracts exactly
  what it added (:attr:`Signal.retract`).

Takes: why a picture request renders two styles side by side.

One 👍 or 👎 on one result carries about one bit, and it is shared by every dimension of that
result. ``bench/simulated_users.py`` shows what that costs: with one result per request the
learner reaches about 70% of an oracle's acceptance after 20 reactions, and no variant we tried
(stronger or empirical-Bayes community priors, less exploration, a hierarchical Bayesian linear
model over all dimensions) did better than a few points; even a learner that knows the hidden
norms reaches only 79% with Thompson sampling. So a request for a picture renders
:data:`~core.settings.Settings.image_takes` takes in *different styles* (the rest shared), as
image bots have long shown a grid to choose from. The first take is the Thompson draw; the others
are the best draws with another style ("top-two Thompson sampling", Russo 2016), so the pair is
both a good bet and a useful comparison. A 👍 on one take then also says "not the other style"
(:data:`PASSED_OVER_WEIGHT` per sibling, the pairwise signal Midjourney-style ranking uses): the
same single reaction now ranks two styles against each other.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CATALOGUE",
    "DEFAULT_EMOJI_MEANINGS",
    "Choice",
    "Posterior",
    "Signal",
    "apply_signal",
    "choose",
    "choose_takes",
    "describe",
    "emoji_meaning",
    "expand_prompt",
    "signal_weight",
]

#: Dimensions and values per job kind. Style values carry the words added to the prompt.
CATALOGUE: dict[str, dict[str, dict[str, Any]]] = {
    "image": {
        "style": {
            "photographic": {"prompt": "photograph, natural light, sharp focus"},
            "watercolor": {"prompt": "watercolor painting, soft washes, paper texture"},
            "anime": {"prompt": "anime illustration, clean lines, vibrant colors"},
            "oil-painting": {"prompt": "oil painting, visible brush strokes, rich color"},
            "pixel-art": {"prompt": "pixel art, 16-bit, crisp pixels"},
            "line-art": {"prompt": "ink line art, black and white, minimal"},
            "3d-render": {"prompt": "3d render, soft global illumination, octane"},
            "cinematic": {"prompt": "cinematic still, dramatic lighting, film grain"},
        },
        "guidance": {"loose": {"scale": 0.6}, "balanced": {"scale": 1.0},
                     "strict": {"scale": 1.4}},
        "aspect": {"square": {"ratio": (1, 1)}, "portrait": {"ratio": (3, 4)},
                   "landscape": {"ratio": (4, 3)}},
        # Times the model family's usual number of denoising steps.
        "steps": {"quick": {"factor": 0.5}, "usual": {"factor": 1.0},
                  "detailed": {"factor": 1.5}},
        # How far a variation (V1, V2) moves from its picture: image-to-image strength.
        # Chosen, and learned, only for variations (see VARIATION_ONLY).
        "variation": {"subtle": {"strength": 0.35}, "medium": {"strength": 0.6},
                      "bold": {"strength": 0.85}},
    },
    "text": {
        "tone": {
            "playful": {"prompt": "Use a playful, light-hearted tone."},
            "earnest": {"prompt": "Use a sincere, heartfelt tone."},
            "dark": {"prompt": "Use a moody, dark tone."},
            "whimsical": {"prompt": "Use a whimsical, fairy-tale tone."},
        },
        "length": {"short": {"tokens": 0.5, "prompt": "Keep it very short."},
                   "medium": {"tokens": 1.0, "prompt": ""},
                   "long": {"tokens": 1.5, "prompt": "Take your time; be generous."}},
        "form": {"prose": {"prompt": "Write in prose."}, "verse": {"prompt": "Write in verse."},
                 "list": {"prompt": "Write it as a short list."}},
    },
}

#: Default meaning of reactions: +1 positive, -1 negative. Others mean nothing.
DEFAULT_EMOJI_MEANINGS: dict[str, int] = {
    **{e: 1 for e in ("👍", "❤️", "❤", "🔥", "😍", "⭐", "🌟", "👏", "🥰", "💯", "🎉")},
    **{e: -1 for e in ("👎", "😐", "💩", "🤮", "😴", "🙄")},
}
BUTTON_MEANINGS: dict[str, int] = {"up": 1, "more": 1, "down": -1, "reroll": -1,
                                   "report": -1, **{f"pick{n}": 1 for n in range(1, 10)}}

#: How much a reaction counts, by who made it.
REQUESTER_WEIGHT = 1.0
BYSTANDER_WEIGHT = 0.4
ANONYMOUS_WEIGHT = 0.25  # one anonymous count (Telegram), community only
#: Reroll says "not this one" weakly: people reroll to explore too.
REROLL_WEIGHT = 0.5
#: An admin's or moderator's report (🚩) is strong evidence against what was made: three times
#: a requester's own 👎, whoever made it.
REPORT_WEIGHT = 3.0
#: The most one actor can move one profile in an hour (sum of |weights|).
HOURLY_CAP = 6.0
#: A newcomer's prior from the community: at most this many pseudo-reactions per value.
COMMUNITY_PRIOR_WEIGHT = 25.0
#: Posterior counts are multiplied by this before sampling (>1: exploit more).
EXPLORATION = 2.0
#: A positive signal on one take counts this much (times its weight) against each other take's
#: differing values: "this one rather than that one".
PASSED_OVER_WEIGHT = 0.5
#: Dimensions that only mean something for variations: other jobs neither choose nor learn them.
VARIATION_ONLY = frozenset({"variation"})
#: The dimension whose value differs between the takes of one request.
LEAD_DIMENSION = {"image": "style", "text": "tone"}


def emoji_meaning(emoji: str, overrides: Mapping[str, int] | None = None) -> int:
    """+1, -1 or 0 for an emoji, with a community's overrides taking precedence."""
    if overrides and emoji in overrides:
        return int(overrides[emoji])
    return DEFAULT_EMOJI_MEANINGS.get(emoji, DEFAULT_EMOJI_MEANINGS.get(emoji.rstrip("\ufe0f"), 0))


def signal_weight(*, is_requester: bool, anonymous: bool = False, button: str | None = None) -> float:
    if anonymous:
        return ANONYMOUS_WEIGHT
    if button == "report":
        return REPORT_WEIGHT
    weight = REQUESTER_WEIGHT if is_requester else BYSTANDER_WEIGHT
    return weight * (REROLL_WEIGHT if button == "reroll" else 1.0)


@dataclass(frozen=True, slots=True)
class Signal:
    """One piece of evidence about one job's choice: ``value`` is +weight or -weight.

    ``retract`` marks the removal of earlier evidence (a reaction taken back): its ``value`` is
    minus what was applied, and the counts it added are subtracted again. ``contrast`` holds the
    choices of the request's other takes; a positive signal also counts against their values
    where they differ from this one (see :data:`PASSED_OVER_WEIGHT`).
    """

    kind: str  # job kind: "image" | "text"
    choice: Mapping[str, str]
    value: float
    retract: bool = False
    contrast: tuple[Mapping[str, str], ...] = ()


#: Profile stats: dimension -> value -> [alpha_evidence, beta_evidence] (without the prior).
Posterior = dict[str, dict[str, list[float]]]


def apply_signal(stats: Posterior, signal: Signal) -> Posterior:
    """Add a signal's evidence to ``stats`` (a new dict; the input is left alone).

    A signal adds ``|value|`` to the liked (positive) or disliked (negative) count of each value
    it names; a retraction subtracts from the count the original signal added, so a reaction
    and its removal leave the stats as they were.
    """
    out = {dim: {val: list(ab) for val, ab in vals.items()} for dim, vals in stats.items()}
    catalogue = CATALOGUE[signal.kind]
    # The sense of the evidence this signal adds (or, retracted, takes back).
    positive = (signal.value > 0) != signal.retract
    amount = abs(signal.value) * (-1.0 if signal.retract else 1.0)

    def add(dim: str, val: str, slot: int, how_much: float) -> None:
        if dim in catalogue and val in catalogue[dim]:
            ab = out.setdefault(dim, {}).setdefault(val, [0.0, 0.0])
            ab[slot] = max(0.0, ab[slot] + how_much)  # max: float dust after exact undo

    for dim, val in signal.choice.items():
        add(dim, val, 0 if positive else 1, amount)
    if positive:
        for other in signal.contrast:
            for dim, val in other.items():
                if signal.choice.get(dim) != val:
                    add(dim, val, 1, amount * PASSED_OVER_WEIGHT)
    return out


def _shrunk(stats: Posterior, limit: float) -> Posterior:
    out: Posterior = {}
    for dim, vals in stats.items():
        for val, (a, b) in vals.items():
            total = a + b
            scale = min(1.0, limit / total) if total else 0.0
            out.setdefault(dim, {})[val] = [a * scale, b * scale]
    return out


def _merged(own: Posterior, prior: Posterior) -> Posterior:
    out = {dim: {val: list(ab) for val, ab in vals.items()} for dim, vals in prior.items()}
    for dim, vals in own.items():
        for val, (a, b) in vals.items():
            ab = out.setdefault(dim, {}).setdefault(val, [0.0, 0.0])
            ab[0] += a
            ab[1] += b
    return out


@dataclass(frozen=True, slots=True)
class Choice:
    """What was chosen for a job, and why (shown by the "why this?" button)."""

    values: dict[str, str]
    why: str
    learned: bool
    expected: dict[str, float] = field(default_factory=dict)


def _dimensions(kind: str, variation: bool) -> dict[str, dict[str, dict[str, Any]]]:
    return {dim: vals for dim, vals in CATALOGUE[kind].items()
            if variation or dim not in VARIATION_ONLY}


def choose(kind: str, own: Posterior | None, community: Posterior | None, *, rng: random.Random,
           learning: bool = True, fixed: Mapping[str, str] | None = None,
           variation: bool = False) -> Choice:
    """Pick one value per dimension by Thompson sampling (or uniformly when learning is off).

    ``fixed`` values (e.g. a style the person asked for) are kept as they are. The
    :data:`VARIATION_ONLY` dimensions are chosen only when ``variation`` is true.
    """
    fixed = {d: v for d, v in (fixed or {}).items() if variation or d not in VARIATION_ONLY}
    dimensions = _dimensions(kind, variation)
    if not learning:
        values = {dim: fixed.get(dim) or rng.choice(sorted(vals))
                  for dim, vals in dimensions.items()}
        return Choice(values, "learning is off, so I picked at random", learned=False)
    stats = _posterior(own, community)
    values, expected = {}, {}
    for dim, vals in dimensions.items():
        if dim in fixed and fixed[dim] in vals:
            values[dim] = fixed[dim]
            continue
        values[dim] = _thompson(stats, dim, vals, rng)
        expected[dim] = _liked(stats, dim, values[dim])
    own_n = sum(a + b for vals in (own or {}).values() for a, b in vals.values())
    community_n = sum(a + b for vals in (community or {}).values() for a, b in vals.values())
    return Choice(values, _why(kind, values, stats, own_n, community_n, fixed), True, expected)


def choose_takes(kind: str, own: Posterior | None, community: Posterior | None, *,
                 rng: random.Random, takes: int, learning: bool = True,
                 fixed: Mapping[str, str] | None = None, variation: bool = False,
                 beside_fixed: bool = False) -> list[Choice]:
    """``takes`` choices for one request that differ in the lead dimension (style, tone).

    The first is an ordinary Thompson draw. Each further take keeps the first one's other values
    and takes the lead value of the best further draw that is not yet among the takes (top-two
    Thompson sampling); if draws keep repeating, the best untried value by posterior mean.
    A fixed lead value (the person named a style) gives one take, unless ``beside_fixed``: a
    picked brainstorm idea comes in its own style and, beside it, another one.
    """
    first = choose(kind, own, community, rng=rng, learning=learning, fixed=fixed,
                   variation=variation)
    lead = LEAD_DIMENSION[kind]
    values = sorted(CATALOGUE[kind][lead])
    out = [first]
    if fixed and lead in fixed and not beside_fixed:
        return out  # the person named the style: one take of it
    stats = _posterior(own, community)
    for _ in range(min(takes, len(values)) - 1):
        used = {c.values[lead] for c in out}
        unused = [v for v in values if v not in used]
        if not learning:
            pick = rng.choice(unused)
        else:
            draws = (_thompson(stats, lead, values, rng) for _attempt in range(20))
            pick = next((v for v in draws if v not in used), None) or max(
                unused, key=lambda v: _liked(stats, lead, v))
        take = {**first.values, lead: pick}
        why = (f"{lead} {pick}: take {len(out) + 1} of {takes}, another {lead} beside "
               f"{first.values[lead]} so you can pick the one you like; "
               + ", ".join(f"{d} {v}" for d, v in take.items() if d != lead))
        out.append(Choice(take, why, first.learned, dict(first.expected)))
    return out


def _posterior(own: Posterior | None, community: Posterior | None) -> Posterior:
    """A person's own evidence on top of their community's, shrunk to a prior."""
    return _merged(own or {}, _shrunk(community or {}, COMMUNITY_PRIOR_WEIGHT))


def _liked(stats: Posterior, dim: str, val: str) -> float:
    """The posterior mean share of likes (uniform prior)."""
    a, b = stats.get(dim, {}).get(val, [0.0, 0.0])
    return (1.0 + a) / (2.0 + a + b)


def _thompson(stats: Posterior, dim: str, vals: Iterable[str], rng: random.Random) -> str:
    """The value with the highest posterior draw (counts scaled by :data:`EXPLORATION`)."""
    best, best_draw = "", -1.0
    for val in sorted(vals):
        a, b = stats.get(dim, {}).get(val, [0.0, 0.0])
        draw = rng.betavariate(1.0 + a * EXPLORATION, 1.0 + b * EXPLORATION)
        if draw > best_draw:
            best, best_draw = val, draw
    return best


def _why(kind: str, values: Mapping[str, str], stats: Posterior, own_n: float,
         community_n: float, fixed: Mapping[str, str]) -> str:
    parts = []
    lead = LEAD_DIMENSION[kind]
    lead_value = values[lead]
    if lead in fixed:
        parts.append(f"{lead} {lead_value}: you asked for it")
    elif sum(stats.get(lead, {}).get(lead_value, [0.0, 0.0])) < 1:
        parts.append(f"{lead} {lead_value}: trying something new (no reactions on it yet)")
    else:
        liked = _liked(stats, lead, lead_value)
        parts.append(f"{lead} {lead_value}: liked {liked:.0%} of the time so far")
    source = ("your reactions" if own_n >= 1 else "") + (
        " and your community's" if community_n >= 1 and own_n >= 1 else
        "your community's reactions" if community_n >= 1 else "")
    rest = ", ".join(f"{d} {v}" for d, v in values.items() if d != lead)
    parts.append(rest)
    if source:
        parts.append(f"learned from {source}")
    else:
        parts.append("nobody has reacted yet, so I am exploring")
    return "; ".join(p for p in parts if p)


def generation_params(kind: str, values: Mapping[str, str]) -> dict[str, Any]:
    """The numeric generation parameters a choice stands for (recorded with the job)."""
    dims = CATALOGUE[kind]
    if kind == "image":
        params = {"style": values["style"],
                  "guidance_factor": dims["guidance"][values["guidance"]]["scale"],
                  "aspect": values["aspect"],
                  "aspect_ratio": list(dims["aspect"][values["aspect"]]["ratio"]),
                  "steps_factor": dims["steps"][values.get("steps", "usual")]["factor"]}
        if "variation" in values:
            params["variation_strength"] = dims["variation"][values["variation"]]["strength"]
        return params
    return {"tone": values["tone"], "form": values["form"], "length": values["length"],
            "length_factor": dims["length"][values["length"]]["tokens"]}


def expand_prompt(kind: str, prompt: str, values: Mapping[str, str]) -> str:
    """The prompt the model sees: the person's words plus the chosen style's words."""
    if kind == "image":
        words = CATALOGUE["image"]["style"][values["style"]]["prompt"]
        return f"{prompt}, {words}"
    hints = [CATALOGUE["text"][dim][values[dim]]["prompt"] for dim in ("tone", "form", "length")]
    return " ".join([prompt.rstrip(".") + "."] + [h for h in hints if h])


def describe(kind: str, stats: Posterior) -> list[tuple[str, str, float, float]]:
    """(dimension, value, liked share, evidence) rows, best first within each dimension."""
    rows = []
    for dim, vals in CATALOGUE[kind].items():
        for val in vals:
            rows.append((dim, val, _liked(stats, dim, val),
                         sum(stats.get(dim, {}).get(val, [0.0, 0.0]))))
    rows.sort(key=lambda r: (list(CATALOGUE[kind]).index(r[0]), -r[2]))
    return rows


def evidence(stats: Posterior) -> float:
    return math.fsum(a + b for vals in stats.values() for a, b in vals.values())


