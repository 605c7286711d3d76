"""One browser test: a person clicks through start → free trial in the web chat (headless Chromium).

Chromium comes from Debian's `chromium` package (`make test` installs it as root with apt), driven by
Playwright's Python package with `executable_path`, so no browser download is needed. Skipped, with
the reason, where either is missing.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from tests.harness import bot_config, start_vpnd
from vpnd_sandbox.telegram_fake import FakeTelegram

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
playwright_sync = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (Debian package `chromium`, installed by make test)"),
]

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def click_through(url: str, screenshot: Path) -> str:
    """In a real browser: pick Alice, send /start, press "Free trial"; return the bot's answer."""
    with playwright_sync.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(url)
            page.click("[data-user='1001']")
            page.fill("#text", "/start")
            page.click("#sendBtn")
            page.click("button[data-cb='trial']", timeout=20_000)
            answer = page.locator(".msg", has_text="free trial is active")
            answer.wait_for(timeout=20_000)
            page.screenshot(path=str(screenshot))
            return answer.inner_text()
        finally:
            browser.close()


async def test_person_clicks_start_then_trial_in_the_web_chat(
    nursery: trio.Nursery,
    fake_telegram: tuple[FakeTelegram, str],
    db_dsn: str,
    write_config: Callable[..., Path],
    tmp_path: Path,
) -> None:
    fake, base_url = fake_telegram
    fake.add_user(1001, "Alice", username="alice", language_code="en")
    vpnd = await start_vpnd(nursery, bot_config(write_config, db_dsn, fake, base_url))
    screenshot = tmp_path / "webchat.png"
    with trio.fail_after(90):
        text = await trio.to_thread.run_sync(click_through, f"{base_url}/", screenshot)
    assert "free trial is active for 3 days" in text
    assert screenshot.stat().st_size > 1000
    await vpnd.stop()
