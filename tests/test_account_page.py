"""The account page's pure parts: browser or client app, the language, the platform, the status, the HTML."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import re

import pytest

from vpnd.account_page import (
    CONTENT_SECURITY_POLICY,
    SCRIPT,
    STYLE,
    AccountFacts,
    PageLinks,
    accepts_html,
    account_status,
    language_from_accept,
    platform_of,
    render_account_page,
    renew_link,
    wants_account_page,
)
from vpnd.config import SUPPORTED_LANGUAGES
from vpnd.connect_apps import load_catalog
from vpnd.texts import Texts

#: What Chromium, Firefox and Safari send for a page load.
BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"

BROWSERS = {
    "chrome-windows": "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0.0.0 Safari/537.36",
    "edge": "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 "
    "Safari/537.36 Edg/124.0.2478.51",
    "firefox-linux": "Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0",
    "firefox-android": "Mozilla/5.0 (Android 14; Mobile; rv:125.0) Gecko/125.0 Firefox/125.0",
    "safari-iphone": "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.4 Mobile/15E148 Safari/604.1",
    "safari-mac": "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.4 Safari/605.1.15",
    "chrome-android": "Mozilla/5.0 (Linux; Android 10; K) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 "
    "Mobile Safari/537.36",
    "samsung": "Mozilla/5.0 (Linux; Android 13; SM-S911B) AppleWebKit/537.36 (KHTML, like Gecko) "
    "SamsungBrowser/24.0 Chrome/117.0.0.0 Mobile Safari/537.36",
    "yandex": "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/122.0.0.0 "
    "YaBrowser/24.4.0.0 Safari/537.36",
    "telegram-in-app": "Mozilla/5.0 (Linux; Android 14; Pixel 8 Build/AP1A; wv) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Version/4.0 Chrome/124.0.6367.82 Mobile Safari/537.36 Telegram-Android/10.11.1 (Google Pixel 8; Android 14)",
    "headless-chromium": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "HeadlessChrome/120.0.6099.224 Safari/537.36",
}

#: User-Agents of client apps and tools as they fetch subscriptions (some look like browsers).
CLIENTS = {
    "happ": "Happ/3.1.0",
    "happ-ios": "Happ/2.6.1 CFNetwork/1494.0.7 Darwin/23.4.0",
    "v2raytun": "v2raytun/android",
    "v2raytun-ios": "v2RayTun/4.1.20 CFNetwork/1496.0.7 Darwin/23.5.0",
    "hiddify": "HiddifyNext/2.5.7 (android) like ClashMeta v2ray sing-box",
    "hiddify-desktop": "HiddifyNext/2.0.5 (windows) like ClashMeta v2ray sing-box",
    "streisand": "Streisand/1.6.35 CFNetwork/1490.0.4 Darwin/23.2.0",
    "v2rayng": "v2rayNG/1.8.19",
    "v2rayn": "v2rayN/6.45",
    "clash-verge": "clash-verge/v1.3.8",
    "clash-meta": "ClashMetaForAndroid/2.10.1.Meta",
    "mihomo": "mihomo/1.18.3",
    "flclash": "FlClash/v0.8.10 clash-verge Platform/android",
    "stash": "Stash/2.5.2 Clash/1.9.0",
    "sing-box": "sing-box 1.8.10",
    "sfa": "SFA/1.8.10 (Android 14)",
    "sfi": "SFI/1.8.10 (iOS 17.4)",
    "shadowrocket": "Shadowrocket/2070 CFNetwork/1490.0.4 Darwin/23.2.0 iPhone14,5",
    "quantumult": "Quantumult%20X/1.4.1 (iPhone14,5; iOS 17.4)",
    "surge": "Surge iOS/2754",
    "loon": "Loon/3.2.1 CFNetwork/1490.0.4",
    "nekobox": "NekoBox/Android/1.3.1 (Prefer ClashMeta Format)",
    "karing": "karing/1.0.29.416 android",
    "foxray": "FoXray/2.7 CFNetwork/1490.0.4",
    "v2box": "V2Box/8.0 CFNetwork/1490.0.4 Darwin/23.2.0",
    "curl": "curl/8.5.0",
    "wget": "Wget/1.21.4",
    "python": "python-requests/2.31.0",
    "httpx": "python-httpx/0.27.0",
    "okhttp": "okhttp/4.12.0",
    "go": "Go-http-client/2.0",
    "dart": "Dart/3.3 (dart:io)",
    # apps and previews that send a browser-like User-Agent: their own name still wins
    "hiddify-webview": "Mozilla/5.0 (Linux; Android 14) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0 "
    "Mobile Safari/537.36 HiddifyNext/2.5.7",
    "telegram-preview": "Mozilla/5.0 (compatible; TelegramBot (like TwitterBot))",
    "googlebot": "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; Googlebot/2.1; "
    "+http://www.google.com/bot.html) Chrome/124.0 Safari/537.36",
    "empty": "",
}


@pytest.mark.parametrize("agent", BROWSERS.values(), ids=BROWSERS.keys())
def test_a_browser_page_load_gets_the_page(agent: str) -> None:
    assert wants_account_page(BROWSER_ACCEPT, agent, None, None)
    assert wants_account_page("text/html", agent, "", "")


@pytest.mark.parametrize("agent", CLIENTS.values(), ids=CLIENTS.keys())
def test_client_apps_get_the_body_even_when_they_ask_for_html(agent: str) -> None:
    assert not wants_account_page(BROWSER_ACCEPT, agent, None, None)
    assert not wants_account_page("*/*", agent, None, None)
    assert not wants_account_page(None, agent, None, None)


@pytest.mark.parametrize("agent", BROWSERS.values(), ids=BROWSERS.keys())
def test_a_browser_without_html_in_accept_or_with_a_device_id_or_raw_gets_the_body(agent: str) -> None:
    assert not wants_account_page("*/*", agent, None, None)  # fetch() / XHR from a page
    assert not wants_account_page(None, agent, None, None)
    assert not wants_account_page("application/json", agent, None, None)
    assert not wants_account_page("text/html;q=0, */*", agent, None, None)
    assert not wants_account_page(BROWSER_ACCEPT, agent, "hwid-123", None)  # only apps send x-hwid
    assert not wants_account_page(BROWSER_ACCEPT, agent, None, "raw")  # ?format=raw forces the body
    assert not wants_account_page(BROWSER_ACCEPT, agent, None, " RAW ")


def test_other_formats_and_garbage_do_not_break_the_decision() -> None:
    chrome = BROWSERS["chrome-windows"]
    assert wants_account_page(BROWSER_ACCEPT, chrome, None, "html")  # an unknown format: as without one
    assert not wants_account_page(BROWSER_ACCEPT, "Mozilla/5.0", None, None)  # no engine token
    assert not wants_account_page(BROWSER_ACCEPT, "Mozilla/4.0 (compatible; MSIE 6.0)", None, None)
    assert not wants_account_page(BROWSER_ACCEPT, "x" * 10_000, None, None)
    assert not wants_account_page("text/html;q=abc", chrome, None, None)


def test_accepts_html() -> None:
    assert accepts_html(BROWSER_ACCEPT)
    assert accepts_html("application/xhtml+xml")
    assert accepts_html("TEXT/HTML; q=0.5")
    assert not accepts_html("text/html;q=0")
    assert not accepts_html("text/htmlx, */*")
    assert not accepts_html("")
    assert not accepts_html(None)


def test_language_from_accept_language() -> None:
    supported = SUPPORTED_LANGUAGES
    assert language_from_accept("ru-RU,ru;q=0.9,en-US;q=0.8,en;q=0.7", supported, "en") == "ru"
    assert language_from_accept("fa-IR,fa;q=0.9", supported, "en") == "fa"
    assert language_from_accept("de-DE,de;q=0.9,tr;q=0.5,uk;q=0.8", supported, "en") == "uk"  # by quality
    assert language_from_accept("zh-TW", supported, "en") == "zh"
    assert language_from_accept("de, fr", supported, "ru") == "ru"  # none of ours: the fallback
    assert language_from_accept("", supported, "tr") == "tr"
    assert language_from_accept(None, supported, "en") == "en"
    assert language_from_accept("ru;q=0, en", supported, "uk") == "en"
    assert language_from_accept("*, ;;;, =,q=", supported, "en") == "en"
    assert language_from_accept("ru;q=nope, tr", supported, "en") == "tr"


@pytest.mark.parametrize(
    ("name", "platform"),
    [
        ("chrome-windows", "windows"),
        ("firefox-linux", "linux"),
        ("firefox-android", "android"),
        ("safari-iphone", "ios"),
        ("safari-mac", "macos"),
        ("chrome-android", "android"),
    ],
)
def test_platform_of_a_browser(name: str, platform: str) -> None:
    assert platform_of(BROWSERS[name]) == platform


def test_platform_of_a_tv_and_of_nothing() -> None:
    tv = "Mozilla/5.0 (Linux; Android 9; AFTMM) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/108.0 Safari/537.36"
    assert platform_of(tv) == "androidtv"
    assert platform_of("") is None and platform_of(None) is None


def test_account_status_precedence() -> None:
    now = dt.datetime(2026, 1, 10, tzinfo=dt.UTC)
    later, earlier = now + dt.timedelta(days=3), now - dt.timedelta(days=3)
    assert account_status("active", later, now, False, True) == "active"
    assert account_status("active", later, now, True, True) == "over_quota"
    assert account_status("active", later, now, True, False) == "preparing"
    assert account_status("active", earlier, now, True, False) == "expired"
    assert account_status("active", now, now, False, True) == "expired"
    assert account_status("revoked", later, now, False, True) == "revoked"


def test_renew_link() -> None:
    assert renew_link("vpnd_bot") == "https://t.me/vpnd_bot"
    assert renew_link("@vpnd_bot") == "https://t.me/vpnd_bot"
    assert renew_link("") == ""
    assert renew_link("bad name/../x") == ""


NOW = dt.datetime(2026, 3, 1, 12, tzinfo=dt.UTC)


def facts(**changes: object) -> AccountFacts:
    values: dict[str, object] = {
        "status": "active",
        "profile_name": "Fast VPN",
        "plan_title": "Monthly",
        "expires_at": NOW + dt.timedelta(days=12, hours=3),
        "now": NOW,
        "used_bytes": 3 * 2**30,
        "total_bytes": 10 * 2**30,
        "resets_at": NOW + dt.timedelta(days=20),
        "devices_used": 2,
        "device_limit": 5,
    }
    values.update(changes)
    return AccountFacts(**values)  # type: ignore[arg-type]


LINKS = PageLinks("https://vpn.example/sub/TOKEN_abc-123", "https://vpn.example/connect/TOKEN_abc-123")


def readable(page: str) -> str:
    """The page without the <bdi> tags that isolate values from the sentence around them."""
    return re.sub(r"</?bdi[^>]*>", "", page)


def render(language: str = "en", **changes: object) -> str:
    """The page, its values' <bdi> tags removed (`test_values_are_isolated_for_right_to_left` keeps them)."""
    links = changes.pop("links", LINKS)
    platform = changes.pop("platform", None)
    catalog = load_catalog()
    return readable(render_account_page(Texts.load(), language, facts(**changes), links, catalog, platform))  # type: ignore[arg-type]


