"""Intent parsing: pure functions from what a person typed to what they want.

Nothing here does I/O, so every rule is a unit test away. Bad input raises a ``UserInputError``
whose text is the answer the person sees.
"""

from __future__ import annotations

import difflib
import enum
import re
import shlex
from dataclasses import dataclass, field
from typing import Any

from core.errors import PromptError, UnknownCommandError

__all__ = [
    "ASPECTS",
    "COMMANDS",
    "IMAGE_COUNT_MAX",
    "Intent",
    "IntentKind",
    "parse_command",
    "parse_text",
]

IMAGE_COUNT_MAX = 4
SEED_MAX = 2**32 - 1
#: Picture shapes ``--aspect`` accepts (slash-command adapters offer them as choices).
ASPECTS = ("square", "portrait", "landscape")
#: Longest free-form ``--style`` / ``--mode`` value, in characters.
WORD_OPTION_MAX_CHARS = 40


class IntentKind(enum.StrEnum):
    IMAGINE = "imagine"
    WRITE = "write"
    HELP = "help"
    PROFILE = "profile"
    SETTINGS = "settings"
    FORGET = "forget"
    LINK = "link"


@dataclass(frozen=True, slots=True)
class Intent:
    """What a person asked for. ``options`` holds typed extras such as ``count`` and ``seed``."""

    kind: IntentKind
    prompt: str = ""
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def makes_job(self) -> bool:
        return self.kind in (IntentKind.IMAGINE, IntentKind.WRITE)


#: Command name -> (intent, one-line help). Aliases point at the same intent.
COMMANDS: dict[str, tuple[IntentKind, str]] = {
    "imagine": (IntentKind.IMAGINE, "draw a picture: /imagine a lighthouse at dusk"),
    "draw": (IntentKind.IMAGINE, "same as /imagine"),
    "write": (IntentKind.WRITE, "write text: /write a haiku about rain"),
    "help": (IntentKind.HELP, "what I can do"),
    "start": (IntentKind.HELP, "same as /help"),
    "profile": (IntentKind.PROFILE, "what I have learned about your taste"),
    "settings": (IntentKind.SETTINGS, "learning on|off for you; admins: emoji 🎉 positive|negative|neutral"),
    "forget": (IntentKind.FORGET, "/forget feedback erases your reactions and what I learned from them"),
    "link": (IntentKind.LINK, "link your identities on two platforms: /link, then /link CODE on the other"),
}

#: Intents whose argument is a free-form instruction rather than a creative prompt.
_PLAIN_ARGUMENT_KINDS = frozenset({IntentKind.SETTINGS, IntentKind.FORGET, IntentKind.LINK})

_IMAGE_WORDS = re.compile(
    r"^\s*(please\s+)?(draw|paint|sketch|imagine|render|picture of|image of|illustrate|"
    r"show me (a|an) (picture|image|drawing) of)\b",
    re.IGNORECASE,
)
_COMMAND = re.compile(r"^/(?P<name>[A-Za-z0-9_]+)(?:@(?P<bot>[A-Za-z0-9_]+))?(?:\s+|$)(?P<rest>.*)$", re.S)


def help_text() -> str:
    lines = ["I make pictures and text with you. Commands:"]
    for name, (_, line) in COMMANDS.items():
        lines.append(f"/{name}: {line}")
    lines.append("Or just talk to me. React to a result (👍 👎 ❤️ ...) and I learn your taste.")
    return "\n".join(lines)


def _check_prompt(prompt: str, kind: IntentKind, max_chars: int) -> str:
    prompt = " ".join(prompt.split())
    if not prompt:
        example = "/imagine a lighthouse at dusk" if kind is IntentKind.IMAGINE else (
            "/write a haiku about rain"
        )
        raise PromptError(f"Your request is empty. Tell me what you'd like, for example: {example}")
    if len(prompt) > max_chars:
        raise PromptError(
            f"Your prompt is {len(prompt):,} characters long; I take at most {max_chars:,}. "
            "Please shorten it and send it again."
        )
    return prompt


def _pop_options(text: str, kind: IntentKind) -> tuple[str, dict[str, Any]]:
    """Split trailing ``--count 2 --seed 7`` style options off a text command."""
    if "--" not in text:
        return text, {}
    head, sep, tail = text.partition(" --")
    if not sep and text.startswith("--"):
        head, tail = "", text[2:]
    try:
        tokens = shlex.split("--" + tail)
    except ValueError:
        return text, {}
    options: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--"):
            raise PromptError(f"I didn't understand '{token}'. Options go last, like --count 2.")
        name = token[2:].replace("-", "_")
        value = tokens[i + 1] if i + 1 < len(tokens) else None
        if value is None:
            raise PromptError(f"The option --{name} needs a value, like --{name} 2.")
        options[name] = value
        i += 2
    return head, _typed_options(options, kind)


