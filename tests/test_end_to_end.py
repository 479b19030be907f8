"""A person's request end to end, through real worker processes, on both backends.

Every test here runs twice (``stack``/``make_stack`` are parametrized): embedded transport +
SQLite, and Redis + PostgreSQL.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from PIL import Image

from bots.console import ShownMessage
from core import taste
from tests._stack import Stack, free_port

RESULT_TIMEOUT_SECONDS = 180


def _status_job(replies: list[ShownMessage]) -> str:
    statuses = [m for m in replies if m.kind == "status" and m.job_id]
    assert len(statuses) == 1, replies
    return statuses[0].job_id  # type: ignore[return-value]


def _results(messages: list[ShownMessage], job_id: str) -> list[ShownMessage]:
    return [m for m in messages if m.job_id == job_id and m.kind in ("result", "error")]


def test_write_answers_with_the_real_text_model_and_learns_from_a_reaction(stack: Stack) -> None:
    chat = stack.chat()
    replies = chat.say("/write a haiku about rain")
    job_id = _status_job(replies)
    assert "Writing" in replies[0].text
    shown = chat.wait(lambda ms: bool(_results(ms, job_id)), timeout=RESULT_TIMEOUT_SECONDS)
    (result,) = _results(shown, job_id)
    assert result.kind == "result", result.text
    body, _, signature = result.text.rpartition("\n\n— ")
    assert body.strip(), "the model produced no text"
    assert "SmolLM2-135M-Instruct" in signature
    job = stack.job(job_id)
    assert job.state == "delivered" and job.model and "SmolLM2" in job.model
    assert job.started_at and job.finished_at and job.finished_at >= job.started_at

    chat.react(result.id, "👍")
    feedback = stack.runtime.store.feedback_for_job(job_id)
    assert [(f.value, f.delta, f.kind) for f in feedback] == [("👍", 1, "reaction")]
    chat.react(result.id, "👍", remove=True)
    assert [f.delta for f in stack.runtime.store.feedback_for_job(job_id)] == [1, -1]


def test_imagine_delivers_png_files_with_their_recipe(stack: Stack) -> None:
    chat = stack.chat()
    job_id = _status_job(chat.say("/imagine a lighthouse at dusk --count 2 --seed 7"))
    shown = chat.wait(lambda ms: bool(_results(ms, job_id)), timeout=RESULT_TIMEOUT_SECONDS)
    (result,) = _results(shown, job_id)
    assert result.kind == "result", result.text
    assert "untrained demo model" in result.text and "MUSESPARK_IMAGE_MODEL" in result.text
    assert len(result.images) == 2
    for position, path in enumerate(result.images):
        with Image.open(path) as image:
            assert image.format == "PNG"
            recipe = json.loads(image.text["musespark"])  # type: ignore[attr-defined]
        assert recipe["job_id"] == job_id and recipe["prompt"] == "a lighthouse at dusk"
        assert recipe["seed"] == 7 and recipe["position"] == position
        assert recipe["demo_model"] is True and recipe["model"]
    assert stack.job(job_id).state == "delivered"


def test_the_bigger_button_renders_the_same_picture_at_twice_the_side(stack: Stack) -> None:
    chat = stack.chat()
    job_id = _status_job(chat.say("/imagine a red fox --seed 11"))
    shown = chat.wait(lambda ms: bool(_results(ms, job_id)), timeout=RESULT_TIMEOUT_SECONDS)
    (first,) = _results(shown, job_id)
    assert any(b == f"upscale:{job_id}" for b in first.buttons), first.buttons
    bigger_job = _status_job(chat.say(f"/press {first.id} upscale"))
    shown = chat.wait(lambda ms: bool(_results(ms, bigger_job)), timeout=RESULT_TIMEOUT_SECONDS)
    (bigger,) = _results(shown, bigger_job)
    with Image.open(first.images[0]) as small, Image.open(bigger.images[0]) as large:
        assert large.width == 2 * small.width and large.height == 2 * small.height
        assert json.loads(large.text["musespark"])["seed"] == 11  # type: ignore[attr-defined]


def test_a_variation_redraws_that_picture_at_the_strength_the_taste_chose(stack: Stack) -> None:
    chat = stack.chat()
    job_id = _status_job(chat.say("/imagine a red fox --seed 11 --count 2"))
    shown = chat.wait(lambda ms: bool(_results(ms, job_id)), timeout=RESULT_TIMEOUT_SECONDS)
    (first,) = _results(shown, job_id)
    assert "variation" not in stack.job(job_id).params["taste"]["choice"]
    varied_job = _status_job(chat.say(f"/press {first.id} vary2"))
    shown = chat.wait(lambda ms: bool(_results(ms, varied_job)), timeout=RESULT_TIMEOUT_SECONDS)
    (varied,) = _results(shown, varied_job)
    job = stack.job(varied_job)
    choice = job.params["taste"]["choice"]
    parent_choice = stack.job(job_id).params["taste"]["choice"]
    assert {d: choice[d] for d in parent_choice} == parent_choice, "the style is kept"
    strength = taste.CATALOGUE["image"]["variation"][choice["variation"]]["strength"]
    with Image.open(varied.images[0]) as picture:
        recipe = json.loads(picture.text["musespark"])  # type: ignore[attr-defined]
    assert recipe["variation_of"]["job_id"] == job_id and recipe["variation_of"]["position"] == 1
    assert recipe["variation_of"]["path"] == first.images[1]
    assert recipe["variation_of"]["strength"] == strength


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("/imagine", "empty"),
        ("/write    ", "empty"),
        ("/write " + "rain " * 2000, "characters long"),
        ("/paint a cat", "don't know the command /paint"),
        ("/imagine a cat --count 12", "between 1 and 4"),
        ("/react 99999 👍", "results I made"),
    ],
)
def test_bad_input_gets_a_clear_answer_and_makes_no_job(stack: Stack, text: str,
                                                         expected: str) -> None:
    chat = stack.chat()
    replies = chat.say(text)
    assert len(replies) == 1 and replies[0].kind == "error", replies
    assert expected in replies[0].text
    assert replies[0].job_id is None


def test_a_reaction_on_the_persons_own_message_is_refused(stack: Stack) -> None:
    chat = stack.chat()
    chat.say("/help")
    own_message = chat.store.local_messages_after(chat.chat_id, 0)[0]
    assert own_message.author != "bot"
    (reply,) = chat.react(own_message.id, "👍")
    assert reply.kind == "error" and "results I made" in reply.text


def test_the_same_event_twice_makes_one_job(stack: Stack) -> None:
    from core.events import Actor, Channel, MessageReceived

    event = MessageReceived(platform="local", event_id="dup-" + str(time.time_ns()),
                            actor=Actor("dup-user"), channel=Channel("dup-chat"),
                            text="/write one line about the sea")
    first = stack.runtime.orchestrator.handle(event)
    second = stack.runtime.orchestrator.handle(event)
    assert len(first) == 1 and first[0].job_id and second == []
    stack.wait_job(first[0].job_id, ("delivered",), timeout=RESULT_TIMEOUT_SECONDS)


def test_a_missing_model_path_is_a_clear_message_and_a_clear_log_line(
        make_stack, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    stack = make_stack(MUSESPARK_IMAGE_MODEL=str(missing))
    worker = stack.start_worker()
    chat = stack.chat()
    job_id = _status_job(chat.say("/imagine a cat"))
    shown = chat.wait(lambda ms: bool(_results(ms, job_id)), timeout=RESULT_TIMEOUT_SECONDS)
    (answer,) = _results(shown, job_id)
    assert answer.kind == "error"
    assert "could not be loaded" in answer.text or "model" in answer.text.lower()
    assert str(missing) not in answer.text, "operator detail leaked to the person"
    job = stack.job(job_id)
    assert job.state == "failed" and job.failure_reason
    assert "MUSESPARK_IMAGE_MODEL" in worker.log() and str(missing) in worker.log()


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs the redis-server binary")
def test_an_unreachable_broker_keeps_the_job_and_delivers_it_when_back(make_stack) -> None:
    port = free_port()
    stack = make_stack(MUSESPARK_BROKER_URL=f"redis://127.0.0.1:{port}/0")
    chat = stack.chat()
    (reply,) = chat.say("/write a limerick about patience")
    assert reply.kind == "status" and "unreachable" in reply.text and reply.job_id
    job = stack.job(reply.job_id)
    assert job.state == "queued" and job.published_at is None

    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                               "--save", "", "--appendonly", "no"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        stack.start_worker()
        shown = chat.wait(lambda ms: bool(_results(ms, reply.job_id)),
                          timeout=RESULT_TIMEOUT_SECONDS)
        (result,) = _results(shown, reply.job_id)
        assert result.kind == "result"
        assert stack.job(reply.job_id).state == "delivered"
    finally:
        for worker in stack.workers:
            worker.stop()
        server.terminate()
        server.wait(timeout=10)


def test_a_worker_killed_mid_job_delivers_exactly_once_after_restart(make_stack) -> None:
    stack = make_stack(MUSESPARK_TEXT_MAX_NEW_TOKENS="160")
    first = stack.start_worker()
    chat = stack.chat()
    job_id = _status_job(chat.say("/write a long story about a lighthouse keeper"))
    stack.wait_job(job_id, ("running",), timeout=RESULT_TIMEOUT_SECONDS)
    time.sleep(1.5)  # inside generation: the model loads in well under a second from its cache
    assert stack.job(job_id).state == "running", "job finished before it could be killed"
    first.kill_hard()

    stack.start_worker()
    job = stack.wait_job(job_id, ("delivered", "failed"), timeout=RESULT_TIMEOUT_SECONDS)
    assert job.state == "delivered", job.failure_reason
    assert job.attempts == 2
    time.sleep(2)  # any duplicate delivery would land now
    shown = chat.poll()
    assert len(_results(shown, job_id)) == 1
    delivered = [r for r in chat.store.local_messages_after(chat.chat_id, 0)
                 if r.job_id == job_id and r.kind == "result"]
    assert len(delivered) == 1
