"""Co-creation on Telegram end to end: /story, /brainstorm and a pick, refinement by replying
to a picture, /remix with a photo or an image file (and every way a remix is refused), /help,
and an answer for every button on every kind of result.

The real python-telegram-bot Application polls a fake Bot API over real HTTP
(tests/fake_telegram.py); one real Celery worker process (embedded broker + SQLite) makes the
jobs and posts the results to the same fake. The module has its own deployment, fake and chat
ids; tests/test_telegram.py covers the transport (webhook, 429, 403, the distributed backend).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from sqlalchemy import select

from core.intents import COMMANDS
from core.store import Artifact, Job
from tests._stack import Stack
from tests.fake_telegram import Call, FakeTelegram
from tests.test_telegram import (
    BotThread,
    callback_data,
    from_worker,
    group_chat,
    jobs_with_key_prefix,
    needs_image_pipeline,
    private_chat,
    wait_feedback,
    wait_job_with_key,
)

#: Generous: the worker runs on CPU, often next to other test runs.
RESULT_TIMEOUT_SECONDS = 300
STORY_SCENES = 3


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeTelegram]:
    with FakeTelegram() as server:
        yield server


@pytest.fixture(scope="module")
def tg(fake: FakeTelegram, tmp_path_factory: pytest.TempPathFactory,
       model_cache: Path) -> Iterator[Stack]:
    """One embedded deployment, one worker, the bot polling the fake (short scenes: a quick
    story)."""
    needs_image_pipeline()
    stack = Stack.create("embedded", tmp_path_factory.mktemp("tg-cocreation"), model_cache,
                         MUSESPARK_TELEGRAM_TOKEN=fake.token, MUSESPARK_TELEGRAM_API_URL=fake.url,
                         MUSESPARK_STORY_SCENE_MAX_CHARS="60")
    bot = None
    try:
        stack.start_worker()
        assert stack.runtime is not None  # made here: Stack.settings swaps os.environ
        bot = BotThread(stack, stack.settings).start()
        yield stack
    finally:
        if bot is not None:
            bot.stop()
        stack.close()


# -- helpers ---------------------------------------------------------------------------------------


def job_for(stack: Stack, chat: int, message_id: int, suffix: str = "") -> Job:
    """The job made for a person's message (its idempotency key is chat:message)."""
    return wait_job_with_key(stack, f"telegram:{chat}:{message_id}{suffix}", timeout=60)


def jobs_for(stack: Stack, chat: int, message_id: int) -> list[Job]:
    """Every job a person's message made (its takes: ``chat:message``, ``...:take2``)."""
    key = f"telegram:{chat}:{message_id}"
    return sorted((j for j in jobs_with_key_prefix(stack, key)
                   if j.idempotency_key == key or j.idempotency_key.startswith(key + ":")),
                  key=lambda j: j.idempotency_key)


def children(stack: Stack, parent_id: str) -> list[Job]:
    with stack.runtime.store.session() as s:
        return list(s.scalars(select(Job).where(Job.parent_job_id == parent_id)
                              .order_by(Job.idempotency_key)).all())


def delivered(stack: Stack, *jobs: Job) -> list[Job]:
    done = [stack.wait_job(j.id, ("delivered", "failed"), timeout=RESULT_TIMEOUT_SECONDS)
            for j in jobs]
    for job in done:
        assert job.state == "delivered", (job.id, job.failure_reason,
                                          stack.workers[0].log()[-3000:])
    return done


def photos_of(fake: FakeTelegram, chat: int, job: Job, count: int = 1) -> list[Call]:
    """The worker's sendPhoto calls that carry ``job``'s buttons (its result)."""
    return fake.wait_calls("sendPhoto", chat_id=chat, count=count, timeout=RESULT_TIMEOUT_SECONDS,
                           where=lambda c: from_worker(c)
                           and any(d.endswith(f":{job.id}") for d in callback_data(c)))


