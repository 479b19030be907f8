"""Privacy: /forget everything really forgets, /mydata hands over everything, retention purges.

The forget test scans every table (reflected from the database itself, every column) and the
data directory for the person's ids, names, prompts and files after forgetting.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import PIL.Image
from sqlalchemy import MetaData, select

from bots.console import ConsoleChat, ShownMessage
from bots.runtime import BotRuntime
from core.events import Actor, Channel, ChannelKind, CommandInvoked
from core.store import Job
from tests._stack import Stack
from tests.fake_discord import FakeDiscord, serving, slash_payload
from tests.fake_telegram import FakeTelegram
from tests.test_discord_adapter import _token_calls, logged_in, until
from tests.test_trust import discord_runtime, said, telegram  # noqa: F401 (fixtures)

RESULT_SECONDS = 120


def person_chat(stack: Stack, name: str) -> ConsoleChat:
    chat = ConsoleChat(stack.runtime.orchestrator, stack.runtime.store, chat_id=f"room-{name}",
                       user=Actor(f"person-{name}", f"Name{name}"))
    chat.poll()
    return chat


def result_of(stack: Stack, chat: ConsoleChat, text: str) -> ShownMessage:
    """Ask, wait for the worker's result, return the result message."""
    status = said(chat, text)
    assert status.job_id, status
    stack.wait_job(status.job_id, ("delivered",), timeout=RESULT_SECONDS)
    shown = chat.wait(lambda seen: any(m.kind == "result" and m.job_id == status.job_id
                                       for m in seen), timeout=30)
    return [m for m in shown if m.kind == "result" and m.job_id == status.job_id][0]


def _cells(stack: Stack) -> list[tuple[str, str, Any]]:
    """(table, column, value) of every cell of every table, reflected from the database."""
    engine = stack.runtime.store.engine
    metadata = MetaData()
    metadata.reflect(engine)
    cells = []
    with engine.connect() as connection:
        for table in metadata.sorted_tables:
            for row in connection.execute(table.select()):
                for column, value in row._mapping.items():
                    cells.append((table.name, str(column), value))
    return cells


def _user_columns(stack: Stack) -> set[tuple[str, str]]:
    """Columns that hold a users.id: foreign keys to it, and the person ids."""
    metadata = MetaData()
    metadata.reflect(stack.runtime.store.engine)
    found = {("users", "id"), ("users", "person_id"), ("request_log", "person_id"),
             ("jobs", "requester")}
    for table in metadata.sorted_tables:
        for column in table.columns:
            if any(fk.column.table.name == "users" for fk in column.foreign_keys):
                found.add((table.name, column.name))
    return found


