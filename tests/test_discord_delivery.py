"""Results posted to Discord by a real Celery worker process, against a local fake REST API.

The bot side is the real adapter (discord.py, logged in to the fake); the worker is a separate
``python -m workers`` process whose ``MUSESPARK_DISCORD_API_URL`` points at the fake. The
in-process tests at the end drive :class:`DiscordDeliverer` directly over real HTTP for the
limits that a worker cannot be made to hit on demand (file size, refusals).
"""

from __future__ import annotations

import asyncio
import re
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from bots.discord import MuseSparkDiscord
from core.actions import buttons_for
from core.errors import DeliveryError
from core.outbound import Button, DeliveryTarget, MessageKind, OutboundMessage
from core.settings import Settings
from tests.fake_discord import (
    APPLICATION_ID,
    BOT_TOKEN,
    CHANNEL_ID,
    FakeDiscord,
    button_payload,
    slash_payload,
    serving,
)
from tests.test_discord_adapter import OTHER, REQUESTER, until
from workers.delivery.discord import (
    MESSAGE_MAX_CHARS,
    DiscordDeliverer,
    shrink_image,
    split_text,
)

JOB_SECONDS = 180.0


@pytest.fixture
def fake() -> Iterator[FakeDiscord]:
    with serving() as server:
        yield server


def _job_of(edit_content: str) -> str:
    found = re.search(r"\(jobs? ([0-9a-f]+)", edit_content)
    assert found, edit_content
    return found.group(1)


async def _slash(fake: FakeDiscord, client: MuseSparkDiscord, options: dict[str, Any],
                 user_id: str = REQUESTER, command: str = "imagine") -> tuple[dict[str, Any], str]:
    payload = slash_payload(fake, command, options, user_id=user_id)
    client._connection.parse_interaction_create(payload)
    edit = (await until(lambda: [c for c in fake.calls_to("PATCH", payload["token"])]))[0]
    return payload, _job_of(edit.json["content"])


def _followups(fake: FakeDiscord, token: str) -> list[Any]:
    return [c for c in fake.calls_to("POST", rf"^/webhooks/{APPLICATION_ID}/{token}$")
            if c.status == 200]


def _start(make_stack, fake: FakeDiscord):  # type: ignore[no-untyped-def]
    stack = make_stack(MUSESPARK_DISCORD_API_URL=fake.api_url, MUSESPARK_DISCORD_TOKEN=BOT_TOKEN)
    stack.start_worker()
    return stack


async def _wait_job(stack, job_id: str) -> Any:  # type: ignore[no-untyped-def]
    job = await asyncio.to_thread(stack.wait_job, job_id, ("delivered", "failed"), JOB_SECONDS)
    assert job.state == "delivered", job.failure_reason
    return job


