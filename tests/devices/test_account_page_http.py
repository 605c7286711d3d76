"""The subscription URL opened in a browser: the account page, over real HTTP and a real PostgreSQL.

Client apps fetching the same URL keep getting the subscription body and headers they always got, and
only they take device slots.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import httpx
import trio

from tests.devices.harness import PLANS, XRAY, happ, links_of, serving, title_of
from tests.harness import sql
from tests.test_account_page import BROWSER_ACCEPT, BROWSERS, readable
from vpnd.config import GIB
from vpnd.connect_apps import load_catalog
from vpnd.db.subscriptions import Subscription
from vpnd.db.xray_state import store_traffic
from vpnd.services.limits import quota_rules
from vpnd.subscription_url import TokenRateLimiter
from vpnd_sandbox.postgres import free_port

CHROME = BROWSERS["chrome-android"]


def browser(language: str = "en-US,en;q=0.9", agent: str = CHROME) -> dict[str, str]:
    """The headers a browser sends when a person opens the URL."""
    return {"accept": BROWSER_ACCEPT, "user-agent": agent, "accept-language": language}


def page_of(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    return readable(response.text)


def without_date(response: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k not in ("date", "server")}


async def test_a_browser_gets_the_account_page_and_takes_no_device_slot(config_file, db_dsn):
    async with serving(config_file()) as s:
        sub = await s.subscribe(30, "five")
        rules = quota_rules(s.app)
        await s.app.db.run(lambda conn: store_traffic(conn, [(30, 0, 2 * GIB)], quota=rules))
        response = await s.fetch(sub, browser())
        page = page_of(response)
        csp = response.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'sha256-" in csp and "unsafe-inline" not in csp
        assert response.headers["cache-control"] == "no-store"
        assert response.headers["referrer-policy"] == "no-referrer"
        assert response.headers["x-robots-tag"].startswith("noindex")
        assert "subscription-userinfo" not in response.headers and "profile-title" not in response.headers

        assert 'data-status="active"' in page and ">Active<" in page
        assert f"Valid until: {sub.expires_at:%Y-%m-%d}" in page and "Days left: 29" in page
        assert "Traffic: 2 GB of 10 GB · resets on" in page
        assert "Devices: 0 of 5" in page and "Plan: Five devices" in page
        assert page.count("<svg") == 1 and "</svg>" in page
        base = s.app.config.http.public_base_url
        assert f'value="{base}/sub/{sub.sub_token}"' in page
        catalog = load_catalog()
        for app in catalog.apps_for("android"):
            assert f'href="{base}/connect/{sub.sub_token}/{app.id}"' in page
            assert f'href="{app.stores["android"]}"' in page
        assert re.findall(r'<details id="platform-(\w+)" open>', page) == ["android"]  # Chrome on Android

        # the browser took no slot and was not counted; the app that follows takes the first
        assert sql(db_dsn, "SELECT count(*) FROM devices WHERE user_id = 30") == [(0,)]
        assert len(links_of(await s.fetch(sub, happ("phone-1")))) == 1
        assert sql(db_dsn, "SELECT count(*) FROM devices WHERE user_id = 30") == [(1,)]
        assert "Devices: 1 of 5" in page_of(await s.fetch(sub, browser()))


async def test_a_browser_at_the_device_limit_still_sees_its_page(config_file, db_dsn):
    async with serving(config_file()) as s:
        sub = await s.subscribe(31, "five")
        for n in range(5):
            await s.fetch(sub, happ(f"d{n}"))
        page = page_of(await s.fetch(sub, browser()))
        assert "Devices: 5 of 5" in page and 'data-status="active"' in page
        assert sql(db_dsn, "SELECT count(*) FROM devices WHERE user_id = 31") == [(5,)]


async def test_client_apps_get_the_body_exactly_as_before(config_file, db_dsn):
    async with serving(config_file()) as s:
        sub = await s.subscribe(32, "five")
        plain = await s.fetch(sub, {"user-agent": "v2rayN/6.45"})
        assert len(links_of(plain)) == 1 and title_of(plain) == "Fast VPN #1"
        expected = without_date(plain)
        assert set(expected) == {
            "content-type",
            "content-length",
            "profile-update-interval",
            "subscription-userinfo",
            "profile-title",
            "cache-control",
        }
        # apps that send a browser-like Accept, or a browser's User-Agent with a device id, or ?format=raw
        for headers in (
            {"user-agent": "v2rayN/6.45", "accept": BROWSER_ACCEPT},
            {"user-agent": "HiddifyNext/2.5.7 (android) like ClashMeta v2ray sing-box", "accept": BROWSER_ACCEPT},
            {"user-agent": "Streisand/1.6.35 CFNetwork/1490.0.4 Darwin/23.2.0", "accept": "*/*"},
            {"user-agent": "curl/8.5.0", "accept": "*/*"},
            {
                "user-agent": "Mozilla/5.0 (Linux; Android 14) AppleWebKit/537.36 Chrome/124.0 v2rayNG/1.8.19",
                "accept": BROWSER_ACCEPT,
            },
        ):
            response = await s.fetch(sub, headers)
            assert response.content == plain.content, headers
            assert without_date(response) == expected, headers
        with trio.fail_after(10):
            raw = await s.client.get(f"/sub/{sub.sub_token}?format=raw", headers=browser())
        assert raw.content == plain.content and without_date(raw) == expected
        assert sql(db_dsn, "SELECT count(*) FROM devices WHERE user_id = 32") == [(0,)]

        # Happ with a browser's headers and its device id: the body, and the slot
        response = await s.fetch(sub, {**browser(), **happ("happ-1")})
        assert len(links_of(response)) == 1 and "<html" not in response.text
        response = await s.fetch(sub, {**browser(), "x-hwid": "hwid-from-a-browser-ua"})
        assert len(links_of(response)) == 1
        rows = sql(db_dsn, "SELECT hwid FROM devices WHERE user_id = 32 ORDER BY hwid")
        assert rows == [("happ-1",), ("hwid-from-a-browser-ua",)]


async def test_the_page_speaks_the_browsers_language(config_file):
    async with serving(config_file()) as s:
        sub = await s.subscribe(33, "five", language="uk")
        ru = page_of(await s.fetch(sub, browser("ru-RU,ru;q=0.9,en;q=0.8")))
        assert '<html lang="ru" dir="ltr">' in ru
        assert ">Активна<" in ru and "Устройства: 0 из 5" in ru and ">Добавить в Happ<" in ru
        fa = page_of(await s.fetch(sub, browser("fa-IR,fa;q=0.9")))
        assert '<html lang="fa" dir="rtl">' in fa and ">فعال<" in fa and "افزودن به Happ" in fa
        # none of ours: the user's own language (from the bot), not the default
        uk = page_of(await s.fetch(sub, browser("de-DE,de;q=0.9")))
        assert '<html lang="uk"' in uk and ">Активна<" in uk


async def test_a_plan_title_or_profile_name_with_markup_is_escaped(write_config, db_dsn):
    evil_plans = PLANS.replace('title = "Five devices"', 'title = "<script>alert(1)</script>"')
    path = write_config(
        evil_plans,
        database={"dsn": db_dsn, "pool_min": 1, "pool_max": 4},
        http={"listen": f"127.0.0.1:{free_port()}"},
        shutdown={"grace_seconds": 1.0},
        xray={**XRAY, "link_name": '</title><img src=x onerror="alert(2)">'},
    )
    async with serving(path) as s:
        sub = await s.subscribe(34, "five")
        page = page_of(await s.fetch(sub, browser()))
        assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
        assert "<img src=x" not in page and "&lt;/title&gt;&lt;img src=x onerror=&quot;alert(2)&quot;&gt;" in page
        assert page.count("<script>") == 1 and page.count("<title>") == 1


async def test_unknown_tokens_are_the_same_404_for_browsers(config_file):
    async with serving(config_file()) as s:
        await s.subscribe(35, "five")
        with trio.fail_after(10):
            for path in ("/sub/" + "A" * 32, "/sub/short", "/sub/" + "x" * 200, "/sub/bad%20token%20here%20ok"):
                as_app = await s.client.get(path)
                as_browser = await s.client.get(path, headers=browser())
                assert as_browser.status_code == as_app.status_code == 404, path
                assert as_browser.content == as_app.content and "<html" not in as_browser.text


async def test_expired_revoked_and_over_quota(config_file, db_dsn):
    async with serving(config_file(), bot_username="shop_vpn_bot") as s:
        sub = await s.subscribe(36, "five")
        sql(db_dsn, "UPDATE subscriptions SET traffic_blocked = true WHERE user_id = 36")
        page = page_of(await s.fetch(sub, browser()))
        assert 'data-status="over_quota"' in page and "buy extra traffic" in page
        assert 'href="https://t.me/shop_vpn_bot"' in page

        sql(db_dsn, "UPDATE subscriptions SET expires_at = now() - interval '2 days' WHERE user_id = 36")
        page = page_of(await s.fetch(sub, browser()))
        assert 'data-status="expired"' in page and ">Expired<" in page and "Days left" not in page
        assert "Renew it to connect again" in page and 'href="https://t.me/shop_vpn_bot"' in page

        sql(db_dsn, "UPDATE subscriptions SET status = 'revoked' WHERE user_id = 36")
        page = page_of(await s.fetch(sub, browser()))
        assert 'data-status="revoked"' in page and ">Revoked<" in page
        assert sql(db_dsn, "SELECT count(*) FROM devices") == [(0,)]


async def test_without_a_bot_username_there_is_no_renew_link(config_file, db_dsn):
    async with serving(config_file()) as s:
        sub = await s.subscribe(37, "five")
        sql(db_dsn, "UPDATE subscriptions SET expires_at = now() - interval '1 day' WHERE user_id = 37")
        page = page_of(await s.fetch(sub, browser()))
        assert "Renew it to connect again" in page and "t.me" not in page


async def test_a_key_being_prepared(write_config: Callable[..., Path], db_dsn):
    path = write_config(
        PLANS,
        database={"dsn": db_dsn, "pool_min": 1, "pool_max": 4},
        http={"listen": f"127.0.0.1:{free_port()}"},
        shutdown={"grace_seconds": 1.0},
        xray={**XRAY, "public_key": ""},
    )
    async with serving(path) as s:
        sub = await s.subscribe(38, "five")
        assert (await s.fetch(sub, happ("p-1"))).status_code == 503  # apps: as before
        page = page_of(await s.fetch(sub, browser()))
        assert 'data-status="preparing"' in page and "check again in a few minutes" in page


async def test_browsers_share_the_tokens_rate_limit(config_file):
    async with serving(config_file(), limiter=TokenRateLimiter(burst=3, refill_seconds=60)) as s:
        sub: Subscription = await s.subscribe(39, "five")
        for _ in range(2):
            assert (await s.fetch(sub, browser())).status_code == 200
        assert (await s.fetch(sub, {"user-agent": "v2rayN/6.45"})).status_code == 200
        limited = await s.fetch(sub, browser())
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) > 0
        assert (await s.fetch(sub, happ("x"))).status_code == 429
