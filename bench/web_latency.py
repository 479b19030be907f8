"""The web layer's cost: a picture request from the browser against the same request in the
terminal chat, and the gallery's pages per second with 1,000 results.

Side by side in one run, on one embedded deployment (SQLite store, the embedded broker, one
real ``python -m workers`` process, the web server in a thread of this process):

* ``terminal``: ``/imagine PROMPT --seed N`` typed into the local chat (bots/console, what the
  terminal runs), timed until its result messages are seen (the console polls the store every
  0.1 s);
* ``browser``: the same request typed into the playground in Debian's Chromium (Playwright),
  timed from the click on Send until both pictures are loaded on the page (server-sent events
  bring the messages, the browser fetches the images).

The two alternate, with different seeds, after one warm-up request of each. The ratio
browser / terminal is the web layer's overhead on the whole request; the absolute difference is
what the web adds (the live hub's tick, rendering, the image fetches).

The gallery: 1,000 delivered picture results (two takes each, one PNG per take) are added to the
store directly (the gallery only reads), then one client fetches pages of 24 pieces one after
another for ``--seconds``: unfiltered pages, and the "liked" filter.

    .venv/bin/python bench/web_latency.py --model-cache /tmp/mscache --repeats 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PROMPT = "a lighthouse at dusk"
CHROMIUM = "/usr/bin/chromium"
GALLERY_RESULTS = 1000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_worker(root: Path) -> subprocess.Popen[bytes]:
    log = open(root / "worker.log", "wb")  # noqa: SIM115 (lives with the child)
    worker = subprocess.Popen([sys.executable, "-m", "workers", "--concurrency", "1",
                               "--name", "bench-web@%h"], stdout=log, stderr=subprocess.STDOUT,
                              cwd=root, env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + 120
    while " ready." not in (root / "worker.log").read_text(errors="replace"):
        if time.monotonic() > deadline:
            raise TimeoutError("worker not ready")
        time.sleep(0.2)
    return worker


def _delivered_at(store: object, chat_id: str) -> float:
    """When the newest result of ``chat_id`` was written by the worker (epoch seconds)."""
    from core.store import Store

    assert isinstance(store, Store)
    rows = [r for r in store.local_messages_after(chat_id, 0) if r.kind == "result"]
    return rows[-1].created_at.timestamp()


def _terminal_request(chat: object, seed: int) -> tuple[float, float]:
    """Seconds from typing to both pictures seen, and from the last delivery to seen."""
    from bots.console import ConsoleChat

    assert isinstance(chat, ConsoleChat)
    started = time.perf_counter()
    chat.say(f"/imagine {PROMPT} --seed {seed}")
    chat.wait(lambda shown: sum(len(m.images) for m in shown if m.kind == "result") >= 2,
              timeout=300)
    seen, total = time.time(), time.perf_counter() - started
    return total, seen - _delivered_at(chat.store, chat.chat_id)


def _browser_request(page: object, seed: int, store: object) -> tuple[float, float]:
    from playwright.sync_api import Page

    assert isinstance(page, Page)
    images = page.locator("#chat .msg-result img")
    before = images.count()
    page.get_by_label("Message", exact=True).fill(f"/imagine {PROMPT} --seed {seed}")
    started = time.perf_counter()
    page.get_by_role("button", name="Send").click()
    page.wait_for_function(
        """(n) => { const imgs = document.querySelectorAll('#chat .msg-result img');
                   return imgs.length >= n && [...imgs].slice(-2).every(
                       i => i.complete && i.naturalWidth > 0); }""",
        arg=before + 2, timeout=300_000, polling="raf")
    seen, total = time.time(), time.perf_counter() - started
    chat_id = "web-" + str(page.evaluate("document.querySelector('header.top .muted')"
                                         ".dataset.sid"))
    return total, seen - _delivered_at(store, chat_id)


def _fill_gallery(runtime: object, source_png: Path, count: int) -> int:
    """``count`` delivered two-take picture results in the local community, straight into the
    store (the gallery only reads them). Returns the community id."""
    from datetime import timedelta

    from bots.runtime import BotRuntime
    from bots.web import PLAYGROUND_COMMUNITY
    from core.events import Actor, Channel, ChannelKind
    from core.store import Artifact, Job, JobState, content_hash, utcnow
    from core.store._store import new_job_id

    assert isinstance(runtime, BotRuntime)
    store = runtime.store
    community = store.ensure_community("local", Channel(PLAYGROUND_COMMUNITY, ChannelKind.GROUP,
                                                        guild_id=PLAYGROUND_COMMUNITY))
    users = [store.ensure_user("local", Actor(f"bench-{n}", f"Bench {n}")) for n in range(8)]
    digest = content_hash(source_png.read_bytes())
    start = utcnow() - timedelta(days=10)
    styles = ["watercolor", "photographic", "anime", "oil-painting", "pixel-art"]
    with store.session() as s:
        for n in range(count):
            at = start + timedelta(minutes=n)
            key = f"bench:{n}"
            for take in (0, 1):
                job_id = new_job_id()
                style = styles[(n + take) % len(styles)]
                s.add(Job(id=job_id, idempotency_key=key + (f":take{take + 1}" if take else ""),
                          kind="image", intent="imagine", state=JobState.DELIVERED,
                          user_id=users[n % len(users)], community_id=community,
                          prompt=f"{PROMPT} number {n}", expanded_prompt=f"{PROMPT}, {style}",
                          params={"taste": {"choice": {"style": style}}}, seed=n, model="bench",
                          platform="local", delivery={}, attempts=1, created_at=at,
                          updated_at=at, finished_at=at))
                s.flush()
                s.add(Artifact(job_id=job_id, kind="image", position=0, path=str(source_png),
                               content_hash=digest, recipe={"seed": n, "style": style},
                               created_at=at))
    return community


def _pages_per_second(base: str, community: int, seconds: float, query: str) -> float:
    import httpx

    with httpx.Client(base_url=base) as client:
        client.get("/")  # the session cookie: the playground's community is open to it
        done, page = 0, 1
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            reply = client.get(f"/c/{community}/gallery?{query}page={page}")
            reply.raise_for_status()
            done += 1
            page = page % 40 + 1
        return done / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-cache", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="how long to fetch gallery pages for, per variant")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench-web-"))
    port = _free_port()
    for key in [k for k in os.environ if k.startswith("MUSESPARK_")]:
        if key not in ("MUSESPARK_IMAGE_MODEL", "MUSESPARK_DEVICE", "MUSESPARK_IMAGE_STEPS",
                       "MUSESPARK_IMAGE_SIZE"):
            del os.environ[key]
    os.environ.update(MUSESPARK_DATA_DIR=str(root / "data"),
                      MUSESPARK_MODEL_CACHE_DIR=str(args.model_cache),
                      MUSESPARK_WEB_PORT=str(port), MUSESPARK_REDRIVE_INTERVAL_SECONDS="0.5",
                      MUSESPARK_DELAYED_NOTICE_SECONDS="0")
    from playwright.sync_api import sync_playwright

    from bots.console import ConsoleChat
    from bots.runtime import BotRuntime
    from bots.web import WebServer
    from core.settings import get_settings

    settings = get_settings()
    worker = _start_worker(root)
    try:
        with BotRuntime(settings) as runtime, WebServer(runtime) as web, \
                sync_playwright() as playwright:
            chat = ConsoleChat(runtime.orchestrator, runtime.store, chat_id="bench-terminal")
            chat.poll()
            browser = playwright.chromium.launch(executable_path=CHROMIUM)
            page = browser.new_page(base_url=web.url)
            page.goto("/")
            terminal: list[tuple[float, float]] = []
            web_times: list[tuple[float, float]] = []
            _terminal_request(chat, 1)  # warm-up: the worker loads the pipeline
            _browser_request(page, 2, runtime.store)
            for n in range(args.repeats):
                terminal.append(_terminal_request(chat, 100 + n))
                web_times.append(_browser_request(page, 200 + n, runtime.store))
            browser.close()
            print(f"picture request (two takes, {settings.image_model or 'tiny demo pipeline'}),"
                  f" {args.repeats} each, median seconds:")
            for label, index in (("typed -> both pictures shown", 0),
                                 ("last result written -> shown", 1)):
                t = statistics.median(x[index] for x in terminal)
                w = statistics.median(x[index] for x in web_times)
                print(f"  {label}: terminal {t:.3f}, browser {w:.3f}, browser/terminal "
                      f"{w / t:.2f}x   (runs: terminal "
                      f"{', '.join(f'{x[index]:.2f}' for x in terminal)}; browser "
                      f"{', '.join(f'{x[index]:.2f}' for x in web_times)})")

            png = next((root / "data" / "artifacts").rglob("*.png"))
            kept = root / "bench-source.png"
            shutil.copy(png, kept)
            community = _fill_gallery(runtime, kept, GALLERY_RESULTS)
            for name, query in (("all results", ""), ("liked only", "liked=1&"),
                                ("one style", "style=anime&")):
                rate = _pages_per_second(web.url, community, args.seconds, query)
                print(f"gallery, {GALLERY_RESULTS} results, {name}: {rate:.1f} pages/s "
                      "(24 pieces a page, one client)")
    finally:
        worker.terminate()
        worker.wait(30)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
