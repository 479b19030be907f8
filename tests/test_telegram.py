"""The Telegram bot end to end: the real python-telegram-bot Application (long polling and
webhook) against a fake Bot API over real HTTP (tests/fake_telegram.py), with a real Celery
worker process that posts results to the same fake.

One deployment (embedded broker + SQLite, or Redis + PostgreSQL) and one worker serve the whole
module; each test uses its own chat ids so tests do not see each other's messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from bots.telegram import running
from core.intents import COMMANDS
from core.settings import Settings
from core.store import Artifact, Job
from tests._stack import Stack, free_port, postgres_reachable, redis_reachable
from tests.fake_telegram import Call, FakeTelegram

RESULT_TIMEOUT_SECONDS = 120
POLL_TIMEOUT_SECONDS = 1
WORKER_AGENT = "MuseSpark-worker"
IMAGE_PIPELINE = Path(__file__).resolve().parent.parent / "workers/pipelines/image_diffusion.py"


def needs_image_pipeline() -> None:
    if not IMAGE_PIPELINE.exists():
        pytest.skip("workers/pipelines/image_diffusion.py (imported by workers/runner.py) is "
                    "not in the tree: image jobs fail in every worker")


def from_worker(call: Call) -> bool:
    return call.user_agent == WORKER_AGENT


def is_text_result(call: Call) -> bool:
    return from_worker(call) and "SmolLM2" in str(call.params.get("text", ""))


class BotThread:
    """The PTB Application running in its own thread and event loop, as in `musespark bot`."""

    def __init__(self, stack: Stack, settings: Settings) -> None:
        self.stack, self.settings = stack, settings
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="telegram-bot", daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            async with running(self.stack.runtime, settings=self.settings,
                               poll_timeout_seconds=POLL_TIMEOUT_SECONDS):
                self._ready.set()
                await self._stop.wait()

        try:
            asyncio.run(main())
        except BaseException as exc:  # surfaced by start()
            self._error = exc
            self._ready.set()

    def start(self) -> BotThread:
        self._thread.start()
        self._ready.wait(timeout=30)
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=30)
        assert not self._thread.is_alive(), "the bot did not stop"


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeTelegram]:
    with FakeTelegram() as server:
        yield server


@contextlib.contextmanager
def deployment(backend: str, fake: FakeTelegram, root: Path, model_cache: Path) -> Iterator[Stack]:
    """A deployment whose worker delivers to the fake, with the bot polling it."""
    if backend == "distributed":
        problems = [p for p in (redis_reachable(), postgres_reachable()) if p]
        if problems:
            pytest.skip(f"distributed mode NOT tested: {'; '.join(problems)}")
    stack = Stack.create(backend, root, model_cache, MUSESPARK_TELEGRAM_TOKEN=fake.token,
                         MUSESPARK_TELEGRAM_API_URL=fake.url)
    try:
        stack.start_worker()
        assert stack.runtime is not None  # made here: Stack.settings swaps os.environ
        stack.bot = BotThread(stack, stack.settings).start()  # type: ignore[attr-defined]
        yield stack
    finally:
        bot = getattr(stack, "bot", None)
        if bot is not None:
            bot.stop()
        stack.close()


@pytest.fixture(scope="module")
def tg(fake: FakeTelegram, tmp_path_factory: pytest.TempPathFactory,
       model_cache: Path) -> Iterator[Stack]:
    """The embedded deployment most tests share (the distributed one: see the last test)."""
    with deployment("embedded", fake, tmp_path_factory.mktemp("tg"), model_cache) as stack:
        yield stack


_chat_ids = iter(range(5001, 6000))
_group_ids = iter(range(-1001000000101, -1001000000999, -1))


def private_chat() -> int:
    return next(_chat_ids)


def group_chat() -> int:
    return next(_group_ids)


def job_for(stack: Stack, chat: int, message_id: int, suffix: str = "",
            timeout: float = 30) -> Job:
    """The job made for a person's message (its idempotency key is chat:message)."""
    return wait_job_with_key(stack, f"telegram:{chat}:{message_id}{suffix}", timeout)