def recipe_in_png(path: str | Path) -> dict[str, Any]:
    with Image.open(path) as image:
        return dict(json.loads(image.text["musespark"]))  # type: ignore[attr-defined]


def image_paths(stack: Stack, job_id: str) -> list[str]:
    return [a.path or "" for a in stack.runtime.store.artifacts(job_id, "image")]


def png(width: int = 128, height: int = 96) -> bytes:
    """A small real picture (a gradient, so it is no flat colour)."""
    image = Image.new("RGB", (width, height))
    image.putdata([(x * 2 % 256, y * 2 % 256, (x + y) % 256)
                   for y in range(height) for x in range(width)])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def reply_to(fake: FakeTelegram, chat: int, update: dict[str, Any], count: int) -> Call:
    """The ``count``-th sendMessage in ``chat``, checked to answer ``update``'s message."""
    reply = fake.wait_calls("sendMessage", chat_id=chat, count=count, timeout=60)[-1]
    assert int(reply.params["reply_parameters"]["message_id"]) == (
        update["message"]["message_id"]), reply.params
    return reply


def press(fake: FakeTelegram, chat: int, message_id: int, data: str) -> Call:
    """Press a button; returns Telegram's answerCallbackQuery call for that press."""
    update = fake.push(fake.callback_update(chat, message_id, data))
    query_id = update["callback_query"]["id"]
    (answer,) = fake.wait_calls("answerCallbackQuery", timeout=30, where=lambda c: str(
        c.params["callback_query_id"]) == query_id)
    return answer


def uploads(stack: Stack) -> set[str]:
    folder = stack.settings.resolved_data_dir / "uploads"
    return {str(p) for p in folder.glob("*")} if folder.is_dir() else set()


def input_paths(stack: Stack) -> set[str]:
    with stack.runtime.store.session() as s:
        return {p for p in s.scalars(select(Artifact.path).where(Artifact.kind == "input")) if p}


# -- shared results ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def picture(tg: Stack, fake: FakeTelegram) -> dict[str, Any]:
    """One /imagine (two takes) in a private chat, delivered: the jobs and their photos."""
    chat = private_chat()
    update = fake.push(fake.text_update(chat, "/imagine a lighthouse on a cliff"))
    first = job_for(tg, chat, update["message"]["message_id"])
    second = job_for(tg, chat, update["message"]["message_id"], ":take2")
    takes = delivered(tg, first, second)
    photos = [photos_of(fake, chat, take)[0] for take in takes]
    return {"chat": chat, "takes": takes, "photos": photos}


@pytest.fixture(scope="module")
def story(tg: Stack, fake: FakeTelegram) -> dict[str, Any]:
    chat = private_chat()
    update = fake.push(fake.text_update(
        chat, f"/story a fox who learns to fly --scenes {STORY_SCENES}"))
    job = job_for(tg, chat, update["message"]["message_id"])
    (job,) = delivered(tg, job)
    plan = job.params.get("plan") or {}
    scenes = sorted((j for j in children(tg, job.id) if j.intent == "scene"),
                    key=lambda j: int(j.params["story"]["scene"]))
    why = (f"plan: {len(plan.get('scenes') or [])} scene(s), note {plan.get('note')!r}, "
           f"raw {str(plan.get('raw'))[:300]!r}; scene jobs: "
           f"{[(j.id, j.state, j.failure_reason) for j in scenes]}")
    assert len(plan.get("scenes") or []) == STORY_SCENES, why
    try:
        title = fake.wait_calls("sendMessage", chat_id=chat, where=lambda c: from_worker(c)
                                and f"reroll:{job.id}" in callback_data(c))[0]
        photos = fake.wait_calls("sendPhoto", chat_id=chat, count=STORY_SCENES,
                                 where=from_worker)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{why}\nworker log:\n{tg.workers[0].log()[-4000:]}"
                             ) from None
    return {"chat": chat, "update": update, "job": job, "title": title, "photos": photos,
            "scenes": scenes}


