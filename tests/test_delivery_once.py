"""A result is posted once: per-part delivery progress and Discord's enforced nonces.

A job whose result is already in its outbox resumes delivery without generating, so these tests
make such jobs directly in the store (a message long enough to go out in several parts) and let
the bot runtime's redriver publish them to a real worker process (``python -m workers``) that
posts to the local fakes of Discord and Telegram. They check that:

* a 429 in the middle of a split message defers the job, and the resumed attempt posts the
  parts not yet posted, never the earlier ones (Discord follow-ups, Telegram);
* a worker killed while Discord is creating a channel message (sent, not recorded) does not
  make a second message: the next worker re-sends that part with the same nonce, and Discord
  (here the fake) answers with the message it made the first time.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import PIL.Image
import pytest

from core.events import Actor
from core.outbound import Button, DeliveryTarget, MessageKind, OutboundMessage
from core.settings import Settings
from core.store import Job, Store
from tests._stack import Stack
from tests.fake_discord import APPLICATION_ID, BOT_TOKEN, CHANNEL_ID, FakeDiscord
from tests.fake_telegram import FakeTelegram
from workers.delivery import discord as discord_delivery
from workers.delivery import telegram as telegram_delivery
from workers.delivery.discord import NONCE_MAX_CHARS, DiscordDeliverer, message_nonce

JOB_SECONDS = 120.0
CHANNEL_POSTS = rf"^/channels/{CHANNEL_ID}/messages$"
_chats = itertools.count(8101)


@pytest.fixture
def discord_fake() -> Iterator[FakeDiscord]:
    with FakeDiscord() as server:
        yield server


@pytest.fixture
def telegram_fake() -> Iterator[FakeTelegram]:
    with FakeTelegram() as server:
        yield server


def _long_text(parts: int, limit: int) -> str:
    """Paragraphs that split into exactly ``parts`` pieces of at most ``limit`` characters."""
    paragraph = ("lighthouse " * ((limit - 100) // 11)).strip()
    return "\n\n".join(f"{n}. {paragraph}" for n in range(1, parts + 1))


def _outbox_job(store: Store, platform: str, target: DeliveryTarget,
                messages: list[OutboundMessage]) -> Job:
    """A job whose result is made (its outbox kept) and not yet posted, left unpublished: the
    redriver publishes it, and the worker that claims it goes straight to delivery."""
    user_id = store.ensure_user(platform, Actor("4242", "Ada"))
    job, created = store.create_job(
        idempotency_key=f"test-once:{uuid.uuid4().hex}", kind="text", intent="write",
        user_id=user_id, prompt="a long text", expanded_prompt="a long text",
        params={"max_new_tokens": 24}, seed=1, platform=platform, delivery=target.to_dict(),
        outbox=[m.to_dict() for m in messages])
    assert created
    return job


def _result(text: str) -> OutboundMessage:
    return OutboundMessage(MessageKind.RESULT, text, job_id="0123456789ab",
                           buttons=(Button("reroll", "🔁 Again", "0123456789ab"),))


def _wait_delivered(stack: Stack, job_id: str) -> Job:
    job = stack.wait_job(job_id, ("delivered", "failed"), JOB_SECONDS)
    assert job.state == "delivered", (job.failure_reason,
                                      "\n".join(w.log()[-3000:] for w in stack.workers))
    return job


def _until(check: Any, timeout: float = JOB_SECONDS, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def discord_settings(fake: FakeDiscord) -> Settings:
    return Settings(_env_file=None, discord_api_url=fake.api_url,  # type: ignore[call-arg]
                    discord_token=BOT_TOKEN)


# -- the store ---------------------------------------------------------------------------------


def test_migration_0004_numbers_the_parts_recorded_before_it(tmp_path: Path) -> None:
    """Rows from before per-part progress (all the messages of one position, recorded at once)
    get parts 0, 1, ... in id order, so (job, position, part) is unique for them too."""
    import sqlite3

    from alembic import command

    store = Store(f"sqlite:///{tmp_path / 'old.db'}")
    config = store.alembic_config()
    with store.engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0003")
    with sqlite3.connect(tmp_path / "old.db") as db:
        db.execute("INSERT INTO users (id, platform, platform_user_id, display_name, "
                   "learning_opt_out, created_at) VALUES (1, 'x', '1', '', 0, '2026-01-01')")
        db.execute("INSERT INTO jobs (id, idempotency_key, kind, intent, state, user_id, prompt,"
                   " expanded_prompt, params, seed, platform, delivery, attempts, created_at, "
                   "updated_at) VALUES ('j1', 'k1', 'text', 'write', 'delivered', 1, 'p', 'p', "
                   "'{}', 1, 'x', '{}', 1, '2026-01-01', '2026-01-01')")
        for message_id, position in [("a", 0), ("b", 0), ("c", 1), ("d", 0)]:
            db.execute("INSERT INTO delivered_messages (job_id, platform, chat_id, message_id, "
                       "position, created_at) VALUES ('j1', 'x', 'c', ?, ?, '2026-01-01')",
                       (message_id, position))
    store.upgrade()
    assert store.delivered_parts("j1") == {0: {0, 1, 2}, 1: {0}}
    assert store.result_of_message("x", "c", "d") is not None
    assert store.result_of_message("x", "c", "d")[1] == 2  # type: ignore[index]
    store.record_delivered("j1", "x", "c", 1, ["e"], part=1)
    store.record_delivered("j1", "x", "c", 1, ["e"], part=1)  # a repeat changes nothing
    assert store.delivered_parts("j1")[1] == {0, 1}
    store.dispose()


# -- the nonce ---------------------------------------------------------------------------------


def test_the_nonce_is_deterministic_short_and_differs_per_part() -> None:
    nonce = message_nonce("0123456789ab:0", 0)
    assert nonce == message_nonce("0123456789ab:0", 0), "the same on every attempt"
    others = {message_nonce("0123456789ab:0", 1), message_nonce("0123456789ab:1", 0),
              message_nonce("ba9876543210:0", 0)}
    assert nonce not in others and len(others) == 3
    for part in range(50):
        value = message_nonce(f"{uuid.uuid4().hex[:12]}:{part}", part)
        assert 0 < len(value) <= NONCE_MAX_CHARS and value.isascii() and value.isalnum()


def test_channel_posts_carry_the_nonce_and_a_repeat_makes_no_second_message(
        discord_fake: FakeDiscord) -> None:
    """In process, over real HTTP: each part of a channel message carries its own enforced
    nonce; sending the same part again (a worker that died before recording it) gets the first
    message back; follow-ups (Execute Webhook documents no nonce) carry none."""
    deliverer = DiscordDeliverer(discord_settings(discord_fake))
    target = DeliveryTarget(platform="discord", chat_id=CHANNEL_ID, reply_to="999")
    message = _result(_long_text(2, discord_delivery.MESSAGE_MAX_CHARS))
    recorded: list[tuple[int, str]] = []
    first = deliverer.send(target, message, key="0123456789ab:3",
                           on_part=lambda part, mid: recorded.append((part, mid)))
    posts = discord_fake.calls_to("POST", CHANNEL_POSTS)
    assert [p.json["nonce"] for p in posts] == [message_nonce("0123456789ab:3", n)
                                                for n in (0, 1)]
    assert all(p.json["enforce_nonce"] is True for p in posts)
    assert recorded == list(enumerate(first)) and len(first) == 2
    assert "message_reference" in posts[0].json and "message_reference" not in posts[1].json

    again = deliverer.send(target, message, key="0123456789ab:3", skip_parts={0})
    assert again == first[1:], "the repeated nonce answers with the message made before"
    assert len(discord_fake.messages) == 2
    assert len(discord_fake.calls_to("POST", CHANNEL_POSTS)) == 3
    assert deliverer.send(target, message, key="0123456789ab:3", skip_parts={0, 1}) == []
    assert len(discord_fake.calls_to("POST", CHANNEL_POSTS)) == 3, "nothing left to post"

    followup = DeliveryTarget(platform="discord", chat_id=CHANNEL_ID, interaction_token="itk-1",
                              extra={"application_id": APPLICATION_ID,
                                     "interaction_expires_at": time.time() + 900})
    deliverer.send(followup, _result("short"), key="0123456789ab:4")
    (hook,) = discord_fake.calls_to("POST", "^/webhooks/")
    assert "nonce" not in hook.json and "enforce_nonce" not in hook.json


def test_telegram_parts_are_numbered_the_same_way_every_time_and_skipped(
        telegram_fake: FakeTelegram, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In process: a photo with a long caption is the photo then the rest (parts 0, 1, ...); an
    album is one part per picture, skipped as a whole (one call posts all of it or none)."""
    from PIL import Image

    monkeypatch.setattr(telegram_delivery, "PRIVATE_CHAT_INTERVAL_SECONDS", 0.0)
    deliverer = telegram_delivery.TelegramDeliverer(Settings(
        _env_file=None, telegram_token=telegram_fake.token,  # type: ignore[call-arg]
        telegram_api_url=telegram_fake.url))
    paths = []
    for n in range(3):
        Image.new("RGB", (32, 32), (40 * n, 90, 200)).save(tmp_path / f"{n}.png")
        paths.append(str(tmp_path / f"{n}.png"))
    chat = next(_chats)
    target = DeliveryTarget(platform="telegram", chat_id=str(chat))
    captioned = OutboundMessage(MessageKind.RESULT, "A caption that goes on. " * 120,
                                images=(paths[0],), job_id="0123456789ab")
    reported: list[tuple[int, str]] = []
    ids = deliverer.send(target, captioned, on_part=lambda n, m: reported.append((n, m)))
    assert len(ids) >= 2 and reported == list(enumerate(ids))
    rest = deliverer.send(target, captioned, skip_parts={0})
    assert len(rest) == len(ids) - 1, "the photo is not sent again"
    assert len(telegram_fake.calls("sendPhoto", chat_id=chat)) == 1

    album = OutboundMessage(MessageKind.RESULT, "three pictures", images=tuple(paths),
                            job_id="0123456789ab",
                            buttons=(Button("reroll", "🔁 Again", "0123456789ab"),))
    reported.clear()
    ids = deliverer.send(target, album, on_part=lambda n, m: reported.append((n, m)))
    assert [n for n, _ in reported] == [0, 1, 2, 3]  # three pictures, then the buttons
    assert len(ids) == 4
    # Recorded up to the second picture (a worker died between two records): the album went
    # out in one call, so it is not sent again; the buttons' message is.
    assert len(deliverer.send(target, album, skip_parts={0, 1})) == 1
    assert deliverer.send(target, album, skip_parts={0, 1, 2, 3}) == []
    assert len(telegram_fake.calls("sendMediaGroup", chat_id=chat)) == 1