def wait_job_with_key(stack: Stack, key: str, timeout: float = 30) -> Job:
    deadline = time.monotonic() + timeout
    while True:
        with stack.runtime.store.session() as s:
            job = s.scalars(select(Job).where(Job.idempotency_key == key)).one_or_none()
        if job is not None:
            return job
        if time.monotonic() > deadline:
            raise TimeoutError(f"no job for {key}")
        time.sleep(0.1)


def jobs_with_key_prefix(stack: Stack, prefix: str) -> list[Job]:
    with stack.runtime.store.session() as s:
        return list(s.scalars(select(Job).where(Job.idempotency_key.like(prefix + "%"))).all())


def callback_data(call: Call) -> list[str]:
    markup = call.params.get("reply_markup") or {}
    return [b["callback_data"] for row in markup.get("inline_keyboard", []) for b in row]


def wait_feedback(stack: Stack, job_id: str, count: int, timeout: float = 30) -> list[Any]:
    deadline = time.monotonic() + timeout
    while True:
        rows = list(stack.runtime.store.feedback_for_job(job_id))
        if len(rows) >= count:
            return rows
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(rows)} feedback rows for {job_id}, wanted {count}: {rows}")
        time.sleep(0.1)


def ask(fake: FakeTelegram, stack: Stack, chat: int, text: str, **kw: Any) -> tuple[int, Job]:
    """Send a message as a person; returns its message id and the job it made."""
    update = fake.push(fake.text_update(chat, text, **kw))
    message_id = update["message"]["message_id"]
    return message_id, job_for(stack, chat, message_id)


@pytest.fixture(scope="module")
def picture(tg: Stack, fake: FakeTelegram) -> dict[str, Any]:
    """One /imagine in a private chat, delivered: the chat, the job and the photo message."""
    needs_image_pipeline()
    chat = private_chat()
    message_id, job = ask(fake, tg, chat, "/imagine a lighthouse at dusk")
    done = tg.wait_job(job.id, ("delivered", "failed"), timeout=RESULT_TIMEOUT_SECONDS)
    assert done.state == "delivered", (done.failure_reason, tg.workers[0].log()[-3000:])
    (photo,) = fake.wait_calls("sendPhoto", chat_id=chat)
    return {"chat": chat, "message_id": message_id, "job": tg.job(job.id), "photo": photo}


@pytest.fixture(scope="module")
def answer(tg: Stack, fake: FakeTelegram) -> dict[str, Any]:
    """One /write in a private chat, delivered: the chat, the job and the result message."""
    chat = private_chat()
    message_id, job = ask(fake, tg, chat, "/write a haiku about rain")
    done = tg.wait_job(job.id, ("delivered", "failed"), timeout=RESULT_TIMEOUT_SECONDS)
    assert done.state == "delivered", (done.failure_reason, tg.workers[0].log()[-3000:])
    (result,) = fake.wait_calls("sendMessage", chat_id=chat, where=is_text_result)
    return {"chat": chat, "message_id": message_id, "job": done, "result": result}


# -- requests and results ----------------------------------------------------------------------


def test_a_command_makes_a_job_whose_photo_arrives_with_buttons(
        tg: Stack, fake: FakeTelegram, picture: dict[str, Any]) -> None:
    chat, job, photo = picture["chat"], picture["job"], picture["photo"]
    assert job.state == "delivered", job.failure_reason
    assert job.prompt == "a lighthouse at dusk" and job.platform == "telegram"
    # The immediate status reply answers the person's message, and becomes the progress message.
    (status,) = fake.calls("sendMessage", chat_id=chat)
    assert "Drawing" in status.params["text"] and job.id in status.params["text"]
    assert int(status.params["reply_parameters"]["message_id"]) == picture["message_id"]
    progress_id = status.result["message_id"]
    assert tg.job(job.id).delivery["extra"]["progress_message_id"] == str(progress_id)
    fake.wait_calls("editMessageText", chat_id=chat,
                    where=lambda c: int(c.params["message_id"]) == progress_id
                    and c.params["text"] == "✅ Done.")
    # The photo: the artifact's bytes, the caption, the buttons, and recorded for feedback.
    (artifact_path,) = [a for a in _artifacts(tg, job.id)]
    assert photo.files["photo"] == Path(artifact_path).read_bytes()
    assert photo.user_agent == WORKER_AGENT
    assert "a lighthouse at dusk" in photo.params["caption"]
    assert int(photo.params["reply_parameters"]["message_id"]) == picture["message_id"]
    data = callback_data(photo)
    for action in ("reroll", "vary1", "vary2", "up", "down"):
        assert f"{action}:{job.id}" in data
    assert all(len(d.encode()) <= 64 for d in data)
    photo_id = str(photo.result["message_id"])
    delivered = tg.runtime.store.find_delivered("telegram", str(chat), photo_id)
    assert delivered is not None and delivered.job_id == job.id