# How Discord posts does not depend on the broker or the database: one deployment each.
@pytest.mark.parametrize("make_stack", ["distributed"], indirect=True)
def test_buttons_restarts_rate_limits_and_expired_tokens_end_to_end(make_stack,
                                                                     fake: FakeDiscord) -> None:
    stack = _start(make_stack, fake)
    store = stack.runtime.store

    async def scenario() -> None:
        client = MuseSparkDiscord(stack.runtime.orchestrator, store)
        await client.login(BOT_TOKEN)
        try:
            # 1. The result arrives as a follow-up with its buttons; its id maps back to the job.
            payload, job_id = await _slash(fake, client, {"prompt": "a haiku about rain"},
                                           command="write")
            await _wait_job(stack, job_id)
            (result,) = _followups(fake, payload["token"])
            assert result.json["allowed_mentions"] == {"parse": []}
            assert "SmolLM2" in result.json["content"]
            custom_ids = [b["custom_id"] for row in result.json["components"]
                          for b in row["components"]]
            assert {f"reroll:{job_id}", f"more:{job_id}", f"delete:{job_id}"} <= set(custom_ids)
            assert all(len(c) <= 100 for c in custom_ids)
            progress = [c.json["content"] for c in fake.calls_to("PATCH", payload["token"])]
            assert any("Writing" in p and job_id in p for p in progress), progress  # adapter
            assert "✍️ Writing…" in progress, progress  # the worker's progress edit
            message_id = next(m["id"] for m in fake.messages.values()
                              if m["components"] == result.json["components"])
            delivered = store.find_delivered("discord", CHANNEL_ID, message_id)
            assert delivered is not None and delivered.job_id == job_id
            message = fake.messages[message_id]

            # 2. Delete pressed by someone else: refused, privately; the result stays.
            other = button_payload(fake, message, f"delete:{job_id}", user_id=OTHER)
            client._connection.parse_interaction_create(other)
            refusal = (await until(lambda: fake.calls_to(
                "POST", rf"/webhooks/.*/{other['token']}$")))[0]
            assert refusal.json["flags"] == 64 and "Only the person" in refusal.json["content"]
            assert message_id in fake.messages
        finally:
            await client.close()

        # 3. After a restart, a button on the old result still works: reroll -> a new result.
        client = MuseSparkDiscord(stack.runtime.orchestrator, store)
        await client.login(BOT_TOKEN)
        try:
            press = button_payload(fake, message, f"reroll:{job_id}", user_id=REQUESTER)
            client._connection.parse_interaction_create(press)
            edit = (await until(lambda: fake.calls_to("PATCH", press["token"])))[0]
            reroll_id = _job_of(edit.json["content"])
            assert reroll_id != job_id
            await _wait_job(stack, reroll_id)
            (rerolled,) = _followups(fake, press["token"])
            assert reroll_id in json.dumps(rerolled.json["components"])
            assert store.get_job(reroll_id).parent_job_id == job_id

            # 4. A 429 defers the job (one attempt, no storm); meanwhile the 15 minutes of the
            #    interaction token run out, so the worker falls back to a channel message.
            fake.rate_limit_next("POST", r"^/webhooks/", retry_after=1.5)
            payload, late_id = await _slash(fake, client, {"prompt": "a slow haiku"},
                                            command="write")
            await until(lambda: [c for c in fake.calls_to("POST", payload["token"])
                                 if c.status == 429], timeout=JOB_SECONDS)
            limited_at = time.monotonic()
            fake.expire_token(payload["token"])
            job = await _wait_job(stack, late_id)
            attempts = fake.calls_to("POST", rf"^/webhooks/.*/{payload['token']}$")
            assert [c.status for c in attempts] == [429, 401], "exactly one try per wait"
            assert time.monotonic() - limited_at >= 1.0
            channel_posts = [c for c in fake.calls_to("POST", rf"^/channels/{CHANNEL_ID}/messages$")
                             if c.json and late_id in json.dumps(c.json.get("components"))]
            assert len(channel_posts) == 1 and channel_posts[0].headers["Authorization"] == (
                f"Bot {BOT_TOKEN}")
            assert store.delivered_positions(late_id) == {0} and job.state == "delivered"
        finally:
            await client.close()

    asyncio.run(scenario())


# How Discord posts does not depend on the broker or the database: one deployment each.
@pytest.mark.parametrize("make_stack", ["embedded"], indirect=True)
def test_images_go_as_attachments_and_long_captions_are_split(make_stack,
                                                              fake: FakeDiscord) -> None:
    stack = _start(make_stack, fake)

    async def scenario() -> None:
        client = MuseSparkDiscord(stack.runtime.orchestrator, stack.runtime.store)
        await client.login(BOT_TOKEN)
        try:
            payload, job_id = await _slash(fake, client, {"prompt": "a lighthouse at dusk",
                                                          "count": 2, "seed": 7})
            await _wait_job(stack, job_id)
            (result,) = _followups(fake, payload["token"])
            assert [f["name"] for f in result.files] == ["files[0]", "files[1]"]
            for upload in result.files:
                assert upload["type"] == "image/png" and 0 < upload["size"] < 10 * 2**20
                with Image.open(io.BytesIO(upload["data"])) as image:
                    assert image.format == "PNG"
            assert [a["id"] for a in result.json["attachments"]] == [0, 1]
            custom_ids = [b["custom_id"] for row in result.json["components"]
                          for b in row["components"]]
            assert {f"vary1:{job_id}", f"vary2:{job_id}", f"delete:{job_id}"} <= set(custom_ids)

            # Over-long text is split at 2000 characters: a long prompt makes a long caption.
            long_prompt = " ".join(["lighthouse"] * 180)  # 1979 characters
            # (A named style: one take, so the parts below are all this picture's.)
            payload, long_id = await _slash(fake, client, {"prompt": long_prompt,
                                                           "style": "anime"})
            await _wait_job(stack, long_id)
            parts = _followups(fake, payload["token"])
            assert len(parts) == 2 and all(len(p.json["content"]) <= MESSAGE_MAX_CHARS
                                           for p in parts)
            assert not parts[0].files and len(parts[1].files) == 1
            assert "components" not in parts[0].json and parts[1].json["components"]
            assert stack.runtime.store.delivered_positions(long_id) == {0}
        finally:
            await client.close()

    asyncio.run(scenario())


