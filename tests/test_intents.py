"""Intent parsing is pure: every rule is checked here without I/O."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.errors import PromptError, UnknownCommandError, UserInputError
from core.intents import IntentKind, parse_command, parse_text

LIMIT = 200


@pytest.mark.parametrize(
    ("text", "kind", "prompt", "options"),
    [
        ("/imagine a lighthouse at dusk", IntentKind.IMAGINE, "a lighthouse at dusk", {}),
        ("/imagine@MuseSparkBot a fox", IntentKind.IMAGINE, "a fox", {}),
        ("/draw a fox --count 3 --seed 11", IntentKind.IMAGINE, "a fox", {"count": 3, "seed": 11}),
        ("/write a haiku about rain", IntentKind.WRITE, "a haiku about rain", {}),
        ("/WRITE   spaced    out  ", IntentKind.WRITE, "spaced out", {}),
        ("draw a red fox in the snow", IntentKind.IMAGINE, "a red fox in the snow", {}),
        ("Please paint a sunset", IntentKind.IMAGINE, "a sunset", {}),
        ("what rhymes with orange?", IntentKind.WRITE, "what rhymes with orange?", {}),
        ("can you draw me a picture of a castle", IntentKind.IMAGINE, "a castle", {}),
        ("/help", IntentKind.HELP, "", {}),
        ("/start", IntentKind.HELP, "", {}),
        ("/profile", IntentKind.PROFILE, "", {}),
    ],
)
def test_parse_text(text: str, kind: IntentKind, prompt: str, options: dict[str, int]) -> None:
    intent = parse_text(text, max_prompt_chars=LIMIT)
    understood = intent.options.pop("understanding", None)
    assert (intent.kind, intent.prompt, intent.options) == (kind, prompt, options)
    # Free text says how it was understood; commands need no understanding.
    assert (understood is None) == text.startswith("/")
    if understood:
        assert understood["source"] == "rules" and understood["intent"] == kind.value
        assert 0.5 < understood["confidence"] <= 1


@pytest.mark.parametrize(
    ("text", "replying", "kind", "prompt", "options"),
    [
        ("/story a fox who learns to fly --scenes 3 --style watercolor", False,
         IntentKind.STORY, "a fox who learns to fly", {"scenes": 3, "style": "watercolor"}),
        ("/brainstorm a poster for our jazz night", False, IntentKind.BRAINSTORM,
         "a poster for our jazz night", {}),
        ("/remix as a watercolor", False, IntentKind.REMIX, "as a watercolor", {}),
        ("write me a short story about a lighthouse keeper, with pictures", False,
         IntentKind.STORY, "write me a short story about a lighthouse keeper, with pictures", {}),
        ("give me some ideas for a bakery logo", False, IntentKind.BRAINSTORM,
         "give me some ideas for a bakery logo", {}),
        ("make it at night", True, IntentKind.REFINE, "make it at night", {}),
        ("same, as a watercolor", True, IntentKind.REFINE, "same, as a watercolor", {}),
        ("now draw a dog on a skateboard", True, IntentKind.IMAGINE, "a dog on a skateboard", {}),
    ],
)
def test_co_creation_requests(text: str, replying: bool, kind: IntentKind, prompt: str,
                              options: dict[str, object]) -> None:
    intent = parse_text(text, max_prompt_chars=LIMIT, replying=replying)
    intent.options.pop("understanding", None)
    assert (intent.kind, intent.prompt, intent.options) == (kind, prompt, options)


def test_unclear_free_text_goes_to_the_model() -> None:
    intent = parse_text("the blue hour over the old harbour", max_prompt_chars=LIMIT)
    assert intent.kind is IntentKind.UNDERSTAND and intent.makes_job
    assert intent.prompt == "the blue hour over the old harbour"


@pytest.mark.parametrize(("text", "words"), [
    ("/story a fox --scenes 0", "between 2 and 6"),
    ("/story a fox --scenes 99", "between 2 and 6"),
    ("/story", "empty"),
    ("/brainstorm   ", "/brainstorm a poster"),
    ("/story a fox --count 2", "no option --count"),
])
def test_bad_co_creation_input(text: str, words: str) -> None:
    with pytest.raises(PromptError) as info:
        parse_text(text, max_prompt_chars=LIMIT)
    assert words in str(info.value)


@pytest.mark.parametrize(
    ("text", "error", "words"),
    [
        ("", PromptError, "empty"),
        ("/imagine", PromptError, "empty"),
        ("/imagine    ", PromptError, "/imagine a lighthouse"),
        ("/write " + "x" * (LIMIT + 1), PromptError, f"at most {LIMIT}"),
        ("/imagin a cat", UnknownCommandError, "Did you mean /imagine?"),
        ("/zzzz", UnknownCommandError, "/help"),
        ("/imagine a cat --count 0", PromptError, "between 1 and 4"),
        ("/imagine a cat --count two", PromptError, "whole number"),
        ("/imagine a cat --steps 5", PromptError, "no option --steps"),
        ("/write a poem --count 2", PromptError, "no option --count"),
        ("/imagine a cat --seed", PromptError, "needs a value"),
        ("/imagine@OtherBot a cat", UnknownCommandError, "@OtherBot"),
    ],
)
def test_bad_input_is_a_user_error_with_a_helpful_message(text: str, error: type[Exception],
                                                          words: str) -> None:
    with pytest.raises(error) as info:
        parse_text(text, max_prompt_chars=LIMIT, bot_username="MuseSparkBot")
    assert words in str(info.value)


def test_slash_command_options_are_typed_and_checked() -> None:
    intent = parse_command("imagine", {"prompt": "a cat", "count": 2, "seed": 5},
                           max_prompt_chars=LIMIT)
    assert intent.options == {"count": 2, "seed": 5}
    with pytest.raises(PromptError):
        parse_command("imagine", {"prompt": "a cat", "seed": -1}, max_prompt_chars=LIMIT)


@given(st.text(max_size=300))
def test_any_text_parses_or_raises_a_user_error(text: str) -> None:
    try:
        intent = parse_text(text, max_prompt_chars=LIMIT)
    except UserInputError as exc:
        assert exc.user_message and "Traceback" not in exc.user_message
        return
    if intent.makes_job:
        assert intent.prompt.strip() and len(intent.prompt) <= LIMIT