def _artifacts(stack: Stack, job_id: str) -> list[str]:
    with stack.runtime.store.session() as s:
        return [a.path or "" for a in s.scalars(
            select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.position))]


def test_write_answers_in_text_and_a_reply_continues_the_thread(
        tg: Stack, fake: FakeTelegram, answer: dict[str, Any]) -> None:
    chat, first, result = answer["chat"], answer["job"], answer["result"]
    assert int(result.params["reply_parameters"]["message_id"]) == answer["message_id"]
    data = callback_data(result)
    assert {f"reroll:{first.id}", f"up:{first.id}", f"down:{first.id}"} <= set(data)
    assert tg.runtime.store.find_delivered("telegram", str(chat),
                                           str(result.result["message_id"])) is not None
    (status,) = [c for c in fake.calls("sendMessage", chat_id=chat) if not from_worker(c)]
    assert "Writing" in status.params["text"] and first.id in status.params["text"]
    fake.wait_calls("editMessageText", chat_id=chat,
                    where=lambda c: c.params["message_id"] == status.result["message_id"]
                    and c.params["text"] == "✅ Done.")
    # Commands registered, reactions asked for.
    assert {c["command"] for c in fake.commands} == set(COMMANDS)
    polls = [c for c in fake.calls("getUpdates")]
    assert polls and {"message_reaction", "message_reaction_count"} <= set(
        polls[0].params["allowed_updates"])
    first_text = _texts(tg, first.id)

    # Free text in a private chat, as a reply to the result: the conversation goes on.
    _, second = ask(fake, tg, chat, "now one about snow",
                    reply_to=result.result["message_id"])
    assert second.parent_job_id == first.id and second.params.get("thread") is True
    assert tg.wait_job(second.id, ("delivered", "failed"),
                       timeout=RESULT_TIMEOUT_SECONDS).state == "delivered"
    with tg.runtime.store.session() as s:
        recipe = s.scalars(select(Artifact.recipe).where(Artifact.job_id == second.id)).one()
    assert recipe["thread"] == [first.id], recipe
    assert first_text  # what the model saw as the earlier turn


def _texts(stack: Stack, job_id: str) -> list[str]:
    with stack.runtime.store.session() as s:
        return [t for t in s.scalars(select(Artifact.text).where(Artifact.job_id == job_id)) if t]


def test_a_long_caption_is_split_not_failed(tg: Stack, fake: FakeTelegram) -> None:
    needs_image_pipeline()
    chat = private_chat()
    prompt = " ".join(["a quiet harbour town at dawn with gulls and fishing boats"] * 26)
    assert 1024 < len(prompt) < 2000
    _, job = ask(fake, tg, chat, f"/imagine {prompt}")
    assert tg.wait_job(job.id, ("delivered", "failed"),
                       timeout=RESULT_TIMEOUT_SECONDS).state == "delivered"
    (photo,) = fake.wait_calls("sendPhoto", chat_id=chat)
    rest = fake.wait_calls("sendMessage", chat_id=chat,
                           where=lambda c: c.at >= photo.at and "MUSESPARK_IMAGE_MODEL"
                           in c.params["text"])
    assert len(photo.params["caption"]) <= 1024
    assert not fake.calls(chat_id=chat, ok=False), "Telegram refused a part"
    assert callback_data(rest[-1]), "the buttons go under the last part"


# -- feedback ------------------------------------------------------------------------------------


