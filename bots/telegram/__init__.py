"""The Telegram adapter (python-telegram-bot): private chats and groups, reactions as feedback.

``serve(runtime)`` runs the bot (long polling, or a webhook when
``MUSESPARK_TELEGRAM_WEBHOOK_URL`` is set) until cancelled; ``musespark bot`` and
``musespark run`` call it when ``MUSESPARK_TELEGRAM_TOKEN`` is set. Results are posted by the
workers (``workers/delivery/telegram.py``), not by this process. ``musespark doctor telegram``
is :func:`bots.telegram.doctor.main`.
"""

from bots.telegram._adapter import TelegramAdapter, bot_commands
from bots.telegram._app import ALLOWED_UPDATES, build_application, running, serve
from bots.telegram._payloads import PLATFORM

__all__ = [
    "ALLOWED_UPDATES",
    "PLATFORM",
    "TelegramAdapter",
    "bot_commands",
    "build_application",
    "running",
    "serve",
]