def test_forget_everything_leaves_nothing_in_any_table_or_file(stack: Stack,
                                                               tmp_path: Path) -> None:
    name = uuid.uuid4().hex[:8]
    marker = f"zanzibar{name}"  # in every prompt of the person
    chat = person_chat(stack, name)
    other = ConsoleChat(stack.runtime.orchestrator, stack.runtime.store, chat_id=chat.chat_id,
                        user=Actor(f"other-{name}", "Bystander"))
    other.poll()
    orchestrator, store = stack.runtime.orchestrator, stack.runtime.store

    picture = result_of(stack, chat, f"/imagine a {marker} fox --count 1")
    upload = tmp_path / f"{marker}.png"
    PIL.Image.new("RGB", (64, 64), (200, 40, 40)).save(upload)
    remix = result_of(stack, chat, f"/remix {upload} {marker} as a watercolor --style anime")
    chat.say(f"/react {picture.id} 👍")
    other.say(f"/react {remix.id} ❤️")  # someone else's feedback on their result goes too
    theirs = result_of(stack, other, "/imagine a quiet harbour --count 1")
    chat.say(f"/react {theirs.id} 👎")  # their feedback on someone else's result goes
    said(chat, "/profile")
    said(chat, "/mydata")
    # The same person on Telegram, linked: that identity and its private chat go too.
    code = re.search(r"/link (\w+)", said(chat, "/link").text)
    assert code is not None
    telegram_id = str(7_000_000 + int(name[:5], 16) % 100_000)
    telegram_actor = Actor(telegram_id, f"Tg{name}")
    orchestrator.handle(CommandInvoked(
        platform="telegram", event_id=f"link-{name}", actor=telegram_actor,
        channel=Channel(telegram_id, ChannelKind.DIRECT), name="link",
        args={"prompt": code.group(1)}))
    person_ids = orchestrator.taste.identities_of(store.ensure_user("local", chat.user))
    assert len(person_ids) == 2
    with store.session() as s:
        job_ids = list(s.scalars(select(Job.id).where(Job.user_id.in_(person_ids))).all())
    assert len(job_ids) == 2  # the picture and the remix (which keeps the upload)
    data_dir = stack.settings.resolved_data_dir
    kept_files = [p for p in data_dir.rglob("*") if p.is_file() and (
        any(j in str(p) for j in job_ids) or f"mydata-" in p.name)]
    assert kept_files

    ask = said(chat, "/forget everything")
    assert "cannot be undone" in ask.text
    confirm = re.search(r"/forget everything (\w+)", ask.text)
    assert confirm is not None
    wrong = said(chat, "/forget everything 000000")
    assert wrong.kind == "error" and "erased nothing" in wrong.text
    assert store.get_job(job_ids[0]) is not None
    done = said(chat, f"/forget everything {confirm.group(1)}")
    assert "I forgot you" in done.text and "2 identities (local, telegram)" in done.text

    # Every cell of every table: none holds their ids, names, prompts, files or jobs.
    needles = [f"person-{name}", f"Name{name}", f"Tg{name}", telegram_id, marker, *job_ids]
    user_columns = _user_columns(stack)
    for table, column, value in _cells(stack):
        text = json.dumps(value, default=str) if not isinstance(value, str) else value
        for needle in needles:
            assert needle not in text, (table, column, needle)
        if (table, column) in user_columns:
            assert value not in person_ids, (table, column, value)
    with store.engine.connect() as connection:
        profiles = {(row.subject, row.subject_id)
                    for row in connection.execute(_profiles_table(stack).select())}
    assert not {("person", p) for p in person_ids} & profiles
    # Community profiles were rebuilt from what is left: live equals a rebuild.
    live = orchestrator.taste.all_profiles()
    assert orchestrator.taste.rebuild() == live
    # Files: no result, upload, chart or export of theirs is left in the data dir.
    for path in data_dir.rglob("*"):
        assert not any(j in str(path) for j in job_ids), path
        assert marker not in path.name, path
    for path in kept_files:
        assert not path.exists(), path
    assert theirs.job_id and store.get_job(theirs.job_id) is not None  # others' work stays


def _profiles_table(stack: Stack) -> Any:
    metadata = MetaData()
    metadata.reflect(stack.runtime.store.engine, only=["profiles"])
    return metadata.tables["profiles"]


def test_mydata_zip_holds_requests_results_feedback_and_profile(stack: Stack) -> None:
    name = uuid.uuid4().hex[:8]
    chat = person_chat(stack, name)
    picture = result_of(stack, chat, f"/imagine a moth named {name} --count 1")
    chat.say(f"/react {picture.id} 👍")
    answer = said(chat, "/mydata")
    path = Path(answer.text.split(" It is at ")[1])
    with zipfile.ZipFile(path) as archive:
        data = json.loads(archive.read("data.json"))
        names = archive.namelist()
    assert [r["prompt"] for r in data["requests"]] == [f"a moth named {name}"]
    assert data["identities"][0]["id"] == f"person-{name}"
    assert [f["value"] for f in data["feedback"]] == ["👍"]
    assert data["profiles"]["image"]
    picture_file = data["requests"][0]["results"][0]["file"]
    assert picture_file in names and picture_file.endswith(".png")


def test_telegram_mydata_goes_to_the_private_chat_never_the_group(
        telegram: tuple[FakeTelegram, Stack]) -> None:  # noqa: F811
    fake, _ = telegram
    group, person, stranger = -1001000000992, 7201, 7202
    fake.push(fake.text_update(group, "/mydata", user_id=person))
    documents = fake.wait_calls("sendDocument", chat_id=person)
    assert documents[0].files["document"][:2] == b"PK"  # a zip
    note = fake.wait_calls("sendMessage", chat_id=group)
    assert "private chat" in str(note[0].params["text"])
    assert not fake.calls("sendDocument", chat_id=group)
    fake.unstarted.add(str(stranger))
    fake.push(fake.text_update(group, "/mydata", user_id=stranger))
    refused = fake.wait_calls("sendMessage", chat_id=group,
                              where=lambda c: "press Start" in str(c.params["text"]))
    assert len(refused) == 1
    notes = [c for c in fake.calls("sendMessage", chat_id=group)
             if "private chat" in str(c.params["text"])]
    assert len(notes) == 1, "one note for one /mydata"
    assert not list((_exports(telegram[1])).glob("*.zip"))  # handed over, not kept