# How Discord posts does not depend on the broker or the database: one deployment each.
@pytest.mark.parametrize("make_stack", ["embedded"], indirect=True)
def test_a_story_posts_its_title_then_each_scene_with_its_picture_in_order(
        make_stack, fake: FakeDiscord) -> None:
    """/story through a real worker: the title, then one follow-up per scene with its picture,
    in order, each within 2000 characters and carrying core's buttons for that part."""
    stack = _start(make_stack, fake)
    store = stack.runtime.store

    async def scenario() -> None:
        client = MuseSparkDiscord(stack.runtime.orchestrator, store)
        await client.login(BOT_TOKEN)
        try:
            payload, story_id = await _slash(fake, client, {"prompt": "a fox who learns to fly",
                                                            "scenes": 2}, command="story")
            story = await _wait_job(stack, story_id)
        finally:
            await client.close()
        plan = story.params["plan"]
        posts = _followups(fake, payload["token"])
        assert len(posts) == 1 + len(plan["scenes"]), [p.json for p in posts]
        title, *scenes = posts
        assert title.json["content"].startswith(f"📖 {plan['title']}") and not title.files
        assert _custom_ids(title) == [f"{b.action}:{story_id}" for b in buttons_for(
            story_id, kind="text", intent="story")]
        for number, (post, planned) in enumerate(zip(scenes, plan["scenes"]), start=1):
            assert post.json["content"].startswith(f"{number}/{len(scenes)}. ")
            assert planned["text"] in post.json["content"]
            assert len(post.json["content"]) <= MESSAGE_MAX_CHARS
            (upload,) = post.files
            with Image.open(io.BytesIO(upload["data"])) as image:
                assert image.format == "PNG"
            scene_id = _custom_ids(post)[0].split(":")[1]
            scene = store.get_job(scene_id)
            assert scene is not None and scene.parent_job_id == story_id
            assert scene.intent == "scene" and scene.params["story"]["scene"] == number
            assert _custom_ids(post) == [f"{b.action}:{scene_id}" for b in buttons_for(
                scene_id, kind="image", intent="scene")]
            # A press or reaction on that message is about that scene's picture.
            message_id = next(m["id"] for m in fake.messages.values()
                              if m["content"] == post.json["content"])
            shown = store.result_of_message("discord", CHANNEL_ID, message_id)
            assert shown is not None and shown[0].id == scene_id
        assert store.delivered_positions(story_id) == set(range(1 + len(plan["scenes"])))

    asyncio.run(scenario())


def _custom_ids(post: Any) -> list[str]:
    return [b["custom_id"] for row in post.json.get("components", []) for b in row["components"]]


# -- the deliverer in-process, over real HTTP ---------------------------------------------------

def _settings(fake: FakeDiscord, token: str | None = BOT_TOKEN) -> Settings:
    return Settings(_env_file=None, discord_api_url=fake.api_url,  # type: ignore[call-arg]
                    discord_token=token)