# -- Discord, through a worker process ---------------------------------------------------------


def _discord_stack(make_stack: Any, fake: FakeDiscord) -> Stack:
    stack: Stack = make_stack(MUSESPARK_DISCORD_API_URL=fake.api_url,
                              MUSESPARK_DISCORD_TOKEN=BOT_TOKEN)
    stack.start_worker()
    return stack


def test_a_429_mid_discord_message_resumes_after_the_parts_already_posted(
        make_stack: Any, discord_fake: FakeDiscord) -> None:
    """Follow-ups carry no nonce, so only per-part progress keeps the first part from being
    posted again when the second one is refused with a 429."""
    stack = _discord_stack(make_stack, discord_fake)
    store = stack.runtime.store
    token = f"itoken-once-{uuid.uuid4().hex[:8]}"
    discord_fake.token_channels[token] = CHANNEL_ID
    target = DeliveryTarget(platform="discord", chat_id=CHANNEL_ID, interaction_token=token,
                            extra={"application_id": APPLICATION_ID,
                                   "interaction_expires_at": time.time() + 900})
    message = _result(_long_text(3, discord_delivery.MESSAGE_MAX_CHARS))
    parts = discord_delivery.split_text(message.text)
    assert len(parts) == 3
    hook = rf"^/webhooks/{APPLICATION_ID}/{token}$"
    # Hold the first part's answer back, and meanwhile arm a 429 for the next request.
    discord_fake.stall_next("POST", hook, 1.0)
    job = _outbox_job(store, "discord", target, [message])
    first = _until(lambda: [c for c in discord_fake.calls_to("POST", hook) if c.status],
                   what="the first part")
    discord_fake.rate_limit_next("POST", hook, retry_after=1.5)
    assert first[0].json["content"] == parts[0]

    done = _wait_delivered(stack, job.id)
    posts = discord_fake.calls_to("POST", hook)
    assert [c.status for c in posts] == [200, 429, 200, 200], [c.status for c in posts]
    assert [c.json["content"] for c in posts if c.status == 200] == parts, "each part once"
    assert posts[1].json["content"] == posts[2].json["content"] == parts[1]
    assert done.attempts == 1, "a wait is not a crash"
    assert store.delivered_parts(job.id) == {0: {0, 1, 2}}
    made = [m for m in discord_fake.messages.values() if m["content"] in parts]
    assert len(made) == 3
    for message_id in (m["id"] for m in made):
        shown = store.result_of_message("discord", CHANNEL_ID, message_id)
        assert shown is not None and shown[0].id == job.id