def test_the_page_shows_the_facts() -> None:
    page = render()
    assert '<html lang="en" dir="ltr">' in page
    assert 'data-status="active"' in page and ">Active<" in page
    assert "Valid until: 2026-03-13" in page and "Days left: 12" in page
    assert "Traffic: 3 GB of 10 GB · resets on 2026-03-21" in page
    assert "Devices: 2 of 5" in page and "Plan: Monthly" in page
    assert page.count("<svg") == 1 and 'value="https://vpn.example/sub/TOKEN_abc-123"' in page
    catalog = load_catalog()
    for platform in catalog.platforms:
        assert f'id="platform-{platform}"' in page
        for app in catalog.apps_for(platform):
            assert f'href="{app.stores[platform]}"' in page
            if app.import_template:
                assert f'href="https://vpn.example/connect/TOKEN_abc-123/{app.id}"' in page
                assert f">Add to {app.name}<" in page
    assert "renew" not in page  # active: no renew hint


def test_unlimited_plan_and_the_browsers_platform_opens_first() -> None:
    page = render(total_bytes=0, resets_at=None, device_limit=0, platform="android")
    assert "(unlimited)" in page and "Devices: 2 (unlimited)" in page
    assert re.findall(r'<details id="platform-(\w+)" open>', page) == ["android"]
    assert re.findall(r'<details id="platform-(\w+)" open>', render()) == ["ios"]  # the catalog's first


