"""A chat's flood wait is shared through the store: after a 429 seen by one worker (or the bot),
no process calls that chat before the announced deadline; and a result of several messages
finishes its progress message once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from telegram import Bot

from bots.telegram._adapter import TelegramAdapter
from core.errors import DeliveryError
from core.outbound import DeliveryTarget, MessageKind, OutboundMessage
from core.settings import Settings
from core.store import Store, utcnow
from tests._stack import create_pg_database, drop_pg_database, postgres_reachable
from tests.fake_telegram import FakeTelegram
from workers.delivery import telegram as delivery
from workers.delivery.telegram import TelegramDeliverer


@pytest.fixture
def fake() -> Iterator[FakeTelegram]:
    with FakeTelegram() as server:
        yield server


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'musespark.db'}"
    Store(url).upgrade()
    return url


@pytest.fixture(autouse=True)
def _no_pacing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(delivery, "PRIVATE_CHAT_INTERVAL_SECONDS", 0.0)
    monkeypatch.setattr(delivery, "GROUP_CHAT_INTERVAL_SECONDS", 0.0)


def _settings(fake: FakeTelegram, **extra: Any) -> Settings:
    return Settings(_env_file=None, telegram_token=fake.token,  # type: ignore[call-arg, arg-type]
                    telegram_api_url=fake.url, **extra)


def _calls_to(fake: FakeTelegram, chat: int) -> int:
    return len([c for c in fake.calls() if c.chat_id == str(chat)])


def test_a_429_seen_by_one_worker_holds_the_chat_for_every_other(
        fake: FakeTelegram, db_url: str) -> None:
    chat = 9101
    first = TelegramDeliverer(_settings(fake), store=Store(db_url))
    # Another worker process: its own deliverer, finding the store through its settings.
    second = TelegramDeliverer(_settings(fake, database_url=db_url))
    target = DeliveryTarget("telegram", str(chat), extra={"progress_message_id": "1"})
    fake.fail("sendMessage", chat_id=chat, code=429, retry_after=2)

    # The deadline is set from the moment the 429 came back: between these two readings.
    asked = time.monotonic()
    with pytest.raises(DeliveryError) as first_error:
        first.send(target, OutboundMessage(MessageKind.RESULT, "take one", job_id="a" * 12))
    answered = time.monotonic()
    assert first_error.value.retry_after == 2
    assert _calls_to(fake, chat) == 1

    with pytest.raises(DeliveryError) as held:
        second.send(target, OutboundMessage(MessageKind.RESULT, "take two", job_id="b" * 12))
    assert held.value.retry_after is not None and 0 < held.value.retry_after <= 2
    assert not held.value.final
    second.progress(target, "🎨 Drawing…")  # cosmetic: skipped, not raised
    with pytest.raises(DeliveryError):
        first.send(target, OutboundMessage(MessageKind.RESULT, "take one", job_id="a" * 12))
    assert time.monotonic() - asked < 2, "the checks ran inside the wait"
    assert _calls_to(fake, chat) == 1, "no call reached Telegram inside the announced wait"
    assert second.held_for(str(chat)) > 0
    assert second.held_for("9102") == 0, "other chats are not held"

    time.sleep(max(0.0, answered + 2.05 - time.monotonic()))
    assert second.send(target, OutboundMessage(MessageKind.STATUS, "take two", job_id="b" * 12))
    assert len(fake.calls("sendMessage", chat_id=chat, ok=True)) == 1


def test_a_result_of_several_messages_finishes_its_progress_message_once(
        fake: FakeTelegram, db_url: str) -> None:
    chat = 9103
    deliverer = TelegramDeliverer(_settings(fake), store=Store(db_url))
    plain = DeliveryTarget("telegram", str(chat))
    (progress_id,) = deliverer.send(plain, OutboundMessage(MessageKind.STATUS, "⏳ Queued"))
    target = DeliveryTarget("telegram", str(chat), extra={"progress_message_id": progress_id})
    for scene in range(3):
        deliverer.send(target, OutboundMessage(MessageKind.RESULT, f"scene {scene}",
                                               job_id="c" * 12))
    edits = fake.calls("editMessageText", chat_id=chat)
    assert len(edits) == 1 and all(c.ok for c in edits)


def _hold_keeps_the_later_deadline(store: Store) -> None:
    store.upgrade()
    assert store.chat_free_at("telegram", "1") is None
    later = utcnow() + timedelta(seconds=60)
    store.hold_chat("telegram", "1", later)
    store.hold_chat("telegram", "1", utcnow() + timedelta(seconds=5))
    free_at = store.chat_free_at("telegram", "1")
    assert free_at is not None and abs((free_at - later).total_seconds()) < 0.01
    even_later = later + timedelta(seconds=30)
    store.hold_chat("telegram", "1", even_later)
    free_at = store.chat_free_at("telegram", "1")
    assert free_at is not None and abs((free_at - even_later).total_seconds()) < 0.01
    assert store.chat_free_at("discord", "1") is None
    store.hold_chat("telegram", "2", utcnow() - timedelta(seconds=1))
    assert store.chat_free_at("telegram", "2") is None, "a deadline passed holds nothing"


def test_the_store_keeps_the_later_deadline_on_sqlite(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'limits.db'}")
    try:
        _hold_keeps_the_later_deadline(store)
    finally:
        store.dispose()


def test_the_store_keeps_the_later_deadline_on_postgresql() -> None:
    if why := postgres_reachable():
        pytest.skip(why)
    name, url = create_pg_database()
    store = Store(url)
    try:
        _hold_keeps_the_later_deadline(store)
    finally:
        store.dispose()
        drop_pg_database(name)


def _where(chat: int) -> Any:
    return SimpleNamespace(chat=SimpleNamespace(id=chat, type="group"), message_thread_id=None,
                           is_topic_message=False)


def test_the_bot_sends_no_reply_into_a_held_chat_and_records_its_own_429(
        fake: FakeTelegram, db_url: str) -> None:
    store = Store(db_url)
    adapter = TelegramAdapter(SimpleNamespace(orchestrator=None, store=store, redriver=None))  # type: ignore[arg-type]
    reply = [OutboundMessage(MessageKind.INFO, "hello")]

    async def scenario() -> None:
        async with Bot(fake.token, base_url=f"{fake.url}/bot") as bot:
            context: Any = SimpleNamespace(bot=bot)
            # A 429 answered to the bot is recorded for the workers too.
            fake.fail("sendMessage", chat_id=9104, code=429, retry_after=30)
            await adapter._send(context, _where(9104), reply)
            assert store.chat_free_at("telegram", "9104") is not None
            await adapter._send(context, _where(9104), reply)
            assert len(fake.calls("sendMessage", chat_id=9104)) == 1
            # A chat a worker holds for long gets nothing; a short hold is waited out.
            store.hold_chat("telegram", "9105", utcnow() + timedelta(seconds=0.5))
            await adapter._send(context, _where(9105), reply)
            assert len(fake.calls("sendMessage", chat_id=9105, ok=True)) == 1

    asyncio.run(scenario())