def test_reaction_updates_become_feedback_rows(tg: Stack, fake: FakeTelegram,
                                               answer: dict[str, Any]) -> None:
    chat, job = answer["chat"], answer["job"]
    photo_id = answer["result"].result["message_id"]
    before = len(tg.runtime.store.feedback_for_job(job.id))
    fake.push(fake.reaction_update(chat, photo_id, user_id=chat, new=("👍",)))
    fake.push(fake.reaction_update(chat, photo_id, user_id=chat, old=("👍",), new=("❤",)))
    rows = wait_feedback(tg, job.id, before + 3)[before:]
    assert sorted((r.value, r.delta, r.kind) for r in rows) == [
        ("❤", 1, "reaction"), ("👍", -1, "reaction"), ("👍", 1, "reaction")]
    assert all(r.user_id is not None for r in rows)
    # A reaction on a message the bot did not make is dropped without a word.
    sends = len(fake.calls("sendMessage", chat_id=chat))
    fake.push(fake.reaction_update(chat, answer["message_id"], user_id=chat, new=("🔥",)))
    fake.push(fake.text_update(chat, "/help"))
    fake.wait_calls("sendMessage", chat_id=chat, count=sends + 1)
    assert "Commands" in fake.calls("sendMessage", chat_id=chat)[-1].params["text"]


def test_anonymous_reaction_counts_move_the_community(tg: Stack, fake: FakeTelegram) -> None:
    group = group_chat()
    _, job = ask(fake, tg, group, f"/write@{fake.username} a line about foxes")
    assert tg.wait_job(job.id, ("delivered", "failed"),
                       timeout=RESULT_TIMEOUT_SECONDS).state == "delivered"
    (result,) = fake.wait_calls("sendMessage", chat_id=group, where=is_text_result)
    photo_id = result.result["message_id"]
    fake.push(fake.reaction_count_update(group, photo_id, {"👍": 3}))
    fake.push(fake.reaction_count_update(group, photo_id, {"👍": 1, "🔥": 2}))
    fake.push(fake.reaction_count_update(group, photo_id, {"🔥": 2}))  # 👍 went to 0
    rows = wait_feedback(tg, job.id, 4)
    assert [(r.value, r.delta) for r in rows] == [("👍", 3), ("👍", -2), ("🔥", 2), ("👍", -1)]
    assert all(r.user_id is None for r in rows), "anonymous counts belong to nobody"


def test_buttons_reroll_and_rate_and_are_answered_at_once(
        tg: Stack, fake: FakeTelegram, answer: dict[str, Any]) -> None:
    chat, job = answer["chat"], answer["job"]
    photo_id = answer["result"].result["message_id"]
    press = fake.push(fake.callback_update(chat, photo_id, f"up:{job.id}"))
    pushed_at = time.monotonic()
    (answer,) = fake.wait_calls("answerCallbackQuery", where=lambda c: str(
        c.params["callback_query_id"]) == press["callback_query"]["id"], timeout=10)
    assert answer.at - pushed_at < 5
    assert answer.params.get("text") == "Thanks, noted."
    assert any(r.kind == "button" and r.value == "up" for r in
               wait_feedback(tg, job.id, 1))

    fake.push(fake.callback_update(chat, photo_id, f"reroll:{job.id}"))
    reroll = fake.wait_for(lambda: [j for j in jobs_with_key_prefix(tg, "telegram:cb:")
                                    if j.parent_job_id == job.id and j.idempotency_key
                                    .endswith(":reroll")], what="reroll job")
    (new,) = reroll
    assert new.prompt == job.prompt and new.params.get("thread") is None
    assert tg.wait_job(new.id, ("delivered", "failed"),
                       timeout=RESULT_TIMEOUT_SECONDS).state == "delivered"
    results = fake.wait_calls("sendMessage", chat_id=chat, where=is_text_result, count=2)
    assert f"reroll:{new.id}" in callback_data(results[-1])


def test_the_same_update_twice_makes_one_job(tg: Stack, fake: FakeTelegram) -> None:
    chat = private_chat()
    update = fake.text_update(chat, "/write one line about a paper boat")
    fake.push(update)
    fake.push(update)  # Telegram (or a webhook retry) delivers it again
    job = job_for(tg, chat, update["message"]["message_id"])
    assert tg.wait_job(job.id, ("delivered", "failed"),
                       timeout=RESULT_TIMEOUT_SECONDS).state == "delivered"
    fake.wait_calls("sendMessage", chat_id=chat, where=is_text_result)
    time.sleep(1.0)  # a second job's replies would be out by now
    assert len(jobs_with_key_prefix(tg, f"telegram:{chat}:")) == 1
    sent = fake.calls("sendMessage", chat_id=chat, ok=True)
    assert len([c for c in sent if not from_worker(c)]) == 1, "one status reply, not two"
    assert len([c for c in sent if from_worker(c)]) == 1, "one result, not two"