def test_expired_shows_the_renew_link_only_when_the_bot_is_known() -> None:
    expired = {"status": "expired", "expires_at": NOW - dt.timedelta(days=1)}
    page = render(**expired)
    assert ">Expired<" in page and "Renew it to connect again" in page and "t.me" not in page
    assert "Days left" not in page and "Ended on: 2026-02-28" in page and "Valid until" not in page
    with_bot = render(**expired, links=PageLinks(LINKS.subscription_url, LINKS.connect_base, "https://t.me/shop_bot"))
    assert 'href="https://t.me/shop_bot"' in with_bot and ">Renew in the bot<" in with_bot
    assert "Traffic used up" in render(status="over_quota")
    assert "being prepared" in render(status="preparing")
    revoked = render(status="revoked")
    assert ">Revoked<" in revoked and "Valid until" not in revoked and "Ended on" not in revoked


@pytest.mark.parametrize("language", SUPPORTED_LANGUAGES)
def test_every_language_renders(language: str) -> None:
    page = render(language)
    assert f'lang="{language}" dir="{"rtl" if language == "fa" else "ltr"}"' in page
    texts = Texts.load()
    assert texts.get(language, "page.status.active") in page
    assert texts.get(language, "page.install") in page


def test_values_are_isolated_for_right_to_left() -> None:
    page = render_account_page(Texts.load(), "fa", facts(plan_title="1 month"), LINKS, load_catalog())
    assert 'dir="rtl"' in page
    assert "<bdi>1 month</bdi>" in page  # a Latin plan title keeps its order in a Persian sentence
    assert '<bdi dir="ltr">2026-03-13</bdi>' in page and '<bdi dir="ltr">10 GB</bdi>' in page
    assert "<bdi>Happ</bdi>" in page


