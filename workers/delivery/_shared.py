"""The database a deliverer writes beside its posts (shared flood waits, local progress)."""

from __future__ import annotations

import os
import threading

from core.settings import Settings
from core.store import Store

__all__ = ["shared_store"]

_stores: dict[tuple[int, str], Store] = {}
_lock = threading.Lock()


def shared_store(settings: Settings) -> Store | None:
    """The database of ``settings`` (the one this worker's jobs live in); one per process and
    URL. None when there is none yet: this never creates an embedded database (a deliverer
    made with default settings, in a test, keeps to itself)."""
    if settings.database_url:
        url = settings.database_url
    else:
        path = settings.data_dir.expanduser().resolve() / "musespark.db"
        if not path.exists():
            return None
        url = f"sqlite:///{path}"
    key = (os.getpid(), url)  # connections must not cross a fork
    with _lock:
        if key not in _stores:
            _stores[key] = Store(url)
        return _stores[key]