def _killed_posting_the_second(make_stack: Any, fake: FakeDiscord, target: DeliveryTarget,
                               route: str) -> tuple[Stack, Job, OutboundMessage, OutboundMessage]:
    """A title and a scene to post to ``target``; the worker is killed while Discord holds
    the answer to the scene's request on ``route`` (made, not yet recorded), and a new worker
    finishes the job. Returns the stack, the delivered job and the two messages."""
    stack = _discord_stack(make_stack, fake)
    store = stack.runtime.store
    title = _result("📖 The keeper's long night")
    scene = _result(f"1/1. The lamp went out at midnight. ({uuid.uuid4().hex[:6]})")
    fake.stall_next("POST", route, 8.0,
                    where=lambda call: (call.json or {}).get("content") == scene.text)
    job = _outbox_job(store, "discord", target, [title, scene])
    _until(lambda: [c for c in fake.calls_to("POST", route)
                    if (c.json or {}).get("content") == scene.text and c.status],
           what="the second message in flight")
    assert store.delivered_parts(job.id) == {0: {0}}, "the first is recorded, not the second"
    stack.workers[0].kill_hard()
    stack.start_worker()
    done = _wait_delivered(stack, job.id)
    assert done.attempts == 2
    return stack, done, title, scene


def test_a_worker_killed_while_discord_posts_makes_one_channel_message(
        make_stack: Any, discord_fake: FakeDiscord) -> None:
    """Sent, not recorded: the worker dies while Discord is creating the second message. The
    next worker skips the first (recorded) and sends the second again with the same nonce;
    Discord answers with the message it made, so the channel holds each message once."""
    target = DeliveryTarget(platform="discord", chat_id=CHANNEL_ID, reply_to="999")
    stack, done, title, scene = _killed_posting_the_second(make_stack, discord_fake, target,
                                                           CHANNEL_POSTS)
    store, job = stack.runtime.store, done
    in_channel = [m for m in discord_fake.messages.values()
                  if m["content"] in (title.text, scene.text)]
    assert sorted(m["content"] for m in in_channel) == sorted([title.text, scene.text])
    posts = discord_fake.calls_to("POST", CHANNEL_POSTS)
    assert [c.json["content"] for c in posts] == [title.text, scene.text, scene.text]
    assert posts[1].json.get("nonce") == posts[2].json.get("nonce") == message_nonce(
        f"{job.id}:1", 0)
    assert all(c.json["enforce_nonce"] is True for c in posts)
    assert store.delivered_parts(job.id) == {0: {0}, 1: {0}}
    second = next(m for m in in_channel if m["content"] == scene.text)
    assert store.find_delivered("discord", CHANNEL_ID, second["id"]) is not None