def test_everything_interpolated_is_escaped() -> None:
    evil = '<script>alert("x")</script>&"\''
    page = render(profile_name=evil, plan_title=evil)
    assert "<script>alert" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;&quot;&#x27;" in page  # heading, title
    assert "Plan: &lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    quoted = PageLinks('https://x/sub/a"><script>b', 'https://x/connect/a"><img src=x>', 'https://t.me/b"><i>')
    page = render(links=quoted, status="expired")
    assert "<script>b" not in page and "<img src=x>" not in page and '"><i>' not in page
    assert page.count("<script>") == 1  # only the page's own


def test_the_csp_hashes_match_the_inline_style_and_script() -> None:
    page = render()
    [style] = re.findall(r"<style>(.*?)</style>", page, re.S)
    [script] = re.findall(r"<script>(.*?)</script>", page, re.S)
    assert (style, script) == (STYLE, SCRIPT)
    for source in (style, script):
        digest = base64.b64encode(hashlib.sha256(source.encode()).digest()).decode()
        assert f"'sha256-{digest}'" in CONTENT_SECURITY_POLICY
    assert "default-src 'none'" in CONTENT_SECURITY_POLICY and "unsafe-inline" not in CONTENT_SECURITY_POLICY
    markup = re.sub(r"<(script|style)>.*?</\1>", "", page, flags=re.S)
    assert not re.search(r"<[^>]*\s(style|on\w+)\s*=", markup, re.I)  # no inline styles or handlers
    assert "http://" not in page.replace("http://www.w3.org", "")  # no external resources