@pytest.fixture(scope="module")
def brainstorm(tg: Stack, fake: FakeTelegram) -> dict[str, Any]:
    chat = private_chat()
    update = fake.push(fake.text_update(chat, "/brainstorm a poster for our jazz night"))
    job = job_for(tg, chat, update["message"]["message_id"])
    (job,) = delivered(tg, job)
    (result,) = fake.wait_calls("sendMessage", chat_id=chat, where=lambda c: from_worker(c)
                                and f"ideas:{job.id}" in callback_data(c))
    return {"chat": chat, "job": job, "result": result}


# -- /story ----------------------------------------------------------------------------------------


def test_a_story_arrives_as_a_title_then_one_photo_per_scene_in_order(
        tg: Stack, fake: FakeTelegram, story: dict[str, Any]) -> None:
    chat, job, title, photos, scenes = (story[k] for k in ("chat", "job", "title", "photos",
                                                           "scenes"))
    assert job.intent == "story" and job.prompt == "a fox who learns to fly"
    assert job.params["story"]["scenes"] == STORY_SCENES
    assert title.params["text"].startswith("📖 ")
    assert int(title.params["reply_parameters"]["message_id"]) == (
        story["update"]["message"]["message_id"])
    assert set(callback_data(title)) == {f"{a}:{job.id}" for a in ("reroll", "why", "up", "down")}
    assert len(photos) == STORY_SCENES, "one photo per scene, nothing more"
    assert all(title.at <= p.at for p in photos), "the title comes first"
    assert [p.params["caption"].split(" ", 1)[0] for p in photos] == [
        f"{n}/{STORY_SCENES}." for n in range(1, STORY_SCENES + 1)]

    assert len(scenes) == STORY_SCENES
    style = job.params["picture_taste"]["choice"]["style"]
    for number, (scene, photo) in enumerate(zip(scenes, photos, strict=True), start=1):
        assert scene.state == "delivered" and scene.parent_job_id == job.id
        (path,) = image_paths(tg, scene.id)
        assert photo.files["photo"] == Path(path).read_bytes()
        assert set(callback_data(photo)) == {f"{a}:{scene.id}"
                                             for a in ("refine", "why", "original", "up",
                                                       "down")}
        recipe = recipe_in_png(path)
        told = recipe["story"]
        assert {k: told[k] for k in ("id", "scene", "of")} == {
            "id": job.id, "scene": number, "of": STORY_SCENES}
        assert told["title"] and told["title"] in title.params["text"]
        assert told["text"] and photo.params["caption"] == f"{number}/{STORY_SCENES}. {told['text']}"
        assert len(told["text"]) <= 60 + 1  # MUSESPARK_STORY_SCENE_MAX_CHARS (+ a full stop)
        assert recipe["style"] == style
    # (The worker marks the progress message done after every part of the post; Telegram
    # refuses the repeats as "not modified", which the worker ignores.)
    refused = [c for c in fake.calls(chat_id=chat, ok=False) if c.method != "editMessageText"]
    assert not refused, "Telegram refused a part"


# -- /brainstorm and a pick ------------------------------------------------------------------------


def test_brainstorm_offers_numbered_picks_and_a_pick_draws_that_idea(
        tg: Stack, fake: FakeTelegram, brainstorm: dict[str, Any]) -> None:
    chat, job, result = brainstorm["chat"], brainstorm["job"], brainstorm["result"]
    data = callback_data(result)
    picks = [d for d in data if d.startswith("pick")]
    assert 3 <= len(picks) <= 5
    assert picks == [f"pick{n}:{job.id}" for n in range(1, len(picks) + 1)]
    assert f"ideas:{job.id}" in data and f"why:{job.id}" in data
    ideas = job.params["ideas"]
    assert len(ideas) == len(picks)

    answer = press(fake, chat, result.result["message_id"], f"pick2:{job.id}")
    assert answer.ok
    rows = wait_feedback(tg, job.id, 1)
    assert [(r.kind, r.value) for r in rows] == [("button", "pick2")]
    drawn = fake.wait_for(lambda: [j for j in children(tg, job.id) if j.kind == "image"]
                          if len([j for j in children(tg, job.id) if j.kind == "image"]) == 2
                          else [], what="two takes of the picked idea")
    assert {j.prompt for j in drawn} == {ideas[1]["prompt"]}
    assert all(j.intent == "imagine" and j.params["picked"]["idea"] == 2 for j in drawn)
    for take in delivered(tg, *drawn):
        (photo,) = photos_of(fake, chat, take)
        (path,) = image_paths(tg, take.id)
        assert photo.files["photo"] == Path(path).read_bytes()


