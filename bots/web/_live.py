"""Live updates for the playground: one watcher for every open tab, server-sent events out.

Browsers never poll. Each tab keeps one ``EventSource`` (htmx's SSE extension) open; this hub
reads the store for all open tabs at once (one query for new local messages in their chats, one
progress read per request still running) every :data:`LIVE_INTERVAL_SECONDS` and pushes HTML
fragments: new messages to append, and out-of-band swaps of a request's progress line
("queued, 2 ahead" -> "drawing…" -> "done"; a reply being written shows there as it grows).
Workers write results into ``local_messages`` (workers/delivery/local.py); the terminal chat
reads the same table.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from core.gallery import local_messages_since, progress
from core.store import JobState, LocalMessage, Store

__all__ = ["LiveHub", "sse_frame"]

log = logging.getLogger(__name__)

LIVE_INTERVAL_SECONDS = 0.2
#: A comment line this often keeps proxies from closing an idle stream and finds closed tabs.
KEEPALIVE_SECONDS = 15.0
#: Frames a slow tab may have waiting before it is dropped (its browser reconnects and resumes).
QUEUE_MAX_FRAMES = 500


def sse_frame(data: str, *, event: str = "message", event_id: int | None = None) -> str:
    """One server-sent event; every line of ``data`` gets its own ``data:`` field."""
    lines = [f"event: {event}"]
    if event_id is not None:
        lines.append(f"id: {event_id}")
    lines += [f"data: {line}" for line in data.splitlines() or [""]]
    return "\n".join(lines) + "\n\n"


@dataclass(eq=False)
class _Tab:
    chat_id: str
    after: int
    queue: asyncio.Queue[str] = field(default_factory=lambda: asyncio.Queue(QUEUE_MAX_FRAMES))
    #: Job id of each request whose progress line this tab shows -> the text it shows now.
    watching: dict[str, str] = field(default_factory=dict)
    dropped: bool = False


class LiveHub:
    """Fans the store's news out to the open tabs.

    Args:
        render_messages: HTML of new messages for one chat (the page's own template).
        render_progress: the out-of-band HTML that replaces one request's progress line, or
            None when there is nothing to show.
    """

    def __init__(self, store: Store,
                 render_messages: Callable[[str, Sequence[LocalMessage]], str],
                 render_progress: Callable[[str, str], str]) -> None:
        self.store = store
        self.render_messages = render_messages
        self.render_progress = render_progress
        self._tabs: set[_Tab] = set()
        self._closed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._ids = itertools.count()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="web-live-hub")

    async def close(self) -> None:
        self._closed.set()
        if self._task is not None:
            self._task.cancel()
            with _suppress_cancel():
                await self._task

    async def stream(self, chat_id: str, after: int,
                     watch: dict[str, str]) -> AsyncIterator[str]:
        """SSE frames for one tab, from the message after ``after`` on, until it goes away."""
        tab = _Tab(chat_id, after, watching=dict(watch))
        self._tabs.add(tab)
        try:
            yield "retry: 1000\n\n"
            while not self._closed.is_set() and not tab.dropped:
                try:
                    yield await asyncio.wait_for(tab.queue.get(), KEEPALIVE_SECONDS)
                except TimeoutError:
                    yield ": keep-alive\n\n"
        finally:
            self._tabs.discard(tab)

    async def _run(self) -> None:
        while not self._closed.is_set():
            await asyncio.sleep(LIVE_INTERVAL_SECONDS)
            if not self._tabs:
                continue
            tabs = list(self._tabs)
            try:
                news = await asyncio.to_thread(self._read, tabs)
            except Exception:  # the store hiccuped (a restart): try again next tick
                log.exception("live updates: reading the store failed")
                continue
            for tab, frames in news:
                for frame in frames:
                    try:
                        tab.queue.put_nowait(frame)
                    except asyncio.QueueFull:
                        tab.dropped = True  # the browser reconnects with Last-Event-ID
                        break

    def _read(self, tabs: list[_Tab]) -> list[tuple[_Tab, list[str]]]:
        """In a thread: what each tab has not seen yet."""
        chats = sorted({t.chat_id for t in tabs})
        rows = local_messages_since(self.store, chats, min(t.after for t in tabs))
        # A reply being written shows on its progress line as it grows (the worker's edits).
        streamed = self.store.local_progress({j for t in tabs for j in t.watching} | {
            r.job_id for r in rows if r.kind == "status" and r.job_id})
        out = []
        for tab in tabs:
            frames: list[str] = []
            mine = [r for r in rows if r.chat_id == tab.chat_id and r.id > tab.after]
            if mine:
                for row in mine:
                    if row.kind == "status" and row.job_id and row.author == "bot":
                        tab.watching.setdefault(row.job_id, "")
                frames.append(sse_frame(self.render_messages(tab.chat_id, mine),
                                        event_id=mine[-1].id))
                tab.after = mine[-1].id
            for job_id, shown in list(tab.watching.items()):
                now = progress(self.store, job_id)
                if now is None:
                    del tab.watching[job_id]
                    continue
                job = self.store.get_job(job_id)
                text = now.describe(job.kind if job else "image")
                if now.state == "running" and streamed.get(job_id):
                    text = streamed[job_id]
                if text != shown:
                    tab.watching[job_id] = text
                    frames.append(sse_frame(self.render_progress(job_id, text)))
                if now.state in (JobState.DELIVERED, JobState.FAILED):
                    del tab.watching[job_id]
            out.append((tab, frames))
        return out


class _suppress_cancel:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> bool:
        return kind is asyncio.CancelledError
