"""The Telegram pieces one by one, over real HTTP against the fake Bot API: the workers'
deliverer (splitting, shrinking, errors), the doctor, and the update -> event conversion."""

from __future__ import annotations

import io
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings as hsettings, strategies as st
from PIL import Image
from telegram import Bot, Update

from bots.telegram import _payloads as payloads
from bots.telegram import doctor
from core.actions import buttons_for
from core.errors import DeliveryError
from core.events import ChannelKind
from core.outbound import DeliveryTarget, MessageKind, OutboundMessage
from core.settings import Settings
from tests._stack import free_port
from tests.fake_telegram import FakeTelegram
from workers.delivery import telegram as delivery
from workers.delivery.telegram import TelegramDeliverer, split_text


@pytest.fixture
def fake() -> Iterator[FakeTelegram]:
    with FakeTelegram() as server:
        yield server


@pytest.fixture
def deliverer(fake: FakeTelegram, monkeypatch: pytest.MonkeyPatch) -> TelegramDeliverer:
    monkeypatch.setattr(delivery, "PRIVATE_CHAT_INTERVAL_SECONDS", 0.0)
    monkeypatch.setattr(delivery, "GROUP_CHAT_INTERVAL_SECONDS", 0.0)
    return TelegramDeliverer(_settings(fake))


def _settings(fake: FakeTelegram, **extra: Any) -> Settings:
    return Settings(_env_file=None, telegram_token=fake.token,  # type: ignore[call-arg]
                    telegram_api_url=fake.url, **extra)


def _result(text: str, job: str = "abcdef012345", images: tuple[str, ...] = ()) -> OutboundMessage:
    """A result with the buttons core puts on it (core/actions.py decides; Telegram lays out)."""
    return OutboundMessage(MessageKind.RESULT, text, images=images, job_id=job,
                           buttons=buttons_for(job, kind="image" if images else "text",
                                               intent="imagine" if images else "write"))


def _png(path: Path, size: tuple[int, int] = (64, 64), noise: bool = False) -> str:
    if noise:
        image = Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3))
    else:
        image = Image.new("RGB", size, (200, 120, 40))
    image.save(path, format="PNG", compress_level=1)
    return str(path)


# -- splitting -----------------------------------------------------------------------------------


@hsettings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from("ab c\n🙂é"), max_size=400),
       st.integers(min_value=8, max_value=64))
