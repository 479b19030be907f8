"""What every adapter needs: settings, store, publisher, orchestrator and the redriver."""

from __future__ import annotations

import asyncio
import logging
import weakref
from concurrent.futures import ThreadPoolExecutor

from core.orchestrator import Orchestrator
from core.privacy import RetentionSweeper
from core.queue import CeleryPublisher
from core.redrive import Redriver, local_delay_notifier
from core.settings import Settings, get_settings
from core.store import Store

__all__ = ["BotRuntime", "HANDLER_THREADS", "use_handler_threads"]

log = logging.getLogger(__name__)

#: Threads the adapters hand updates to core in (``asyncio.to_thread``). A thread is held only
#: while core works on its update; in a burst most of them wait for the group commit that takes
#: their request with the others (core/store/_group.py), so the pool bounds the group's size.
#: asyncio's default pool (CPU count + 4, 6 threads on a 2-core machine) kept groups small.
HANDLER_THREADS = 64

_with_handler_threads: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()


def use_handler_threads(threads: int = HANDLER_THREADS) -> None:
    """Give the running event loop a default executor of ``threads`` threads (once per loop),
    for the adapters' ``asyncio.to_thread`` calls into core."""
    loop = asyncio.get_running_loop()
    if loop not in _with_handler_threads:
        loop.set_default_executor(ThreadPoolExecutor(threads, thread_name_prefix="musespark"))
        _with_handler_threads.add(loop)


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
