"""``musespark discord sync`` and ``musespark doctor discord`` against the local fake API."""

from __future__ import annotations

from collections.abc import Iterator

import discord.http
import pytest

from bots.discord import doctor, sync
from bots.discord._setup import REQUIRED_PERMISSIONS
from core.taste import CATALOGUE
from tests.fake_discord import APPLICATION_ID, BOT_TOKEN, CHANNEL_ID, GUILD_ID, FakeDiscord

ROLE_ID = "1400000000000000001"
EVERYONE_BITS = (1 << 10) | (1 << 11) | (1 << 16) | (1 << 31)  # view, send, history, commands


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch, tmp_path) -> Iterator[FakeDiscord]:  # type: ignore[no-untyped-def]
    saved = discord.http.Route.BASE
    monkeypatch.chdir(tmp_path)  # no stray .env
    with FakeDiscord() as server:
        monkeypatch.setenv("MUSESPARK_DISCORD_API_URL", server.api_url)
        monkeypatch.setenv("MUSESPARK_DISCORD_TOKEN", BOT_TOKEN)
        monkeypatch.delenv("MUSESPARK_DISCORD_MENTION_MODE", raising=False)
        try:
            yield server
        finally:
            discord.http.Route.BASE = saved


def test_sync_globally_and_per_guild(fake: FakeDiscord, capsys: pytest.CaptureFixture[str]) -> None:
    assert sync.main([]) == 0
    (put,) = fake.calls_to("PUT", rf"^/applications/{APPLICATION_ID}/commands$")
    names = {c["name"] for c in put.json}  # type: ignore[union-attr]
    assert {"imagine", "write", "help", "profile"} <= names
    assert "globally" in capsys.readouterr().out

    assert sync.main(["--guild", GUILD_ID]) == 0
    (guild_put,) = fake.calls_to("PUT", rf"/guilds/{GUILD_ID}/commands$")
    assert {c["name"] for c in guild_put.json} == names  # type: ignore[union-attr]
    assert f"in server {GUILD_ID}" in capsys.readouterr().out


def test_sync_publishes_the_co_creation_commands_with_their_options(fake: FakeDiscord) -> None:
    """The sync builds its list from the client's own tree: new commands need no second list."""
    assert sync.main([]) == 0
    (put,) = fake.calls_to("PUT", rf"^/applications/{APPLICATION_ID}/commands$")
    commands = {c["name"]: {o["name"]: o for o in c.get("options", [])}
                for c in put.json}  # type: ignore[union-attr]
    styles = list(CATALOGUE["image"]["style"])
    story = commands["story"]
    assert story["prompt"]["type"] == 3 and story["prompt"]["required"]
    assert (story["scenes"]["type"], story["scenes"]["min_value"], story["scenes"]["max_value"],
            story["scenes"].get("required", False)) == (4, 2, 6, False)
    assert [c["value"] for c in story["style"]["choices"]] == styles
    brainstorm = commands["brainstorm"]
    assert list(brainstorm) == ["prompt"] and brainstorm["prompt"]["required"]
    remix = commands["remix"]
    assert remix["image"]["type"] == 11 and remix["image"]["required"]  # ATTACHMENT
    assert remix["prompt"]["type"] == 3 and remix["prompt"]["required"]
    assert [c["value"] for c in commands["imagine"]["style"]["choices"]] == styles


def test_sync_with_a_bad_token_says_so(fake: FakeDiscord, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MUSESPARK_DISCORD_TOKEN", "wrong")
    assert sync.main([]) == 1
    assert "refused the token" in capsys.readouterr().out


def _server(fake: FakeDiscord, *, role_bits: int, overwrites: list[dict[str, str]]) -> None:
    fake.guilds[GUILD_ID] = {"id": GUILD_ID, "name": "art club", "owner_id": "1",
                             "roles": [{"id": GUILD_ID, "name": "@everyone",
                                        "permissions": str(EVERYONE_BITS)},
                                       {"id": ROLE_ID, "name": "MuseSpark",
                                        "permissions": str(role_bits)}]}
    fake.channels[CHANNEL_ID] = {"id": CHANNEL_ID, "type": 0, "guild_id": GUILD_ID,
                                 "name": "art", "permission_overwrites": overwrites}
    fake.members[(GUILD_ID, APPLICATION_ID)] = {"user": fake.bot_user, "roles": [ROLE_ID],
                                                "joined_at": "2024-01-01T00:00:00+00:00"}


def test_doctor_names_missing_permissions_and_prints_the_invite(
        fake: FakeDiscord, capsys: pytest.CaptureFixture[str]) -> None:
    deny_reactions = [{"id": ROLE_ID, "type": 0, "allow": "0", "deny": str(1 << 6)}]
    _server(fake, role_bits=(1 << 6), overwrites=deny_reactions)
    assert doctor.main(["--channel", CHANNEL_ID]) == 1
    out = capsys.readouterr().out
    assert "token valid: bot MuseSpark" in out
    missing = out.split("missing ")[1].split("\n")[0]
    assert set(missing.split(", ")) == {"Add Reactions", "Attach Files",
                                        "Send Messages In Threads"}
    assert f"permissions={REQUIRED_PERMISSIONS.value}" in out
    assert "scope=bot+applications.commands" in out


def test_doctor_passes_a_good_setup_and_checks_the_content_intent(
        fake: FakeDiscord, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    _server(fake, role_bits=REQUIRED_PERMISSIONS.value, overwrites=[])
    assert doctor.main(["--channel", CHANNEL_ID]) == 0
    assert "every permission the bot needs" in capsys.readouterr().out

    monkeypatch.setenv("MUSESPARK_DISCORD_MENTION_MODE", "true")
    assert doctor.main([]) == 1
    assert "Message Content intent is off" in capsys.readouterr().out
    fake.application["flags"] = 1 << 19  # GATEWAY_MESSAGE_CONTENT_LIMITED
    assert doctor.main([]) == 0


def test_doctor_reports_a_refused_token(fake: FakeDiscord, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MUSESPARK_DISCORD_TOKEN", "wrong")
    assert doctor.main([]) == 1
    assert "refused the token (401)" in capsys.readouterr().out
