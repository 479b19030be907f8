"""Text from an OpenAI-compatible server (MUSESPARK_TEXT_API_URL), through a real worker.

tests/fake_openai.py plays vLLM: a streamed /write edits the Telegram status message as the
reply arrives (at most one edit a second), and structured output (a brainstorm) goes through
the server's ``response_format: json_schema``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from core.errors import ModelUnavailableError
from tests._stack import Stack
from tests.fake_openai import MODEL, FakeOpenAI
from tests.fake_telegram import Call, FakeTelegram
from tests.test_telegram import BotThread, ask, from_worker, private_chat
from workers.pipelines.text_openai import ApiTextGenerator
from workers.runner import STREAM_CURSOR, STREAM_EDIT_SECONDS

RESULT_TIMEOUT_SECONDS = 120
API_KEY = "sk-test-4242"
#: Seconds between streamed words: the reply takes a few seconds, so several edits are due.
CHUNK_DELAY_SECONDS = 0.3


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory,
           model_cache: Path) -> Iterator[tuple[Stack, FakeOpenAI, FakeTelegram]]:
    with FakeOpenAI(chunk_delay=CHUNK_DELAY_SECONDS) as api, FakeTelegram() as telegram:
        stack = Stack.create("embedded", tmp_path_factory.mktemp("text-api"), model_cache,
                             MUSESPARK_TEXT_API_URL=api.url, MUSESPARK_TEXT_API_KEY=API_KEY,
                             MUSESPARK_TELEGRAM_TOKEN=telegram.token,
                             MUSESPARK_TELEGRAM_API_URL=telegram.url)
        bot = None
        try:
            stack.start_worker()
            assert stack.runtime is not None  # made here: Stack.settings swaps os.environ
            bot = BotThread(stack, stack.settings).start()
            yield stack, api, telegram
        finally:
            if bot is not None:
                bot.stop()
            stack.close()


def test_a_write_streams_from_the_server_into_throttled_edits(
        served: tuple[Stack, FakeOpenAI, FakeTelegram]) -> None:
    stack, api, telegram = served
    chat = private_chat()
    _, job = ask(telegram, stack, chat, "/write a haiku about rain")
    done = stack.wait_job(job.id, ("delivered", "failed"), timeout=RESULT_TIMEOUT_SECONDS)
    assert done.state == "delivered", (done.failure_reason, stack.workers[0].log()[-3000:])
    (result,) = telegram.wait_calls("sendMessage", chat_id=chat,
                                    where=lambda c: from_worker(c) and MODEL in c.params["text"])
    assert result.params["text"].startswith(api.reply)
    assert f"{MODEL} (served at 127.0.0.1)" in result.params["text"]
    (request,) = [r for r in api.requests if r["body"].get("stream")]
    assert request["auth"] == f"Bearer {API_KEY}" and request["body"]["model"] == MODEL
    assert request["body"]["messages"][-1]["content"].startswith("a haiku about rain")

    (status,) = [c for c in telegram.calls("sendMessage", chat_id=chat) if not from_worker(c)]
    edits: list[Call] = [c for c in telegram.calls("editMessageText", chat_id=chat)
                         if c.params["message_id"] == status.result["message_id"]
                         and c.params["text"].endswith(STREAM_CURSOR)]
    streamed_seconds = CHUNK_DELAY_SECONDS * len(api.reply.split())
    assert 2 <= len(edits) <= streamed_seconds / STREAM_EDIT_SECONDS + 1, [
        c.params["text"] for c in edits]
    texts = [c.params["text"].removesuffix(STREAM_CURSOR) for c in edits]
    assert all(api.reply.startswith(t) for t in texts), texts
    assert [len(t) for t in texts] == sorted({len(t) for t in texts}), "the text only grows"
    gaps = [b.at - a.at for a, b in zip(edits, edits[1:])]
    assert min(gaps) >= STREAM_EDIT_SECONDS * 0.9, gaps


def test_the_local_chat_shows_a_reply_as_it_streams_in(
        served: tuple[Stack, FakeOpenAI, FakeTelegram]) -> None:
    """The terminal chat's JSON-lines driver prints the growing reply while it waits."""
    import io
    import json

    from bots.console import run_jsonl

    stack, api, _ = served
    out = io.StringIO()
    code = run_jsonl(stack.chat(), stdin=io.StringIO('{"text": "/write a haiku about rain"}\n'),
                     stdout=out, finish_timeout=RESULT_TIMEOUT_SECONDS)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert code == 0, lines
    (status,) = [m for m in lines if m["kind"] == "status"]
    streamed = [m["text"].removesuffix(STREAM_CURSOR) for m in lines
                if m["kind"] == "progress" and m["text"].endswith(STREAM_CURSOR)]
    assert len(streamed) >= 2, lines
    assert all(api.reply.startswith(t) for t in streamed), streamed
    assert [len(t) for t in streamed] == sorted(set(len(t) for t in streamed)), "it only grows"
    assert all(m["id"] == status["id"] for m in lines if m["kind"] == "progress")
    (result,) = [m for m in lines if m["kind"] == "result"]
    assert result["text"].startswith(api.reply)
    assert lines.index(result) > max(i for i, m in enumerate(lines) if m["kind"] == "progress")


