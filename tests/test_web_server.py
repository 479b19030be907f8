"""Starting the web pages: where they listen, what they refuse, and what is open without a
sign-in. No browser here (tests/test_web.py has the browser flows)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.testclient import TestClient

from bots.runtime import BotRuntime
from bots.web import create_app
from core.settings import Settings
from tests._stack import REPO, free_port

START_TIMEOUT_SECONDS = 60.0


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MUSESPARK_")}
    env.update(PYTHONPATH=str(REPO), MUSESPARK_DATA_DIR=str(tmp_path / "data"), **extra)
    return env


@pytest.mark.parametrize("command", ["run", "web", "bot"])
def test_a_public_address_without_a_secret_is_refused_at_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        command: str) -> None:
    from bots.cli import main

    for key, value in _env(tmp_path, MUSESPARK_WEB_LISTEN="0.0.0.0").items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as stopped:
        main([command])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "MUSESPARK_WEB_SECRET" in err and "0.0.0.0" in err
    assert not (tmp_path / "data" / "logs").exists()  # no worker was started


def test_the_terminal_chat_prints_the_address_and_serves_the_playground(tmp_path: Path) -> None:
    port = free_port()
    chat = subprocess.Popen([sys.executable, "-m", "bots.cli", "bot"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=_env(tmp_path, MUSESPARK_WEB_PORT=str(port)))
    try:
        assert chat.stdout is not None and chat.stdin is not None
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        lines = []
        while time.monotonic() < deadline:
            line = chat.stdout.readline()
            lines.append(line)
            if "Web playground" in line or not line:
                break
        address = f"http://127.0.0.1:{port}/"
        assert any(address in line for line in lines), lines
        page = httpx.get(address, follow_redirects=True)
        assert page.status_code == 200 and "Playground" in page.text
        chat.stdin.write("/quit\n")
        chat.stdin.close()
        assert chat.wait(30) == 0
    finally:
        if chat.poll() is None:
            chat.kill()
            chat.wait()


def test_web_false_serves_nothing(tmp_path: Path) -> None:
    from bots.cli import _web_server

    settings = Settings(_env_file=None, data_dir=tmp_path / "data",  # type: ignore[call-arg]
                        web=False, web_port=free_port())
    with BotRuntime(settings, redrive=False) as runtime, _web_server(runtime) as web:
        assert web is None
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{settings.web_port}/")


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[BotRuntime]:
    settings = Settings(_env_file=None, data_dir=tmp_path / "data",  # type: ignore[call-arg]
                        web_listen="0.0.0.0", web_secret="s" * 40)
    with BotRuntime(settings, redrive=False) as rt:
        yield rt


def test_off_loopback_only_signed_in_communities_are_served(runtime: BotRuntime) -> None:
    with TestClient(create_app(runtime, playground=False)) as client:
        home = client.get("/")
        assert home.status_code == 200 and "Send /web" in home.text
        for path in ("/events", "/c/1/gallery", "/c/1/dashboard", "/a/1", "/a/1/thumb"):
            assert client.get(path).status_code == 404, path
        assert client.post("/say", data={"text": "/imagine a fox"}).status_code == 404


def test_the_loopback_playground_refuses_other_host_names(runtime: BotRuntime) -> None:
    """A page elsewhere whose name resolves to 127.0.0.1 (DNS rebinding) gets nothing."""
    app = create_app(runtime, playground=True, allowed_hosts=["127.0.0.1", "localhost"])
    with TestClient(app, base_url="http://127.0.0.1") as client:
        assert client.get("/", headers={"Host": "evil.example"}).status_code == 400
        home = client.get("/")
        assert home.status_code == 200
        person = home.url.params["as"]  # each tab opened at / gets a person of its own
        assert client.get("/").url.params["as"] != person
        empty = client.post("/say", data={"text": "  ", "as": person})
        assert empty.status_code == 422 and "Type something" in empty.text
        bad = client.post("/press", data={"message": "1", "action": "launch", "as": person})
        assert bad.status_code == 422
        # A person this browser did not make cannot be spoken for.
        assert client.post("/say", data={"text": "hi", "as": "f" * 16}).status_code == 404


def test_a_taken_port_leaves_the_chat_running_without_the_web_pages(tmp_path: Path) -> None:
    import socket

    from bots.cli import _web_server

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        settings = Settings(_env_file=None, data_dir=tmp_path / "data",  # type: ignore[call-arg]
                            web_port=taken.getsockname()[1])
        with BotRuntime(settings, redrive=False) as runtime, _web_server(runtime) as web:
            assert web is None