# -- refinement by reply ---------------------------------------------------------------------------


def test_a_reply_to_a_picture_refines_it(tg: Stack, fake: FakeTelegram,
                                         picture: dict[str, Any]) -> None:
    chat, (parent, _), (photo, _) = picture["chat"], picture["takes"], picture["photos"]
    update = fake.push(fake.text_update(chat, "make it at night",
                                        reply_to=photo.result["message_id"]))
    job = job_for(tg, chat, update["message"]["message_id"])
    assert job.intent == "refine" and job.kind == "image"
    assert job.parent_job_id == parent.id
    assert job.params["refine"]["job_id"] == parent.id
    assert job.params["refine"]["instruction"] == "make it at night"
    (job,) = delivered(tg, job)
    (result,) = photos_of(fake, chat, job)
    assert int(result.params["reply_parameters"]["message_id"]) == (
        update["message"]["message_id"])
    (path,) = image_paths(tg, job.id)
    assert result.files["photo"] == Path(path).read_bytes()
    recipe = recipe_in_png(path)
    assert recipe["refined_from"] == {"job_id": parent.id, "position": 0}
    assert recipe["instruction"] == "make it at night"
    assert "night" in recipe["prompt"].lower()


# -- /remix ----------------------------------------------------------------------------------------


def test_a_photo_captioned_remix_is_redrawn_from_the_largest_size(
        tg: Stack, fake: FakeTelegram) -> None:
    chat = private_chat()
    sent = png(160, 120)
    update = fake.push(fake.photo_update(chat, sent, caption="/remix as a watercolor"))
    sizes = update["message"]["photo"]
    assert len(sizes) == 2 and sizes[0]["width"] < 160, "a preview, then the photo"
    job_for(tg, chat, update["message"]["message_id"])
    status = reply_to(fake, chat, update, 1)  # sent once every take's job is made
    assert "Remixing" in status.params["text"]
    # The caption names a style, so that is the person's choice: one take, in that style.
    (job,) = jobs_for(tg, chat, update["message"]["message_id"])
    assert job.intent == "remix" and job.kind == "image" and job.prompt == "as a watercolor"
    assert job.params["taste"]["choice"]["style"] == "watercolor"
    # Only the full size was fetched.
    ids = {size["file_id"] for size in sizes}
    (got,) = [c for c in fake.calls("getFile") if c.params["file_id"] in ids]
    assert got.params["file_id"] == sizes[-1]["file_id"] and got.ok
    assert got.result["file_path"] in {c.params["file_path"] for c in fake.calls("downloadFile")}

    takes = delivered(tg, job)
    (kept,) = {a.path for t in takes for a in tg.runtime.store.artifacts(t.id, "input")}
    assert kept is not None
    with Image.open(kept) as picture, Image.open(io.BytesIO(sent)) as original:
        assert picture.size == (160, 120)
        assert picture.convert("RGB").tobytes() == original.convert("RGB").tobytes()
    for take in takes:
        (photo,) = photos_of(fake, chat, take)
        (path,) = image_paths(tg, take.id)
        assert photo.files["photo"] == Path(path).read_bytes()
        recipe = recipe_in_png(path)
        assert recipe["remix_of"]["path"] == kept and recipe["style"] == "watercolor"
    # The adapter's own copy of the download is gone; core's copy is the job's input.
    assert uploads(tg) <= input_paths(tg)