def _exports(stack: Stack) -> Path:
    return stack.settings.resolved_data_dir / "exports"


def test_discord_mydata_is_an_ephemeral_attachment(
        discord_runtime: BotRuntime) -> None:  # noqa: F811
    async def scenario(fake: FakeDiscord) -> None:
        async with logged_in(discord_runtime) as client:
            payload = slash_payload(fake, "mydata", {}, user_id="5101")
            client._connection.parse_interaction_create(payload)
            calls = await until(lambda: [c for c in _token_calls(fake, payload) if c.files])
            assert _token_calls(fake, payload)[0].json == {"type": 5, "data": {"flags": 64}}
            assert calls[0].method == "PATCH" and calls[0].files[0]["data"][:2] == b"PK"

    with serving() as fake:
        asyncio.run(scenario(fake))
    exports = discord_runtime.settings.resolved_data_dir / "exports"
    assert not list(exports.glob("*.zip"))


def test_retention_purges_old_results_and_uploads_and_keeps_profiles(
        make_stack: Callable[..., Stack], tmp_path: Path) -> None:
    stack = make_stack(MUSESPARK_RETENTION_DAYS=str(6 / 86400),  # six seconds
                       MUSESPARK_RETENTION_SWEEP_SECONDS="0.5")
    stack.start_worker()
    store, taste = stack.runtime.store, stack.runtime.orchestrator.taste
    chat = person_chat(stack, uuid.uuid4().hex[:8])

    def files(job_id: str | None) -> list[Path]:
        found = [Path(a.path) for a in store.artifacts(str(job_id)) if a.path]
        assert found and all(p.is_file() for p in found)
        return found

    picture = result_of(stack, chat, "/imagine a tern over waves --count 1")
    paths = files(picture.job_id)
    chat.say(f"/react {picture.id} 👍")
    person = taste.person_of(store.ensure_user("local", chat.user))
    before = taste.profile("person", person, "image")
    assert before[1] > 0
    upload = tmp_path / "mine.png"
    PIL.Image.new("RGB", (64, 64), (20, 40, 200)).save(upload)
    remix = result_of(stack, chat, f"/remix {upload} as ink --style anime")
    paths += files(remix.job_id)
    assert any("uploads" in str(p) for p in paths)

    deadline = time.monotonic() + 40
    while any(p.exists() for p in paths):  # the bot's periodic sweep, not this test, erases
        assert time.monotonic() < deadline, [p for p in paths if p.exists()]
        time.sleep(0.2)
    for job_id in (picture.job_id, remix.job_id):
        job = store.get_job(str(job_id))
        assert job is not None and job.outbox is None and not store.artifacts(str(job_id))
    shown = store.local_message(picture.id)
    assert shown is not None and shown.text.startswith("(erased after")
    assert taste.profile("person", person, "image") == before


def test_a_replayed_command_is_answered_once_and_keeps_no_platform_id(stack: Stack) -> None:
    # A Telegram update fetched again (a getUpdates answer lost on the way, a webhook retried)
    # or a Discord event replayed on a resume carries the same event id.
    orchestrator, store = stack.runtime.orchestrator, stack.runtime.store
    person = str(7_100_000 + uuid.uuid4().int % 100_000)

    def mydata(event_id: str) -> list[Any]:
        return orchestrator.handle(CommandInvoked(
            platform="telegram", event_id=event_id, actor=Actor(person, "Replayed"),
            channel=Channel(person, ChannelKind.DIRECT), name="mydata", args={}))

    first = mydata(f"{person}:41")
    assert len(first) == 1 and first[0].files
    for path in first[0].files:
        Path(path).unlink()
    assert mydata(f"{person}:41") == [], "the replay made a second export"
    again = mydata(f"{person}:42")  # the person asks again: a new message, a new answer
    assert len(again) == 1 and again[0].files
    for path in again[0].files:
        Path(path).unlink()
    assert not [cell for cell in _cells(stack) if person in str(cell[2])
                and cell[0] == "handled_events"], "the person's id is kept in handled_events"