def test_the_terminal_chat_prints_only_the_new_words_of_a_streaming_reply(
        served: tuple[Stack, FakeOpenAI, FakeTelegram]) -> None:
    import io
    import time

    from bots.console import run_interactive

    stack, api, _ = served
    out = io.StringIO()

    def typed() -> Iterator[str]:  # a person types one line, then watches until the reply
        yield "/write a haiku about rain\n"
        deadline = time.monotonic() + RESULT_TIMEOUT_SECONDS
        while MODEL not in out.getvalue() and time.monotonic() < deadline:
            time.sleep(0.2)

    run_interactive(stack.chat(), stdin=typed(), stdout=out)  # type: ignore[arg-type]
    lines = out.getvalue().splitlines()
    pieces = [line.split(" ✎ ", 1)[1] for line in lines if " ✎ " in line]
    grown = [p for p in pieces if p.startswith("…")]
    assert len(grown) >= 1, lines
    first = next(p for p in pieces if p.endswith(STREAM_CURSOR) and not p.startswith("…"))
    whole = first.removesuffix(STREAM_CURSOR) + "".join(
        p[1:].removesuffix(STREAM_CURSOR) for p in grown)
    assert api.reply.startswith(whole) and len(whole) > len(first), (whole, lines)
    assert any(MODEL in line for line in lines)


def test_the_web_playgrounds_progress_line_shows_the_reply_as_it_grows(
        served: tuple[Stack, FakeOpenAI, FakeTelegram]) -> None:
    """The live hub swaps the request's progress line for the reply written so far."""
    import html
    import time

    from bots.web._live import LiveHub, _Tab

    stack, api, _ = served
    chat = stack.chat()
    (status,) = [m for m in chat.say("/write a haiku about rain") if m.job_id]
    job_id = str(status.job_id)
    hub = LiveHub(stack.runtime.store, lambda chat_id, rows: "",
                  lambda job, text: f"<span id='state-{job}'>{html.escape(text)}</span>")
    tab = _Tab(chat.chat_id, status.id, watching={job_id: ""})
    shown: list[str] = []
    deadline = time.monotonic() + RESULT_TIMEOUT_SECONDS
    while job_id in tab.watching and time.monotonic() < deadline:
        ((_, frames),) = hub._read([tab])
        shown += [f for f in frames if f"state-{job_id}" in f]
        time.sleep(0.2)
    grown = [f for f in shown if STREAM_CURSOR in f]
    assert len(grown) >= 2, shown
    assert all(html.escape(api.reply.split()[0]) in f for f in grown), grown
    assert "done" in shown[-1], shown


def test_a_brainstorm_uses_the_servers_json_schema_output(
        served: tuple[Stack, FakeOpenAI, FakeTelegram]) -> None:
    stack, api, _ = served
    chat = stack.chat()
    replies = chat.say("/brainstorm a harbour festival")
    (job_id,) = [m.job_id for m in replies if m.kind == "status" and m.job_id]
    done = stack.wait_job(job_id, ("delivered", "failed"), timeout=RESULT_TIMEOUT_SECONDS)
    assert done.state == "delivered", done.failure_reason
    ideas = done.params["ideas"]
    # The server's (repetitive) ideas come first; the fallback fills up the rest.
    assert ideas[0]["title"] == api.words and ideas[0]["prompt"] == api.words, ideas
    structured = [r for r in api.chat_requests()
                  if (r.get("response_format") or {}).get("type") == "json_schema"]
    schema = structured[-1]["response_format"]["json_schema"]["schema"]
    assert "ideas" in schema["properties"], schema


def test_an_unreachable_server_is_a_clear_model_error() -> None:
    generator = ApiTextGenerator("http://127.0.0.1:9/v1", MODEL, None)
    with pytest.raises(ModelUnavailableError, match="MUSESPARK_TEXT_API_URL") as caught:
        generator.generate([{"role": "user", "content": "hello"}], max_new_tokens=8, seed=1)
    assert "not available right now" in caught.value.user_message


def test_a_server_that_does_not_serve_the_model_is_a_clear_model_error() -> None:
    with FakeOpenAI() as api:
        generator = ApiTextGenerator(api.url, "no-such-model", None)
        with pytest.raises(ModelUnavailableError, match="no-such-model"):
            generator.generate_json([{"role": "user", "content": "hi"}], {"type": "object"},
                                    max_new_tokens=8, seed=1)
