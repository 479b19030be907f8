"""Graceful shutdown of a worker: finish the running job up to a bound, then hand it back.

SIGTERM (Kubernetes scaling down, ``docker stop``, ``musespark run`` stopping) starts Celery's
warm shutdown: the worker takes no new task and waits for the running one. That wait has no
bound of its own, and the orchestrator kills the worker after its grace period, which would
leave the job ``running`` until its heartbeat goes stale. So the worker's main process also
starts a timer (:func:`install_main`): after ``MUSESPARK_WORKER_STOP_GRACE_SECONDS`` it sends
:data:`HAND_BACK_SIGNAL` to its pool processes. In a pool process (:func:`install_child`) that
signal raises :class:`HandBack` inside the job while it is generating
(:func:`interruptible`); the runner then gives the job back to the queue (state ``queued``,
the attempt returned, published again) and the task ends normally, so the worker exits.

A stopping worker takes no new job: Celery's consumer stops at once, and the main process
tells its pool processes (:data:`STOPPING_SIGNAL`) so that a picture batch that is still
gathering (:mod:`workers.batching`) neither pulls more messages nor claims those it pulled but
has not started; it gives them back to the queue for another worker (:func:`stopping`).

Posting is never interrupted (:func:`shielded`): a part half sent could be posted twice. A job
that is posting when the bound comes finishes posting. Should a pool process still not return
:data:`HAND_BACK_WAIT_SECONDS` after the signal (stuck in native code), the worker goes to a
cold shutdown (SIGQUIT); that job's heartbeat goes stale and the bot's redriver hands it to
another worker, fenced by its claim, so it is neither lost nor posted twice.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

__all__ = ["HAND_BACK_SIGNAL", "STOPPING_SIGNAL", "HandBack", "install_child", "install_main",
           "interruptible", "shielded", "stopping"]

log = logging.getLogger(__name__)

#: What the main process sends its pool processes when the grace period is over.
HAND_BACK_SIGNAL = signal.SIGUSR2
#: After the hand-back signal, how long the pool may take to return before a cold shutdown.
HAND_BACK_WAIT_SECONDS = 15.0
#: What the main process sends its pool processes when the stop begins. SIGURG: its default
#: action is to ignore it, so a process that has not installed the handler is unharmed.
STOPPING_SIGNAL = signal.SIGURG


class HandBack(BaseException):
    """Raised inside a job that must be given back because its worker is stopping.

    A ``BaseException``: model code that catches ``Exception`` must not swallow it.
    """


class _State:
    interruptible = 0
    shielded = 0
    requested = False
    stopping = False


_state = _State()


def _on_hand_back(signum: int, frame: FrameType | None) -> None:
    _state.requested = True
    if _state.interruptible and not _state.shielded:
        raise HandBack()


def _on_stopping(signum: int, frame: FrameType | None) -> None:
    _state.stopping = True


def stopping() -> bool:
    """Whether this worker is stopping: it should take no new job."""
    return _state.stopping


@contextmanager
def interruptible() -> Iterator[None]:
    """The block may be cut short by :class:`HandBack` (a job generating)."""
    if _state.requested:  # the bound passed before this job even started
        raise HandBack()
    _state.interruptible += 1
    try:
        yield
    finally:
        _state.interruptible -= 1


@contextmanager
def shielded() -> Iterator[None]:
    """The block is never cut short (posting a result)."""
    _state.shielded += 1
    try:
        yield
    finally:
        _state.shielded -= 1


def install_child(**_: Any) -> None:
    """A ``worker_process_init`` receiver: pool processes obey :data:`HAND_BACK_SIGNAL`."""
    _state.interruptible = _state.shielded = 0
    _state.requested = _state.stopping = False
    signal.signal(HAND_BACK_SIGNAL, _on_hand_back)
    signal.signal(STOPPING_SIGNAL, _on_stopping)


def _pool(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return found


def install_main(grace_seconds: float) -> None:
    """In the worker's main process: bound the warm shutdown Celery starts on SIGTERM."""
    from celery.signals import worker_shutting_down

    started = threading.Event()
    me = os.getpid()

    def bound() -> None:
        time.sleep(grace_seconds)
        pool = _pool(me)
        log.warning("still running %.0f s after the stop signal; handing back the jobs of "
                    "pool processes %s", grace_seconds, pool)
        for pid in pool:
            try:
                os.kill(pid, HAND_BACK_SIGNAL)
            except ProcessLookupError:
                pass
        time.sleep(HAND_BACK_WAIT_SECONDS)
        log.error("pool still busy %.0f s after the hand-back; cold shutdown",
                  HAND_BACK_WAIT_SECONDS)
        os.kill(me, signal.SIGQUIT)

    def on_shutdown(sig: str | None = None, how: str | None = None, **_: Any) -> None:
        if how == "Warm" and os.getpid() == me and not started.is_set():
            started.set()
            _state.stopping = True  # the solo and threads pools run jobs in this process
            for pid in _pool(me):
                try:
                    os.kill(pid, STOPPING_SIGNAL)
                except ProcessLookupError:
                    pass
            log.warning("%s: taking no new job; the running one has %.0f s to finish", sig,
                        grace_seconds)
            threading.Thread(target=bound, name="stop-bound", daemon=True).start()

    worker_shutting_down.connect(on_shutdown, weak=False)
