"""Each community's safety policy: which prompts may become jobs and which pictures may be posted.

Pure functions; the orchestrator checks prompts before a job is made, the worker checks pictures
after rendering (``workers/safety.py`` runs the detector and asks :func:`picture_verdict`).

Policies (``/settings safety strict|standard|off``, admins only):

* ``standard`` (the default): prompts are checked against a maintained word list
  (better-profanity's, with its leetspeak variants) and the community's own blocked words;
  pictures in which the detector finds exposed intimate body parts are not posted.
* ``strict``: as standard, and pictures are also refused for covered intimate parts, at a lower
  detector score.
* ``off``: only the community's blocked words; pictures are not checked. On Discord ``off``
  counts only in channels marked age-restricted (a thread follows its parent channel); on
  Telegram only a chat's admin can set it.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

__all__ = [
    "BLOCKED_WORDS_MAX",
    "BLOCKED_WORD_MAX_CHARS",
    "DEFAULT_POLICY",
    "PICTURE_RULES",
    "POLICIES",
    "blocked_word_in",
    "effective_policy",
    "normalize_blocked_word",
    "picture_verdict",
    "prompt_verdict",
]

POLICIES = ("strict", "standard", "off")
DEFAULT_POLICY = "standard"
#: A community's own list: at most this many words or phrases, each this long.
BLOCKED_WORDS_MAX = 200
BLOCKED_WORD_MAX_CHARS = 40

#: NudeNet classes that block a picture, and the least detector score that counts, per policy.
_EXPOSED = frozenset({"FEMALE_GENITALIA_EXPOSED", "MALE_GENITALIA_EXPOSED",
                      "FEMALE_BREAST_EXPOSED", "BUTTOCKS_EXPOSED", "ANUS_EXPOSED"})
_COVERED = frozenset({"FEMALE_GENITALIA_COVERED", "FEMALE_BREAST_COVERED", "BUTTOCKS_COVERED",
                      "ANUS_COVERED"})
PICTURE_RULES: dict[str, tuple[frozenset[str], float]] = {
    "standard": (_EXPOSED, 0.5),
    "strict": (_EXPOSED | _COVERED, 0.35),
}

_profanity_lock = threading.Lock()
_profanity_loaded = False


def effective_policy(community_settings: Mapping[str, Any] | None, *, platform: str,
                     nsfw: bool) -> str:
    """The policy a request here runs under: the community's, except that ``off`` on Discord
    counts only in an age-restricted channel (elsewhere it is ``standard``)."""
    policy = str((community_settings or {}).get("safety") or DEFAULT_POLICY)
    if policy not in POLICIES:
        policy = DEFAULT_POLICY
    if policy == "off" and platform == "discord" and not nsfw:
        return DEFAULT_POLICY
    return policy


def normalize_blocked_word(word: str) -> str:
    return " ".join(word.lower().split())


def blocked_word_in(text: str, words: Iterable[str]) -> str | None:
    """The first of the community's blocked ``words`` (whole words or phrases) in ``text``."""
    lowered = " ".join(text.lower().split())
    for word in words:
        if word and re.search(rf"(?<!\w){re.escape(word)}(?!\w)", lowered):
            return word
    return None


class _IndexedWords:
    """better-profanity's word set with a fast ``in``, and numbers left alone.

    The library tests each word of a prompt (and each run of up to five words) with ``in``
    against a list of about 900 ``VaryingString`` entries, comparing one by one: some 20 ms a
    prompt, the largest cost of taking a request. This keeps the same entries and the same
    comparison (the library's own ``VaryingString.__eq__``), but compares a string only with
    the entries whose variants can have its length, and remembers the answer per string.
    """

    def __init__(self, entries: list[Any]) -> None:
        self._entries = entries
        self._by_length: dict[int, list[Any]] = {}
        for entry in entries:
            for length in range(entry._min_len, entry._max_len + 1):
                self._by_length.setdefault(length, []).append(entry)
        self._seen: dict[str, bool] = {}

    def __contains__(self, word: object) -> bool:
        # A number is a number: the library's leetspeak variants read "455" as a swear word
        # (4 -> a, 5 -> s), which refused "draw 455 balloons". Digits next to letters ("a55",
        # "sh1t") are still read as the library reads them.
        if not isinstance(word, str) or not any(c.isalpha() for c in word):
            return False
        known = self._seen.get(word)
        if known is None:
            known = any(entry == word for entry in self._by_length.get(len(word), ()))
            if len(self._seen) >= _SEEN_MAX:
                self._seen.clear()
            self._seen[word] = known
        return known

    def __iter__(self) -> Iterator[Any]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


#: Strings whose verdict is remembered (then forgotten all at once).
_SEEN_MAX = 100_000


def _profane(text: str) -> bool:
    global _profanity_loaded
    from better_profanity import profanity  # type: ignore[import-untyped]

    with _profanity_lock:
        if not _profanity_loaded:
            profanity.load_censor_words()
            profanity.CENSOR_WORDSET = _IndexedWords(profanity.CENSOR_WORDSET)
            _profanity_loaded = True
        return bool(profanity.contains_profanity(text))


def prompt_verdict(prompt: str, policy: str, blocked_words: Sequence[str]) -> str | None:
    """Why ``prompt`` may not become a job here (plain words for the person), or None."""
    if blocked_word_in(prompt, blocked_words):
        return ("I can't make that here: your request contains a word this community's admins "
                "have blocked. Please rephrase it.")
    if policy != "off" and _profane(prompt):
        return (f"I can't make that here: this community's safety setting ({policy}) doesn't "
                "allow some of the words in your request. Please rephrase it.")
    return None


def picture_verdict(detections: Iterable[Mapping[str, Any]], policy: str) -> str | None:
    """The detector class that blocks a picture under ``policy`` (None: it may be posted).

    ``detections`` are NudeNet's: ``{"class": ..., "score": ...}`` mappings.
    """
    rule = PICTURE_RULES.get(policy)
    if rule is None:
        return None
    classes, threshold = rule
    for found in detections:
        if found.get("class") in classes and float(found.get("score", 0.0)) >= threshold:
            return str(found["class"])
    return None
