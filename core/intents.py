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
    "HIDDEN_COMMANDS",
    "IMAGE_COUNT_MAX",
    "JOB_KINDS",
    "SCENES_DEFAULT",
    "SCENES_MAX",
    "SCENES_MIN",
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
#: Scenes an illustrated story may have (``/story ... --scenes N``).
SCENES_MIN, SCENES_MAX, SCENES_DEFAULT = 2, 6, 4


class IntentKind(enum.StrEnum):
    IMAGINE = "imagine"
    WRITE = "write"
    STORY = "story"
    BRAINSTORM = "brainstorm"
    REMIX = "remix"
    #: A reply to a result that changes it (Telegram reply, Discord "Refine", /reply N).
    REFINE = "refine"
    #: Free text the rules could not place: the text model reads it (see core/understanding).
    UNDERSTAND = "understand"
    HELP = "help"
    PROFILE = "profile"
    SETTINGS = "settings"
    FORGET = "forget"
    LINK = "link"
    #: Where a picture comes from (reply to it, or attach it): a worker reads its provenance.
    VERIFY = "verify"
    #: A zip of everything kept about the person, sent privately.
    MYDATA = "mydata"
    #: A private sign-in link to the community's gallery and dashboard in a browser.
    WEB = "web"


@dataclass(frozen=True, slots=True)
class Intent:
    """What a person asked for. ``options`` holds typed extras such as ``count`` and ``seed``."""

    kind: IntentKind
    prompt: str = ""
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def makes_job(self) -> bool:
        return self.kind in JOB_KINDS


#: Intents that become jobs for the workers.
JOB_KINDS = frozenset({IntentKind.IMAGINE, IntentKind.WRITE, IntentKind.STORY,
                       IntentKind.BRAINSTORM, IntentKind.REMIX, IntentKind.REFINE,
                       IntentKind.UNDERSTAND})


#: Command name -> (intent, one-line help). Aliases point at the same intent.
COMMANDS: dict[str, tuple[IntentKind, str]] = {
    "imagine": (IntentKind.IMAGINE, "draw a picture: /imagine a lighthouse at dusk"),
    "draw": (IntentKind.IMAGINE, "same as /imagine"),
    "write": (IntentKind.WRITE, "write text: /write a haiku about rain"),
    "story": (IntentKind.STORY, "an illustrated story: /story a fox who learns to fly "
                                "--scenes 4 --style watercolor"),
    "brainstorm": (IntentKind.BRAINSTORM, "ideas to pick from: /brainstorm a poster for our "
                                          "jazz night"),
    "remix": (IntentKind.REMIX, "redraw your picture: send a photo with the caption "
                                "/remix as a watercolor"),
    "help": (IntentKind.HELP, "what I can do"),
    "start": (IntentKind.HELP, "same as /help"),
    "profile": (IntentKind.PROFILE, "what I have learned about your taste"),
    "settings": (IntentKind.SETTINGS, "learning on|off for you; admins: emoji 🎉 positive|negative|neutral"),
    "forget": (IntentKind.FORGET, "/forget feedback erases your reactions and what I learned "
                                  "from them; /forget everything erases all I keep about you"),
    "mydata": (IntentKind.MYDATA, "a zip of everything I keep about you, sent privately"),
    "link": (IntentKind.LINK, "link your identities on two platforms: /link, then /link CODE on the other"),
    "verify": (IntentKind.VERIFY, "where a picture comes from: reply /verify to it, or send it "
                                  "with the caption /verify"),
    "web": (IntentKind.WEB, "a private link to this community's gallery and dashboard in your browser"),
}

#: Commands that exist for adapters but are not offered to people: a Discord "Refine" modal
#: sends ``refine`` with the result it refines as ``reply_to``.
HIDDEN_COMMANDS: dict[str, tuple[IntentKind, str]] = {
    "refine": (IntentKind.REFINE, "change a result: reply to it with what to change"),
}

#: Intents whose argument is a free-form instruction rather than a creative prompt.
_PLAIN_ARGUMENT_KINDS = frozenset({IntentKind.SETTINGS, IntentKind.FORGET, IntentKind.LINK,
                                   IntentKind.VERIFY})

_COMMAND = re.compile(r"^/(?P<name>[A-Za-z0-9_]+)(?:@(?P<bot>[A-Za-z0-9_]+))?(?:\s+|$)(?P<rest>.*)$", re.S)


def help_text() -> str:
    lines = ["I make pictures and text with you. Commands:"]
    for name, (_, line) in COMMANDS.items():
        lines.append(f"/{name}: {line}")
    lines.append("Or just talk to me (\"draw a fox in the snow\", \"a story about a brave "
                 "mouse, with pictures\"). Reply to a result to change it (\"make it at "
                 "night\"). React to a result (👍 👎 ❤️ ...) and I learn your taste.")
    return "\n".join(lines)


_EXAMPLES = {IntentKind.IMAGINE: "/imagine a lighthouse at dusk",
             IntentKind.STORY: "/story a fox who learns to fly",
             IntentKind.BRAINSTORM: "/brainstorm a poster for our jazz night",
             IntentKind.REMIX: "/remix as a watercolor (with your picture attached)",
             IntentKind.REFINE: "make it at night"}