def _target(token: str | None = "itoken-x", **extra: Any) -> DeliveryTarget:
    return DeliveryTarget(platform="discord", chat_id=CHANNEL_ID, reply_to="999",
                          interaction_token=token,
                          extra={"application_id": APPLICATION_ID, **extra})


def test_text_is_split_on_word_boundaries_under_2000_characters() -> None:
    text = ("word " * 300 + "\n") * 5 + "x" * 4500
    pieces = split_text(text)
    assert all(0 < len(p) <= MESSAGE_MAX_CHARS for p in pieces)
    assert "".join(pieces).replace(" ", "").replace("\n", "") == (
        text.replace(" ", "").replace("\n", ""))
    assert split_text("") == [""] and split_text("short") == ["short"]


def test_an_image_over_the_upload_limit_is_reencoded_under_it(tmp_path: Path) -> None:
    import numpy as np

    noise = np.random.default_rng(0).integers(0, 255, (512, 512, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    data = buffer.getvalue()
    limit = len(data) // 4
    name, small = shrink_image(data, "a.png", limit=limit)
    assert len(small) <= limit and name == "a.jpg"
    with Image.open(io.BytesIO(small)) as image:
        assert image.format == "JPEG"
    assert shrink_image(data, "a.png", limit=len(data)) == ("a.png", data)


def test_a_stored_expiry_goes_straight_to_the_channel_as_a_reply(fake: FakeDiscord) -> None:
    deliverer = DiscordDeliverer(_settings(fake))
    message = OutboundMessage(MessageKind.RESULT, "late result", job_id="abcdef",
                              buttons=(Button("reroll", "🔁", "abcdef"),))
    ids = deliverer.send(_target(interaction_expires_at=time.time() - 1), message)
    assert not fake.calls_to("POST", "/webhooks/")
    (post,) = fake.calls_to("POST", "/channels/")
    assert ids == [fake.messages[ids[0]]["id"]]
    assert post.json["message_reference"] == {"message_id": "999", "fail_if_not_exists": False}
    deliverer.progress(_target(interaction_expires_at=time.time() - 1), "drawing")
    assert not fake.calls_to("PATCH", "/webhooks/")


def test_429_is_one_request_and_a_retry_after(fake: FakeDiscord) -> None:
    deliverer = DiscordDeliverer(_settings(fake))
    fake.rate_limit_next("POST", "/webhooks/", retry_after=2.75, is_global=True)
    with pytest.raises(DeliveryError) as caught:
        deliverer.send(_target(), OutboundMessage(MessageKind.RESULT, "hello"))
    assert caught.value.retry_after == pytest.approx(3.0)  # Retry-After header rounds up
    assert not caught.value.final and len(fake.calls) == 1


@pytest.mark.parametrize(("status", "code", "reason"), [
    (401, 0, "401: Unauthorized"), (403, 50013, "Missing Permissions"),
    (404, 10003, "Unknown Channel")])
def test_refusals_are_final_with_the_reason(fake: FakeDiscord, status: int, code: int,
                                            reason: str) -> None:
    deliverer = DiscordDeliverer(_settings(fake))
    fake.fail_next("POST", "/channels/", status, {"message": reason, "code": code})
    with pytest.raises(DeliveryError) as caught:
        deliverer.send(_target(token=None), OutboundMessage(MessageKind.RESULT, "hello"))
    assert caught.value.final and reason in str(caught.value) and str(status) in str(caught.value)
    assert len(fake.calls) == 1


def test_errors_are_ephemeral_and_the_application_id_is_looked_up(fake: FakeDiscord) -> None:
    deliverer = DiscordDeliverer(_settings(fake))
    target = DeliveryTarget(platform="discord", chat_id=CHANNEL_ID, interaction_token="itoken-y")
    deliverer.send(target, OutboundMessage(MessageKind.ERROR, "That failed, sorry."))
    (post,) = fake.calls_to("POST", "/webhooks/")
    assert post.path == f"/webhooks/{APPLICATION_ID}/itoken-y" and post.json["flags"] == 64
    assert fake.calls_to("GET", "/applications/@me")
