"""Co-creation on Discord: /story, /brainstorm, /remix and every button a result can carry.

As in tests/test_discord_adapter.py, interactions enter through discord.py's gateway parser
against the local fake Discord REST API, and core runs for real on SQLite without a worker.
Result messages are posted by the real deliverer (workers/delivery/discord.py), so the buttons
pressed here are exactly the components a worker sends.
"""

from __future__ import annotations

import asyncio
import io
import re
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from sqlalchemy import select

from bots.discord import MuseSparkDiscord
from bots.runtime import BotRuntime
from core.actions import QUIET_ACTIONS, buttons_for
from core.orchestrator import UPSCALE_FACTOR
from core.outbound import Button, DeliveryTarget, MessageKind, OutboundMessage
from core.settings import Settings
from core.store import Job
from core.uploads import UPLOAD_MAX_BYTES
from tests.fake_discord import (
    APPLICATION_ID,
    BOT_TOKEN,
    CDN_PREFIX,
    CHANNEL_ID,
    Call,
    FakeDiscord,
    button_payload,
    modal_submit_payload,
    slash_payload,
)
# The fake Discord and the SQLite runtime are the adapter tests' own fixtures.
from tests.test_discord_adapter import REQUESTER, fake, logged_in, runtime, until  # noqa: F401
from workers.delivery.discord import MESSAGE_MAX_CHARS, DiscordDeliverer

DEADLINE_SECONDS = 3.0  # Discord's: an interaction unanswered by then is gone (404/10062)
EPHEMERAL = 64


def token_calls(fake: FakeDiscord, payload: dict[str, Any]) -> list[Call]:
    return [c for c in fake.calls if payload["token"] in c.path]


def job_ids(text: str) -> list[str]:
    """The ids in core's status: "(job ab12cd34ef56, 1 ahead of you)" or "(jobs a, b)"."""
    found = re.search(r"\(jobs? ([0-9a-f]{12}(?:, [0-9a-f]{12})*)\b", text)
    assert found, text
    return found.group(1).split(", ")


def all_jobs(runtime: BotRuntime) -> list[Job]:
    with runtime.store.session() as s:
        return list(s.scalars(select(Job)).all())


async def dispatch(fake: FakeDiscord, client: MuseSparkDiscord,
                   payload: dict[str, Any]) -> tuple[Call, float]:
    """Hand ``payload`` to discord.py's gateway parser; the callback and how long it took."""
    started = time.monotonic()
    client._connection.parse_interaction_create(payload)
    callback = (await until(lambda: [c for c in token_calls(fake, payload)
                                     if c.path.endswith("/callback")]))[0]
    return callback, time.monotonic() - started


async def status_of(fake: FakeDiscord, client: MuseSparkDiscord,
                    payload: dict[str, Any]) -> tuple[Call, str]:
    """A job-making interaction: deferred ("thinking") in time, then core's status fills it."""
    callback, took = await dispatch(fake, client, payload)
    assert took < DEADLINE_SECONDS, "Discord's 3 s deadline"
    assert callback.json == {"type": 5}, callback.json
    edit = (await until(lambda: [c for c in token_calls(fake, payload)
                                 if c.method == "PATCH"]))[0]
    return callback, edit.json["content"]