# -- platform errors ---------------------------------------------------------------------------


def test_429_waits_retry_after_then_delivers(tg: Stack, fake: FakeTelegram) -> None:
    chat = private_chat()
    fake.fail("sendMessage", chat_id=chat, code=429, retry_after=3, where=is_text_result)
    _, job = ask(fake, tg, chat, "/write two words about kites")
    (refused,) = fake.wait_calls("sendMessage", chat_id=chat, ok=False,
                                 timeout=RESULT_TIMEOUT_SECONDS)
    assert refused.status == 429
    assert tg.wait_job(job.id, ("delivered", "failed"),
                       timeout=RESULT_TIMEOUT_SECONDS).state == "delivered"
    sent = [c for c in fake.calls("sendMessage", chat_id=chat, ok=True) if is_text_result(c)][0]
    assert sent.params["text"] == refused.params["text"], "generated once, posted once"
    assert sent.at - refused.at >= 3 - 0.1, "sent again before retry_after"
    assert tg.job(job.id).attempts == 1, "waiting is not a crash"


def test_403_fails_the_job_and_sends_no_more_to_that_chat(tg: Stack,
                                                          fake: FakeTelegram) -> None:
    chat = private_chat()
    fake.block_chat(chat)
    update = fake.push(fake.text_update(chat, "/write two words about a locked door"))
    job = job_for(tg, chat, update["message"]["message_id"])
    failed = tg.wait_job(job.id, ("delivered", "failed"), timeout=RESULT_TIMEOUT_SECONDS)
    assert failed.state == "failed"
    assert "blocked" in (failed.failure_reason or "")
    time.sleep(1.5)  # anything more would have been sent by now
    worker_calls = [c for c in fake.calls(chat_id=chat) if from_worker(c)]
    assert [c.method for c in worker_calls] == ["sendMessage"], worker_calls
    assert all(c.status == 403 for c in fake.calls(chat_id=chat))


# -- groups ----------------------------------------------------------------------------------------


def test_in_groups_only_commands_mentions_and_replies_are_answered(
        tg: Stack, fake: FakeTelegram) -> None:
    group = group_chat()
    for text in ("hello everyone", "/imagine@some_other_bot a cat", "/paint a cat",
                 "draw a cat please"):
        fake.push(fake.text_update(group, text))
    update = fake.push(fake.text_update(group, f"/help@{fake.username}"))
    (help_reply,) = fake.wait_calls("sendMessage", chat_id=group)
    assert "Commands" in help_reply.params["text"]
    assert int(help_reply.params["reply_parameters"]["message_id"]) == (
        update["message"]["message_id"])
    assert jobs_with_key_prefix(tg, f"telegram:{group}:") == []

    # A mention, and a reply to one of the bot's messages, are for the bot.
    _, mentioned = ask(fake, tg, group, f"@{fake.username} draw a red fox")
    assert mentioned.kind == "image" and mentioned.prompt == "a red fox"
    _, replied = ask(fake, tg, group, "one word for blue",
                     reply_to=help_reply.result["message_id"])
    assert replied.kind == "text" and replied.parent_job_id is None


def test_a_command_for_another_bot_is_answered_in_a_private_chat(
        tg: Stack, fake: FakeTelegram) -> None:
    """Groups leave ``/cmd@otherbot`` to that bot; a private chat is ours alone, so silence
    there would be a dead end."""
    chat = private_chat()
    for count, text in enumerate(("/imagine@some_other_bot a cat", "/paint@some_other_bot"), 1):
        update = fake.push(fake.text_update(chat, text))
        reply = fake.wait_calls("sendMessage", chat_id=chat, count=count)[-1]
        assert reply.params["text"] == "That command was for @some_other_bot, not me."
        assert int(reply.params["reply_parameters"]["message_id"]) == (
            update["message"]["message_id"])
    assert jobs_with_key_prefix(tg, f"telegram:{chat}:") == []


