"""What every adapter needs: settings, store, publisher, orchestrator and the redriver."""

from __future__ import annotations

import logging

from core.orchestrator import Orchestrator
from core.privacy import RetentionSweeper
from core.queue import CeleryPublisher
from core.redrive import Redriver, local_delay_notifier
from core.settings import Settings, get_settings
from core.store import Store

__all__ = ["BotRuntime"]

log = logging.getLogger(__name__)


class BotRuntime:
    """Opens the store (migrating it), the publisher and the redriver; ``close()`` undoes it."""

    def __init__(self, settings: Settings | None = None, *, redrive: bool = True,
                 serve_metrics: bool = True) -> None:
        self.settings = settings or get_settings()
        self.store = Store(self.settings.resolved_database_url)
        self.store.upgrade()
        self.publisher = CeleryPublisher(self.settings)
        self.orchestrator = Orchestrator(self.store, self.publisher, self.settings)
        # People whose request waits (the broker lost it, or it is slow to start) are told: in
        # the local chat here; the Telegram and Discord adapters add theirs when they connect.
        notifiers = {"local": local_delay_notifier(self.store)}
        self.redriver = (Redriver(self.store, self.publisher, self.settings, notifiers=notifiers)
                         .start() if redrive else None)
        # Results and uploads past MUSESPARK_RETENTION_DAYS are erased by the bot, hourly.
        self.retention = (RetentionSweeper(self.orchestrator.privacy, self.settings).start()
                          if redrive and self.settings.retention_days > 0 else None)
        self._metrics_server = None
        if serve_metrics and self.settings.metrics_port:
            from core.metrics import serve_bot_metrics

            self._metrics_server = serve_bot_metrics(self.settings, self.store)

    def close(self) -> None:
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server = None
        if self.redriver is not None:
            self.redriver.stop()
        if self.retention is not None:
            self.retention.stop()
        self.publisher.close()
        self.store.dispose()

    def __enter__(self) -> BotRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