def _followup_target(fake: FakeDiscord, interaction_id: str | None = None) -> DeliveryTarget:
    """Answers through a fresh interaction of ``interaction_id`` (known to the fake)."""
    token = f"itoken-once-{uuid.uuid4().hex[:8]}"
    fake.token_channels[token] = CHANNEL_ID
    extra: dict[str, Any] = {"application_id": APPLICATION_ID,
                             "interaction_expires_at": time.time() + 900}
    if interaction_id is not None:
        fake.token_interactions[token] = interaction_id
        extra["interaction_id"] = interaction_id
    return DeliveryTarget(platform="discord", chat_id=CHANNEL_ID, interaction_token=token,
                          extra=extra)


def test_a_resumed_followup_finds_the_part_posted_before_and_posts_it_not_again(
        discord_fake: FakeDiscord, tmp_path: Path) -> None:
    """Execute Webhook takes no nonce: a resumed delivery reads the channel back for a part of
    the same interaction with the same text and files, and records it instead."""
    deliverer = DiscordDeliverer(discord_settings(discord_fake))
    target = _followup_target(discord_fake, "1400000000000000001")
    picture = tmp_path / "p.png"
    PIL.Image.new("RGB", (64, 64), "teal").save(picture)
    message = OutboundMessage(MessageKind.RESULT, _long_text(2, discord_delivery.MESSAGE_MAX_CHARS),
                              images=(str(picture),), job_id="0123456789ab")
    first = deliverer.send(target, message, key="0123456789ab:0")  # "crashed" before recording
    hooks = len(discord_fake.calls_to("POST", "^/webhooks/"))
    found: list[tuple[int, str]] = []
    again = deliverer.send(target, message, key="0123456789ab:0", resumed=True,
                           on_part=lambda part, mid: found.append((part, mid)))
    assert again == first and found == list(enumerate(first)), "both parts found, in order"
    assert len(discord_fake.calls_to("POST", "^/webhooks/")) == hooks, "nothing posted again"
    assert len(discord_fake.calls_to("GET", CHANNEL_POSTS)) == 1, "the channel is read once"

    # Another interaction's identical text is not ours: posted.
    other = _followup_target(discord_fake, "1400000000000000002")
    text = _result("the same words")
    deliverer.send(_followup_target(discord_fake, "1400000000000000003"), text)
    deliverer.send(other, text, resumed=True)
    assert len([m for m in discord_fake.messages.values() if m["content"] == text.text]) == 2
    # A bot that may not read the history posts, as before.
    discord_fake.fail_next("GET", CHANNEL_POSTS, 403, {"message": "Missing Access",
                                                      "code": 50001})
    third = _followup_target(discord_fake, "1400000000000000004")
    deliverer.send(third, _result("once more"), resumed=True)
    assert [m["content"] for m in discord_fake.messages.values()].count("once more") == 1


