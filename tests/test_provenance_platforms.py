"""/verify and the 📎 Original file button on Telegram and Discord, through their local fakes,
a real bot adapter and a real worker process (embedded backend; tests/test_provenance.py runs
provenance itself on both backends).

Telegram: the original file goes out as a document, byte for byte (its manifest intact); a
``/verify`` reply to it, a picture captioned ``/verify``, and ``/verify`` with nothing to check.
Discord: ``/verify`` with the ``image`` option, and the Original file button's attachment.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from bots.discord import MuseSparkDiscord
from core.store import Job
from tests._stack import Stack
from tests.fake_discord import (
    BOT_TOKEN,
    CHANNEL_ID,
    FakeDiscord,
    button_payload,
    serving,
    slash_payload,
    user_payload,
)
from tests.fake_telegram import Call, FakeTelegram
from tests.test_discord_adapter import REQUESTER, until
from tests.test_telegram import (
    deployment,
    from_worker,
    job_for,
    private_chat,
)


RESULT_TIMEOUT_SECONDS = 300


def _picture(side: int = 96) -> bytes:
    out = io.BytesIO()
    Image.effect_noise((side, side), 30).convert("RGB").save(out, format="PNG")
    return out.getvalue()


def _delivered(stack: Stack, job: Job) -> Job:
    done = stack.wait_job(job.id, ("delivered", "failed"), timeout=RESULT_TIMEOUT_SECONDS)
    assert done.state == "delivered", (done.failure_reason, stack.workers[0].log()[-3000:])
    return done


def _image_path(stack: Stack, job_id: str) -> Path:
    (artifact,) = stack.runtime.store.artifacts(job_id, "image")
    assert artifact.path
    return Path(artifact.path)


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeTelegram]:
    with FakeTelegram() as server:
        yield server


@pytest.fixture(scope="module")
def tg(fake: FakeTelegram, tmp_path_factory: pytest.TempPathFactory,
       model_cache: Path) -> Iterator[Stack]:
    with deployment("embedded", fake, tmp_path_factory.mktemp("tg-prov"), model_cache) as stack:
        yield stack


def _worker_text(fake: FakeTelegram, chat: int, job_id: str) -> str:
    def found() -> list[Call]:
        return [c for c in fake.calls("sendMessage", chat_id=chat)
                if from_worker(c) and job_id in str(c.params.get("text"))]
    return str(fake.wait_for(found)[0].params["text"])


def test_telegram_offers_the_original_file_and_verifies_what_it_is_sent(
        tg: Stack, fake: FakeTelegram) -> None:
    chat = private_chat()
    asked = fake.push(fake.text_update(chat, "/imagine a lighthouse --style watercolor"))
    job = _delivered(tg, job_for(tg, chat, asked["message"]["message_id"]))
    (photo,) = fake.wait_calls("sendPhoto", chat_id=chat)
    assert f"original:{job.id}" in [b["callback_data"] for row in
                                    photo.params["reply_markup"]["inline_keyboard"] for b in row]
    # 📎 Original file: the PNG as a document, byte for byte.
    fake.push(fake.callback_update(chat, photo.result["message_id"], f"original:{job.id}"))
    (document,) = fake.wait_calls("sendDocument", chat_id=chat)
    assert document.ok and document.files["document"] == _image_path(tg, job.id).read_bytes()
    assert "signed provenance" in document.params["caption"]

    # /verify as a reply to that document: the manifest travelled with it, trusted.
    ask = fake.push(fake.text_update(chat, "/verify", reply_to=document.result["message_id"]))
    check = _delivered(tg, job_for(tg, chat, ask["message"]["message_id"]))
    assert check.intent == "verify"
    text = _worker_text(fake, chat, job.id)
    assert f"✅ Provenance of your picture: made by this MuseSpark, job {job.id}" in text
    assert "signed, intact, and trusted" in text and "trainedAlgorithmicMedia" in text
    assert "The requester is not named" in text
    (kept,) = tg.runtime.store.artifacts(check.id, "input")
    assert kept.path and Path(kept.path).read_bytes() == document.files["document"], \
        "kept byte for byte"

    # A picture captioned /verify that MuseSpark did not make.
    other = fake.push(fake.photo_update(chat, _picture(), caption="/verify"))
    none = _delivered(tg, job_for(tg, chat, other["message"]["message_id"]))
    assert none.intent == "verify"
    text = str(fake.wait_for(lambda: [
        c for c in fake.calls("sendMessage", chat_id=chat) if from_worker(c)
        and "No MuseSpark provenance found" in str(c.params.get("text"))])[0].params["text"])
    assert "C2PA manifest: none" in text

    # /verify with nothing to check: told how, and no job.
    alone = fake.push(fake.text_update(chat, "/verify"))
    (answer,) = fake.wait_calls("sendMessage", chat_id=chat, where=lambda c: int(
        (c.params.get("reply_parameters") or {}).get("message_id", 0))
        == alone["message"]["message_id"])
    assert "Reply /verify to a picture" in answer.params["text"]


def test_discord_verifies_an_attached_picture_and_attaches_the_original(
        tmp_path: Path, model_cache: Path) -> None:
    with serving() as discord_fake:
        stack = Stack.create("embedded", tmp_path / "stack", model_cache,
                             MUSESPARK_DISCORD_API_URL=discord_fake.api_url,
                             MUSESPARK_DISCORD_TOKEN=BOT_TOKEN, MUSESPARK_IMAGE_TAKES="1")
        try:
            stack.start_worker()
            _discord_scenario(stack, discord_fake)
        finally:
            stack.close()


def _jobs(stack: Stack) -> list[Job]:
    from sqlalchemy import select

    with stack.runtime.store.session() as session:
        return list(session.scalars(select(Job)).all())


def _discord_scenario(stack: Stack, fake: FakeDiscord) -> None:
    store = stack.runtime.store

    async def job_from_edit(payload: dict[str, Any]) -> Job:
        edit = (await until(lambda: fake.calls_to("PATCH", payload["token"])))[0]
        content = edit.json["content"]
        job_id = content.split("(job ")[1].split(")")[0].split(",")[0]
        job = await asyncio.to_thread(stack.wait_job, job_id, ("delivered", "failed"),
                                      RESULT_TIMEOUT_SECONDS)
        assert job.state == "delivered", job.failure_reason
        return job

    async def scenario() -> None:
        client = MuseSparkDiscord(stack.runtime.orchestrator, store, mention_mode=True)
        await client.login(BOT_TOKEN)
        try:
            drawn = slash_payload(fake, "imagine", {"prompt": "a red kite"}, user_id=REQUESTER)
            client._connection.parse_interaction_create(drawn)
            job = await job_from_edit(drawn)
            signed = _image_path(stack, job.id).read_bytes()
            # /verify with the picture attached: kept byte for byte, read by a worker.
            picture = fake.attachment("kite.png", signed)
            asked = slash_payload(fake, "verify", {}, user_id=REQUESTER,
                                  attachments={"image": picture})
            client._connection.parse_interaction_create(asked)
            check = await job_from_edit(asked)
            assert check.intent == "verify"
            posts = await until(lambda: [c for c in fake.calls_to("POST", asked["token"])
                                         if job.id in str((c.json or {}).get("content"))])
            content = posts[0].json["content"]
            assert f"made by this MuseSpark, job {job.id}" in content and "trusted" in content
            (kept,) = store.artifacts(check.id, "input")
            assert kept.path and Path(kept.path).read_bytes() == signed
            # 📎 Original file: the PNG attached, byte for byte.
            result = (await until(lambda: [c for c in fake.calls_to("POST", drawn["token"])
                                           if c.files]))[0]
            assert f"original:{job.id}" in [b["custom_id"] for row in result.json["components"]
                                            for b in row["components"]]
            message = next(m for m in fake.messages.values()
                           if m["components"] == result.json["components"])
            press = button_payload(fake, message, f"original:{job.id}", user_id=REQUESTER)
            client._connection.parse_interaction_create(press)
            sent = await until(lambda: [c for c in fake.calls_to("PATCH", press["token"])
                                        if c.files])
            assert sent[0].files[0]["data"] == signed

            # Mention mode: "@MuseSpark /verify" with the picture attached, as a message.
            def verdicts() -> list[dict[str, Any]]:
                return [m for m in fake.messages.values() if m["channel_id"] == CHANNEL_ID
                        and f"made by this MuseSpark, job {job.id}" in str(m["content"])]

            before = len(verdicts())
            mention = fake.add_message(CHANNEL_ID, user_payload(REQUESTER, "Ada"),
                                       f"<@{fake.bot_user['id']}> /verify")
            mention.update(mentions=[fake.bot_user], attachments=[
                fake.attachment("kite-again.png", signed)])
            client._connection.parse_message_create(mention)
            await until(lambda: len(verdicts()) > before)
            checks = [j for j in await asyncio.to_thread(_jobs, stack)
                      if j.intent == "verify" and j.id != check.id]
            (again,) = store.artifacts(checks[0].id, "input")
            assert again.path and Path(again.path).read_bytes() == signed, "kept byte for byte"
        finally:
            await client.close()

    asyncio.run(scenario())
