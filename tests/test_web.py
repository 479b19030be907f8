"""The web pages in a real browser: Debian's Chromium driven by Playwright, against a real
deployment (embedded store and broker, one real worker process, the web server in a thread).

One server and one worker for the module; the tests run in order and build on each other's
results (a picture asked for in the playground is then found in the gallery and the dashboard).
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import (
    Browser,
    BrowserContext,
    BrowserType,
    Page,
    Playwright,
    expect,
    sync_playwright,
)

from bots.web import WebServer
from core.events import Actor, Channel, ChannelKind, CommandInvoked
from core.store import FeedbackEvent
from tests._stack import Stack, free_port

CHROMIUM = Path("/usr/bin/chromium")
RESULT_TIMEOUT_MS = 90_000
PROMPT = "a red lighthouse at dusk"

pytestmark = [
    pytest.mark.skipif(not CHROMIUM.exists(), reason=(
        "Debian's Chromium is missing: apt-get install chromium (.ci/run installs it)")),
    # The browser flows on the embedded deployment only, sharing its worker (and the models it
    # has loaded) with the other end-to-end modules.
    pytest.mark.parametrize("stack", ["embedded"], indirect=True),
]


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args: dict[str, Any]) -> dict[str, Any]:
    """Playwright drives the system's Chromium; it never downloads a browser."""
    return {**browser_type_launch_args, "executable_path": str(CHROMIUM)}


# pytest-playwright's own playwright/browser fixtures live for the whole session. Its sync API
# keeps an asyncio loop running in the main thread while they do, so every later module's
# asyncio.run() (the Discord and Telegram tests) would fail: here they live for this module.
@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="module")
def browser_type(playwright: Playwright) -> BrowserType:
    return playwright.chromium


@pytest.fixture(scope="module")
def browser(browser_type: BrowserType,
            browser_type_launch_args: dict[str, Any]) -> Iterator[Browser]:
    launched = browser_type.launch(**browser_type_launch_args)
    yield launched
    launched.close()


@pytest.fixture(scope="module")
def web(stack: Stack) -> Iterator[Stack]:
    """The session's embedded deployment and its warm worker (see the module's mark), with
    the web server on a free port in this process."""
    stack.runtime.settings.web_port = free_port()
    server = WebServer(stack.runtime).start()
    try:
        yield stack
    finally:
        server.stop()


@pytest.fixture(scope="module")
def person_a(browser: Browser, web: Stack) -> Iterator[BrowserContext]:
    context = browser.new_context(base_url=web.runtime.settings.resolved_web_url)
    yield context
    context.close()


@pytest.fixture(scope="module")
def page_a(person_a: BrowserContext) -> Page:
    return person_a.new_page()


def _results(page: Page) -> Any:
    return page.locator("#chat .msg-result")


def test_playground_picture_arrives_live_with_both_takes(web: Stack, page_a: Page) -> None:
    page = page_a
    page.goto("/")
    page.evaluate("window.notReloaded = true")
    box = page.get_by_label("Message", exact=True)  # the input is labelled
    box.fill(f"/imagine {PROMPT}")
    page.get_by_role("button", name="Send").click()
    # The request's status message and its live progress line (queued / drawing / done).
    status = page.locator("#chat .msg-status").filter(has_text=PROMPT)
    expect(status).to_be_visible(timeout=10_000)
    expect(status.locator(".progress")).to_have_text(re.compile(r"queued|drawing|done"))
    # Both takes arrive by server-sent events, without a reload.
    expect(_results(page).locator("img")).to_have_count(2, timeout=RESULT_TIMEOUT_MS)
    expect(status.locator(".progress")).to_have_text(re.compile("done"), timeout=10_000)
    assert page.evaluate("window.notReloaded") is True
    # Accessibility: alt text from the prompt, labelled buttons.
    for img in _results(page).locator("img").all():
        assert PROMPT in (img.get_attribute("alt") or "")
    first = _results(page).first
    for button in first.get_by_role("button").all():
        assert button.get_attribute("aria-label") or button.inner_text().strip()
    # The same result buttons as every platform (core/actions.py).
    expect(first.get_by_role("button", name=re.compile(r"Reroll"))).to_be_visible()
    expect(first.get_by_role("button", name=re.compile(r"^V1"))).to_be_visible()
    first.get_by_role("button", name=re.compile("React 👍")).click()
    job_id = first.get_attribute("id")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with web.runtime.store.session() as s:
            liked = s.query(FeedbackEvent).filter(FeedbackEvent.value == "👍").all()
        if liked:
            break
        time.sleep(0.1)
    assert liked and liked[0].weight > 0, job_id


