"""Concurrent Telegram updates: in order for one person in a chat, side by side for other
people and other chats."""

from __future__ import annotations

import asyncio
from typing import Any

from telegram import Chat, Message, Update, User

from bots.telegram._concurrency import PerSenderOrder, StatusCoalescer
from core.outbound import MessageKind, OutboundMessage


def _update(update_id: int, chat_id: int, user_id: int | None = 1) -> Update:
    chat = Chat(chat_id, Chat.GROUP)
    user = User(user_id, "U", False) if user_id is not None else None
    return Update(update_id, message=Message(update_id, None, chat,  # type: ignore[arg-type]
                                             from_user=user))


def test_one_persons_updates_keep_their_order_while_others_and_other_chats_go_on() -> None:
    events: list[str] = []

    async def handle(name: str, seconds: float) -> None:
        events.append(f"{name} start")
        await asyncio.sleep(seconds)
        events.append(f"{name} end")

    async def main() -> None:
        processor = PerSenderOrder()
        await asyncio.gather(
            processor.process_update(_update(1, -1), handle("a1", 0.2)),
            processor.process_update(_update(2, -1), handle("a2", 0.0)),
            processor.process_update(_update(3, -1, user_id=2), handle("c1", 0.05)),
            processor.process_update(_update(4, -1, user_id=None), handle("n1", 0.2)),
            processor.process_update(_update(5, -1, user_id=None), handle("n2", 0.0)),
            processor.process_update(_update(6, -2), handle("b1", 0.05)))
        assert processor._senders == {}  # nothing kept for senders gone quiet

    asyncio.run(main())
    assert events.index("a1 end") < events.index("a2 start")  # one person, in order
    assert events.index("n1 end") < events.index("n2 start")  # no sender: the chat's order
    assert events.index("c1 end") < events.index("a1 end")  # another person did not wait
    assert events.index("b1 end") < events.index("a1 end")  # nor did another chat


def test_statuses_in_a_busy_chat_are_gathered_into_one_message() -> None:
    posted: list[tuple[str, Any]] = []

    async def post(status: OutboundMessage, reply_to: int | None) -> bool:
        posted.append((status.text, reply_to))
        return True

    async def main() -> StatusCoalescer:
        coalescer = StatusCoalescer()
        for n in range(5):
            await coalescer.submit((-1, None), False, OutboundMessage(
                MessageKind.STATUS, f"Drawing: “{n}”", job_id=f"j{n}"), n, post)
        await asyncio.sleep(1.3)  # a private chat's pace: one message a second
        return coalescer

    coalescer = asyncio.run(main())
    assert [p[1] for p in posted] == [0, None], posted
    assert posted[0][0] == "Drawing: “0”" and "4 requests are queued" in posted[1][0]
    assert all(f"“{n}”" in posted[1][0] for n in range(1, 5)) and coalescer.gathered == 1