# -- webhook mode ----------------------------------------------------------------------------------


def test_webhook_mode_refuses_requests_without_the_secret(tg: Stack,
                                                          fake: FakeTelegram) -> None:
    port = free_port()
    settings = tg.settings.model_copy(update={
        "telegram_webhook_url": f"http://127.0.0.1:{port}/telegram-hook",
        "telegram_webhook_listen": "127.0.0.1", "telegram_webhook_port": port})
    polling: BotThread = tg.bot  # type: ignore[attr-defined]
    polling.stop()
    webhook = BotThread(tg, settings).start()
    try:
        assert fake.webhook["url"] == settings.telegram_webhook_url
        secret = fake.webhook["secret_token"]
        assert secret and len(secret) >= 32
        assert {"message_reaction", "message_reaction_count"} <= set(
            fake.webhook["allowed_updates"])

        chat = private_chat()
        update = fake.text_update(chat, "/write two words about a lantern")
        assert fake.post_webhook(update, secret=None) == 403
        assert fake.post_webhook(update, secret="wrong-secret") == 403
        time.sleep(0.5)
        assert jobs_with_key_prefix(tg, f"telegram:{chat}:") == []

        assert fake.post_webhook(update) == 200
        assert fake.post_webhook(update) == 200  # Telegram retries: still one job
        job = job_for(tg, chat, update["message"]["message_id"])
        assert tg.wait_job(job.id, ("delivered", "failed"),
                           timeout=RESULT_TIMEOUT_SECONDS).state == "delivered"
        fake.wait_calls("sendMessage", chat_id=chat, where=is_text_result)
        assert len(jobs_with_key_prefix(tg, f"telegram:{chat}:")) == 1
        assert len([c for c in fake.calls("sendMessage", chat_id=chat)
                    if not from_worker(c)]) == 1, "one status reply, not two"
    finally:
        webhook.stop()
        tg.bot = BotThread(tg, tg.settings).start()  # type: ignore[attr-defined]
    assert not fake.webhook, "polling removes the webhook when it starts"


# -- the distributed backend -------------------------------------------------------------------


@pytest.mark.distributed
def test_the_core_flow_on_redis_and_postgresql(tmp_path: Path, model_cache: Path) -> None:
    """Command -> job -> result, a reaction, a button and a duplicate, on Redis + PostgreSQL."""
    with FakeTelegram() as fake, deployment("distributed", fake, tmp_path,
                                            model_cache) as stack:
        chat = private_chat()
        update = fake.text_update(chat, "/write two words about harbours")
        fake.push(update)
        fake.push(update)
        job = job_for(stack, chat, update["message"]["message_id"])
        assert stack.wait_job(job.id, ("delivered", "failed"),
                              timeout=RESULT_TIMEOUT_SECONDS).state == "delivered"
        (result,) = fake.wait_calls("sendMessage", chat_id=chat, where=is_text_result)
        result_id = result.result["message_id"]
        fake.push(fake.reaction_update(chat, result_id, user_id=chat, new=("👍",)))
        fake.push(fake.callback_update(chat, result_id, f"down:{job.id}"))
        rows = wait_feedback(stack, job.id, 2)
        assert sorted((r.kind, r.value) for r in rows) == [("button", "down"),
                                                          ("reaction", "👍")]
        assert len(jobs_with_key_prefix(stack, f"telegram:{chat}:")) == 1


# -- /web sign-in links ----------------------------------------------------------------------------


def _redeem(stack: Stack, text: str) -> Any:
    """The grant a sign-in link in ``text`` gives (core/web_access.py)."""
    import re

    from core.web_access import redeem_signin

    found = re.search(r"/c/(\d+)/signin/(\S+)", text)
    assert found, text
    return redeem_signin(stack.runtime.store, stack.runtime.settings, int(found[1]), found[2])