def test_gallery_finds_the_picture_with_its_recipe(web: Stack, page_a: Page) -> None:
    page = page_a
    page.get_by_role("link", name="Gallery").click()
    card = page.locator(".card").filter(has_text=PROMPT)
    expect(card).to_have_count(1)  # the two takes are one piece
    expect(card.locator("img")).to_have_count(2)
    assert PROMPT in (card.locator("img").first.get_attribute("alt") or "")
    # Filters: liked (our 👍), kind, style; every control is labelled.
    for name in ("Person", "Style", "Kind", "Liked only"):
        expect(page.get_by_label(name)).to_be_visible()
    page.get_by_label("Liked only").check()
    page.get_by_role("button", name="Show").click()
    expect(page.locator(".card").filter(has_text=PROMPT)).to_have_count(1)
    page.get_by_label("Kind").select_option("text")
    page.get_by_role("button", name="Show").click()
    expect(page.locator(".card")).to_have_count(0)
    page.get_by_label("Kind").select_option("")
    page.get_by_role("button", name="Show").click()
    card.get_by_role("link", name=PROMPT, exact=True).click()
    expect(page.get_by_role("heading", level=1)).to_have_text(PROMPT)
    page.get_by_text("Recipe and provenance").first.click()
    recipe = page.locator("dl.recipe").first
    for field in ("seed", "model", "sha256", "prompt the model saw", "style"):
        expect(recipe.locator("dt", has_text=re.compile(f"^{field}$"))).to_have_count(1)
    # Pictures: cacheable for good, validated by ETag, thumbnails made once.
    thumb = page.locator(".part img").first.get_attribute("src") or ""
    first = page.request.get(thumb)
    assert first.status == 200 and "immutable" in first.headers["cache-control"]
    again = page.request.get(thumb, headers={"If-None-Match": first.headers["etag"]})
    assert again.status == 304
    made = list((web.runtime.settings.resolved_data_dir / "thumbs").glob("*.webp"))
    before = {p: p.stat().st_mtime_ns for p in made}
    page.request.get(thumb)
    assert {p: p.stat().st_mtime_ns for p in made} == before and made


def _style_points(page: Page) -> int:
    return int(page.locator("#plot-community-image-style").get_attribute("data-points") or 0)


def test_dashboard_plot_changes_with_a_reaction(web: Stack, page_a: Page) -> None:
    page = page_a
    page.get_by_role("link", name="Dashboard").click()
    expect(page.locator("#plot-community-image-style")).to_be_visible()
    before = _style_points(page)
    assert before >= 1  # the 👍 of the first test
    page.get_by_role("link", name="Playground").click()
    _results(page).nth(1).get_by_role("button", name=re.compile("React ❤️")).click()
    deadline = time.monotonic() + 10
    while True:
        page.get_by_role("link", name="Dashboard").click()
        if _style_points(page) > before or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert _style_points(page) == before + 1
    assert "❤️" in page.locator("table[aria-label='Recent feedback']").first.inner_text()


