"""Running the web pages: uvicorn in a thread beside the chat adapters, or on its own.

The open playground is served only on a loopback address. Binding anywhere else needs
``MUSESPARK_WEB_SECRET`` (it signs the session cookies and sign-in links every other machine
will see) and then serves signed-in communities only.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time

import uvicorn

from bots.runtime import BotRuntime
from bots.web._app import create_app
from core.errors import ConfigurationError
from core.settings import Settings

__all__ = ["WebServer", "check_listen", "is_loopback"]

log = logging.getLogger(__name__)

START_TIMEOUT_SECONDS = 15.0
STOP_TIMEOUT_SECONDS = 5.0
LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_listen(settings: Settings) -> bool:
    """Whether the address is loopback (then the playground is open); refuses any other
    address without a configured secret."""
    if is_loopback(settings.web_listen):
        return True
    if settings.web_secret is None:
        raise ConfigurationError(
            f"MUSESPARK_WEB_LISTEN={settings.web_listen} is not a loopback address: set "
            "MUSESPARK_WEB_SECRET to a long random string first (it signs sign-in links and "
            "session cookies), or listen on 127.0.0.1.")
    return False


def _allowed_hosts(settings: Settings, loopback: bool) -> list[str] | None:
    if not loopback:
        return None
    return ["127.0.0.1", "localhost", "[::1]", "::1", settings.web_listen]


class WebServer:
    """The web app served by uvicorn in a daemon thread (``start`` waits until it listens)."""

    def __init__(self, runtime: BotRuntime) -> None:
        settings = runtime.settings
        loopback = check_listen(settings)
        app = create_app(runtime, playground=loopback,
                         allowed_hosts=_allowed_hosts(settings, loopback))
        config = uvicorn.Config(app, host=settings.web_listen, port=settings.web_port,
                                log_level="warning", lifespan="on",
                                timeout_graceful_shutdown=2, access_log=False)
        self.server = uvicorn.Server(config)
        self.url = settings.resolved_web_url
        self._thread: threading.Thread | None = None

    def start(self) -> WebServer:
        self._thread = threading.Thread(target=self.server.run, name="musespark-web",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not self.server.started:
            if not self._thread.is_alive():
                raise ConfigurationError(
                    f"The web server could not listen on {self.url} (is the port taken? set "
                    "MUSESPARK_WEB_PORT, or MUSESPARK_WEB=false to go without it).")
            if time.monotonic() > deadline:
                raise ConfigurationError(f"The web server did not start within "
                                         f"{START_TIMEOUT_SECONDS:.0f} s.")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT_SECONDS)

    def __enter__(self) -> WebServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_forever(runtime: BotRuntime) -> None:
    """``musespark web``: the web pages alone, in the foreground, until Ctrl-C."""
    settings = runtime.settings
    loopback = check_listen(settings)
    app = create_app(runtime, playground=loopback,
                     allowed_hosts=_allowed_hosts(settings, loopback))
    uvicorn.run(app, host=settings.web_listen, port=settings.web_port, log_level="info",
                timeout_graceful_shutdown=2)