def test_web_in_a_group_sends_the_link_privately_with_the_admin_flag(
        tg: Stack, fake: FakeTelegram) -> None:
    from core.events import Channel, ChannelKind

    group = group_chat()
    admin, member, stranger = 7101, 7102, 7103
    fake.members[(str(group), str(admin))] = "administrator"
    community = tg.runtime.store.ensure_community(
        "telegram", Channel(str(group), ChannelKind.GROUP))
    for count, (user, is_admin) in enumerate(((admin, True), (member, False)), 1):
        fake.push(fake.text_update(group, "/web", user_id=user))
        (private,) = fake.wait_calls("sendMessage", chat_id=user)
        grant = _redeem(tg, private.params["text"])
        assert (grant.community_id, grant.admin) == (community, is_admin)
        note = fake.wait_calls("sendMessage", chat_id=group, count=count)[-1]
        assert "private message" in note.params["text"] and "/signin/" not in note.params["text"]
    # Someone who never started a chat with the bot is told how, and the group sees no link.
    fake.block_chat(stranger)
    fake.push(fake.text_update(group, "/web", user_id=stranger))
    note = fake.wait_calls("sendMessage", chat_id=group, count=3)[-1]
    assert "can't write to you privately" in note.params["text"]
    assert not any("/signin/" in c.params.get("text", "")
                   for c in fake.calls("sendMessage", chat_id=group))


BURST = 40


def test_a_burst_in_one_group_is_all_taken_with_a_few_gathered_statuses(
        tg: Stack, fake: FakeTelegram) -> None:
    """Updates are handled concurrently; a group gets its statuses paced and gathered (Telegram
    allows 20 messages a minute there), not one message per request."""
    chat = group_chat()
    updates = [fake.push(fake.text_update(chat, f"/imagine burst picture {n} --count 1",
                                          user_id=5000 + n)) for n in range(BURST)]
    jobs = [job_for(tg, chat, u["message"]["message_id"], timeout=120) for u in updates]
    try:
        assert len({j.id for j in jobs}) == BURST
        fake.wait_for(lambda: any("requests are queued" in str(c.params.get("text", ""))
                                  for c in fake.calls("sendMessage", chat_id=chat)
                                  if not from_worker(c)) or None, timeout=30)
        time.sleep(4)  # a gathered status still waiting for the chat's pace is posted by now
        statuses = [c for c in fake.calls("sendMessage", chat_id=chat) if not from_worker(c)]
        assert 1 < len(statuses) <= BURST // 4, [c.params.get("text") for c in statuses]
        named = " ".join(str(c.params.get("text")) for c in statuses)
        assert "burst picture 0" in named  # the first request's status went at once
    finally:  # the burst's pictures would hold up the module's other tests
        with tg.runtime.store.session() as s:
            s.execute(update(Job).where(Job.id.in_([j.id for j in jobs]),
                                        Job.state == "queued")
                      .values(state="cancelled", failure_reason="withdrawn by the test"))


def test_a_request_that_waits_too_long_is_told_in_its_chat(tg: Stack, fake: FakeTelegram) -> None:
    """The redriver tells Telegram people of a delay through the bot (a reply to their
    request), as it tells the local chat."""
    from datetime import timedelta

    from core.events import Actor
    from core.store import utcnow

    assert tg.runtime.redriver is not None
    chat = private_chat()
    user = tg.runtime.store.ensure_user("telegram", Actor(str(chat), "Ada"))
    request = 777  # the person's message (sent without the reply if it is gone)
    job, _ = tg.runtime.store.create_job(
        idempotency_key=f"delay-test:{chat}", kind="text", intent="write", user_id=user,
        prompt="p", expanded_prompt="p", params={"max_new_tokens": 8}, seed=1,
        platform="telegram",
        delivery={"platform": "telegram", "chat_id": str(chat), "reply_to": str(request)})
    with tg.runtime.store.session() as s:  # made long ago, and held back from the worker
        s.execute(update(Job).where(Job.id == job.id).values(
            created_at=utcnow() - timedelta(hours=1), not_before=utcnow() + timedelta(hours=1)))
    try:
        tg.runtime.redriver.round()
        (notice,) = fake.wait_calls("sendMessage", chat_id=chat)
        assert f"taking longer than usual; it is still in line (job {job.id})" in \
            notice.params["text"]
        assert notice.params["reply_parameters"]["message_id"] == request
        tg.runtime.redriver.round()
        time.sleep(1)
        assert len(fake.calls("sendMessage", chat_id=chat)) == 1, "told once"
    finally:
        with tg.runtime.store.session() as s:
            s.execute(update(Job).where(Job.id == job.id).values(state="cancelled"))
