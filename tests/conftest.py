"""Shared fixtures. ``stack`` runs every end-to-end test twice: embedded and distributed."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from core.store import Store
from tests._stack import (
    Stack,
    create_pg_database,
    drop_pg_database,
    postgres_reachable,
    redis_reachable,
)

BACKENDS = ["embedded", "distributed"]

# Tests act as a few people who send far more requests than the operator's default quotas
# allow; tests/test_trust.py sets limits per community (/settings quota) where it checks them.
# Likewise fair share (one job in flight per person), which would reorder the jobs of the many
# tests that speak as one person: tests/test_fairness.py switches it on and checks it.
for _window in ("PERSON_HOURLY", "PERSON_DAILY", "COMMUNITY_HOURLY"):
    os.environ.setdefault(f"MUSESPARK_QUOTA_{_window}", "0")
os.environ.setdefault("MUSESPARK_FAIR_SHARE_INFLIGHT", "0")


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Converted and demo models, shared by every stack in the session (set
    MUSESPARK_TEST_MODEL_CACHE to keep them between runs)."""
    kept = os.environ.get("MUSESPARK_TEST_MODEL_CACHE")
    if kept:
        Path(kept).mkdir(parents=True, exist_ok=True)
        return Path(kept)
    return tmp_path_factory.mktemp("models")


def _require_backend(backend: str) -> None:
    if backend != "distributed":
        return
    redis_problem, pg_problem = redis_reachable(), postgres_reachable()
    if redis_problem and pg_problem:
        pytest.skip(f"distributed mode NOT tested: neither server can be reached "
                    f"({redis_problem}; {pg_problem})")
    if redis_problem or pg_problem:
        pytest.fail(f"distributed mode needs both servers: {redis_problem or pg_problem}")


@pytest.fixture(scope="session", params=BACKENDS)
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
          model_cache: Path) -> Iterator[Stack]:
    """One deployment per backend with one shared worker process for the whole session."""
    backend = request.param
    _require_backend(backend)
    shared = Stack.create(backend, tmp_path_factory.mktemp(f"stack-{backend}"), model_cache)
    try:
        shared.start_worker()
        yield shared
    finally:
        shared.close()


@pytest.fixture(params=BACKENDS)
def make_stack(request: pytest.FixtureRequest, tmp_path: Path,
               model_cache: Path) -> Iterator[Callable[..., Stack]]:
    """A factory for private deployments (own database, broker and workers) on each backend."""
    backend = request.param
    _require_backend(backend)
    made: list[Stack] = []

    def factory(**overrides: str) -> Stack:
        private = Stack.create(backend, tmp_path / f"stack-{len(made)}", model_cache, **overrides)
        made.append(private)
        return private

    yield factory
    for private in made:
        private.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def each_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A fresh store on SQLite, then on PostgreSQL (skipped, saying so, when unreachable)."""
    database = None
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    else:
        problem = postgres_reachable()
        if problem:
            if not redis_reachable():
                pytest.fail(f"distributed mode needs PostgreSQL: {problem}")
            pytest.skip(f"PostgreSQL NOT tested: {problem}")
        database, url = create_pg_database()
    opened = Store(url)
    opened.upgrade()
    try:
        yield opened
    finally:
        opened.dispose()
        if database:
            drop_pg_database(database)
