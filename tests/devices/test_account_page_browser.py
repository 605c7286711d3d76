"""One browser test: a person opens their subscription URL in headless Chromium and sees the account page.

Like tests/telegram/test_webchat_browser.py: Debian's `chromium` driven by Playwright's Python package
with `executable_path`, skipped with the reason where either is missing. The page must load with its
strict Content-Security-Policy intact: its one inline style and one inline script apply (allowed by
their hashes), and the console shows no error and no CSP violation.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio

from tests.harness import bot_config, start_vpnd
from tests.test_account_page import BROWSER_ACCEPT
from vpnd.db import subscriptions
from vpnd.db.users import upsert_user
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


@attrs.define
class Seen:
    """What the browser saw of the page."""

    console: list[str] = attrs.field(factory=list)
    errors: list[str] = attrs.field(factory=list)
    status: str = ""
    qr_size: tuple[float, float] = (0.0, 0.0)
    add_hrefs: list[str] = attrs.field(factory=list)
    install_hrefs: list[str] = attrs.field(factory=list)
    copy_visible: bool = False
    copied_label: str = ""
    clipboard: str = ""
    button_radius: str = ""
    backgrounds: tuple[str, str] = ("", "")
    #: The page in Persian: (document direction, the status badge's text).
    persian: tuple[str, str] = ("", "")


def look_at_the_page(url: str, screenshots: Path) -> Seen:
    """Open `url` in Chromium like a person on an Android phone would; record what is there."""
    seen = Seen()
    with playwright_sync.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(
                viewport={"width": 412, "height": 915},
                user_agent="Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) "
                "Chrome/124.0.0.0 Mobile Safari/537.36",
                locale="en-US",
                permissions=["clipboard-read", "clipboard-write"],
            )
            page = context.new_page()
            page.on("console", lambda message: seen.console.append(f"{message.type}: {message.text}"))
            page.on("pageerror", lambda error: seen.errors.append(str(error)))
            response = page.goto(url)
            assert response is not None and response.status == 200
            page.wait_for_load_state("load")
            seen.status = page.locator("[data-status]").first.inner_text()
            qr = page.locator("#key svg")
            qr.wait_for(state="visible", timeout=10_000)
            box = qr.bounding_box()
            assert box is not None
            seen.qr_size = (box["width"], box["height"])
            seen.add_hrefs = [str(a.get_attribute("href")) for a in page.locator("#platform-android a.add").all()]
            seen.install_hrefs = [
                str(a.get_attribute("href")) for a in page.locator("#platform-android a.install").all()
            ]
            copy = page.locator("#copy")
            seen.copy_visible = copy.is_visible()  # the script ran: it un-hides the button
            seen.button_radius = copy.evaluate("b => getComputedStyle(b).borderTopLeftRadius")  # the style applied
            copy.click()
            page.locator("#copy", has_text="Copied").wait_for(timeout=5_000)  # (a string predicate would need eval)
            seen.copied_label = copy.inner_text()
            seen.clipboard = page.evaluate("navigator.clipboard.readText()")
            page.screenshot(path=str(screenshots / "account-light.png"), full_page=True)
            light = page.evaluate("getComputedStyle(document.body).backgroundColor")
            page.emulate_media(color_scheme="dark")
            dark = page.evaluate("getComputedStyle(document.body).backgroundColor")
            seen.backgrounds = (light, dark)
            page.screenshot(path=str(screenshots / "account-dark.png"), full_page=True)

            persian = browser.new_context(viewport={"width": 412, "height": 915}, locale="fa-IR").new_page()
            persian.on("console", lambda message: seen.console.append(f"{message.type}: {message.text}"))
            persian.on("pageerror", lambda error: seen.errors.append(str(error)))
            persian.goto(url)
            seen.persian = (persian.evaluate("document.dir"), persian.locator("[data-status]").first.inner_text())
            persian.screenshot(path=str(screenshots / "account-fa.png"), full_page=True)
        finally:
            browser.close()
    return seen


async def test_a_person_opens_the_subscription_url_in_a_browser(
    nursery: trio.Nursery,
    fake_telegram: tuple[FakeTelegram, str],
    db_dsn: str,
    write_config: Callable[..., Path],
    tmp_path: Path,
) -> None:
    fake, base_url = fake_telegram
    vpnd = await start_vpnd(nursery, bot_config(write_config, db_dsn, fake, base_url))

    def subscribe(conn: Any, user_id: int, days: int) -> subscriptions.Subscription:
        upsert_user(conn, user_id, None, "Alice", "en")
        return subscriptions.grant_days(conn, user_id, days, kind="paid", plan_code="m1")

    sub = await vpnd.app.db.run(subscribe, 2001, 30)
    with trio.fail_after(90):
        seen = await trio.to_thread.run_sync(look_at_the_page, f"{vpnd.http_url}/sub/{sub.sub_token}", tmp_path)

    assert seen.errors == [] and seen.console == []  # no script error, no CSP violation, nothing
    assert seen.status == "Active"
    assert seen.qr_size[0] >= 100 and seen.qr_size == (seen.qr_size[1], seen.qr_size[0])
    public = vpnd.app.config.http.public_base_url
    catalog = vpnd.app.config.connect.catalog
    android = catalog.apps_for("android")
    assert seen.add_hrefs == [f"{public}/connect/{sub.sub_token}/{app.id}" for app in android if app.import_template]
    assert seen.install_hrefs == [app.stores["android"] for app in android]
    assert seen.copy_visible and seen.button_radius == "10px"
    assert seen.copied_label == "Copied" and seen.clipboard == f"{public}/sub/{sub.sub_token}"
    light, dark = seen.backgrounds
    assert light != dark  # prefers-color-scheme
    assert seen.persian == ("rtl", "فعال")
    for name in ("account-light.png", "account-dark.png", "account-fa.png"):
        assert (tmp_path / name).stat().st_size > 5000

    # the composition root hands the bot's username to the page: an expired subscription links to the bot
    expired = await vpnd.app.db.run(subscribe, 2002, 1)
    await vpnd.app.db.run(
        lambda conn: conn.execute("UPDATE subscriptions SET expires_at = now() - interval '1 day' WHERE user_id = 2002")
    )
    async with httpx.AsyncClient(base_url=vpnd.http_url, timeout=10) as client:
        with trio.fail_after(10):
            response = await client.get(
                f"/sub/{expired.sub_token}", headers={"accept": BROWSER_ACCEPT, "user-agent": CHROME_UA}
            )
    assert 'data-status="expired"' in response.text
    assert f'href="https://t.me/{fake.bot_username}"' in response.text
    await vpnd.stop()


CHROME_UA = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36"