def test_a_worker_killed_while_a_followup_is_created_posts_it_once(
        make_stack: Any, discord_fake: FakeDiscord) -> None:
    """Created, not recorded: the worker dies while Discord is answering the follow-up of the
    second message. The next worker reads the channel, finds it, and records it."""
    target = _followup_target(discord_fake, "1400000000000000010")
    hook = rf"^/webhooks/{APPLICATION_ID}/{target.interaction_token}$"
    stack, done, title, scene = _killed_posting_the_second(make_stack, discord_fake, target,
                                                           hook)
    store, job = stack.runtime.store, done
    made = [m for m in discord_fake.messages.values() if m["content"] == scene.text]
    assert len(made) == 1, "one follow-up, found and recorded by the next attempt"
    assert [c.json["content"] for c in discord_fake.calls_to("POST", hook)] == [
        title.text, scene.text]
    assert store.delivered_parts(job.id) == {0: {0}, 1: {0}}
    assert store.find_delivered("discord", CHANNEL_ID, made[0]["id"]) is not None


# -- Telegram, through a worker process --------------------------------------------------------


def test_a_long_429_mid_telegram_message_defers_and_posts_no_part_twice(
        make_stack: Any, telegram_fake: FakeTelegram) -> None:
    """A 429 longer than the deliverer waits in place defers the job; the resumed attempt
    posts from the refused part on (Telegram has no idempotency key: only the progress kept
    per part prevents the repeat)."""
    waits_in_place = 1  # seconds (15 by default: the test keeps it short)
    stack: Stack = make_stack(MUSESPARK_TELEGRAM_TOKEN=telegram_fake.token,
                              MUSESPARK_TELEGRAM_API_URL=telegram_fake.url,
                              MUSESPARK_TELEGRAM_INLINE_RETRY_MAX_SECONDS=str(waits_in_place))
    stack.start_worker()
    store = stack.runtime.store
    chat = next(_chats)
    message = _result(_long_text(3, telegram_delivery.MESSAGE_MAX_CHARS))
    parts = telegram_delivery.split_text(message.text)
    assert len(parts) == 3
    wait = waits_in_place + 2
    telegram_fake.fail("sendMessage", chat_id=chat, code=429, retry_after=wait,
                       where=lambda call: call.params.get("text") == parts[1])
    target = DeliveryTarget(platform="telegram", chat_id=str(chat), reply_to="77")
    job = _outbox_job(store, "telegram", target, [message])

    done = stack.wait_job(job.id, ("delivered", "failed"), JOB_SECONDS + wait)
    assert done.state == "delivered", done.failure_reason
    calls = telegram_fake.calls("sendMessage", chat_id=chat)
    assert [c.status for c in calls] == [200, 429, 200, 200]
    assert [c.params["text"] for c in calls if c.ok] == parts, "each part once, in order"
    assert calls[2].at - calls[1].at >= wait - 0.1, "resumed only after retry_after"
    assert "reply_parameters" in calls[0].params
    assert all("reply_parameters" not in c.params for c in calls[1:])
    assert calls[-1].params.get("reply_markup") and not calls[0].params.get("reply_markup")
    assert done.attempts == 1
    assert store.delivered_parts(job.id) == {0: {0, 1, 2}}


def test_a_delivery_target_is_stored_with_every_field_and_read_back_whole() -> None:
    """``to_dict`` is written out by hand (it is on the request path): it must keep every
    field the dataclass has, nested values copied, and ``from_dict`` must give it back."""
    from dataclasses import asdict, fields

    full = DeliveryTarget(**{f.name: {"interaction_id": "9", "nested": {"k": [1]}}
                             if f.name == "extra" else f"{f.name}-value"
                             for f in fields(DeliveryTarget)})
    stored = full.to_dict()
    assert stored == asdict(full)
    assert DeliveryTarget.from_dict(stored) == full
    stored["extra"]["nested"]["k"].append(2)
    assert full.extra["nested"]["k"] == [1], "the stored copy shares nothing with the target"
    assert DeliveryTarget("telegram", "1").to_dict()["extra"] == {}