def _typed_options(raw: dict[str, Any], kind: IntentKind) -> dict[str, Any]:
    allowed = ({"count", "n", "seed", "style", "aspect"} if kind is IntentKind.IMAGINE
               else {"seed", "mode"})
    options: dict[str, Any] = {}
    for name, value in raw.items():
        if value is None:
            continue
        if name not in allowed:
            known = ", ".join(f"--{a}" for a in sorted(allowed))
            raise PromptError(f"/{kind.value} has no option --{name}. It takes: {known}.")
        if name in ("style", "aspect", "mode"):
            # Words, not numbers: carried in the job's intent options for the pipelines to use.
            word = " ".join(str(value).split()).lower()
            if not word or len(word) > WORD_OPTION_MAX_CHARS:
                raise PromptError(f"--{name} must be a word or two (at most "
                                  f"{WORD_OPTION_MAX_CHARS} characters).")
            if name == "aspect" and word not in ASPECTS:
                raise PromptError(f"--aspect must be one of: {', '.join(ASPECTS)}.")
            options[name] = word
            continue
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise PromptError(f"--{name} must be a whole number, not '{value}'.") from None
        if name in ("count", "n"):
            if not 1 <= number <= IMAGE_COUNT_MAX:
                raise PromptError(f"--count must be between 1 and {IMAGE_COUNT_MAX}.")
            options["count"] = number
        elif name == "seed":
            if not 0 <= number <= SEED_MAX:
                raise PromptError(f"--seed must be between 0 and {SEED_MAX}.")
            options["seed"] = number
    return options


def parse_command(name: str, args: dict[str, Any], *, max_prompt_chars: int) -> Intent:
    """Turn a command and its typed arguments (slash commands, or parsed text) into an Intent.

    Raises:
        UnknownCommandError: the name is not a command; the message suggests the nearest one.
        PromptError: the prompt or an option is unusable.
    """
    name = name.lower()
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        hint = f" Did you mean /{close[0]}?" if close else ""
        raise UnknownCommandError(f"I don't know the command /{name}.{hint} Send /help for the list.")
    kind = COMMANDS[name][0]
    if kind in (IntentKind.HELP, IntentKind.PROFILE):
        return Intent(kind)
    if kind in _PLAIN_ARGUMENT_KINDS:
        return Intent(kind, " ".join(str(args.get("prompt") or "").split())[:max_prompt_chars])
    prompt = _check_prompt(str(args.get("prompt") or ""), kind, max_prompt_chars)
    options = _typed_options({k: v for k, v in args.items() if k != "prompt"}, kind)
    return Intent(kind, prompt, options)


def parse_text(text: str, *, max_prompt_chars: int, bot_username: str | None = None) -> Intent:
    """Parse a chat message: a ``/command`` (``/cmd@bot`` in groups) or free text.

    Free text that reads like a request for a picture ("draw a fox") becomes ``imagine``;
    anything else is answered by the text model, so a person is never met with silence.
    """
    stripped = text.strip()
    match = _COMMAND.match(stripped)
    if match:
        if bot_username and match["bot"] and match["bot"].lower() != bot_username.lower():
            raise UnknownCommandError(f"That command was for @{match['bot']}, not me.")
        name = match["name"].lower()
        kind = COMMANDS.get(name, (None, ""))[0]
        rest = match["rest"]
        options: dict[str, Any] = {}
        if kind is not None and kind.value in ("imagine", "write"):
            rest, options = _pop_options(rest, kind)
        return parse_command(name, {"prompt": rest, **options}, max_prompt_chars=max_prompt_chars)
    if not stripped:
        raise PromptError("Your message is empty. Send /help to see what I can do.")
    if _IMAGE_WORDS.match(stripped):
        prompt = _IMAGE_WORDS.sub("", stripped, count=1)
        return Intent(IntentKind.IMAGINE, _check_prompt(prompt, IntentKind.IMAGINE, max_prompt_chars))
    return Intent(IntentKind.WRITE, _check_prompt(stripped, IntentKind.WRITE, max_prompt_chars))
