"""Co-creation pieces: what the text model is asked for, in which shape, and what a bad answer
becomes. Pure: the worker runs the model (constrained to these JSON schemas), this module says
what to ask and checks what came back.

The shapes are pydantic models; their JSON schemas drive constrained decoding in the worker
(``workers/pipelines/text_causal_lm.py``, llguidance), so even SmolLM2-135M returns JSON that
parses. Validation still runs on the result: a schema bounds lengths, it cannot make a tiny
model say something useful, so an empty or unusable answer falls back to something sensible
(:func:`story_or_fallback`, :func:`ideas_or_fallback`, :func:`rewrite_or_fallback`) with a note
for the person, never a crash.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = [
    "IDEAS_MAX",
    "IDEAS_MIN",
    "Brainstorm",
    "Idea",
    "Rewrite",
    "Scene",
    "StoryPlan",
    "brainstorm_messages",
    "ideas_or_fallback",
    "rewrite_messages",
    "rewrite_or_fallback",
    "story_messages",
    "story_or_fallback",
    "story_schema",
    "REFINE_STRENGTH",
    "tidy",
]

IDEAS_MIN, IDEAS_MAX = 3, 5
TITLE_MAX_CHARS = 80
PICTURE_MAX_CHARS = 160
IDEA_TITLE_MAX_CHARS = 60
IDEA_PROMPT_MAX_CHARS = 200
REWRITE_MAX_CHARS = 300
#: Image-to-image strength for a refinement, by how big a change the instruction asks for.
REFINE_STRENGTH = {"small": 0.45, "medium": 0.6, "big": 0.8}
#: A JSON-schema pattern for model text: it starts with a letter or digit and holds no line
#: breaks (the grammar then cannot produce an empty-looking "\n" scene).
STARTS_WITH_A_WORD = r"^[\w“\"'¿¡(][^\n\r\\]*$"
#: Below this many letters a model's answer counts as empty.
MEANINGFUL_CHARS = 3


class _Strict(BaseModel):
    # additionalProperties: false, so constrained decoding cannot wander into other keys.
    model_config = ConfigDict(extra="forbid")


class Scene(_Strict):
    text: str = Field(description="what happens in this scene, one or two sentences")
    picture: str = Field(max_length=PICTURE_MAX_CHARS,
                         description="what the scene's picture shows, in a few words")


class StoryPlan(_Strict):
    title: str = Field(min_length=1, max_length=TITLE_MAX_CHARS)
    scenes: list[Scene]


class Idea(_Strict):
    title: str = Field(min_length=1, max_length=IDEA_TITLE_MAX_CHARS)
    prompt: str = Field(min_length=1, max_length=IDEA_PROMPT_MAX_CHARS,
                        description="a concrete picture prompt for this direction")


class Brainstorm(_Strict):
    ideas: list[Idea] = Field(min_length=IDEAS_MIN, max_length=IDEAS_MAX)


class Rewrite(_Strict):
    prompt: str = Field(min_length=1, max_length=REWRITE_MAX_CHARS)
    change: Literal["small", "medium", "big"]


def story_schema(scenes: int, scene_max_chars: int) -> dict[str, Any]:
    """:class:`StoryPlan`'s JSON schema with exactly ``scenes`` scenes of bounded length."""
    schema = StoryPlan.model_json_schema()
    scene = schema["$defs"]["Scene"]["properties"]
    # Words, not "\n": a small model happily writes an escaped newline as a whole scene.
    scene["text"].update(minLength=min(12, scene_max_chars), maxLength=scene_max_chars,
                         pattern=STARTS_WITH_A_WORD)
    scene["picture"].update(minLength=3, maxLength=min(scene_max_chars, PICTURE_MAX_CHARS),
                            pattern=STARTS_WITH_A_WORD)
    schema["properties"]["title"]["pattern"] = STARTS_WITH_A_WORD
    schema["properties"]["scenes"].update(minItems=scenes, maxItems=scenes)
    # A title no longer than a scene: short scenes (tests, quick stories) keep it quick too.
    schema["properties"]["title"]["maxLength"] = min(TITLE_MAX_CHARS, max(20, scene_max_chars))
    return schema


def tidy(text: str, *, sentence: bool = False) -> str:
    """One line of model text, whitespace folded. A ``sentence`` cut off by a length bound ends
    at its last full stop when that keeps most of it, else gets one."""
    text = " ".join(str(text).replace("&#39;", "'").split()).strip(" \"'")
    if sentence and text and text[-1] not in ".!?…\"'”»)":
        end = max(text.rfind(". "), text.rfind("! "), text.rfind("? "))
        text = text[: end + 1] if end > len(text) // 2 else text + "."
    return text


def _meaningful(text: str) -> bool:
    return len(re.sub(r"\W", "", text)) >= MEANINGFUL_CHARS


def story_messages(prompt: str, scenes: int, *, style_words: str,
                   tone: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": (
            "You are a children's book author. Answer with JSON only: a title and the scenes "
            "of a short story, each scene one or two sentences that move the story on, and "
            f"for each a few words saying what its picture shows. {tone}").strip()},
        {"role": "user", "content": f"Write a story in {scenes} scenes about: {prompt}. "
                                    f"The pictures will be drawn as {style_words}."},
    ]


