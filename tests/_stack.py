"""Test harness: a whole MuseSpark deployment (store, broker, bot runtime, real worker processes).

A :class:`Stack` is one isolated deployment: its own data dir and, in distributed mode, its own
PostgreSQL database and Redis key prefix, so stacks in one test session never see each other's
jobs. Workers are real ``python -m workers`` processes (no eager mode).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from bots.console import ConsoleChat
from bots.runtime import BotRuntime
from core.settings import Settings
from core.store import Job

REPO = Path(__file__).resolve().parent.parent
REDIS_URL = os.environ.get("MUSESPARK_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_ADMIN_URL = os.environ.get("MUSESPARK_TEST_POSTGRES_URL",
                                    "postgresql://postgres@127.0.0.1:5432/postgres")
WORKER_READY_TIMEOUT_SECONDS = 60.0


def redis_reachable() -> str | None:
    """None when Redis answers PING, else why not."""
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
        return None
    except Exception as exc:
        return f"Redis at {REDIS_URL}: {exc}"


def postgres_reachable() -> str | None:
    import psycopg

    try:
        psycopg.connect(POSTGRES_ADMIN_URL, connect_timeout=3).close()
        return None
    except Exception as exc:
        return f"PostgreSQL at {POSTGRES_ADMIN_URL}: {exc}"


def create_pg_database() -> tuple[str, str]:
    import psycopg

    name = f"musespark_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    return name, f"{base}/{name}"


def drop_pg_database(name: str) -> None:
    import psycopg

    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def drop_redis_prefix(prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{prefix}*", count=500))
    if keys:
        client.delete(*keys)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Worker:
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self, timeout: float = WORKER_READY_TIMEOUT_SECONDS) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if " ready." in self.log():
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited with {self.process.returncode}:\n{self.log()}")
            time.sleep(0.2)
        raise TimeoutError(f"worker not ready after {timeout} s:\n{self.log()}")

    def children(self) -> list[int]:
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                except OSError:
                    continue
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                if ppid == self.process.pid:
                    found.append(int(entry.name))
        return found

    def kill_hard(self) -> None:
        """SIGKILL the worker and its pool processes, as a machine or the OOM killer would."""
        children = self.children()
        self.process.send_signal(signal.SIGKILL)
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait(timeout=10)

    def stop(self) -> None:
        """Warm shutdown: SIGTERM to the main pid only (Celery stops its own pool)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill_hard()


@dataclass
class Stack:
    backend: str  # "embedded" | "distributed"
    root: Path
    env: dict[str, str]
    pg_database: str | None = None
    redis_prefix: str | None = None
    workers: list[Worker] = field(default_factory=list)
    _runtime: BotRuntime | None = None

    @classmethod
    def create(cls, backend: str, root: Path, model_cache: Path, **overrides: str) -> Stack:
        root.mkdir(parents=True, exist_ok=True)
        env = {
            "MUSESPARK_DATA_DIR": str(root / "data"),
            "MUSESPARK_MODEL_CACHE_DIR": str(model_cache),
            "MUSESPARK_TEXT_MAX_NEW_TOKENS": "24",
            "MUSESPARK_JOB_HEARTBEAT_SECONDS": "0.5",
            "MUSESPARK_JOB_STALE_AFTER_SECONDS": "4",
            "MUSESPARK_REDRIVE_INTERVAL_SECONDS": "0.5",
            # Short scenes keep the offline text model's story within seconds.
            "MUSESPARK_STORY_SCENE_MAX_CHARS": "60",
            "MUSESPARK_STORY_POLL_SECONDS": "0.5",
            # A loaded test machine must not turn slow jobs into "taking longer" notes in
            # chats whose messages the tests count (tests/test_broker_loss.py sets its own).
            "MUSESPARK_DELAYED_NOTICE_SECONDS": "600",
            # Tests send far more requests than a person may; tests/test_trust.py sets limits
            # per community (/settings quota) where it checks them.
            "MUSESPARK_QUOTA_PERSON_HOURLY": "0",
            "MUSESPARK_QUOTA_PERSON_DAILY": "0",
            "MUSESPARK_QUOTA_COMMUNITY_HOURLY": "0",
            # First come, first served, as the tests expect; tests/test_fairness.py turns
            # fair share on.
            "MUSESPARK_FAIR_SHARE_INFLIGHT": "0",
            # NudeNet for real, plus one stand-in finding only the strict policy refuses.
            "MUSESPARK_PICTURE_DETECTOR": "tests.picture_stand_in:detect",
        }
        stack = cls(backend, root, env)
        if backend == "distributed":
            stack.pg_database, env["MUSESPARK_DATABASE_URL"] = create_pg_database()
            stack.redis_prefix = f"musespark-test-{uuid.uuid4().hex[:8]}:"
            env["MUSESPARK_BROKER_URL"] = REDIS_URL
            env["MUSESPARK_BROKER_KEY_PREFIX"] = stack.redis_prefix
        env.update(overrides)
        return stack

    @property
    def settings(self) -> Settings:
        saved = dict(os.environ)
        try:
            os.environ.update(self.env)
            for key in [k for k in os.environ if k.startswith("MUSESPARK_") and k not in self.env]:
                del os.environ[key]
            return Settings(_env_file=None)  # type: ignore[call-arg]
        finally:
            os.environ.clear()
            os.environ.update(saved)

    @property
    def runtime(self) -> BotRuntime:
        if self._runtime is None:
            self._runtime = BotRuntime(self.settings)
        return self._runtime

    def chat(self, name: str | None = None) -> ConsoleChat:
        chat = ConsoleChat(self.runtime.orchestrator, self.runtime.store,
                           chat_id=name or f"chat-{uuid.uuid4().hex[:8]}")
        chat.poll()
        return chat

    def start_worker(self, *, wait: bool = True) -> Worker:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MUSESPARK_")}
        env.update(self.env)
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        env["PYTHONUNBUFFERED"] = "1"
        log_path = self.root / f"worker-{len(self.workers) + 1}.log"
        process = subprocess.Popen(
            [sys.executable, "-m", "workers", "--concurrency", "1",
             "--name", f"test-{uuid.uuid4().hex[:6]}@%h"],
            stdout=log_path.open("wb"), stderr=subprocess.STDOUT, env=env, cwd=self.root)
        worker = Worker(process, log_path)
        self.workers.append(worker)
        if wait:
            worker.wait_ready()
        return worker

    def job(self, job_id: str) -> Job:
        job = self.runtime.store.get_job(job_id)
        assert job is not None, job_id
        return job

    def wait_job(self, job_id: str, states: tuple[str, ...], timeout: float = 120) -> Job:
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job.state in states:
                return job
            if time.monotonic() > deadline:
                logs = "\n".join(w.log()[-3000:] for w in self.workers)
                raise TimeoutError(f"job {job_id} is {job.state}, not {states}\n{logs}")
            time.sleep(0.1)

    def close(self) -> None:
        # The deployment is thrown away: its workers are killed, not stopped. A warm stop
        # waits on Celery's own timers (up to 2 s for the embedded transport's poll, then the
        # prefork pool's 1-second sleeps: 4 to 7 s a worker), and the tests that check a warm
        # stop (test_operating, test_end_to_end) stop their workers themselves.
        for worker in self.workers:
            if worker.process.poll() is None:
                worker.kill_hard()
        if self._runtime is not None:
            self._runtime.close()
        if self.pg_database:
            drop_pg_database(self.pg_database)
        if self.redis_prefix:
            drop_redis_prefix(self.redis_prefix)
