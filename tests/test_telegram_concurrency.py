"""Concurrent Telegram updates: in order within a chat, side by side across chats."""

from __future__ import annotations

import asyncio
from typing import Any

from telegram import Chat, Message, Update

from bots.telegram._concurrency import PerChatOrder, StatusCoalescer
from core.outbound import MessageKind, OutboundMessage


def _update(update_id: int, chat_id: int) -> Update:
    chat = Chat(chat_id, Chat.GROUP)
    return Update(update_id, message=Message(update_id, None, chat))  # type: ignore[arg-type]


def test_updates_of_one_chat_keep_their_order_while_other_chats_go_on() -> None:
    events: list[str] = []

    async def handle(name: str, seconds: float) -> None:
        events.append(f"{name} start")
        await asyncio.sleep(seconds)
        events.append(f"{name} end")

    async def main() -> None:
        processor = PerChatOrder()
        await asyncio.gather(
            processor.process_update(_update(1, -1), handle("a1", 0.2)),
            processor.process_update(_update(2, -1), handle("a2", 0.0)),
            processor.process_update(_update(3, -2), handle("b1", 0.05)))
        assert processor._chats == {}  # nothing kept for chats gone quiet

    asyncio.run(main())
    assert events.index("a1 end") < events.index("a2 start")  # chat -1 in order
    assert events.index("b1 end") < events.index("a1 end")  # chat -2 did not wait for it


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