def test_split_text_keeps_every_word_within_the_limit(text: str, limit: int) -> None:
    pieces = split_text(text, limit)
    assert all(len(p.encode("utf-16-le")) // 2 <= limit for p in pieces)
    assert all(p for p in pieces) or pieces == [""]
    assert "".join("".join(pieces).split()) == "".join(text.split())


# -- the deliverer ------------------------------------------------------------------------------


def test_long_text_becomes_several_messages_with_the_buttons_on_the_last(
        fake: FakeTelegram, deliverer: TelegramDeliverer) -> None:
    text = "\n\n".join(f"Paragraph {n}. " + "words " * 300 for n in range(6))
    assert len(text) > 2 * 4096
    target = DeliveryTarget("telegram", "7001", reply_to="5")
    ids = deliverer.send(target, _result(text))
    calls = fake.calls("sendMessage", chat_id=7001)
    assert len(calls) == len(ids) == 3 and all(c.ok for c in calls)
    assert ids == [str(c.result["message_id"]) for c in calls]
    assert all(len(c.params["text"]) <= 4096 for c in calls)
    assert " ".join(" ".join(c.params["text"] for c in calls).split()) == " ".join(text.split())
    assert [bool(c.params.get("reply_markup")) for c in calls] == [False, False, True]
    assert [bool(c.params.get("reply_parameters")) for c in calls] == [True, False, False]


def test_a_long_caption_goes_partly_under_the_photo_and_the_rest_follows(
        fake: FakeTelegram, deliverer: TelegramDeliverer, tmp_path: Path) -> None:
    caption = "A caption that goes on. " * 120
    ids = deliverer.send(DeliveryTarget("telegram", "7002"),
                         _result(caption, images=(_png(tmp_path / "1.png"),)))
    (photo,) = fake.calls("sendPhoto", chat_id=7002)
    rest = fake.calls("sendMessage", chat_id=7002)
    assert photo.ok and len(photo.params["caption"]) <= 1024 and not photo.params.get(
        "reply_markup")
    assert len(ids) == 1 + len(rest) and all(c.ok for c in rest)
    assert " ".join((photo.params["caption"] + " " + " ".join(
        c.params["text"] for c in rest)).split()) == " ".join(caption.split())
    assert rest[-1].params.get("reply_markup")


def test_several_pictures_go_as_a_media_group_then_the_buttons(
        fake: FakeTelegram, deliverer: TelegramDeliverer, tmp_path: Path) -> None:
    images = tuple(_png(tmp_path / f"{n}.png") for n in range(3))
    ids = deliverer.send(DeliveryTarget("telegram", "-1007003"),
                         _result("three pictures", images=images))
    (group,) = fake.calls("sendMediaGroup", chat_id=-1007003)
    assert group.ok and len(group.params["media"]) == 3
    assert group.params["media"][0]["caption"] == "three pictures"
    (buttons,) = fake.calls("sendMessage", chat_id=-1007003)
    data = [b["callback_data"] for row in buttons.params["reply_markup"]["inline_keyboard"]
            for b in row]
    assert {"reroll:abcdef012345", "vary1:abcdef012345", "up:abcdef012345",
            "down:abcdef012345"} <= set(data)
    assert len(ids) == 4


def test_a_photo_over_10_mb_is_shrunk_not_refused(fake: FakeTelegram,
                                                  deliverer: TelegramDeliverer,
                                                  tmp_path: Path) -> None:
    path = _png(tmp_path / "big.png", (2000, 2000), noise=True)
    assert Path(path).stat().st_size > 10_000_000
    deliverer.send(DeliveryTarget("telegram", "7004"), _result("big", images=(path,)))
    (photo,) = fake.calls("sendPhoto", chat_id=7004)
    assert photo.ok and len(photo.files["photo"]) <= 10_000_000
    with Image.open(io.BytesIO(photo.files["photo"])) as sent:
        assert sent.format == "JPEG"


@pytest.mark.parametrize(("code", "final", "retry_after"),
                         [(429, False, 7), (403, True, None), (400, True, None)])
def test_platform_errors_become_delivery_errors(fake: FakeTelegram,
                                                deliverer: TelegramDeliverer, code: int,
                                                final: bool, retry_after: int | None) -> None:
    fake.fail("sendMessage", chat_id=7005, code=code, retry_after=retry_after)
    with pytest.raises(DeliveryError) as caught:
        deliverer.send(DeliveryTarget("telegram", "7005"), _result("hello"))
    assert caught.value.final is final
    assert caught.value.retry_after == retry_after
    assert fake.token not in str(caught.value)


def test_an_unreachable_api_is_retried_later_and_the_token_never_shows(
        fake: FakeTelegram) -> None:
    settings = Settings(_env_file=None, telegram_token=fake.token,  # type: ignore[call-arg]
                        telegram_api_url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(DeliveryError) as caught:
        TelegramDeliverer(settings).send(DeliveryTarget("telegram", "7006"), _result("hi"))
    assert caught.value.retry_after and not caught.value.final
    assert fake.token not in str(caught.value)


def test_a_429_in_the_middle_of_a_message_is_waited_out_in_place(
        fake: FakeTelegram, deliverer: TelegramDeliverer) -> None:
    """Deferring after the first part was posted would post that part twice."""
    first = {"done": False}

    def second_part(call: Any) -> bool:
        if first["done"]:
            return True
        first["done"] = True
        return False

    fake.fail("sendMessage", chat_id=7007, code=429, retry_after=1, where=second_part)
    ids = deliverer.send(DeliveryTarget("telegram", "7007"), _result("word " * 1500))
    ok = fake.calls("sendMessage", chat_id=7007, ok=True)
    assert len(ids) == len(ok) == 2


def test_sends_to_one_chat_are_paced(fake: FakeTelegram) -> None:
    deliverer = TelegramDeliverer(_settings(fake))
    deliverer.send(DeliveryTarget("telegram", "7008"), _result("word " * 1500))
    first, second = fake.calls("sendMessage", chat_id=7008)
    assert second.at - first.at >= delivery.PRIVATE_CHAT_INTERVAL_SECONDS - 0.05


def test_progress_edits_the_status_message(fake: FakeTelegram,
                                           deliverer: TelegramDeliverer) -> None:
    status = deliverer.send(DeliveryTarget("telegram", "7009"),
                            OutboundMessage(MessageKind.STATUS, "queued, 2 ahead of you"))[0]
    target = DeliveryTarget("telegram", "7009", extra={"progress_message_id": status})
    deliverer.progress(target, "🎨 Drawing…")
    deliverer.progress(target, "🎨 Drawing…")  # "not modified" is not an error
    deliverer.progress(DeliveryTarget("telegram", "7009"), "no progress message: no call")
    edits = fake.calls("editMessageText", chat_id=7009)
    assert [c.status for c in edits] == [200, 400]
    assert fake.message(7009, int(status))["text"] == "🎨 Drawing…"  # type: ignore[index]


# -- the doctor ----------------------------------------------------------------------------------


def _doctor(fake: FakeTelegram, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
            *argv: str, token: str | None = None) -> tuple[int, str]:
    for key in [k for k in os.environ if k.startswith("MUSESPARK_TELEGRAM")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("MUSESPARK_TELEGRAM_TOKEN", token or fake.token)
    monkeypatch.setenv("MUSESPARK_TELEGRAM_API_URL", fake.url)
    code = doctor.main(list(argv))
    return code, capsys.readouterr().out


def test_doctor_says_all_good_for_a_healthy_setup(fake: FakeTelegram,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    fake.members[("-100500", str(fake.bot_id))] = "administrator"
    code, out = _doctor(fake, monkeypatch, capsys, "--chat", "-100500")
    assert code == 0, out
    assert f"@{fake.username}" in out and "admin in chat -100500" in out and "All good" in out


def test_doctor_names_each_problem_with_its_fix(fake: FakeTelegram,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    fake.webhook = {"url": "https://example.org/hook", "allowed_updates": ["message"]}
    fake.webhook_last_error = "Connection timed out"
    code, out = _doctor(fake, monkeypatch, capsys, "--chat", "-100501")
    assert code == 1
    assert "not an admin in chat -100501" in out and "reactions" in out
    assert "long polling" in out and "Connection timed out" in out
    assert out.count("Fix:") >= 3
    code, out = _doctor(fake, monkeypatch, capsys, token="123:wrong")
    assert code == 1 and "refused the token" in out and "BotFather" in out


def test_doctor_runs_from_the_cli(fake: FakeTelegram, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    from bots.cli import main

    _doctor(fake, monkeypatch, capsys)
    with pytest.raises(SystemExit) as exited:
        main(["doctor", "telegram"])
    assert exited.value.code == 0
    assert "Token valid" in capsys.readouterr().out


def test_musespark_bot_serves_telegram_when_the_token_is_set(fake: FakeTelegram,
                                                             tmp_path: Path) -> None:
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("MUSESPARK_")}
    env.update(MUSESPARK_TELEGRAM_TOKEN=fake.token, MUSESPARK_TELEGRAM_API_URL=fake.url,
               MUSESPARK_DATA_DIR=str(tmp_path / "data"),
               PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    bot = subprocess.Popen([sys.executable, "-m", "bots.cli", "bot"], env=env, cwd=tmp_path,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        fake.wait_calls("setMyCommands", timeout=30)
        fake.push(fake.text_update(7010, "/help"))
        (reply,) = fake.wait_calls("sendMessage", chat_id=7010, timeout=30)
        assert "Commands" in reply.params["text"]
    finally:
        bot.terminate()
        output = bot.communicate(timeout=30)[0].decode(errors="replace")
    assert fake.token not in output, "the token leaked into the log"


# -- updates to events ---------------------------------------------------------------------------


def _update(fake: FakeTelegram, data: dict[str, Any]) -> Update:
    bot = Bot(fake.token)
    return Update.de_json(data, bot)  # type: ignore[return-value]


def test_a_message_event_is_keyed_by_chat_and_message(fake: FakeTelegram) -> None:
    data = fake.text_update(-100900, f"@{fake.username} draw a fox", user_id=42)
    update = _update(fake, data)
    text = payloads.addressed_text(update.effective_message, fake.bot_id,  # type: ignore[arg-type]
                                   fake.username)
    assert text == "draw a fox"
    event = payloads.message_event(update, text)
    assert event.event_id == f"-100900:{data['message']['message_id']}"
    assert event.channel.kind is ChannelKind.GROUP and event.actor.id == "42"
    # The same message in a new update (a webhook retry) keeps its key.
    again = dict(data, update_id=data["update_id"] + 1)
    assert payloads.message_event(_update(fake, again), text).event_id == event.event_id
    plain = _update(fake, fake.text_update(-100900, "hello all"))
    assert payloads.addressed_text(plain.effective_message, fake.bot_id,  # type: ignore[arg-type]
                                   fake.username) is None


def test_reactions_become_the_old_new_difference(fake: FakeTelegram) -> None:
    update = _update(fake, fake.reaction_update(-100901, 7, user_id=42, old=("👍", "🔥"),
                                                new=("🔥", "❤")))
    event = payloads.reaction_event(update)
    assert event is not None and event.added == {"❤"} and event.removed == {"👍"}
    assert not event.anonymous and event.actor.id == "42"
    counted = payloads.reaction_count_event(
        _update(fake, fake.reaction_count_update(-100901, 7, {"👍": 4})))
    assert counted is not None and counted.anonymous and counted.counts == {"👍": 4}
    assert counted.event_id != event.event_id
