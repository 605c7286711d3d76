"""Payments fixtures: a real PostgreSQL, the fake Crypto Pay over HTTP, vpnd's App and its HTTP server.

`env` starts vpnd with only its HTTP service (`tests.harness.start_vpnd`: the webhook route is there
since Crypto Pay is enabled) on 127.0.0.1, and points the fake Crypto Pay's webhooks at it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import psycopg
import pytest
import trio

from tests.harness import config_sections, merge, scalar, sql, start_vpnd, write_config_file
from vpnd.app import App
from vpnd.compose import Services
from vpnd.config import load_config
from vpnd.cryptopay import CryptoPayClient, open_cryptopay_client
from vpnd.db.users import upsert_user
from vpnd.payments.webhook import WEBHOOK_PATH
from vpnd_sandbox.cryptopay_fake import FakeCryptoPay, serve_fake_cryptopay

IO_TIMEOUT = 20
ADMINS = (900001, 900002)

PLANS = """
[[plans]]
code = "m1"
title = "1 month"
days = 30
price = "4.99"
currency = "USD"
stars = 250

[[plans]]
code = "m3"
title = "3 months"
days = 90
price = "12.00"
currency = "USD"
stars = 600

[[plans]]
code = "eur"
title = "1 month (EUR)"
days = 30
price = "5.00"
currency = "EUR"
"""


@attrs.define(eq=False, kw_only=True)
class PaymentsEnv:
    """A vpnd serving payment routes over HTTP, the test's database and its users: the payment providers'
    test environments (Crypto Pay here, YooKassa in test_yookassa_flow) add their fake and client."""

    app: App
    http_url: str
    dsn: str

    def sql(self, query: str, params: Any = None) -> list[tuple[Any, ...]]:
        """Read (or set up) state on a separate, direct connection — the test's own view."""
        return sql(self.dsn, query, *(params or ()))

    def scalar(self, query: str, params: Any = None) -> Any:
        return scalar(self.dsn, query, *(params or ()))

    async def add_users(self, *user_ids: int) -> None:
        for user_id in user_ids:
            await self.add_user(user_id)

    async def add_user(self, user_id: int, *, balance_minor: int = 0, referred_by: int | None = None) -> int:
        def create(conn: psycopg.Connection[Any]) -> None:
            upsert_user(conn, user_id, f"user{user_id}", f"User {user_id}", "en")
            if referred_by is not None:
                conn.execute("INSERT INTO referrals (referred_id, referrer_id) VALUES (%s, %s)", (user_id, referred_by))
                conn.execute("UPDATE users SET referred_by = %s WHERE id = %s", (referred_by, user_id))
            if balance_minor:
                # Through the ledger, as every balance change goes.
                from vpnd.db import ledger

                ledger.record(conn, user_id, balance_minor, ledger.ADMIN, f"test-seed:{user_id}")

        await self.app.db.run(create)
        return user_id


@attrs.define(eq=False, kw_only=True)
class Env(PaymentsEnv):
    fake: FakeCryptoPay
    client: CryptoPayClient

    @property
    def webhook_url(self) -> str:
        return self.http_url + WEBHOOK_PATH

    def snapshot(self) -> dict[str, Any]:
        """Everything a payment can change, to assert that nothing did."""
        return {
            "purchases": self.sql("SELECT id, status, paid_at, invoice_id, paid_late FROM purchases ORDER BY id"),
            "payments": self.sql("SELECT * FROM payments ORDER BY id"),
            "subscriptions": self.sql("SELECT user_id, expires_at, status FROM subscriptions ORDER BY user_id"),
            "ledger": self.sql("SELECT * FROM balance_ledger ORDER BY id"),
            "balances": self.sql("SELECT id, balance_minor, pending_promo_code FROM users ORDER BY id"),
            "outbox": self.sql("SELECT id, chat_id, dedupe_key FROM outbox ORDER BY id"),
            "promo": self.sql("SELECT code, used_count FROM promo_codes ORDER BY code"),
        }


@pytest.fixture
def make_config(tmp_path: Path, db_dsn: str) -> Callable[..., Any]:
    def make(fake: FakeCryptoPay, *, plans: str = PLANS, **overrides: dict[str, Any]) -> Any:
        payments: dict[str, dict[str, Any]] = {
            "database": {"pool_min": 2, "pool_max": 12},
            "telegram": {"admin_ids": list(ADMINS)},
            "referral": {"percent": 10},
            "payments": {"purchase_ttl_minutes": 30, "min_price": "0.50", "currency": "USD"},
            "cryptopay": {
                "enabled": True,
                "token": fake.token,
                "api_base_url": f"{fake.base_url}/api",
                "poll_interval": 0.5,
            },
            "shutdown": {"grace_seconds": 1},
        }
        sections = merge(config_sections(db_dsn, **payments), overrides)
        return load_config(write_config_file(tmp_path / "config.toml", sections, plans), environ={})

    return make


@pytest.fixture
async def env(make_config: Callable[..., Any], db_dsn: str) -> AsyncIterator[Env]:
    async with open_env(make_config, db_dsn) as opened:
        yield opened


@asynccontextmanager
async def open_env(make_config: Callable[..., Any], db_dsn: str, *, plans: str = PLANS) -> AsyncIterator[Env]:
    """The `env` fixture's vpnd, with `plans` (TOML `[[plans]]`/`[[traffic_packs]]`) instead of `PLANS`."""
    fake = FakeCryptoPay(webhook_retry_delay=0.05)
    async with trio.open_nursery() as outer:
        with trio.fail_after(IO_TIMEOUT):
            await outer.start(serve_fake_cryptopay, fake)
        config = make_config(fake, plans=plans)
        async with open_cryptopay_client(fake.token, f"{fake.base_url}/api", timeout=5) as client:
            with trio.fail_after(IO_TIMEOUT):
                vpnd = await start_vpnd(outer, config, Services.only("listener", "http"), single_instance=False)
            env = Env(app=vpnd.app, fake=fake, client=client, http_url=vpnd.http_url.rstrip("/"), dsn=db_dsn)
            fake.webhook_url = env.webhook_url
            yield env
            fake.webhooks_enabled = False
            await vpnd.stop()
        outer.cancel_scope.cancel()
