"""Building and running the python-telegram-bot Application: long polling or webhook.

* Long polling (the default, ``MUSESPARK_TELEGRAM_WEBHOOK_URL`` unset) needs no public address.
* Webhook mode (``MUSESPARK_TELEGRAM_WEBHOOK_URL`` set): PTB's server listens on
  ``MUSESPARK_TELEGRAM_WEBHOOK_LISTEN``:``MUSESPARK_TELEGRAM_WEBHOOK_PORT`` at the URL's path and
  calls setWebhook with a ``secret_token``; Telegram then sends it in the
  ``X-Telegram-Bot-Api-Secret-Token`` header and every request without it is refused (403).
  Put it behind an HTTPS reverse proxy: Telegram posts only to HTTPS on ports 443, 80, 88, 8443.

Either way ``allowed_updates`` lists ``message_reaction`` and ``message_reaction_count``:
Telegram's default list leaves them out, and then no reaction ever arrives.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

from telegram import Update
from telegram.error import InvalidToken
from telegram.ext import Application, ApplicationBuilder

from bots.runtime import BotRuntime, use_handler_threads
from bots.telegram._adapter import TelegramAdapter
from bots.telegram._concurrency import PerChatOrder
from core.errors import ConfigurationError
from core.settings import Settings

__all__ = ["ALLOWED_UPDATES", "POLL_TIMEOUT_SECONDS", "build_application", "running", "serve"]

log = logging.getLogger(__name__)
# httpx logs every request URL at INFO, and the URL carries the bot token.
logging.getLogger("httpx").setLevel(logging.WARNING)

ALLOWED_UPDATES = [Update.MESSAGE, Update.CALLBACK_QUERY, Update.MESSAGE_REACTION,
                   Update.MESSAGE_REACTION_COUNT]
#: getUpdates long-poll timeout: Telegram holds the request this long when there is nothing.
POLL_TIMEOUT_SECONDS = 30


def build_application(runtime: BotRuntime, settings: Settings | None = None) -> Application:  # type: ignore[type-arg]
    """A PTB Application with MuseSpark's handlers, pointed at ``telegram_api_url``."""
    settings = settings or runtime.settings
    if settings.telegram_token is None:
        raise ConfigurationError("MUSESPARK_TELEGRAM_TOKEN is not set; get one from @BotFather.")
    api = settings.telegram_api_url.rstrip("/")
    adapter = TelegramAdapter(runtime)
    app = (ApplicationBuilder()
           .token(settings.telegram_token.get_secret_value())
           .base_url(f"{api}/bot")
           .base_file_url(f"{api}/file/bot")
           .post_init(adapter.post_init)
           .post_stop(adapter.post_stop)
           .concurrent_updates(PerChatOrder())
           .build())
    adapter.install(app)
    return app


@asynccontextmanager
async def running(runtime: BotRuntime, *, settings: Settings | None = None,
                  poll_timeout_seconds: float = POLL_TIMEOUT_SECONDS,
                  ) -> AsyncIterator[Application]:  # type: ignore[type-arg]
    """Start the bot (polling or webhook, as ``settings`` say) and stop it on exit."""
    settings = settings or runtime.settings
    use_handler_threads()
    app = build_application(runtime, settings)
    try:
        await app.initialize()
    except InvalidToken as exc:
        raise ConfigurationError("Telegram refused MUSESPARK_TELEGRAM_TOKEN. Check it with "
                                 "`musespark doctor telegram`.") from exc
    try:
        if app.post_init:
            await app.post_init(app)
        await app.start()
        assert app.updater is not None
        if settings.telegram_webhook_url:
            secret = (settings.telegram_webhook_secret.get_secret_value()
                      if settings.telegram_webhook_secret else secrets.token_urlsafe(32))
            await app.updater.start_webhook(
                listen=settings.telegram_webhook_listen, port=settings.telegram_webhook_port,
                url_path=urlsplit(settings.telegram_webhook_url).path.lstrip("/"),
                webhook_url=settings.telegram_webhook_url, secret_token=secret,
                allowed_updates=ALLOWED_UPDATES)
            log.info("Telegram webhook mode: listening on %s:%d", settings.telegram_webhook_listen,
                     settings.telegram_webhook_port)
        else:
            await app.updater.start_polling(timeout=int(poll_timeout_seconds), poll_interval=0,
                                            allowed_updates=ALLOWED_UPDATES)
            log.info("Telegram long polling started")
        yield app
    finally:
        if app.updater is not None and app.updater.running:
            await app.updater.stop()
        if app.running:
            await app.stop()
        await app.shutdown()


async def serve(runtime: BotRuntime) -> None:
    """Run the Telegram bot until cancelled (``musespark bot`` / ``musespark run``)."""
    async with running(runtime):
        await asyncio.Event().wait()