def test_a_remix_in_a_group_is_for_the_bot_unless_it_names_another(
        tg: Stack, fake: FakeTelegram) -> None:
    group = group_chat()
    ignored = fake.push(fake.photo_update(group, png(), caption="/remix@some_other_bot as ink"))
    update = fake.push(fake.document_update(
        group, png(), caption=f"/remix@{fake.username} as a pencil sketch",
        mime_type="image/png", file_name="sketch.png"))
    job_for(tg, group, update["message"]["message_id"])
    status = reply_to(fake, group, update, 1)
    assert "Remixing" in status.params["text"]
    # No style named: takes in different styles, from the one picture.
    takes = jobs_for(tg, group, update["message"]["message_id"])
    assert len(takes) == tg.settings.image_takes == 2
    assert {(j.intent, j.prompt) for j in takes} == {("remix", "as a pencil sketch")}
    assert len({j.params["taste"]["choice"]["style"] for j in takes}) == 2
    assert len({j.params["remix"]["path"] for j in takes}) == 1
    # A group's plain "/remix" caption is addressed to the bot as well.
    broken = fake.push(fake.photo_update(group, b"\xff\xd8\xff not really a jpeg",
                                         caption="/remix as ink"))
    refusal = reply_to(fake, group, broken, 2)
    assert "can't read" in refusal.params["text"]
    delivered(tg, *takes)
    assert not jobs_with_key_prefix(tg, f"telegram:{group}:{ignored['message']['message_id']}")
    assert not [c for c in fake.calls("sendMessage", chat_id=group) if int(
        c.params.get("reply_parameters", {}).get("message_id", 0)) == (
        ignored["message"]["message_id"])]
    assert uploads(tg) <= input_paths(tg)


def test_remix_refusals_are_answered_and_make_no_job(tg: Stack, fake: FakeTelegram) -> None:
    chat = private_chat()
    before = uploads(tg)
    gets = len(fake.calls("getFile"))

    # Over 10 MB: refused before anything is downloaded.
    huge = fake.push(fake.document_update(chat, png(), caption="/remix as a mosaic",
                                          mime_type="image/png", file_name="huge.png",
                                          file_size=12_500_000))
    text = reply_to(fake, chat, huge, 1).params["text"]
    assert "12.5 MB" in text and "10 MB" in text
    # Not a picture: refused by its type, before downloading.
    notes = fake.push(fake.document_update(chat, b"shopping list: eggs, milk\n",
                                           caption="/remix as a poem", mime_type="text/plain",
                                           file_name="notes.txt"))
    text = reply_to(fake, chat, notes, 2).params["text"]
    assert "notes.txt" in text and "not a picture" in text
    assert len(fake.calls("getFile")) == gets, "nothing was downloaded"
    # A damaged picture: downloaded, then refused by core's check.
    broken = fake.push(fake.document_update(chat, png()[:60], caption="/remix as a mosaic",
                                            mime_type="image/png", file_name="broken.png"))
    text = reply_to(fake, chat, broken, 3).params["text"]
    assert "broken.png" in text and "can't read" in text
    # An untyped file is judged by its bytes.
    untyped = fake.push(fake.document_update(chat, b"\x00" * 200, caption="/remix as a mosaic",
                                             mime_type=None, file_name="blob"))
    assert "can't read" in reply_to(fake, chat, untyped, 4).params["text"]
    # A video is no picture either.
    video = fake.push(fake.message_update(chat, caption="/remix as a mosaic",
                                          caption_entities=fake.entities("/remix"),
                                          video={**fake.add_file(b"\x00" * 50), "width": 2,
                                                 "height": 2, "duration": 1}))
    assert "only remix pictures" in reply_to(fake, chat, video, 5).params["text"]
    # A caption core refuses is answered before downloading.
    empty = fake.push(fake.photo_update(chat, png(), caption="/remix"))
    assert "empty" in reply_to(fake, chat, empty, 6).params["text"]
    # /remix as text, with no picture: core says to attach one.
    bare = fake.push(fake.text_update(chat, "/remix as a watercolor"))
    assert "Attach the picture" in reply_to(fake, chat, bare, 7).params["text"]

    assert len(fake.calls("getFile")) == gets + 2  # the damaged picture and the untyped file
    assert jobs_with_key_prefix(tg, f"telegram:{chat}:") == []
    assert uploads(tg) == before, "nothing refused is kept"
    assert not [c for c in fake.calls(chat_id=chat) if from_worker(c)]