def _check_prompt(prompt: str, kind: IntentKind, max_chars: int) -> str:
    prompt = " ".join(prompt.split())
    if not prompt:
        example = _EXAMPLES.get(kind, "/write a haiku about rain")
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
        if name in ADAPTER_ONLY_OPTIONS:
            # A picture comes as an attachment the adapter checked, never as a path someone
            # typed: a typed path would let a chat message read files on the server.
            raise PromptError("Attach the picture itself (local chat: /remix PATH prompt); "
                              f"--{name} can't be typed.")
        value = tokens[i + 1] if i + 1 < len(tokens) else None
        if value is None:
            raise PromptError(f"The option --{name} needs a value, like --{name} 2.")
        options[name] = value
        i += 2
    return head, _typed_options(options, kind)


#: Options only adapters set (from an attachment they fetched and checked).
ADAPTER_ONLY_OPTIONS = frozenset({"image"})

_OPTIONS: dict[IntentKind, set[str]] = {
    IntentKind.IMAGINE: {"count", "n", "seed", "style", "aspect"},
    IntentKind.STORY: {"scenes", "style", "seed"},
    IntentKind.BRAINSTORM: {"seed"},
    IntentKind.REMIX: {"seed", "style", "image"},
    IntentKind.REFINE: {"seed"},
}


def _typed_options(raw: dict[str, Any], kind: IntentKind) -> dict[str, Any]:
    allowed = _OPTIONS.get(kind, {"seed", "mode"})
    options: dict[str, Any] = {}
    for name, value in raw.items():
        if value is None:
            continue
        if name not in allowed:
            known = ", ".join(f"--{a}" for a in sorted(allowed))
            raise PromptError(f"/{kind.value} has no option --{name}. It takes: {known}.")
        if name == "image":  # an uploaded picture's path, checked by core/uploads.py
            options[name] = str(value)
            continue
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
        elif name == "scenes":
            if not SCENES_MIN <= number <= SCENES_MAX:
                raise PromptError(f"--scenes must be between {SCENES_MIN} and {SCENES_MAX} "
                                  f"(default {SCENES_DEFAULT}).")
            options["scenes"] = number
    return options


def parse_command(name: str, args: dict[str, Any], *, max_prompt_chars: int) -> Intent:
    """Turn a command and its typed arguments (slash commands, or parsed text) into an Intent.

    Raises:
        UnknownCommandError: the name is not a command; the message suggests the nearest one.
        PromptError: the prompt or an option is unusable.
    """
    name = name.lower()
    known = {**COMMANDS, **HIDDEN_COMMANDS}
    if name not in known:
        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        hint = f" Did you mean /{close[0]}?" if close else ""
        raise UnknownCommandError(f"I don't know the command /{name}.{hint} Send /help for the list.")
    kind = known[name][0]
    if kind in (IntentKind.HELP, IntentKind.PROFILE, IntentKind.MYDATA,
                IntentKind.WEB):
        return Intent(kind)
    if kind in _PLAIN_ARGUMENT_KINDS:
        return Intent(kind, " ".join(str(args.get("prompt") or "").split())[:max_prompt_chars])
    prompt = _check_prompt(str(args.get("prompt") or ""), kind, max_prompt_chars)
    options = _typed_options({k: v for k, v in args.items() if k != "prompt"}, kind)
    return Intent(kind, prompt, options)


def parse_text(text: str, *, max_prompt_chars: int, bot_username: str | None = None,
               replying: bool = False) -> Intent:
    """Parse a chat message: a ``/command`` (``/cmd@bot`` in groups) or free text.

    Free text goes through :func:`core.understanding.classify_rules`: what the rules place
    with confidence becomes that intent (its ``options["understanding"]`` says how sure), the
    rest becomes ``understand``, for the text model to read in a worker. ``replying`` says the
    message answers one of the bot's results (then "make it at night" is a refinement).
    """
    stripped = text.strip()
    match = _COMMAND.match(stripped)
    if match:
        if bot_username and match["bot"] and match["bot"].lower() != bot_username.lower():
            raise UnknownCommandError(f"That command was for @{match['bot']}, not me.")
        name = match["name"].lower()
        kind = {**COMMANDS, **HIDDEN_COMMANDS}.get(name, (None, ""))[0]
        rest = match["rest"]
        options: dict[str, Any] = {}
        if kind is not None and (kind in _OPTIONS or kind is IntentKind.WRITE):
            rest, options = _pop_options(rest, kind)
        return parse_command(name, {"prompt": rest, **options}, max_prompt_chars=max_prompt_chars)
    if not stripped:
        raise PromptError("Your message is empty. Send /help to see what I can do.")
    from core.understanding import classify_rules

    found = classify_rules(stripped, replying=replying)
    if found is None:
        return Intent(IntentKind.UNDERSTAND,
                      _check_prompt(stripped, IntentKind.WRITE, max_prompt_chars))
    kind = IntentKind(found.intent)
    if kind is IntentKind.HELP:
        return Intent(kind, options={"understanding": found.to_dict()})
    return Intent(kind, _check_prompt(found.prompt or stripped, kind, max_prompt_chars),
                  {"understanding": found.to_dict()})
