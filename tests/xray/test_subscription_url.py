"""`GET /sub/<token>` served by the HTTP nursery over real HTTP, and the share links behind it."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio

from tests.harness import open_app
from tests.keys import PUBLIC_KEY
from vpnd.app import App
from vpnd.config import load_config
from vpnd.db import subscriptions
from vpnd.db.users import upsert_user
from vpnd.db.xray_state import store_traffic
from vpnd.nurseries.http import build_router, run_http
from vpnd.subscription_url import TokenRateLimiter, add_subscription_routes, user_links
from vpnd.xray.links import decode_subscription_body, parse_vless_link
from vpnd_sandbox.postgres import free_port

XRAY = {
    "host": "vpn.example.com",
    "port": 8443,
    "public_key": PUBLIC_KEY,
    "short_id": "6ba85179e30d4fc2",
    "sni": "www.microsoft.com",
    "fingerprint": "firefox",
    "link_name": "Fast VPN #1",
}


@attrs.define
class Served:
    app: App
    client: httpx.AsyncClient

    async def grant(self, user_id: int, days: int = 30) -> subscriptions.Subscription:
        def work(conn: Any) -> subscriptions.Subscription:
            upsert_user(conn, user_id, None, "x", "en")
            return subscriptions.grant_days(conn, user_id, days, kind="paid")

        return await self.app.db.run(work)


@asynccontextmanager
async def serving(config_file: Path, limiter: TokenRateLimiter | None = None) -> AsyncIterator[Served]:
    async with open_app(load_config(config_file), single_instance=False) as app:
        async with trio.open_nursery() as nursery:
            router = build_router(app)
            add_subscription_routes(router, app, limiter=limiter)
            with trio.fail_after(10):
                url = await nursery.start(run_http, app, router)
            async with httpx.AsyncClient(base_url=f"http://{url.split('://')[-1]}", timeout=5) as client:
                yield Served(app, client)
            app.lifecycle.request_stop("test")


@pytest.fixture
def config_file(write_config: Callable[..., Path], db_dsn: str) -> Callable[..., Path]:
    def make(**xray: Any) -> Path:
        return write_config(
            database={"dsn": db_dsn, "pool_min": 1, "pool_max": 4},
            http={"listen": f"127.0.0.1:{free_port()}"},
            shutdown={"grace_seconds": 1.0},
            xray={**XRAY, **xray},
        )

    return make


async def test_active_subscription_serves_its_link_and_usage(config_file):
    async with serving(config_file()) as s:
        sub = await s.grant(42)
        await s.app.db.run(store_traffic, [(42, 1234, 98765)])
        with trio.fail_after(10):
            response = await s.client.get(f"/sub/{sub.sub_token}")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        assert response.headers["profile-update-interval"] == "12"
        expire = int(sub.expires_at.timestamp())
        assert response.headers["subscription-userinfo"] == f"upload=1234; download=98765; total=0; expire={expire}"
        [link] = decode_subscription_body(response.content)
        assert link == user_links(s.app.config, sub)[0]
        parsed = parse_vless_link(link)
        assert (parsed.uuid, parsed.host, parsed.port, parsed.name) == (
            str(sub.uuid),
            "vpn.example.com",
            8443,
            "Fast VPN #1",
        )
        assert dict(parsed.params) == {
            "type": "tcp",
            "encryption": "none",
            "security": "reality",
            "pbk": PUBLIC_KEY,
            "fp": "firefox",
            "sni": "www.microsoft.com",
            "sid": "6ba85179e30d4fc2",
            "flow": "xtls-rprx-vision",
        }
        with trio.fail_after(10):
            head = await s.client.head(f"/sub/{sub.sub_token}")
        assert head.status_code == 200 and "subscription-userinfo" in head.headers


async def test_unknown_and_malformed_tokens_are_404(config_file):
    async with serving(config_file()) as s:
        await s.grant(1)
        with trio.fail_after(10):
            for path in ("/sub/" + "A" * 32, "/sub/short", "/sub/" + "x" * 200, "/sub/bad%20token%20here%20ok"):
                assert (await s.client.get(path)).status_code == 404, path


async def test_expired_subscription_is_an_empty_list_with_its_expiry(config_file):
    async with serving(config_file()) as s:
        sub = await s.grant(5)
        ended = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(days=2)
        await s.app.db.run(
            lambda conn: conn.execute("UPDATE subscriptions SET expires_at = %s WHERE user_id = 5", (ended,))
        )
        with trio.fail_after(10):
            response = await s.client.get(f"/sub/{sub.sub_token}")
        assert response.status_code == 200
        assert decode_subscription_body(response.content) == []
        assert response.headers["subscription-userinfo"].endswith(f"expire={int(ended.timestamp())}")
        await s.app.db.run(subscriptions.revoke, 5)
        with trio.fail_after(10):
            response = await s.client.get(f"/sub/{sub.sub_token}")
        assert response.status_code == 200 and decode_subscription_body(response.content) == []


async def test_reissue_retires_the_old_url(config_file):
    async with serving(config_file()) as s:
        old = await s.grant(7)
        new = await s.app.db.run(subscriptions.reissue_key, 7)
        with trio.fail_after(10):
            assert (await s.client.get(f"/sub/{old.sub_token}")).status_code == 404
            response = await s.client.get(f"/sub/{new.sub_token}")
        assert parse_vless_link(decode_subscription_body(response.content)[0]).uuid == str(new.uuid)


async def test_rate_limit_per_token(config_file):
    async with serving(config_file(), limiter=TokenRateLimiter(burst=3, refill_seconds=60)) as s:
        first, second = await s.grant(1), await s.grant(2)
        with trio.fail_after(10):
            codes = [(await s.client.get(f"/sub/{first.sub_token}")).status_code for _ in range(4)]
            assert codes == [200, 200, 200, 429]
            limited = await s.client.get(f"/sub/{first.sub_token}")
            assert limited.status_code == 429 and 0 < int(limited.headers["retry-after"]) <= 60
            assert (await s.client.get(f"/sub/{second.sub_token}")).status_code == 200


def test_rate_limiter_refills_and_stays_bounded():
    limiter = TokenRateLimiter(burst=2, refill_seconds=10, max_keys=1000)
    assert limiter.acquire("a", 0.0) == 0 and limiter.acquire("a", 0.0) == 0
    assert limiter.acquire("a", 1.0) == pytest.approx(9.0)
    assert limiter.acquire("a", 11.0) == 0
    for n in range(50_000):
        limiter.acquire(f"token{n}", 20.0)
    assert len(limiter) == 1000


async def test_links_with_an_ipv6_host_and_a_name_with_special_characters(config_file):
    name = "Мой VPN #1 / 100% & more?"
    async with serving(config_file(host="[2001:DB8::1]", link_name=name, flow="")) as s:
        sub = await s.grant(9)
        [link] = user_links(s.app.config, sub)
        assert link.startswith(f"vless://{sub.uuid}@[2001:db8::1]:8443?")
        parsed = parse_vless_link(link)
        assert (parsed.host, parsed.name, parsed.flow) == ("2001:db8::1", name, "")
        with trio.fail_after(10):
            response = await s.client.get(f"/sub/{sub.sub_token}")
        assert decode_subscription_body(response.content) == [link]
