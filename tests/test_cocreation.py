"""Co-creation's pure half: what bad model output becomes, and how free text is read."""

from __future__ import annotations

import json

import pytest

from core import cocreation
from core.actions import buttons_for, is_action
from core.understanding import ASK_BELOW, classify_rules, combine


def test_a_good_story_is_kept_and_tidied() -> None:
    raw = json.dumps({"title": "The Fox", "scenes": [
        {"text": "A fox looks up at the birds", "picture": "a fox watching birds"},
        {"text": "She builds wings. ", "picture": "a fox with paper wings"}]})
    plan, note = cocreation.story_or_fallback(raw, "a fox who learns to fly", 2)
    assert note is None and plan.title == "The Fox"
    assert [s.text for s in plan.scenes] == ["A fox looks up at the birds.", "She builds wings."]


@pytest.mark.parametrize("raw", ["", "{", '{"title": "", "scenes": []}',
                                 '{"title": "x", "scenes": [{"text": " ", "picture": ""}]}',
                                 "not json at all"])
def test_an_empty_or_broken_story_becomes_one_scene_with_a_note(raw: str) -> None:
    plan, note = cocreation.story_or_fallback(raw, "a fox who learns to fly", 4)
    assert len(plan.scenes) == 1 and plan.scenes[0].text == "a fox who learns to fly"
    assert note and "one-scene" in note


def test_fewer_scenes_than_asked_are_kept_and_said() -> None:
    raw = json.dumps({"title": "T", "scenes": [{"text": "One thing happens.", "picture": "p"}]})
    plan, note = cocreation.story_or_fallback(raw, "x", 3)
    assert len(plan.scenes) == 1 and note and "1 usable scene(s) of 3" in note


def test_the_story_schema_bounds_scenes_and_lengths() -> None:
    schema = cocreation.story_schema(4, 90)
    assert schema["properties"]["scenes"]["minItems"] == 4 == schema["properties"]["scenes"]["maxItems"]
    scene = schema["$defs"]["Scene"]
    assert scene["properties"]["text"]["maxLength"] == 90
    assert scene["additionalProperties"] is False


def test_ideas_are_deduplicated_and_padded_to_three() -> None:
    raw = json.dumps({"ideas": [{"title": "Neon", "prompt": "a neon saxophone"},
                                {"title": "Neon again", "prompt": "A neon saxophone"}]})
    ideas, note = cocreation.ideas_or_fallback(raw, "a jazz poster")
    assert len(ideas) == 3 and ideas[0].prompt == "a neon saxophone" and note
    assert all("a jazz poster" in i.prompt for i in ideas[1:])


def test_a_rewrite_keeps_the_instruction() -> None:
    kept = cocreation.rewrite_or_fallback(
        json.dumps({"prompt": "a lighthouse at night, stars", "change": "medium"}),
        "a lighthouse", "make it at night")
    assert kept.prompt == "a lighthouse at night, stars." or "night" in kept.prompt
    forgot = cocreation.rewrite_or_fallback(
        json.dumps({"prompt": "a tall lighthouse", "change": "small"}), "a lighthouse",
        "as a watercolor")
    assert "watercolor" in forgot.prompt
    broken = cocreation.rewrite_or_fallback("{", "a lighthouse", "at night")
    assert broken.prompt == "a lighthouse, at night" and broken.change == "medium"


def test_every_button_core_offers_is_an_action_it_answers() -> None:
    for kind, intent in [("image", "imagine"), ("text", "write"), ("image", "scene"),
                         ("text", "story"), ("text", "brainstorm"), ("image", "refine"),
                         ("image", "remix")]:
        for button in buttons_for("abc123abc123", kind=kind, intent=intent, ideas=4):
            assert is_action(button.action), button
            assert len(button.custom_id.encode()) <= 64
    assert [b.action for b in buttons_for("abc123abc123", kind="text", intent="brainstorm",
                                          ideas=3)][:3] == ["pick1", "pick2", "pick3"]


def test_rules_route_clear_cues_in_several_languages_with_typos() -> None:
    for text, intent in [("drw a cat on a skateboard", "imagine"),
                         ("un dessin d'un chat", "imagine"),
                         ("schreib ein gedicht über den herbst", "write"),
                         ("brainstrom names for my band", "brainstorm"),
                         ("a storry about a dragon with pictures", "story"),
                         ("what can you do?", "help")]:
        found = classify_rules(text)
        assert found is not None and found.intent == intent, (text, found)


def test_the_model_decides_what_the_rules_cannot_and_refine_needs_a_reply() -> None:
    logprobs = {"imagine": -0.2, "write": -3.0, "story": -4.0, "brainstorm": -5.0,
                "refine": -0.1, "help": -6.0}
    decided = combine("the blue hour over the harbour", logprobs, replying=False)
    assert decided.intent == "imagine" and decided.source == "model"
    assert decided.scores["refine"] == 0.0
    unsure = combine("hmm", {k: -1.0 for k in logprobs}, replying=False)
    assert unsure.confidence < ASK_BELOW


def test_a_typed_picture_path_is_refused_so_chat_cannot_read_server_files() -> None:
    from core.errors import PromptError
    from core.intents import parse_text

    with pytest.raises(PromptError) as info:
        parse_text("/remix a fox --image /etc/hostname", max_prompt_chars=200)
    assert "can't be typed" in str(info.value)


def test_a_remote_attachment_outside_the_uploads_folder_is_refused(tmp_path) -> None:
    from PIL import Image

    from core.events import Actor, Channel, MessageReceived
    from core.orchestrator import Orchestrator
    from core.queue import RecordingPublisher
    from core.settings import Settings
    from core.store import Store

    settings = Settings(_env_file=None, data_dir=tmp_path / "data")  # type: ignore[call-arg]
    store = Store(settings.resolved_database_url)
    store.upgrade()
    outside = tmp_path / "server-file.png"
    Image.new("RGB", (32, 32)).save(outside)
    orchestrator = Orchestrator(store, RecordingPublisher(), settings)
    (reply,) = orchestrator.handle(MessageReceived(
        platform="telegram", event_id="1:1", actor=Actor("7"), channel=Channel("7"),
        text="/remix as a watercolor", attachments=(str(outside),)))
    assert reply.kind.value == "error" and "Attach the picture" in reply.text
    assert orchestrator.publisher.published == []  # type: ignore[attr-defined]
    store.dispose()