def test_another_tab_is_another_person_who_sees_the_gallery(web: Stack, page_a: Page) -> None:
    page = page_a.context.new_page()  # a new tab of the same browser
    try:
        page.goto("/")
        assert "as=" in page.url  # the tab keeps its person in its address
        expect(page.locator("#chat .msg")).to_have_count(0)  # a chat of their own
        me = page.locator("header.top .muted").inner_text()
        assert me and me != page_a.locator("header.top .muted").inner_text()
        page.get_by_role("link", name="Gallery").click()
        card = page.locator(".card").filter(has_text=PROMPT)
        expect(card).to_have_count(1)
        page.get_by_role("link", name="Dashboard").click()
        # The community's taste is shared; their own has no feedback yet.
        assert _style_points(page) >= 2
        assert page.locator("#plot-person-image-style").get_attribute("data-points") == "0"
        # The first tab is still the first person (its links carry them).
        page_a.get_by_role("link", name="Playground").click()
        expect(page_a.locator("#chat .msg-result img")).to_have_count(2)
    finally:
        page.close()


def _web_link(web: Stack, guild: str, *, admin: bool) -> str:
    event = CommandInvoked(platform="discord", event_id=f"i{uuid.uuid4().hex}",
                           actor=Actor("4242", "Ann", is_admin=admin),
                           channel=Channel("c-" + guild, ChannelKind.GUILD_CHANNEL,
                                           guild_id=guild), name="web")
    (reply,) = web.runtime.orchestrator.handle(event)
    assert reply.ephemeral, reply
    found = re.search(r"https?://\S+", reply.text)
    assert found, reply.text
    return found.group(0)


def test_sign_in_link_works_once_expires_and_stays_in_its_community(
        web: Stack, browser: Browser) -> None:
    base = web.runtime.settings.resolved_web_url
    link = _web_link(web, "g-one", admin=True)
    other_link = _web_link(web, "g-two", admin=False)
    one = int(link.split("/c/")[1].split("/")[0])
    two = int(other_link.split("/c/")[1].split("/")[0])
    wrong_place = link.replace(f"/c/{one}/", f"/c/{two}/")
    context = browser.new_context(base_url=base)
    try:
        page = context.new_page()
        page.goto(wrong_place)
        expect(page.get_by_role("alert")).to_contain_text("another community")
        page.goto(link)
        expect(page.get_by_role("heading", level=1)).to_have_text("Gallery")
        assert page.url.endswith(f"/c/{one}/gallery")
        # Nothing of the other community, even by URL.
        assert page.request.get(f"/c/{two}/gallery").status == 404
        assert page.request.get(f"/c/{two}/dashboard").status == 404
        # Admins (Manage Server, carried on the actor) change what emoji mean, through the
        # same core call as /settings in the chat.
        page.goto(f"/c/{one}/dashboard")
        page.get_by_label("Emoji", exact=True).fill("🎉")
        page.get_by_label("counts as").select_option("positive")
        page.get_by_role("button", name="Change").click()
        expect(page.get_by_role("status").first).to_contain_text("🎉 now counts as positive")
    finally:
        context.close()
    # Used once: a second browser is refused.
    again = httpx.get(link, follow_redirects=False)
    assert again.status_code == 403 and "already used" in again.text
    # Not an admin: no form, and a hand-made post is refused by core.
    member = browser.new_context(base_url=base)
    try:
        page = member.new_page()
        page.goto(other_link)
        page.goto(f"/c/{two}/dashboard")
        expect(page.get_by_label("Emoji", exact=True)).to_have_count(0)
        page.get_by_label("/settings").fill("emoji 🎉 negative")
        page.get_by_role("button", name="Apply").click()
        expect(page.get_by_role("status").first).to_contain_text("Only an admin")
    finally:
        member.close()
    # Expired.
    settings = web.runtime.settings
    saved = settings.web_signin_ttl_seconds
    settings.web_signin_ttl_seconds = 1
    try:
        stale = _web_link(web, "g-one", admin=True)
        time.sleep(2.2)
        refused = httpx.get(stale, follow_redirects=False)
        assert refused.status_code == 403 and "expired" in refused.text
    finally:
        settings.web_signin_ttl_seconds = saved
    forged = httpx.get(f"{base}/c/{one}/signin/not-a-token", follow_redirects=False)
    assert forged.status_code == 403 and "not valid" in forged.text

