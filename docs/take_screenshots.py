"""Screenshots of the three web pages for the README, taken by Playwright in Debian's Chromium
from a real embedded deployment (one worker, the tiny demo pipeline unless
MUSESPARK_IMAGE_MODEL names a real one).

    .venv/bin/python docs/take_screenshots.py --model-cache /tmp/mscache

Writes docs/web-playground.png, docs/web-gallery.png and docs/web-dashboard.png.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DOCS = REPO / "docs"
VIEWPORT = {"width": 1100, "height": 900}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-cache", type=Path, required=True)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="shots-"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key in [k for k in os.environ if k.startswith("MUSESPARK_")]:
        if key != "MUSESPARK_IMAGE_MODEL":
            del os.environ[key]
    os.environ.update(MUSESPARK_DATA_DIR=str(root / "data"),
                      MUSESPARK_MODEL_CACHE_DIR=str(args.model_cache),
                      MUSESPARK_WEB_PORT=str(port), MUSESPARK_TEXT_MAX_NEW_TOKENS="40")
    from playwright.sync_api import expect, sync_playwright

    from bots.runtime import BotRuntime
    from bots.web import WebServer
    from core.settings import get_settings

    log = open(root / "worker.log", "wb")  # noqa: SIM115 (lives with the child)
    worker = subprocess.Popen([sys.executable, "-m", "workers", "--concurrency", "1"],
                              stdout=log, stderr=subprocess.STDOUT, cwd=root,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        with BotRuntime(get_settings()) as runtime, WebServer(runtime) as web, \
                sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium")
            page = browser.new_page(base_url=web.url, viewport=VIEWPORT)
            page.goto("/")
            box = page.get_by_label("Message", exact=True)
            for request in ("/imagine a lighthouse at dusk", "/write a haiku about rain"):
                box.fill(request)
                page.get_by_role("button", name="Send").click()
                expect(box).to_have_value("")  # sent: the form is reset
            results = page.locator("#chat .msg-result")
            expect(results).to_have_count(3, timeout=300_000)
            for number, emoji in ((0, "👍"), (1, "👎"), (0, "❤️"), (2, "👍"), (1, "🔥")):
                results.nth(number).get_by_role("button", name=f"React {emoji} to message",
                                                exact=False).click()
                time.sleep(0.4)
            time.sleep(1)
            page.wait_for_load_state("networkidle")
            page.screenshot(path=str(DOCS / "web-playground.png"), full_page=False)
            page.get_by_role("link", name="Gallery").click()
            page.wait_for_load_state("networkidle")
            page.screenshot(path=str(DOCS / "web-gallery.png"))
            page.get_by_role("link", name="Dashboard").click()
            page.wait_for_load_state("networkidle")
            page.screenshot(path=str(DOCS / "web-dashboard.png"))
            browser.close()
    finally:
        worker.terminate()
        worker.wait(30)
        shutil.rmtree(root, ignore_errors=True)
    print("wrote", ", ".join(f"docs/web-{p}.png" for p in ("playground", "gallery", "dashboard")))


if __name__ == "__main__":
    main()
