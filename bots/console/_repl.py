"""Terminal front ends for :class:`ConsoleChat`: an interactive chat and a JSON-lines driver."""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any, TextIO

from bots.console._adapter import ConsoleChat, ShownMessage
from core.events import Actor
from core.outbound import STREAM_CURSOR

__all__ = ["render", "run_interactive", "run_jsonl"]

DEFAULT_FINISH_TIMEOUT_SECONDS = 900.0
POLL_SECONDS = 0.2


def render(message: ShownMessage) -> str:
    """How a bot message looks in the terminal (``progress``: its status message's number and
    the work so far, a reply as it is written)."""
    if message.kind == "progress":
        return f"[{message.id}] ✎ {message.text}"
    lines = [f"[{message.id}] {message.text}"]
    lines += [f"     🖼  {path}" for path in message.images]
    if message.buttons:
        names = " ".join(b.split(":", 1)[0] for b in message.buttons)
        lines.append(f"     buttons: {names}  (press with /press {message.id} NAME; "
                     f"react with /react {message.id} 👍)")
    return "\n".join(lines)


def _new_part(message: ShownMessage, streamed: dict[int, str]) -> ShownMessage:
    """A reply streaming in is printed as it grows: only what came since the last line."""
    before = streamed.get(message.id, "").removesuffix(STREAM_CURSOR)
    streamed[message.id] = message.text
    if before and message.text.startswith(before):
        return ShownMessage(id=message.id, kind="progress", job_id=message.job_id,
                            text="…" + message.text[len(before):])
    return message


def run_interactive(chat: ConsoleChat, *, stdin: TextIO = sys.stdin,
                    stdout: TextIO = sys.stdout) -> None:
    """Read lines until EOF or /quit; print the bot's messages as they arrive."""
    lock = threading.Lock()
    stop = threading.Event()

    streamed: dict[int, str] = {}  # status message -> the progress printed for it so far

    def show(messages: list[ShownMessage]) -> None:
        with lock:
            for message in messages:
                if message.kind == "progress":
                    message = _new_part(message, streamed)
                print(render(message), file=stdout, flush=True)

    def poller() -> None:
        while not stop.wait(POLL_SECONDS):
            show(chat.poll())
            show(chat.poll_progress())

    thread = threading.Thread(target=poller, name="console-poller", daemon=True)
    thread.start()
    try:
        for line in stdin:
            line = line.strip()
            if not line:
                continue
            if line in ("/quit", "/exit"):
                break
            show(chat.say(line))
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        thread.join(timeout=2)
        pending = chat.pending_jobs()
        if pending:
            print(f"(leaving {len(pending)} unfinished job(s); they will be delivered next time)",
                  file=stdout)


def _event_from_json(chat: ConsoleChat, data: Any) -> list[ShownMessage]:
    if not isinstance(data, dict):
        raise ValueError("each line must be a JSON object")
    if "react" in data or "unreact" in data:
        remove = "unreact" in data
        number = data["unreact" if remove else "react"]
        emoji = data.get("emoji")
        if not isinstance(number, int) or not isinstance(emoji, str) or not emoji:
            raise ValueError('a reaction looks like {"react": 2, "emoji": "👍"}')
        return chat.react(number, emoji, remove=remove)
    if "press" in data:
        number, button = data["press"], data.get("button")
        if not isinstance(number, int) or not isinstance(button, str):
            raise ValueError('a button press looks like {"press": 2, "button": "reroll"}')
        return chat.say(f"/press {number} {button}")
    text = data.get("text")
    if not isinstance(text, str):
        raise ValueError('a message looks like {"text": "/imagine a lighthouse at dusk"}')
    return chat.say(text)


def run_jsonl(chat: ConsoleChat, *, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout,
              finish_timeout: float = DEFAULT_FINISH_TIMEOUT_SECONDS) -> int:
    """One JSON event per input line, one JSON bot message per output line.

    Input: ``{"text": ...}``, ``{"react": N, "emoji": "👍"}``, ``{"unreact": N, "emoji": ...}``
    or ``{"press": N, "button": "reroll"}``; an optional ``"user"`` sets who speaks. At end of
    input it waits (up to ``finish_timeout`` seconds) for every job it started, then returns 0,
    or 1 if some did not finish. While it waits, a request's progress comes out as it changes:
    ``{"kind": "progress", "id": <its status message>, "text": <the reply so far>, ...}``.
    """
    def emit(messages: list[ShownMessage]) -> None:
        for message in messages:
            stdout.write(json.dumps(message.to_json(), ensure_ascii=False) + "\n")
        stdout.flush()

    for line in stdin:
        if not line.strip():
            continue
        try:
            data = json.loads(line)
            if isinstance(data, dict) and isinstance(data.get("user"), str):
                chat.user = Actor(data["user"], data["user"])
            emit(_event_from_json(chat, data))
        except (ValueError, KeyError) as exc:
            emit([ShownMessage(id=0, kind="error", text=f"Bad input line: {exc}")])
        emit(chat.poll())
    deadline = time.monotonic() + finish_timeout
    while chat.pending_jobs() and time.monotonic() < deadline:
        emit(chat.poll())
        emit(chat.poll_progress())
        time.sleep(POLL_SECONDS)
    time.sleep(POLL_SECONDS)
    emit(chat.poll())
    return 1 if chat.pending_jobs() else 0
