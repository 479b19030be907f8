"""The Celery application the workers run: ``celery -A workers.celery_app worker``.

``musespark worker`` wraps this with the right flags; the configuration itself is
:func:`core.queue.celery_config`, shared with the publishing side.
"""

from __future__ import annotations

from core.queue import make_celery
from core.settings import get_settings

__all__ = ["app"]

app = make_celery(get_settings())
app.conf.include = ["workers.tasks"]