def png(size: int = 48) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (200, 120, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


# -- /story and /brainstorm --------------------------------------------------------------------

@pytest.mark.parametrize(("options", "scenes", "style"), [
    ({"prompt": "a fox who learns to fly", "scenes": 3, "style": "watercolor"}, 3, "watercolor"),
    ({"prompt": "a fox who learns to fly"}, 4, None)])
def test_story_is_deferred_then_shows_its_plan(fake: FakeDiscord, runtime: BotRuntime,
                                               options: dict[str, Any], scenes: int,
                                               style: str | None) -> None:
    async def scenario() -> None:
        async with logged_in(runtime) as client:
            payload = slash_payload(fake, "story", options, user_id=REQUESTER)
            _, status = await status_of(fake, client, payload)
            assert f"Writing a story in {scenes} scenes" in status, status
            assert "a fox who learns to fly" in status
            (job_id,) = job_ids(status)
            job = await until(lambda: (j := runtime.store.get_job(job_id)) and
                              j.delivery.get("extra", {}).get("application_id") and j)
        assert (job.intent, job.kind, job.prompt) == ("story", "text", "a fox who learns to fly")
        assert job.params["story"] == {"scenes": scenes}
        chosen = job.params["picture_taste"]["choice"]["style"]
        assert (chosen == style) if style else (chosen in status)
        assert job.delivery["interaction_token"] == payload["token"]

    asyncio.run(scenario())


def test_brainstorm_is_deferred_then_shows_its_status(fake: FakeDiscord,
                                                      runtime: BotRuntime) -> None:
    async def scenario() -> None:
        async with logged_in(runtime) as client:
            payload = slash_payload(fake, "brainstorm", {"prompt": "a poster for our jazz night"},
                                    user_id=REQUESTER)
            _, status = await status_of(fake, client, payload)
        assert "Thinking up ideas" in status and "a poster for our jazz night" in status
        (job_id,) = job_ids(status)
        job = runtime.store.get_job(job_id)
        assert job is not None and (job.intent, job.kind) == ("brainstorm", "text")
        assert job.params["idea_styles"] and job.params["max_new_tokens"] > 0

    asyncio.run(scenario())


def test_story_scenes_out_of_range_are_refused_by_discord_py_before_core(
        fake: FakeDiscord, runtime: BotRuntime) -> None:
    """A stale definition sending 9 scenes: refused privately, no job."""
    async def scenario() -> None:
        async with logged_in(runtime) as client:
            payload = slash_payload(fake, "story", {"prompt": "a fox", "scenes": 9},
                                    user_id=REQUESTER)
            callback, _ = await dispatch(fake, client, payload)
        assert callback.json["type"] == 4 and callback.json["data"]["flags"] == EPHEMERAL
        assert not all_jobs(runtime)

    asyncio.run(scenario())


# -- /remix ------------------------------------------------------------------------------------

def uploads(runtime: BotRuntime) -> set[Path]:
    folder = runtime.settings.resolved_data_dir / "uploads"
    return set(folder.iterdir()) if folder.exists() else set()


def test_remix_downloads_the_attachment_and_makes_a_remix_job(fake: FakeDiscord,
                                                              runtime: BotRuntime) -> None:
    async def scenario() -> None:
        async with logged_in(runtime) as client:
            picture = fake.attachment("fox.png", png())
            payload = slash_payload(fake, "remix", {"prompt": "as a watercolor at night"},
                                    user_id=REQUESTER, attachments={"image": picture})
            _, status = await status_of(fake, client, payload)
        assert "Remixing" in status and "as a watercolor at night" in status, status
        assert fake.calls_to("GET", rf"^{CDN_PREFIX}/{picture['id']}/fox.png$")
        ids = job_ids(status)
        jobs = [runtime.store.get_job(j) for j in ids]
        assert all(j is not None and j.intent == "remix" and j.kind == "image" for j in jobs)
        kept = {Path(j.params["remix"]["path"]) for j in jobs if j}
        inputs = {Path(a.path) for j in ids for a in runtime.store.artifacts(j, "input") if a.path}
        assert kept == inputs and all(p.exists() for p in kept)
        with Image.open(next(iter(kept))) as image:
            assert image.size == (48, 48)
        # Only the job's own copy stays: ``/forget uploads`` can erase everything kept.
        assert uploads(runtime) == kept

    asyncio.run(scenario())


def test_an_oversized_attachment_is_refused_at_once_without_downloading(
        fake: FakeDiscord, runtime: BotRuntime) -> None:
    async def scenario() -> None:
        async with logged_in(runtime) as client:
            huge = fake.attachment("huge.png", png(), size=UPLOAD_MAX_BYTES + 1_500_000)
            payload = slash_payload(fake, "remix", {"prompt": "as a watercolor"},
                                    user_id=REQUESTER, attachments={"image": huge})
            callback, took = await dispatch(fake, client, payload)
            await asyncio.sleep(0.2)
        assert took < DEADLINE_SECONDS
        assert callback.json["type"] == 4 and callback.json["data"]["flags"] == EPHEMERAL
        assert "11.5 MB" in callback.json["data"]["content"]
        assert "up to 10 MB" in callback.json["data"]["content"]
        assert not fake.calls_to("GET", CDN_PREFIX), "never downloaded"
        assert len(token_calls(fake, payload)) == 1 and not all_jobs(runtime)

    asyncio.run(scenario())


@pytest.mark.parametrize(("filename", "data", "content_type"), [
    ("notes.txt", b"not a picture at all\n", "text/plain"),
    ("broken.png", png(256)[:380], "image/png"),  # a PNG cut short, half its bytes gone
    ("fake.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 64, "image/png"),  # a PNG signature, no image
])
def test_a_bad_attachment_ends_with_a_clear_private_answer_and_no_job(
        fake: FakeDiscord, runtime: BotRuntime, filename: str, data: bytes,
        content_type: str) -> None:
    """Known only after the download, so after the public "thinking": that message goes and
    the answer follows privately (a public message cannot turn ephemeral)."""
    async def scenario() -> None:
        async with logged_in(runtime) as client:
            attachment = fake.attachment(filename, data, content_type)
            payload = slash_payload(fake, "remix", {"prompt": "as a watercolor"},
                                    user_id=REQUESTER, attachments={"image": attachment})
            callback, took = await dispatch(fake, client, payload)
            calls = await until(lambda: len(token_calls(fake, payload)) >= 3 and
                                token_calls(fake, payload))
        assert took < DEADLINE_SECONDS and callback.json == {"type": 5}
        assert [c.method for c in calls] == ["POST", "DELETE", "POST"]
        answer = calls[2].json
        assert answer["flags"] == EPHEMERAL
        assert f"“{filename}” as a picture" in answer["content"], answer
        assert "PNG, JPEG or WebP" in answer["content"]
        assert not all_jobs(runtime) and not uploads(runtime)

    asyncio.run(scenario())


# -- every button a result can carry ---------------------------------------------------------

def deliverer(fake: FakeDiscord) -> DiscordDeliverer:
    return DiscordDeliverer(Settings(_env_file=None,  # type: ignore[call-arg]
                                     discord_api_url=fake.api_url, discord_token=BOT_TOKEN))


async def post(fake: FakeDiscord, runtime: BotRuntime, job: Job, text: str,
               buttons: tuple[Button, ...], *, under: Job | None = None,
               position: int = 0) -> dict[str, Any]:
    """Post a result as a worker does (the real deliverer, after the interaction token's
    15 minutes: a channel message) and record it delivered under ``under`` (a story)."""
    (message_id,) = await asyncio.to_thread(
        deliverer(fake).send, DeliveryTarget(platform="discord", chat_id=CHANNEL_ID),
        OutboundMessage(MessageKind.RESULT, text, job_id=job.id, buttons=buttons))
    runtime.store.record_delivered((under or job).id, "discord", CHANNEL_ID, position,
                                   [message_id])
    return fake.messages[message_id]


def patch_job(runtime: BotRuntime, job_id: str, **fields: Any) -> None:
    """Stand in for the worker's bookkeeping (a brainstorm's ideas, a story's outbox)."""
    with runtime.store.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        for name, value in fields.items():
            setattr(job, name, value)


async def make(fake: FakeDiscord, client: MuseSparkDiscord, runtime: BotRuntime,
               command: str, options: dict[str, Any]) -> Job:
    payload = slash_payload(fake, command, options, user_id=REQUESTER)
    _, status = await status_of(fake, client, payload)
    job = runtime.store.get_job(job_ids(status)[0])
    assert job is not None
    return job


async def results(fake: FakeDiscord, runtime: BotRuntime) -> list[tuple[Job, dict[str, Any]]]:
    """One delivered result of each kind, with the buttons core puts on it."""
    async with logged_in(runtime) as client:
        image = await make(fake, client, runtime, "imagine", {"prompt": "a lighthouse",
                                                              "style": "anime", "seed": 7})
        text = await make(fake, client, runtime, "write", {"prompt": "a haiku about rain"})
        story = await make(fake, client, runtime, "story", {"prompt": "a fox who flies",
                                                            "scenes": 2})
        brainstorm = await make(fake, client, runtime, "brainstorm", {"prompt": "a jazz poster"})
    # What the workers would have made: a scene's picture job, a brainstorm's three ideas.
    scene, _ = runtime.store.create_job(
        idempotency_key=f"{story.idempotency_key}:scene1", kind="image", intent="scene",
        user_id=story.user_id, community_id=story.community_id, parent_job_id=story.id,
        prompt="a fox with paper wings", expanded_prompt="a fox with paper wings, watercolor",
        params={"count": 1, "taste": story.params["picture_taste"], "part_of": story.id,
                "story": {"id": story.id, "title": "Wings", "scene": 1, "of": 2,
                          "text": "She builds wings."}},
        seed=story.seed + 1, platform="discord", delivery=story.delivery)
    ideas = [{"title": f"Idea {n}", "prompt": f"a jazz poster, idea {n}", "style": style}
             for n, style in enumerate(("anime", "pixel-art", "line-art"), start=1)]
    patch_job(runtime, brainstorm.id, params={**brainstorm.params, "ideas": ideas})
    title = OutboundMessage(MessageKind.RESULT, "📖 Wings", job_id=story.id,
                            buttons=buttons_for(story.id, kind="text", intent="story"))
    scene_post = OutboundMessage(MessageKind.RESULT, "1/2. She builds wings.", job_id=scene.id,
                                 buttons=buttons_for(scene.id, kind="image", intent="scene"))
    patch_job(runtime, story.id, outbox=[title.to_dict(), scene_post.to_dict()])
    shown = [
        (image, await post(fake, runtime, image, "“a lighthouse”",
                           buttons_for(image.id, kind="image", intent="imagine"))),
        (text, await post(fake, runtime, text, "Rain on the roof",
                          buttons_for(text.id, kind="text", intent="write"))),
        (story, await post(fake, runtime, story, title.text, title.buttons)),
        (scene, await post(fake, runtime, scene, scene_post.text, scene_post.buttons,
                           under=story, position=1)),
        (runtime.store.get_job(brainstorm.id) or brainstorm, await post(
            fake, runtime, brainstorm, "1. Idea 1\n2. Idea 2\n3. Idea 3",
            buttons_for(brainstorm.id, kind="text", intent="brainstorm", ideas=3))),
    ]
    return shown


def pressed_ids(message: dict[str, Any]) -> list[str]:
    return [b["custom_id"] for row in message["components"] for b in row["components"]]


def test_every_button_on_every_kind_of_result_answers_after_a_restart(
        fake: FakeDiscord, runtime: BotRuntime) -> None:
    """Each button core puts on an image, a text, a story's title, a scene and a brainstorm is
    answered within the 3 s by a client that never sent it (rebuilt from ``custom_id``)."""
    async def scenario() -> None:
        shown = await results(fake, runtime)
        async with logged_in(runtime) as restarted:
            for job, message in shown:
                custom_ids = pressed_ids(message)
                buttons = buttons_for(job.id, kind=job.kind, intent=job.intent,
                                      ideas=len(job.params.get("ideas", [])))
                assert custom_ids == [f"{b.action}:{job.id}" for b in buttons]
                # delete last: it removes the message the others are pressed on
                for custom_id in sorted(custom_ids, key=lambda c: c.startswith("delete:")):
                    await press_and_check(fake, restarted, runtime, job, message, custom_id)

    asyncio.run(scenario())


async def press_and_check(fake: FakeDiscord, client: MuseSparkDiscord, runtime: BotRuntime,
                          job: Job, message: dict[str, Any], custom_id: str) -> None:
    action = custom_id.split(":")[0]
    press = button_payload(fake, message, custom_id, user_id=REQUESTER)
    callback, took = await dispatch(fake, client, press)
    assert took < DEADLINE_SECONDS, custom_id
    if action == "refine":
        assert callback.json["type"] == 9, callback.json  # a modal is the first answer
        return await submit_refine(fake, client, runtime, job, message, callback.json["data"])
    if action == "original":  # no files here (no worker drew it): said privately
        assert callback.json == {"type": 5}, (custom_id, callback.json)
        answer = (await until(lambda: [c for c in token_calls(fake, press)
                                       if c.method == "POST" and "/webhooks/" in c.path]))[0]
        assert answer.json["flags"] == EPHEMERAL and "gone" in answer.json["content"]
        return None
    if action in QUIET_ACTIONS:
        assert callback.json == {"type": 6}, (custom_id, callback.json)  # deferred update
        if action == "delete":
            await until(lambda: message["id"] not in fake.messages)
            return None
        answer = (await until(lambda: [c for c in token_calls(fake, press)
                                       if c.method == "POST" and "/webhooks/" in c.path]))[0]
        assert answer.json["flags"] == EPHEMERAL and answer.json["content"], custom_id
        return None
    assert callback.json == {"type": 5}, (custom_id, callback.json)
    edit = (await until(lambda: [c for c in token_calls(fake, press)
                                 if c.method == "PATCH"]))[0]
    (new_id, *_) = job_ids(edit.json["content"])
    child = runtime.store.get_job(new_id)
    assert child is not None and child.parent_job_id == job.id, custom_id
    assert child.delivery["reply_to"] == message["id"]
    expected_intent = {"pick": "imagine", "ideas": "brainstorm"}.get(
        action.rstrip("0123456789"), job.intent if job.intent in ("story", "brainstorm")
        else "imagine" if job.kind == "image" else "write")
    assert child.intent == expected_intent, (custom_id, child.intent)
    if action == "upscale":  # the button that used to be dead
        assert child.params["scale"] == UPSCALE_FACTOR and child.seed == job.seed
        assert child.kind == "image"
    if action.startswith("pick"):
        assert child.params["picked"]["idea"] == int(action[4:])
    if action == "ideas":
        assert child.params["avoid"] == ["Idea 1", "Idea 2", "Idea 3"]
    return None


async def submit_refine(fake: FakeDiscord, client: MuseSparkDiscord, runtime: BotRuntime,
                        job: Job, message: dict[str, Any], modal: dict[str, Any]) -> None:
    """The Refine form, filled in and sent: core refines the result the button was on."""
    assert modal["title"] and len(modal["components"]) == 1
    submit = modal_submit_payload(fake, modal, ["make it at night"], user_id=REQUESTER,
                                  message=message)
    callback, took = await dispatch(fake, client, submit)
    assert took < DEADLINE_SECONDS and callback.json == {"type": 5}
    edit = (await until(lambda: [c for c in token_calls(fake, submit)
                                 if c.method == "PATCH"]))[0]
    assert "Refining" in edit.json["content"], edit.json
    (refine_id,) = job_ids(edit.json["content"])
    refined = runtime.store.get_job(refine_id)
    assert refined is not None and refined.intent == "refine"
    assert refined.params["refine"]["job_id"] == job.id
    assert refined.params["refine"]["instruction"] == "make it at night"
    assert refined.kind == job.kind and refined.parent_job_id == job.id


# -- a story's post, as the deliverer sends it ---------------------------------------------------

def test_a_storys_post_goes_out_in_order_within_limits_with_its_buttons(
        fake: FakeDiscord, tmp_path: Path) -> None:
    """The title, then one message per scene with its picture, in order; each under 2000
    characters (long scene text split, the picture and buttons with the last part)."""
    story_id, scene_ids = "5703ea", [f"5ce4e{n}" for n in range(1, 5)]
    pictures = []
    for n in range(1, 5):
        path = tmp_path / f"scene{n}.png"
        Image.new("RGB", (64, 64), (40 * n, 80, 120)).save(path)
        pictures.append(str(path))
    scene_texts = ["A fox looks up at the birds.", "She builds wings of paper.",
                   "The wind takes her. " * 120, "She lands, laughing."]
    messages = [OutboundMessage(MessageKind.RESULT, "📖 Wings\n— SmolLM2", job_id=story_id,
                                buttons=buttons_for(story_id, kind="text", intent="story"))]
    messages += [OutboundMessage(MessageKind.RESULT, f"{n}/4. {text}", images=(picture,),
                                 job_id=scene_id,
                                 buttons=buttons_for(scene_id, kind="image", intent="scene"))
                 for n, (text, picture, scene_id) in enumerate(
                     zip(scene_texts, pictures, scene_ids), start=1)]
    target = DeliveryTarget(platform="discord", chat_id=CHANNEL_ID, reply_to="999",
                            interaction_token="itoken-story",
                            extra={"application_id": APPLICATION_ID})
    sender = deliverer(fake)
    sent = [sender.send(target, m) for m in messages]
    posts = [c for c in fake.calls if c.method == "POST"]
    assert all(c.path == f"/webhooks/{APPLICATION_ID}/itoken-story" and c.json for c in posts)
    assert [len(ids) for ids in sent] == [1, 1, 1, 2, 1]  # scene 3's text needs two messages
    assert [fake.messages[i]["content"] for ids in sent for i in ids] == [
        c.json["content"] for c in posts]  # posted in order, one message each
    assert all(len(c.json["content"]) <= MESSAGE_MAX_CHARS for c in posts)
    contents = [c.json["content"] for c in posts]
    assert contents[0].startswith("📖 Wings")
    assert [contents[n][:2] for n in (1, 2, 3, 5)] == ["1/", "2/", "3/", "4/"]
    assert " ".join((contents[3] + " " + contents[4]).split()) == " ".join(
        messages[3].text.split())
    with_files = [c for c in posts if c.files]
    assert len(with_files) == 4 and all(len(c.files) == 1 for c in with_files)
    assert [c.json["attachments"] for c in with_files] == [
        [{"id": 0, "filename": f"musespark-{s}-1.png"}] for s in scene_ids]
    for upload in (c.files[0] for c in with_files):
        with Image.open(io.BytesIO(upload["data"])) as image:
            assert image.size == (64, 64)
    assert [c.files != [] for c in posts] == [False, True, True, False, True, True]
    shown = [[b["custom_id"] for row in c.json["components"] for b in row["components"]]
             for c in posts if "components" in c.json]
    assert shown == [[f"{b.action}:{b.job_id}" for b in m.buttons] for m in messages]
    assert "components" not in posts[3].json  # buttons go with a split text's last part
    assert all(len(row["components"]) <= 5 for c in posts
               for row in c.json.get("components", []))


def test_in_mention_mode_a_reply_to_a_result_refines_it(fake: FakeDiscord,
                                                       runtime: BotRuntime) -> None:
    """A reply to the bot's picture (no @mention needed) is a refinement of that picture."""
    from tests.fake_discord import user_payload

    async def scenario() -> None:
        client = MuseSparkDiscord(runtime.orchestrator, runtime.store, mention_mode=True)
        await client.login(BOT_TOKEN)
        try:
            job, _ = runtime.store.create_job(
                idempotency_key="discord:seed-job", kind="image", intent="imagine",
                user_id=runtime.store.ensure_user("discord", _actor()),
                community_id=None, prompt="a lighthouse", expanded_prompt="a lighthouse",
                params={"count": 1}, seed=5, platform="discord",
                delivery=DeliveryTarget("discord", CHANNEL_ID).to_dict())
            result = fake.add_message(CHANNEL_ID, fake.bot_user, "“a lighthouse” · seed 5")
            runtime.store.record_delivered(job.id, "discord", CHANNEL_ID, 0, [result["id"]])
            reply = fake.add_message(CHANNEL_ID, user_payload(REQUESTER, "Ada"),
                                     "make it at night")
            reply["message_reference"] = {"message_id": result["id"],
                                          "channel_id": CHANNEL_ID}
            reply["referenced_message"] = result
            reply["type"] = 19
            client._connection.parse_message_create(reply)
            refined = await until(lambda: [j for j in all_jobs(runtime)
                                           if j.intent == "refine"])
            assert refined[0].params["refine"]["job_id"] == job.id
            assert refined[0].params["refine"]["instruction"] == "make it at night"
            # An ordinary message that neither mentions nor replies to the bot is left alone.
            other = fake.add_message(CHANNEL_ID, user_payload(REQUESTER, "Ada"), "hello all")
            client._connection.parse_message_create(other)
            await asyncio.sleep(0.3)
            assert len([j for j in all_jobs(runtime) if j.intent != "imagine"]) == 1
        finally:
            await client.close()

    asyncio.run(scenario())


def _actor() -> Any:
    from core.events import Actor

    return Actor(REQUESTER, "Ada")