def story_or_fallback(raw: str, prompt: str, scenes: int) -> tuple[StoryPlan, str | None]:
    """The model's story, cleaned; or a one-scene story and a note when it is unusable."""
    try:
        plan = StoryPlan.model_validate_json(raw)
        cleaned = [Scene(text=tidy(s.text, sentence=True), picture=tidy(s.picture) or tidy(s.text))
                   for s in plan.scenes]
        cleaned = [s for s in cleaned if _meaningful(s.text)]
        if cleaned:
            title = tidy(plan.title) if _meaningful(plan.title) else prompt
            note = None if len(cleaned) == scenes else (
                f"The writer gave me {len(cleaned)} usable scene(s) of {scenes}.")
            return StoryPlan(title=title[:TITLE_MAX_CHARS], scenes=cleaned), note
    except ValidationError:
        pass
    fallback = StoryPlan(title=prompt[:TITLE_MAX_CHARS].capitalize(),
                         scenes=[Scene(text=prompt, picture=prompt[:PICTURE_MAX_CHARS])])
    return fallback, ("The writing model did not manage a story this time, so here is your "
                      "idea as a one-scene story. Press 🔁 for another try.")


def brainstorm_messages(prompt: str, *, avoid: list[str], tone: str) -> list[dict[str, str]]:
    avoid_line = (" Give new directions, not these: " + "; ".join(avoid) + ".") if avoid else ""
    return [
        {"role": "system", "content": (
            "You are a creative director. Answer with JSON only: 3 to 5 clearly different "
            "directions for the request, each a short title and a concrete picture prompt "
            f"(subject, setting, mood, colours). {tone}").strip()},
        {"role": "user", "content": f"Request: {prompt}.{avoid_line}"},
    ]


def ideas_or_fallback(raw: str, prompt: str) -> tuple[list[Idea], str | None]:
    """Distinct, non-empty ideas; padded from the request itself when the model gave too few."""
    ideas: list[Idea] = []
    try:
        listed = json.loads(raw).get("ideas") or []
    except (ValueError, AttributeError):
        listed = []  # a reply cut off by the token budget: keep none, pad below
    for item in listed if isinstance(listed, list) else []:
        try:
            idea = Idea.model_validate(item)
        except ValidationError:
            continue  # one bad idea does not sink the others
        title, text = tidy(idea.title), tidy(idea.prompt)
        if _meaningful(title) and _meaningful(text) and text.lower() not in {
                i.prompt.lower() for i in ideas}:
            ideas.append(Idea(title=title[:IDEA_TITLE_MAX_CHARS],
                              prompt=text[:IDEA_PROMPT_MAX_CHARS]))
    ideas = ideas[:IDEAS_MAX]
    if len(ideas) >= IDEAS_MIN:
        return ideas, None
    moods = ("bold and graphic", "soft and dreamy", "retro, warm colours", "minimal, lots of "
             "space", "dramatic night scene")
    for mood in moods[: IDEAS_MIN - len(ideas)]:
        ideas.append(Idea(title=mood.split(",")[0].capitalize(),
                          prompt=f"{prompt}, {mood}"[:IDEA_PROMPT_MAX_CHARS]))
    return ideas, "The writing model came up short, so I filled in some directions myself."


def rewrite_messages(prompts: list[str], instructions: list[str],
                     instruction: str) -> list[dict[str, str]]:
    """Ask for the picture prompt with ``instruction`` applied, ancestors' steps in context."""
    history = "\n".join(f"- then: {i}" for i in instructions)
    return [
        {"role": "system", "content": (
            "You edit prompts for a picture generator. Answer with JSON only: the new prompt "
            "(the original with the change applied, keep everything else) and how big the "
            "change is: small (colour, light, a detail), medium (time of day, mood, an added "
            "thing), big (another style or a different scene).")},
        {"role": "user", "content": (f"Original prompt: {prompts[0]}\n{history}\n"
                                     f"Change: {instruction}").replace("\n\n", "\n")},
    ]


_STOPWORDS = frozenset("make it the a an and but with more less same as in at of to this that "
                       "please pls can you could".split())


def _carries(text: str, instruction: str) -> bool:
    """Does ``text`` keep most content words of ``instruction``? Small models drop them."""
    words = [w for w in re.findall(r"\w+", instruction.lower())
             if len(w) > 2 and w not in _STOPWORDS]
    return not words or sum(w in text.lower() for w in words) * 2 >= len(words)


def rewrite_or_fallback(raw: str, previous: str, instruction: str) -> Rewrite:
    """The rewritten prompt; when unusable, the previous prompt with the instruction appended.

    A rewrite that lost the instruction's words gets them appended: the change the person asked
    for must reach the picture model even when a small text model forgot it.
    """
    try:
        rewrite = Rewrite.model_validate_json(raw)
        text = tidy(rewrite.prompt)
        if _meaningful(text) and text.lower() != previous.lower():
            if not _carries(text, instruction):
                text = f"{text}, {instruction}"
            return Rewrite(prompt=text[:REWRITE_MAX_CHARS], change=rewrite.change)
    except ValidationError:
        pass
    return Rewrite(prompt=f"{previous}, {instruction}"[:REWRITE_MAX_CHARS], change="medium")