# -- /help and the command menu --------------------------------------------------------------------


def test_help_and_the_command_menu_offer_the_new_commands(tg: Stack, fake: FakeTelegram) -> None:
    chat = private_chat()
    update = fake.push(fake.text_update(chat, "/help"))
    text = reply_to(fake, chat, update, 1).params["text"]
    for name in ("story", "brainstorm", "remix"):
        assert f"/{name}" in text
    names = {c["command"] for c in fake.commands}
    assert {"story", "brainstorm", "remix"} <= names and names == set(COMMANDS)


# -- every button answers --------------------------------------------------------------------------


def test_every_button_on_every_result_kind_is_answered(
        tg: Stack, fake: FakeTelegram, picture: dict[str, Any], story: dict[str, Any],
        brainstorm: dict[str, Any]) -> None:
    chat, job, photo = picture["chat"], picture["takes"][1], picture["photos"][1]
    message_id = photo.result["message_id"]
    offered = {d.split(":")[0] for d in callback_data(photo)}
    wanted = ["reroll", "more", "vary1", "upscale", "refine", "why", "up", "down", "delete"]
    assert set(wanted) <= offered
    answers = {action: press(fake, chat, message_id, f"{action}:{job.id}")
               for action in wanted}
    assert all(a.ok for a in answers.values())
    refine = answers["refine"].params.get("text") or ""
    assert "Reply to this result with what to change" in refine, refine
    assert answers["up"].params.get("text") == "Thanks, noted."
    assert "Why this" in (answers["why"].params.get("text") or "")
    fake.wait_calls("deleteMessage", chat_id=chat,
                    where=lambda c: int(c.params["message_id"]) == message_id)
    for action in ("reroll", "more", "vary1", "upscale"):
        wait_job_with_key(tg, f"telegram:cb:{answers[action].params['callback_query_id']}"
                              f":{action}")
    made = {j.idempotency_key.rsplit(":", 1)[-1] for j in children(tg, job.id)}
    assert {"reroll", "more", "vary1", "upscale"} <= made
    assert sorted(r.value for r in wait_feedback(tg, job.id, 6) if r.kind == "button") == sorted(
        ["reroll", "more", "vary1", "upscale", "up", "down"])

    # The story's title and a scene, and the brainstorm (its pick was pressed above).
    title_id = story["title"].result["message_id"]
    for action in ("why", "up", "down"):
        assert press(fake, story["chat"], title_id, f"{action}:{story['job'].id}").ok
    scene, scene_photo = story["scenes"][0], story["photos"][0]
    for action in ("refine", "why", "up"):
        answer = press(fake, story["chat"], scene_photo.result["message_id"],
                       f"{action}:{scene.id}")
        assert answer.ok
        if action == "refine":
            assert "Reply to this result" in (answer.params.get("text") or "")
    # A scene's 📎 Original file: its PNG as a document, bytes intact.
    assert press(fake, story["chat"], scene_photo.result["message_id"],
                 f"original:{scene.id}").ok
    (path,) = image_paths(tg, scene.id)
    fake.wait_calls("sendDocument", chat_id=story["chat"],
                    where=lambda c: c.files.get("document") == Path(path).read_bytes())
    assert press(fake, brainstorm["chat"], brainstorm["result"].result["message_id"],
                 f"why:{brainstorm['job'].id}").ok
    # A button of a result the bot no longer knows still gets an answer.
    stale = press(fake, brainstorm["chat"], brainstorm["result"].result["message_id"],
                  "reroll:no-such-job")
    assert "no longer know" in (stale.params.get("text") or "")
