"""Co-creation end to end in the local chat, through real worker processes, on both backends:
illustrated stories, brainstorms, refinement by reply, remix, and free text read by meaning."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import select

from bots.console import ConsoleChat, ShownMessage
from core.events import Actor
from core.export import rows
from core.store import Artifact, FeedbackEvent, Job
from tests._stack import Stack

#: The flows that write with the real text model run on one backend each (story and revision on
#: Redis + PostgreSQL, brainstorm and unclear free text on the embedded default): the model's
#: time, not the backend, is what they would spend twice. The kill-mid-story test below and the
#: cheaper picture flows run on both.
ONE_BACKEND = lambda backends: pytest.mark.parametrize("stack", backends, indirect=True)  # noqa: E731

RESULT_TIMEOUT_SECONDS = 240


def _status_job(replies: list[ShownMessage]) -> str:
    statuses = [m for m in replies if m.kind == "status" and m.job_id]
    assert len(statuses) == 1, replies
    return statuses[0].job_id  # type: ignore[return-value]


def _recipe(path: str) -> dict:
    with Image.open(path) as image:
        return json.loads(image.text["musespark"])  # type: ignore[attr-defined]


def _wait_done(stack: Stack, chat: ConsoleChat, job_id: str) -> list[ShownMessage]:
    """Every message shown until ``job_id`` and the jobs it led to are final."""
    shown = chat.wait(lambda ms: not chat.pending_jobs() and any(
        m.job_id == job_id and m.kind in ("result", "error", "info") for m in ms)
        or stack.job(job_id).state == "failed", timeout=RESULT_TIMEOUT_SECONDS)
    time.sleep(0.3)
    return shown + chat.poll()


def _results(shown: list[ShownMessage]) -> list[ShownMessage]:
    return [m for m in shown if m.kind == "result"]


@ONE_BACKEND(["distributed"])
def test_a_story_arrives_as_a_title_then_each_scene_with_its_picture(stack: Stack) -> None:
    chat = stack.chat()
    story_id = _status_job(chat.say("/story a fox who learns to fly --scenes 4"))
    shown = chat.wait(lambda ms: len(_results(ms)) >= 5, timeout=RESULT_TIMEOUT_SECONDS)
    story = stack.job(story_id)
    assert story.state == "delivered", story.failure_reason
    title, *scenes = _results(shown)
    assert title.job_id == story_id and title.text.startswith("📖 ")
    assert "SmolLM2" in title.text, "says which model wrote it"
    plan = story.params["plan"]
    assert len(scenes) == 4 and len(plan["scenes"]) == 4
    style = story.params["picture_taste"]["choice"]["style"]
    seeds = []
    for number, (message, planned) in enumerate(zip(scenes, plan["scenes"]), start=1):
        assert message.text.startswith(f"{number}/4. ") and planned["text"] in message.text
        (path,) = message.images
        recipe = _recipe(path)
        assert recipe["story"] == {"id": story_id, "title": plan["title"], "scene": number,
                                   "of": 4, "text": planned["text"]}
        assert recipe["style"] == style, "one style for the whole story"
        scene = stack.job(message.job_id)  # type: ignore[arg-type]
        assert scene.parent_job_id == story_id and scene.intent == "scene"
        seeds.append(recipe["seed"])
        assert any(b.startswith("refine:") for b in message.buttons)
    assert seeds == sorted(seeds) and len(set(seeds)) == 4, "a seed schedule"
    # A reaction on a scene's picture teaches the picture taste of that scene's job.
    chat.react(scenes[1].id, "👍")
    (row,) = stack.runtime.store.feedback_for_job(scenes[1].job_id)  # type: ignore[arg-type]
    assert row.weight > 0


@ONE_BACKEND(["embedded"])
def test_a_brainstorm_press_draws_the_pick_and_counts_it_over_the_others(stack: Stack) -> None:
    chat = stack.chat()
    job_id = _status_job(chat.say("/brainstorm a poster for our jazz night"))
    shown = chat.wait(lambda ms: bool(_results(ms)), timeout=RESULT_TIMEOUT_SECONDS)
    (listing,) = _results(shown)
    ideas = stack.job(job_id).params["ideas"]
    assert 3 <= len(ideas) <= 5
    assert [b.split(":")[0] for b in listing.buttons][:len(ideas)] == [
        f"pick{n}" for n in range(1, len(ideas) + 1)]
    assert f"ideas:{job_id}" in listing.buttons
    for number, idea in enumerate(ideas, start=1):
        assert f"{number}. {idea['title']}" in listing.text
    styles = {i["style"] for i in ideas}
    assert len(styles) == len(ideas), "each direction in its own style"

    # Anyone may pick; the pick counts for the person who pressed.
    asker = chat.user
    chat.user = Actor("bystander", "Bea")
    picked = _status_job(chat.say(f"/press {listing.id} pick2"))
    chat.user = asker
    shown = chat.wait(lambda ms: len(_results(ms)) >= 2, timeout=RESULT_TIMEOUT_SECONDS)
    first = stack.job(picked)
    assert first.parent_job_id == job_id and first.prompt == ideas[1]["prompt"]
    assert first.params["taste"]["choice"]["style"] == ideas[1]["style"]
    assert first.params["takes"]["of"] == 2, "rendered with takes, as for /imagine"
    (press,) = [f for f in stack.runtime.store.feedback_for_job(job_id) if f.value == "pick2"]
    assert press.kind == "button" and press.weight > 0
    presser = stack.runtime.store.ensure_user("local", Actor("bystander", "Bea"))
    assert press.user_id == presser and first.user_id == presser
    # The community's picture taste moved: the picked style up, the others down.
    community = stack.runtime.orchestrator.taste.profile("community", first.community_id,
                                                          "image")[0]
    assert community["style"][ideas[1]["style"]][0] > 0
    assert all(community["style"][i["style"]][1] > 0 for n, i in enumerate(ideas) if n != 1)
    pairs = [r for r in rows(stack.runtime.store, "dpo") if r.get("kind") == "brainstorm"
             and r["chosen_job_id"] == job_id]
    assert {p["rejected"] for p in pairs} == {i["prompt"] for n, i in enumerate(ideas)
                                              if n != 1}
    assert all(p["chosen"] == ideas[1]["prompt"] for p in pairs)


def test_a_reply_refines_a_picture_image_to_image_and_a_chain_keeps_going(stack: Stack) -> None:
    chat = stack.chat()
    job_id = _status_job(chat.say("/imagine a lighthouse on a cliff --style watercolor"))
    shown = chat.wait(lambda ms: bool(_results(ms)), timeout=RESULT_TIMEOUT_SECONDS)
    (picture,) = _results(shown)
    refined = _status_job(chat.say(f"/reply {picture.id} make it at night"))
    shown = chat.wait(lambda ms: any(m.job_id == refined for m in _results(ms)),
                      timeout=RESULT_TIMEOUT_SECONDS)
    (result,) = [m for m in _results(shown) if m.job_id == refined]
    job = stack.job(refined)
    assert job.intent == "refine" and job.parent_job_id == job_id
    recipe = _recipe(result.images[0])
    assert recipe["refined_from"] == {"job_id": job_id, "position": 0}
    assert recipe["instruction"] == "make it at night" and "night" in recipe["prompt"]
    assert recipe["style"] == "watercolor", "a refinement keeps the style"
    assert 0 < recipe["strength"] < 1
    with Image.open(result.images[0]) as new, Image.open(picture.images[0]) as old:
        assert new.size == old.size

    again = _status_job(chat.say(f"/reply {result.id} add a red boat"))
    shown = chat.wait(lambda ms: any(m.job_id == again for m in _results(ms)),
                      timeout=RESULT_TIMEOUT_SECONDS)
    (second,) = [m for m in _results(shown) if m.job_id == again]
    recipe = _recipe(second.images[0])
    assert recipe["refined_from"]["job_id"] == refined and "boat" in recipe["prompt"]


@ONE_BACKEND(["distributed"])
def test_a_reply_revises_a_text_with_the_earlier_text_in_context(stack: Stack) -> None:
    chat = stack.chat()
    job_id = _status_job(chat.say("/write a short poem about the sea"))
    shown = chat.wait(lambda ms: bool(_results(ms)), timeout=RESULT_TIMEOUT_SECONDS)
    (text,) = _results(shown)
    revised = _status_job(chat.say(f"/reply {text.id} a happier ending"))
    stack.wait_job(revised, ("delivered",), timeout=RESULT_TIMEOUT_SECONDS)
    job = stack.job(revised)
    assert job.intent == "refine" and job.kind == "text" and job.parent_job_id == job_id
    (recipe,) = [a.recipe for a in stack.runtime.store.artifacts(revised)]
    assert recipe["thread"] == [job_id] and recipe["instruction"] == "a happier ending"


@pytest.mark.parametrize(("line", "expected"), [
    ("/reply 1 make it blue", "isn't one of my results"),
    ("/reply x make it blue", "/reply 5 make it at night"),
    ("/story a fox --scenes 0", "between 2 and 6"),
    ("/story a fox --scenes 99", "between 2 and 6"),
    ("/brainstorm", "empty"),
    ("/remix", "Use it like this: /remix"),
    ("/remix /no/such/picture.png as a watercolor", "can't open the file"),
])
def test_bad_co_creation_input_gets_a_clear_answer_and_makes_no_job(
        stack: Stack, line: str, expected: str) -> None:
    chat = stack.chat()
    replies = chat.say(line)
    assert len(replies) == 1 and replies[0].kind == "error", replies
    assert expected in replies[0].text and replies[0].job_id is None


def _png(path: Path, size: tuple[int, int] = (96, 80)) -> Path:
    Image.new("RGB", size, (200, 120, 40)).save(path)
    return path


def test_remix_draws_from_an_uploaded_picture_and_forget_erases_it(stack: Stack,
                                                                   tmp_path: Path) -> None:
    chat = stack.chat()
    source = _png(tmp_path / "mine.png")
    # No style named, so two takes in two styles (naming one gives one take in it).
    job_id = _status_job(chat.say(f"/remix {source} on a stormy night"))
    shown = chat.wait(lambda ms: len(_results(ms)) >= 2, timeout=RESULT_TIMEOUT_SECONDS)
    job = stack.job(job_id)
    assert job.intent == "remix" and job.params["takes"]["of"] == 2
    (kept,) = [a for a in stack.runtime.store.artifacts(job_id, "input")]
    assert Path(kept.path).is_file() and Path(kept.path) != source  # type: ignore[arg-type]
    recipe = _recipe(_results(shown)[0].images[0])
    assert recipe["remix_of"]["path"] == kept.path
    reply = chat.say("/forget uploads")[0]
    assert "erased 1 picture" in reply.text
    assert not Path(kept.path).exists() and source.exists(), "our copy only"  # type: ignore[arg-type]
    assert stack.runtime.store.artifacts(job_id, "input") == []


@pytest.mark.parametrize(("content", "expected"), [
    (b"just some text, not a picture", "can't read"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "can't read"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * (10 * 1000 * 1000 + 1), "up to 10 MB"),
    (b"", "empty"),
])
def test_a_bad_upload_is_refused_clearly(stack: Stack, tmp_path: Path, content: bytes,
                                         expected: str) -> None:
    chat = stack.chat()
    path = tmp_path / "upload.png"
    path.write_bytes(content)
    (reply,) = chat.say(f"/remix {path} as a watercolor")
    assert reply.kind == "error" and expected in reply.text and reply.job_id is None


def test_free_text_is_routed_by_meaning_and_the_decision_is_kept(stack: Stack) -> None:
    chat = stack.chat()
    job_id = _status_job(chat.say("write me a short story about a lighthouse keeper, "
                                  "with pictures"))
    job = stack.job(job_id)
    assert job.intent == "story" and job.params["understanding"]["source"] == "rules"
    assert job.params["understanding"]["confidence"] > 0.5
    why = chat.say(f"/press {_status_message(chat, job_id)} why")
    assert "story request from its wording" in why[-1].text


def _status_message(chat: ConsoleChat, job_id: str) -> int:
    with chat.store.session() as s:
        from core.store import LocalMessage

        return int(s.scalar(select(LocalMessage.id).where(LocalMessage.job_id == job_id,
                                                          LocalMessage.kind == "status")))


@ONE_BACKEND(["embedded"])
def test_unclear_free_text_goes_to_the_model_which_routes_it_or_asks(stack: Stack) -> None:
    chat = stack.chat()
    understand = _status_job(chat.say("the blue hour over the old harbour"))
    job = stack.wait_job(understand, ("delivered", "failed"), timeout=RESULT_TIMEOUT_SECONDS)
    assert job.intent == "understand" and job.state == "delivered", job.failure_reason
    decided = job.params["understanding"]
    assert decided["source"] == "model" and set(decided["scores"]) >= {"imagine", "write"}
    shown = chat.wait(lambda ms: any(m.job_id == understand for m in ms),
                      timeout=RESULT_TIMEOUT_SECONDS)
    (answer,) = [m for m in shown if m.job_id == understand]
    with stack.runtime.store.session() as s:
        routed = s.scalars(select(Job).where(
            Job.idempotency_key.like(job.idempotency_key + ":as-%"))).all()
    if decided["confidence"] < 0.5:
        assert {b.split(":")[0] for b in answer.buttons} == {
            "as-imagine", "as-write", "as-story", "as-brainstorm"} and not routed
    else:
        assert routed and routed[0].intent == decided["intent"]
        assert routed[0].params["understanding"]["source"] == "model"
    # The person answers the question (a press works whether or not it was shown).
    picked = _status_job(chat.say(f"/press {answer.id} as-imagine"))
    chosen = stack.job(picked)
    assert chosen.intent == "imagine" and chosen.params["understanding"]["source"] == "person"
    assert chosen.prompt == "the blue hour over the old harbour"


# On Redis + PostgreSQL only: the embedded deployment's recovery from a killed worker is the
# same redriver and claims, tested on both backends by test_end_to_end's kill test.
@pytest.mark.parametrize("make_stack", ["distributed"], indirect=True)
def test_a_worker_killed_while_a_story_draws_its_second_picture_posts_one_whole_story(
        make_stack) -> None:
    # Enough steps that the kill lands inside the render (the four scenes render as one batch:
    # a few seconds on an idle CPU).
    stack = make_stack(MUSESPARK_IMAGE_STEPS="60")
    first = stack.start_worker()
    chat = stack.chat()
    story_id = _status_job(chat.say("/story a lantern that wanted to be the moon --scenes 4"))
    deadline = time.monotonic() + RESULT_TIMEOUT_SECONDS
    while True:
        scenes = stack.runtime.store.children(story_id, "scene")
        if len(scenes) == 4 and scenes[1].state == "running":
            break
        assert time.monotonic() < deadline, [s.state for s in scenes]
        time.sleep(0.05)
    time.sleep(0.3)
    assert stack.job(scenes[1].id).state == "running", "scene 2 finished before the kill"
    first.kill_hard()
    stack.start_worker()
    story = stack.wait_job(story_id, ("delivered", "failed"), timeout=RESULT_TIMEOUT_SECONDS)
    assert story.state == "delivered", story.failure_reason
    time.sleep(2)  # a second post would land now
    posted = [r for r in chat.store.local_messages_after(chat.chat_id, 0)
              if r.author == "bot" and r.kind == "result"]
    assert [r.job_id for r in posted] == [story_id] + [s.id for s in scenes]
    assert all(len(r.attachments["images"]) == 1 for r in posted[1:])
    assert stack.job(scenes[1].id).attempts == 2, "the killed scene ran again, once"
    with stack.runtime.store.session() as s:
        pictures = s.scalars(select(Artifact).where(Artifact.job_id.in_(
            [sc.id for sc in scenes]), Artifact.kind == "image")).all()
    assert len(pictures) == 4, "no scene rendered twice into the story"
