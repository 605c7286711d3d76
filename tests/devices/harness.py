"""Helpers of the device tests: vpnd's HTTP nursery serving `/sub/<token>` on loopback, a real PostgreSQL."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio

from tests.harness import open_app
from tests.keys import PUBLIC_KEY
from vpnd.app import App
from vpnd.config import load_config
from vpnd.db import subscriptions
from vpnd.db.users import upsert_user
from vpnd.nurseries.http import build_router, run_http
from vpnd.subscription_url import TokenRateLimiter, add_subscription_routes
from vpnd.xray.links import decode_subscription_body

XRAY = {
    "host": "vpn.example.com",
    "port": 8443,
    "public_key": PUBLIC_KEY,
    "short_id": "6ba85179e30d4fc2",
    "sni": "www.microsoft.com",
    "link_name": "Fast VPN #1",
}

#: Plans with device limits: "five" (5 devices, 10 GB a month), "free" (no device limit).
PLANS = """
[[plans]]
code = "five"
title = "Five devices"
days = 30
price = "9.99"
currency = "USD"
devices = 5
traffic_gb = 10
traffic_reset = "monthly"

[[plans]]
code = "free"
title = "Unlimited"
days = 30
price = "19.99"
currency = "USD"
"""


def happ(hwid: str, *, os: str = "Android", version: str = "14", model: str = "Pixel 8") -> dict[str, str]:
    """The headers Happ sends with a subscription fetch."""
    return {
        "x-hwid": hwid,
        "x-device-os": os,
        "x-ver-os": version,
        "x-device-model": model,
        "user-agent": "Happ/3.1.0",
    }


def title_of(response: httpx.Response) -> str:
    value = response.headers["profile-title"]
    assert value.startswith("base64:")
    return base64.b64decode(value.removeprefix("base64:")).decode()


def announce_of(response: httpx.Response) -> str | None:
    value = response.headers.get("announce")
    return None if value is None else base64.b64decode(value.removeprefix("base64:")).decode()


def links_of(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return decode_subscription_body(response.content)


@attrs.define
class Served:
    app: App
    client: httpx.AsyncClient

    async def subscribe(self, user_id: int, plan: str | None, language: str = "en") -> subscriptions.Subscription:
        def work(conn: Any) -> subscriptions.Subscription:
            upsert_user(conn, user_id, None, "x", language)
            return subscriptions.grant_days(conn, user_id, 30, kind="paid", plan_code=plan)

        return await self.app.db.run(work)

    async def fetch(self, sub: subscriptions.Subscription, headers: dict[str, Any] | None = None) -> httpx.Response:
        with trio.fail_after(10):
            return await self.client.get(f"/sub/{sub.sub_token}", headers=headers or {})


@asynccontextmanager
async def serving(
    config_file: Path, limiter: TokenRateLimiter | None = None, *, bot_username: str = ""
) -> AsyncIterator[Served]:
    # not `limiter or ...`: an empty limiter has len() 0, so it is falsy
    limiter = limiter if limiter is not None else TokenRateLimiter(burst=1000, refill_seconds=0.01)
    async with open_app(load_config(config_file), single_instance=False) as app:
        async with trio.open_nursery() as nursery:
            router = build_router(app)
            add_subscription_routes(router, app, limiter=limiter, bot_username=bot_username)
            with trio.fail_after(10):
                url = await nursery.start(run_http, app, router)
            async with httpx.AsyncClient(base_url=f"http://{url.split('://')[-1]}", timeout=10) as client:
                yield Served(app, client)
            app.lifecycle.request_stop("test")
