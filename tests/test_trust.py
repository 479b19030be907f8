"""Trust: quotas, each community's safety policy, reports and the audit log.

End to end on real workers (the shared ``stack``, embedded and distributed), plus the
platform-specific rules against the Telegram and Discord fakes (no worker needed there: the
rules act before a job is made, and a delivered result is recorded as a worker would).

The picture check runs NudeNet for real in the workers; the test deployments add one stand-in
finding that only ``strict`` refuses (see tests/picture_stand_in.py), because the tiny demo
pipeline draws noise that no real detector flags.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pytest
from sqlalchemy import select

from bots.console import ConsoleChat, ShownMessage
from bots.runtime import BotRuntime
from core import safety
from core.events import Actor
from core.policy import Quotas, Usage, quota_refusal
from core.settings import Settings
from core.store import Artifact, FeedbackEvent, Job
from core.store.models import AuditEvent
from tests._stack import Stack
from tests.fake_discord import (
    CHANNEL_ID,
    GUILD_ID,
    FakeDiscord,
    member_payload,
    reaction_payload,
    serving,
    slash_payload,
)
from tests.fake_telegram import FakeTelegram
from tests.test_discord_adapter import _delivered_result, _token_calls, logged_in, until
from tests.test_telegram import BotThread

RESULT_SECONDS = 120


def person_chat(stack: Stack) -> ConsoleChat:
    """A local chat with a person of its own (quotas count per person)."""
    name = uuid.uuid4().hex[:8]
    chat = ConsoleChat(stack.runtime.orchestrator, stack.runtime.store, chat_id=f"chat-{name}",
                       user=Actor(f"person-{name}", f"Person {name}"))
    chat.poll()
    return chat


def said(chat: ConsoleChat, text: str) -> ShownMessage:
    replies = chat.say(text)
    assert replies, text
    return replies[-1]


def jobs_of(stack: Stack, chat: ConsoleChat) -> list[Job]:
    with stack.runtime.store.session() as s:
        return list(s.scalars(select(Job).where(Job.delivery["chat_id"].as_string()
                                                == chat.chat_id)).all())


def audit(stack: Stack, kind: str, job_id: str | None = None) -> list[AuditEvent]:
    with stack.runtime.store.session() as s:
        query = select(AuditEvent).where(AuditEvent.kind == kind)
        if job_id is not None:
            query = query.where(AuditEvent.job_id == job_id)
        return list(s.scalars(query).all())


# -- pure rules ------------------------------------------------------------------------------


def test_quota_defaults_overrides_and_the_limit_reached() -> None:
    defaults = {name: field.default for name, field in Settings.model_fields.items()}
    settings = Settings(_env_file=None, **{  # type: ignore[call-arg]
        name: defaults[name] for name in defaults if name.startswith("quota_")})
    assert Quotas.of(settings) == Quotas(20, 100, 300, 0)
    assert Quotas.of(settings, {"person_hourly": 5, "bogus": 3}).person_hourly == 5
    quotas = Quotas(2, 5, 10, 0)
    assert quota_refusal(quotas, Usage(1, 1, 9, 9)) is None
    assert quota_refusal(quotas, Usage(2, 2, 0, 0)) == ("person", "hourly", 2)
    assert quota_refusal(quotas, Usage(0, 5, 0, 0)) == ("person", "daily", 5)
    assert quota_refusal(quotas, Usage(0, 0, 10, 10**6)) == ("community", "hourly", 10)


def test_policy_rules() -> None:
    assert safety.effective_policy({}, platform="telegram", nsfw=False) == "standard"
    assert safety.effective_policy({"safety": "off"}, platform="discord", nsfw=False) == "standard"
    assert safety.effective_policy({"safety": "off"}, platform="discord", nsfw=True) == "off"
    assert safety.effective_policy({"safety": "off"}, platform="telegram", nsfw=False) == "off"
    assert safety.prompt_verdict("a fox in the snow", "strict", []) is None
    assert safety.prompt_verdict("a f*ck fox", "standard", []) is not None  # leetspeak too
    assert safety.prompt_verdict("a f*ck fox", "off", []) is None
    assert safety.prompt_verdict("Pineapple pizza", "off", ["pineapple"]) is not None
    assert safety.prompt_verdict("pineapples", "off", ["pineapple"]) is None  # whole words
    # Numbers are not leetspeak (the library reads 455 as a swear word); "a55" still is.
    for numbered in ("draw 455 balloons", "room 5318008 at dusk", "soak-455 a lighthouse",
                     "burst 455 --count 1", "80085 stars"):
        assert safety.prompt_verdict(numbered, "strict", []) is None, numbered
    assert safety.prompt_verdict("a big a55 fox", "standard", []) is not None
    covered = [{"class": "FEMALE_BREAST_COVERED", "score": 0.4}]
    exposed = [{"class": "FEMALE_BREAST_EXPOSED", "score": 0.6}]
    assert safety.picture_verdict(covered, "standard") is None
    assert safety.picture_verdict(covered, "strict") == "FEMALE_BREAST_COVERED"
    assert safety.picture_verdict(exposed, "standard") == "FEMALE_BREAST_EXPOSED"
    assert safety.picture_verdict(exposed, "off") is None


def test_nudenet_loads_from_its_wheel_and_runs_on_cpu() -> None:
    """The real detector: its ONNX model comes with the wheel (no download), runs on CPU."""
    from workers.safety import detector

    noise = PIL.Image.fromarray(np.random.default_rng(7).integers(0, 255, (256, 256, 3),
                                                                   dtype=np.uint8))
    found = detector("nudenet")(noise)
    assert isinstance(found, list)
    assert all({"class", "score"} <= set(f) for f in found)


# -- end to end, on real workers -------------------------------------------------------------


def test_over_quota_says_when_and_makes_no_job(stack: Stack) -> None:
    chat = person_chat(stack)
    assert "each person 2 per hour" in said(chat, "/settings quota person hourly 2").text
    assert said(chat, "/settings quota person hourly 0").kind == "error"
    assert said(chat, "/imagine moss on a rock --count 1").kind == "status"
    assert said(chat, "/imagine ferns in rain --count 1").kind == "status"
    refused = said(chat, "/imagine lichen on bark --count 1")
    assert refused.kind == "error"
    assert "limit of 2 requests per hour" in refused.text and "UTC" in refused.text
    assert len(jobs_of(stack, chat)) == 2


def test_blocked_prompt_makes_no_job_and_strict_blocks_the_picture(stack: Stack) -> None:
    chat = person_chat(stack)
    refused = said(chat, "/imagine a f*cking fox")
    assert refused.kind == "error" and "safety setting (standard)" in refused.text
    said(chat, "/settings blockword add lighthouse")
    assert "admins have blocked" in said(chat, "/imagine a lighthouse at dusk").text
    assert jobs_of(stack, chat) == []

    said(chat, "/settings safety strict")
    status = said(chat, "/imagine a red fox --count 1")
    assert status.job_id is not None
    job = stack.wait_job(status.job_id, ("failed",), timeout=RESULT_SECONDS)
    shown = chat.wait(lambda seen: any(m.job_id == job.id and m.kind == "error" for m in seen),
                      timeout=30)
    told = [m for m in shown if m.job_id == job.id and m.kind == "error"][0]
    assert "safety setting (strict)" in told.text and "didn't post it" in told.text
    assert not any(m.images for m in shown)
    assert list(stack.runtime.store.artifacts(job.id)) == []
    assert not (stack.settings.artifacts_dir / job.id).exists()
    blocked = audit(stack, "blocked_picture", job.id)
    assert blocked and blocked[0].detail["detected"] == "FEMALE_BREAST_COVERED"

    said(chat, "/settings safety standard")
    status = said(chat, "/imagine a red fox --count 1")
    assert status.job_id is not None
    stack.wait_job(status.job_id, ("delivered",), timeout=RESULT_SECONDS)
    log = said(chat, "/settings audit").text
    assert "blocked_picture" in log and "blocked_prompt" in log
    assert "from: strict, to: standard" in log


def test_a_report_hides_the_result_logs_it_and_counts_against_it(stack: Stack) -> None:
    chat = person_chat(stack)
    status = said(chat, "/imagine a blue heron --count 1")
    assert status.job_id is not None
    job = stack.wait_job(status.job_id, ("delivered",), timeout=RESULT_SECONDS)
    shown = chat.wait(lambda seen: any(m.kind == "result" for m in seen), timeout=30)
    result = [m for m in shown if m.kind == "result"][0]
    answer = said(chat, f"/react {result.id} 🚩")
    assert "Reported" in answer.text
    removed = stack.runtime.store.local_message(result.id)
    assert removed is not None and removed.kind == "removed" and not removed.job_id
    assert [r.job_id for r in audit(stack, "report", job.id)] == [job.id]
    feedback = list(stack.runtime.store.feedback_for_job(job.id))
    assert [(f.value, f.weight) for f in feedback] == [("report", -3.0)]


# -- platform rules --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def telegram(tmp_path_factory: pytest.TempPathFactory,
             model_cache: Path) -> Iterator[tuple[FakeTelegram, Stack]]:
    """The Telegram bot against the fake, without a worker (no job runs here)."""
    with FakeTelegram() as fake:
        stack = Stack.create("embedded", tmp_path_factory.mktemp("trust-tg"), model_cache,
                             MUSESPARK_TELEGRAM_TOKEN=fake.token,
                             MUSESPARK_TELEGRAM_API_URL=fake.url)
        assert stack.runtime is not None
        bot = BotThread(stack, stack.settings).start()
        try:
            yield fake, stack
        finally:
            bot.stop()
            stack.close()


def _answer_to(fake: FakeTelegram, chat: int, before: int) -> str:
    calls = fake.wait_for(lambda: [c for c in fake.calls("sendMessage", chat_id=chat)][before:])
    return str(calls[0].params["text"])


def test_telegram_only_the_chats_admins_change_safety_and_report(
        telegram: tuple[FakeTelegram, Stack]) -> None:
    fake, stack = telegram
    group, member, admin = -1001000000991, 7101, 7102
    fake.members[(str(group), str(admin))] = "administrator"
    sent = 0

    def say(user: int, text: str) -> str:
        nonlocal sent
        fake.push(fake.text_update(group, text, user_id=user))
        answer = _answer_to(fake, group, sent)
        sent += 1
        return answer

    assert "Only an admin" in say(member, "/settings safety off")
    assert "safety is now off" in say(admin, "/settings safety off")
    assert "Only an admin" in say(member, "/settings audit")
    assert "from: standard, to: off" in say(admin, "/settings audit")

    # A result on the chat, as a worker would have posted and recorded it.
    job, _ = stack.runtime.store.create_job(
        idempotency_key=f"trust:{uuid.uuid4().hex}", kind="text", intent="write",
        user_id=stack.runtime.store.ensure_user("telegram", Actor(str(member))),
        community_id=None, prompt="a poem", expanded_prompt="a poem", params={}, seed=1,
        platform="telegram", delivery={"platform": "telegram", "chat_id": str(group)})
    shown = 900
    stack.runtime.store.record_delivered(job.id, "telegram", str(group), 0, [str(shown)])
    fake.push(fake.reaction_update(group, shown, user_id=member, new=["🚩"]))
    fake.wait_for(lambda: stack.runtime.store.feedback_for_job(job.id))
    assert not fake.calls("deleteMessage", chat_id=group)  # a member's 🚩 is a reaction
    fake.push(fake.reaction_update(group, shown, user_id=admin, new=["🚩"]))
    deleted = fake.wait_calls("deleteMessage", chat_id=group)
    assert str(deleted[0].params["message_id"]) == str(shown)
    assert [r.actor_user_id for r in audit(stack, "report", job.id)] == [
        stack.runtime.store.ensure_user("telegram", Actor(str(admin)))]


@pytest.fixture
def discord_runtime(tmp_path: Path) -> Iterator[BotRuntime]:
    settings = Settings(_env_file=None, data_dir=tmp_path / "data")  # type: ignore[call-arg]
    with BotRuntime(settings, redrive=False) as rt:
        yield rt


MANAGE_GUILD = str(1 << 5)
MANAGE_MESSAGES = 1 << 13
MOD_ROLE = "1250000000000000007"


def test_discord_safety_off_only_in_age_restricted_channels_and_mods_report(
        discord_runtime: BotRuntime) -> None:
    runtime = discord_runtime

    async def scenario(fake: FakeDiscord) -> None:
        async with logged_in(runtime) as client:
            async def settings(text: str, **kw: Any) -> str:
                payload = slash_payload(fake, "settings", {"text": text}, user_id="5001",
                                        permissions=MANAGE_GUILD, **kw)
                client._connection.parse_interaction_create(payload)
                edit = (await until(lambda: [c for c in _token_calls(fake, payload)
                                             if c.method in ("PATCH", "POST")
                                             and "content" in (c.json or {})]))[0]
                return str(edit.json["content"])

            assert "age-restricted" in await settings("safety off")
            assert "safety is now off" in await settings("safety off", nsfw=True)
            member = slash_payload(fake, "settings", {"text": "safety strict"},
                                   user_id="5002")
            client._connection.parse_interaction_create(member)
            refused = await until(lambda: [c for c in _token_calls(fake, member)
                                           if "content" in (c.json or {})])
            assert "Only an admin" in refused[0].json["content"]

            fake.guilds[GUILD_ID] = {"id": GUILD_ID, "name": "art club", "owner_id": "1",
                                     "roles": [{"id": GUILD_ID, "name": "@everyone",
                                                "permissions": "0"},
                                               {"id": MOD_ROLE, "name": "mods",
                                                "permissions": str(MANAGE_MESSAGES)}]}
            fake.members[(GUILD_ID, "5003")] = {**member_payload("5003", "mod"),
                                                "roles": [MOD_ROLE]}
            fake.members[(GUILD_ID, "5004")] = member_payload("5004", "someone")
            job, _ = runtime.store.create_job(
                idempotency_key=f"trust:{uuid.uuid4().hex}", kind="text", intent="write",
                user_id=runtime.store.ensure_user("discord", Actor("5004")), community_id=None,
                prompt="a poem", expanded_prompt="a poem", params={}, seed=1,
                platform="discord", delivery={"platform": "discord", "chat_id": CHANNEL_ID})
            message = _delivered_result(fake, runtime, job.id)
            state = client._connection
            state.parse_message_reaction_add(
                reaction_payload(message["id"], "5004", {"id": None, "name": "🚩"}))
            await until(lambda: runtime.store.feedback_for_job(job.id))
            assert message["id"] in fake.messages
            state.parse_message_reaction_add(
                reaction_payload(message["id"], "5003", {"id": None, "name": "🚩"}))
            await until(lambda: message["id"] not in fake.messages)
            with runtime.store.session() as s:
                reports = s.scalars(select(AuditEvent).where(AuditEvent.kind == "report")).all()
                assert [r.job_id for r in reports] == [job.id]
                rows = s.scalars(select(FeedbackEvent).where(FeedbackEvent.job_id == job.id,
                                                             FeedbackEvent.value == "report"))
                assert [r.weight for r in rows] == [-3.0]

    with serving() as fake:
        asyncio.run(scenario(fake))


def test_discord_a_thread_is_age_restricted_when_its_parent_channel_is(
        discord_runtime: BotRuntime) -> None:
    """discord.py's Thread reads its parent from the guild cache, which the bot may not hold:
    the client asks Discord for the parent channel (once) and goes by its flag."""
    runtime = discord_runtime
    restricted, plain = "1260000000000000001", "1260000000000000002"

    async def scenario(fake: FakeDiscord) -> None:
        for parent, nsfw in ((restricted, True), (plain, False)):
            fake.channels[parent] = {"id": parent, "type": 0, "guild_id": GUILD_ID,
                                     "name": f"parent-{nsfw}", "position": 0,
                                     "permission_overwrites": [], "nsfw": nsfw,
                                     "parent_id": None}
        async with logged_in(runtime) as client:
            async def in_thread_of(parent: str, thread: str) -> str:
                payload = slash_payload(fake, "settings", {"text": "safety off"},
                                        user_id="5001", permissions=MANAGE_GUILD,
                                        channel_id=thread)
                payload["channel"] = {
                    "id": thread, "type": 11, "guild_id": GUILD_ID, "name": "a thread",
                    "parent_id": parent, "owner_id": "5001", "last_message_id": None,
                    "rate_limit_per_user": 0, "message_count": 0, "member_count": 1,
                    "flags": 0, "thread_metadata": {
                        "archived": False, "auto_archive_duration": 1440,
                        "archive_timestamp": "2026-11-30T00:00:00+00:00", "locked": False}}
                client._connection.parse_interaction_create(payload)
                edit = (await until(lambda: [c for c in _token_calls(fake, payload)
                                             if c.method in ("PATCH", "POST")
                                             and "content" in (c.json or {})]))[0]
                return str(edit.json["content"])

            assert "age-restricted" in await in_thread_of(plain, "1260000000000000011")
            assert "safety is now off" in await in_thread_of(restricted, "1260000000000000012")
            assert "safety is now off" in await in_thread_of(restricted, "1260000000000000013")
        asked = [c for c in fake.calls if c.method == "GET" and c.path.startswith("/channels/")]
        assert sorted(c.path for c in asked) == sorted([f"/channels/{plain}",
                                                        f"/channels/{restricted}"])  # once each

    with serving() as fake:
        asyncio.run(scenario(fake))


@pytest.mark.parametrize("text", [
    "a haiku about rain", "you are a shithead", "sh1t happens", "mother fucker",
    "motherfucker", "a dog style poster", "b00bs", "assassin's creed poster", "class of 2026",
    "cow girl riding", "hello @ss", "2 girls 1 cup", "Scunthorpe", "pen island", "f.u.c.k"])
def test_the_indexed_word_list_judges_as_better_profanity_does(text: str) -> None:
    """core/safety.py speeds up better-profanity's membership test; the verdicts stay its own."""
    from better_profanity import Profanity  # type: ignore[import-untyped]

    library = Profanity()
    library.load_censor_words()
    assert safety._profane(text) == bool(library.contains_profanity(text))
