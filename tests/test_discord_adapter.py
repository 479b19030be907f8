"""The Discord adapter with discord.py's own objects, against a local fake Discord REST API.

Interactions and reactions enter through discord.py's gateway parser
(``ConnectionState.parse_interaction_create`` / ``parse_message_reaction_add`` ...) with payloads
shaped as Discord documents them; the client logs in to the fake over real HTTP, so every
deferral, edit and follow-up it makes is a recorded request. Core runs for real on SQLite (no
worker here: results are the subject of tests/test_discord_delivery.py).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from bots.discord import MuseSparkDiscord, build_intents, invite_url
from bots.discord._setup import REQUIRED_PERMISSIONS
from bots.runtime import BotRuntime
from core.settings import Settings
from core.taste import CATALOGUE
from tests.fake_discord import (
    APPLICATION_ID,
    BOT_TOKEN,
    CHANNEL_ID,
    EVERYDAY_BITS,
    GUILD_ID,
    FakeDiscord,
    button_payload,
    reaction_payload,
    slash_payload,
    serving,
)

REQUESTER, OTHER = "500000000000000001", "500000000000000002"
WAIT_SECONDS = 10.0


@pytest.fixture
def fake() -> Iterator[FakeDiscord]:
    with serving() as server:
        yield server


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[BotRuntime]:
    settings = Settings(_env_file=None, data_dir=tmp_path / "data")  # type: ignore[call-arg]
    with BotRuntime(settings, redrive=False) as rt:
        yield rt


@asynccontextmanager
async def logged_in(runtime: BotRuntime) -> AsyncIterator[MuseSparkDiscord]:
    client = MuseSparkDiscord(runtime.orchestrator, runtime.store)
    await client.login(BOT_TOKEN)
    try:
        yield client
    finally:
        await client.close()


async def until(condition: Callable[[], Any], timeout: float = WAIT_SECONDS) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.02)


def _token_calls(fake: FakeDiscord, payload: dict[str, Any]) -> list[Any]:
    return [c for c in fake.calls if payload["token"] in c.path]


def test_intents_are_the_fewest_that_work() -> None:
    intents = build_intents()
    assert intents.guilds and intents.guild_reactions and intents.dm_reactions
    assert not intents.message_content and not intents.guild_messages and not intents.members
    assert intents.value == (1 << 0) | (1 << 10) | (1 << 13)
    assert build_intents(mention_mode=True).message_content


def test_invite_url_asks_for_exactly_the_needed_permissions() -> None:
    url = invite_url(APPLICATION_ID)
    assert f"client_id={APPLICATION_ID}" in url and "scope=bot+applications.commands" in url
    assert f"permissions={REQUIRED_PERMISSIONS.value}" in url
    wanted = {"send_messages", "attach_files", "add_reactions", "read_message_history",
              "use_application_commands", "view_channel", "send_messages_in_threads"}
    assert {name for name, on in REQUIRED_PERMISSIONS if on} == (
        wanted - {"view_channel"} | {"read_messages"})  # discord.py's name for View Channel
    assert not REQUIRED_PERMISSIONS.administrator and not REQUIRED_PERMISSIONS.manage_messages


def test_commands_have_typed_options_and_catalogue_choices(runtime: BotRuntime) -> None:
    client = MuseSparkDiscord(runtime.orchestrator, runtime.store)
    commands = {c.name: c.to_dict(client.tree) for c in client.tree.get_commands()}
    assert {"imagine", "write", "help", "profile"} <= set(commands)
    imagine = {o["name"]: o for o in commands["imagine"]["options"]}
    assert imagine["prompt"]["required"] and imagine["prompt"]["type"] == 3
    assert (imagine["count"]["type"], imagine["count"]["min_value"],
            imagine["count"]["max_value"]) == (4, 1, 4)
    assert [c["value"] for c in imagine["aspect"]["choices"]] == ["square", "portrait",
                                                                  "landscape"]
    assert imagine["seed"]["type"] == 4
    # Only the taste catalogue's values shape a result, so exactly those are offered.
    assert [c["value"] for c in imagine["style"]["choices"]] == list(CATALOGUE["image"]["style"])
    assert "autocomplete" not in imagine["style"]
    write = {o["name"]: o for o in commands["write"]["options"]}
    assert {c["value"] for c in write["mode"]["choices"]} == {
        "prose", "verse", "list", "playful", "earnest", "dark", "whimsical"}


def test_imagine_is_deferred_then_shows_its_status_and_keeps_the_interaction(
        fake: FakeDiscord, runtime: BotRuntime) -> None:
    async def scenario() -> None:
        async with logged_in(runtime) as client:
            payload = slash_payload(fake, "imagine", {"prompt": "a fox in snow", "count": 2,
                                                      "style": "watercolor",
                                                      "aspect": "portrait", "seed": 7},
                                    user_id=REQUESTER)
            started = time.monotonic()
            client._connection.parse_interaction_create(payload)
            callback = (await until(lambda: fake.calls_to("POST", r"/callback$")))[0]
            assert time.monotonic() - started < 3, "Discord's 3 s deadline"
            assert callback.json == {"type": 5}  # public "thinking…"
            edit = (await until(lambda: fake.calls_to("PATCH", "@original")))[0]
            assert "Drawing" in edit.json["content"] and "a fox in snow" in edit.json["content"]
            job_id = edit.json["content"].split("(job ")[1].split(")")[0].split(",")[0]
            job = await until(lambda: (j := runtime.store.get_job(job_id)) and
                              j.delivery.get("extra", {}).get("application_id") and j)
        assert job.params["count"] == 2 and job.seed == 7 and job.kind == "image"
        assert job.delivery["interaction_token"] == payload["token"]
        assert job.delivery["chat_id"] == CHANNEL_ID and job.delivery["platform"] == "discord"
        extra = job.delivery["extra"]
        assert extra["application_id"] == APPLICATION_ID
        assert extra["interaction_id"] == payload["id"], "to find a follow-up posted unrecorded"
        assert abs(extra["interaction_expires_at"] - (time.time() + 15 * 60)) < 60

    asyncio.run(scenario())


def test_bad_input_is_answered_at_once_privately_and_makes_no_job(
        fake: FakeDiscord, runtime: BotRuntime) -> None:
    async def scenario() -> None:
        async with logged_in(runtime) as client:
            for options, expected in (({"prompt": "   "}, "empty"),
                                      ({"prompt": "rain " * 500}, "characters long"),
                                      # a stale command definition offering another choice
                                      ({"prompt": "a cat", "aspect": "wide"}, "'wide'")):
                payload = slash_payload(fake, "imagine", options, user_id=REQUESTER)
                client._connection.parse_interaction_create(payload)
                (call,) = await until(lambda: _token_calls(fake, payload))
                assert call.json["type"] == 4 and call.json["data"]["flags"] == 64
                assert expected in call.json["data"]["content"]
        assert not fake.calls_to("POST", r"/webhooks/")

    asyncio.run(scenario())


def test_help_is_private(fake: FakeDiscord, runtime: BotRuntime) -> None:
    async def scenario() -> None:
        async with logged_in(runtime) as client:
            payload = slash_payload(fake, "help", {}, user_id=REQUESTER)
            client._connection.parse_interaction_create(payload)
            calls = await until(lambda: len(_token_calls(fake, payload)) >= 2 and
                                _token_calls(fake, payload))
            assert calls[0].json == {"type": 5, "data": {"flags": 64}}
            assert calls[1].method == "PATCH" and "/imagine" in calls[1].json["content"]

    asyncio.run(scenario())


def test_a_style_outside_the_catalogue_is_refused_privately(fake: FakeDiscord,
                                                            runtime: BotRuntime) -> None:
    """A stale command definition (the old free-text style) cannot pass an unknown style."""
    async def scenario() -> None:
        async with logged_in(runtime) as client:
            payload = slash_payload(fake, "imagine", {"prompt": "a cat", "style": "pencil sketch"},
                                    user_id=REQUESTER)
            client._connection.parse_interaction_create(payload)
            (call,) = await until(lambda: _token_calls(fake, payload))
            assert call.json["type"] == 4 and call.json["data"]["flags"] == 64
            assert "'pencil sketch'" in call.json["data"]["content"]

    asyncio.run(scenario())


def _delivered_result(fake: FakeDiscord, runtime: BotRuntime, job_id: str) -> dict[str, Any]:
    """Stand in for the worker: a result message with buttons, recorded as delivered."""
    components = [{"type": 1, "components": [
        {"type": 2, "style": 2, "label": label, "custom_id": f"{action}:{job_id}"}
        for action, label in (("reroll", "🔁"), ("vary1", "V1"), ("delete", "🗑️"))]}]
    message = fake.add_message(CHANNEL_ID, fake.bot_user, "“a fox” · seed 7", components)
    runtime.store.record_delivered(job_id, "discord", CHANNEL_ID, 0, [message["id"]])
    return message


async def _make_job(fake: FakeDiscord, client: MuseSparkDiscord, prompt: str = "a fox") -> str:
    payload = slash_payload(fake, "imagine", {"prompt": prompt}, user_id=REQUESTER)
    client._connection.parse_interaction_create(payload)
    edit = (await until(lambda: [c for c in _token_calls(fake, payload) if c.method == "PATCH"]))[0]
    return str(re.search(r"\(jobs? ([0-9a-f]+)", edit.json["content"]).group(1))  # type: ignore[union-attr]


def test_delete_is_refused_to_others_and_done_for_the_requester(
        fake: FakeDiscord, runtime: BotRuntime) -> None:
    async def scenario() -> None:
        async with logged_in(runtime) as client:
            job_id = await _make_job(fake, client)
            message = _delivered_result(fake, runtime, job_id)

            other = button_payload(fake, message, f"delete:{job_id}", user_id=OTHER)
            client._connection.parse_interaction_create(other)
            calls = await until(lambda: len(_token_calls(fake, other)) >= 2 and
                                _token_calls(fake, other))
            assert calls[0].json == {"type": 6}  # deferred update, within the 3 s
            assert calls[1].method == "POST" and calls[1].json["flags"] == 64
            assert "Only the person who asked" in calls[1].json["content"]
            assert message["id"] in fake.messages

            mine = button_payload(fake, message, f"delete:{job_id}", user_id=REQUESTER)
            client._connection.parse_interaction_create(mine)
            await until(lambda: message["id"] not in fake.messages)
            assert [c.method for c in _token_calls(fake, mine)][:2] == ["POST", "DELETE"]

    asyncio.run(scenario())


def test_a_button_press_reaches_core_in_a_client_that_never_sent_the_message(
        fake: FakeDiscord, runtime: BotRuntime) -> None:
    async def scenario() -> None:
        async with logged_in(runtime) as first:
            job_id = await _make_job(fake, first)
        message = _delivered_result(fake, runtime, job_id)
        async with logged_in(runtime) as restarted:  # no view was ever registered here
            press = button_payload(fake, message, f"vary1:{job_id}", user_id=OTHER)
            restarted._connection.parse_interaction_create(press)
            edit = (await until(lambda: [c for c in _token_calls(fake, press)
                                         if c.method == "PATCH"]))[0]
        assert _token_calls(fake, press)[0].json == {"type": 5}
        new_job = edit.json["content"].split("(job ")[1].split(")")[0].split(",")[0]
        child = runtime.store.get_job(new_job)
        assert child is not None and child.parent_job_id == job_id
        assert child.delivery["reply_to"] == message["id"]

    asyncio.run(scenario())


def test_reactions_through_the_gateway_parser_become_feedback(
        fake: FakeDiscord, runtime: BotRuntime) -> None:
    async def scenario() -> None:
        async with logged_in(runtime) as client:
            job_id = await _make_job(fake, client)
            message = _delivered_result(fake, runtime, job_id)
            state = client._connection

            def feedback() -> list[tuple[str, int]]:
                return [(f.value, f.delta) for f in runtime.store.feedback_for_job(job_id)]

            # Not in discord.py's message cache: only the raw events see these.
            assert state._get_message(int(message["id"])) is None
            state.parse_message_reaction_add(
                reaction_payload(message["id"], OTHER, {"id": None, "name": "👍"}))
            await until(lambda: feedback() == [("👍", 1)])
            state.parse_message_reaction_add(reaction_payload(
                message["id"], OTHER, {"id": "777000000000000001", "name": "partyblob"}))
            await until(lambda: ("custom:777000000000000001", 1) in feedback())
            state.parse_message_reaction_remove(
                reaction_payload(message["id"], OTHER, {"id": None, "name": "👍"}, add=False))
            await until(lambda: ("👍", -1) in feedback())
            before = feedback()

            # Ignored: the bot's own reaction, and reactions on messages the bot did not make.
            state.parse_message_reaction_add(
                reaction_payload(message["id"], APPLICATION_ID, {"id": None, "name": "❤️"}))
            theirs = fake.add_message(CHANNEL_ID, {"id": OTHER, "username": "x",
                                                   "discriminator": "0", "avatar": None})
            state.parse_message_reaction_add(reaction_payload(
                theirs["id"], REQUESTER, {"id": None, "name": "👍"}, author_id=OTHER))
            state.parse_message_reaction_remove(reaction_payload(
                theirs["id"], REQUESTER, {"id": None, "name": "👍"}, add=False))
            calls_before = len(fake.calls)
            await asyncio.sleep(0.5)
            assert feedback() == before
            assert len(fake.calls) == calls_before, "reactions must never be answered"

            state.parse_message_reaction_remove_emoji({
                "channel_id": CHANNEL_ID, "guild_id": "1200000000000000001",
                "message_id": message["id"], "emoji": {"id": "777000000000000001",
                                                       "name": "partyblob"}})
            await until(lambda: len(feedback()) > len(before))
            state.parse_message_reaction_remove_all({
                "channel_id": CHANNEL_ID, "guild_id": "1200000000000000001",
                "message_id": message["id"]})
            await asyncio.sleep(0.3)
        assert runtime.store.find_delivered("discord", CHANNEL_ID, message["id"]) is not None

    asyncio.run(scenario())


async def _reaction_handlers_done() -> None:
    """Wait for the reaction handlers discord.py has dispatched (it names their tasks)."""
    await asyncio.gather(*(task for task in asyncio.all_tasks()
                           if task.get_name().startswith("discord.py: on_raw_reaction")))


def test_a_replayed_reaction_or_clear_changes_nothing_while_a_new_one_counts(
        fake: FakeDiscord, runtime: BotRuntime) -> None:
    """A resume or reconnect can replay a gateway event with the very same payload. Reaction
    events carry no id, yet add, remove, add again by one person must be three rows."""
    async def scenario() -> None:
        async with logged_in(runtime) as client:
            failures: list[str] = []

            async def on_error(event: str, *args: Any, **kwargs: Any) -> None:
                failures.append(event)

            client.on_error = on_error  # type: ignore[method-assign]
            job_id = await _make_job(fake, client)
            message = _delivered_result(fake, runtime, job_id)
            state = client._connection
            thumbs = {"id": None, "name": "👍"}

            def add(times: int = 1) -> None:
                for _ in range(times):
                    state.parse_message_reaction_add(reaction_payload(message["id"], OTHER, thumbs))

            def clear(times: int = 1) -> None:
                for _ in range(times):
                    state.parse_message_reaction_remove_all({
                        "channel_id": CHANNEL_ID, "guild_id": GUILD_ID,
                        "message_id": message["id"]})

            def feedback() -> list[tuple[int, float]]:
                return [(f.delta, f.weight) for f in runtime.store.feedback_for_job(job_id)]

            add(times=2)  # delivered twice, back to back: the handlers even run concurrently
            await _reaction_handlers_done()
            ((delta, weight),) = feedback()
            assert delta == 1 and weight > 0

            for _ in range(2):
                state.parse_message_reaction_remove(
                    reaction_payload(message["id"], OTHER, thumbs, add=False))
            await _reaction_handlers_done()
            add()  # the same payload as the first add, now a genuine add again
            await _reaction_handlers_done()
            assert feedback() == [(1, weight), (-1, -weight), (1, weight)]
            assert runtime.store.live_reactions("discord", message["id"]) != []

            clear(times=2)  # a moderator's remove-all, replayed
            await _reaction_handlers_done()
            assert [d for d, _ in feedback()] == [1, -1, 1, -1]
            assert runtime.store.live_reactions("discord", message["id"]) == []
            add()
            await _reaction_handlers_done()
            clear()  # the same clear payload again, with a reaction standing: it counts
            await _reaction_handlers_done()
            assert [d for d, _ in feedback()] == [1, -1, 1, -1, 1, -1]
            assert sum(w for _, w in feedback()) == pytest.approx(0.0)
            assert failures == []

    asyncio.run(scenario())


MANAGE_GUILD_BIT = 1 << 5


def test_web_answers_privately_with_a_link_to_this_server_and_its_admin_flag(
        fake: FakeDiscord, runtime: BotRuntime) -> None:
    from core.events import Channel, ChannelKind
    from core.web_access import redeem_signin

    community = runtime.store.ensure_community(
        "discord", Channel(CHANNEL_ID, ChannelKind.GUILD_CHANNEL, guild_id=GUILD_ID))

    async def scenario() -> None:
        async with logged_in(runtime) as client:
            for permissions, admin in ((EVERYDAY_BITS, False),
                                       (str(int(EVERYDAY_BITS) | MANAGE_GUILD_BIT), True)):
                payload = slash_payload(fake, "web", {}, user_id=REQUESTER,
                                        permissions=permissions)
                client._connection.parse_interaction_create(payload)
                calls = await until(lambda: len(_token_calls(fake, payload)) >= 2 and
                                    _token_calls(fake, payload))
                assert calls[0].json == {"type": 5, "data": {"flags": 64}}  # ephemeral
                found = re.search(r"/c/(\d+)/signin/(\S+)", calls[1].json["content"])
                assert found, calls[1].json
                grant = redeem_signin(runtime.store, runtime.settings, int(found[1]), found[2])
                assert (grant.community_id, grant.admin) == (community, admin)

    asyncio.run(scenario())


def test_a_request_that_waits_too_long_is_told_in_its_channel(
        fake: FakeDiscord, runtime: BotRuntime, tmp_path: Path) -> None:
    """The client registers a delay notifier with the redriver while it is connected."""
    from datetime import timedelta

    from sqlalchemy import update

    from core.events import Actor
    from core.redrive import Redriver
    from core.store import Job, utcnow

    settings = runtime.settings.model_copy(update={"delayed_notice_seconds": 1.0})
    redriver = Redriver(runtime.store, runtime.publisher, settings)
    user = runtime.store.ensure_user("discord", Actor(REQUESTER, "Ada"))
    job, _ = runtime.store.create_job(
        idempotency_key="delay-test", kind="text", intent="write", user_id=user, prompt="p",
        expanded_prompt="p", params={"max_new_tokens": 8}, seed=1, platform="discord",
        delivery={"platform": "discord", "chat_id": CHANNEL_ID, "reply_to": "1234567890"})
    with runtime.store.session() as s:  # made long ago, held back from any worker
        s.execute(update(Job).where(Job.id == job.id).values(
            created_at=utcnow() - timedelta(hours=1), not_before=utcnow() + timedelta(hours=1)))

    async def scenario() -> None:
        client = MuseSparkDiscord(runtime.orchestrator, runtime.store, redriver=redriver)
        await client.login(BOT_TOKEN)
        try:
            await asyncio.to_thread(redriver.round)
            await asyncio.to_thread(redriver.round)
        finally:
            await client.close()
        await asyncio.to_thread(redriver.round)  # closed: nobody to tell, nothing recorded

    asyncio.run(scenario())
    posts = fake.calls_to("POST", rf"/channels/{CHANNEL_ID}/messages$")
    assert len(posts) == 1, "told once"
    assert f"still in line (job {job.id})" in posts[0].json["content"]
    assert str(posts[0].json["message_reference"]["message_id"]) == "1234567890"
