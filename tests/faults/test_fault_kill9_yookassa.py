"""kill -9 during YooKassa payments: 200 card payments paid while the daemon is SIGKILLed and restarted.

`python -m vpnd run` serves the notification route and the watcher (every second); the payments are
paid in the fake YooKassa while the daemon is killed at random moments (seeded) and restarted at once,
as systemd would. Notifications fail while it is down (retried a few times, then given up), so some
payments reach vpnd only through the watcher. At the end every payment is granted exactly once: one
payment row, 30 days, one "payment received" outbox row.
"""

from __future__ import annotations

import collections
import datetime as dt
import os
import random
from pathlib import Path

import psycopg
import pytest
import trio

from tests.faults.support import Supervisor, daemon_sections, until
from tests.harness import config_text, open_app, scalar, sql
from vpnd.config import load_config
from vpnd.db.users import upsert_user
from vpnd.payments.checkout import YooKassaCheckout, start_checkout_purchase
from vpnd.yookassa import open_yookassa_client
from vpnd_sandbox.postgres import free_port
from vpnd_sandbox.telegram_fake import FakeTelegram
from vpnd_sandbox.yookassa import FakeYooKassa, serve_fake_yookassa

PURCHASES = 200
FIRST_USER = 700_001
KILLS = 3
SEED = int(os.environ.get("VPND_FAULT_SEED", "20240806"))
PLANS = '\n[[plans]]\ncode = "r1"\ntitle = "1 month"\ndays = 30\nprice = "299.00"\ncurrency = "RUB"\n'


async def create_purchases(config_path: Path, shop: FakeYooKassa) -> dict[str, int]:
    """Through vpnd's own service, in-process: purchase committed, payment created, recorded.

    Returns payment id → purchase id.
    """
    config = load_config(config_path, environ={})
    out: dict[str, int] = {}
    async with (
        open_app(config, single_instance=False) as app,
        open_yookassa_client(shop.shop_id, shop.secret_key, f"{shop.base_url}/v3", timeout=10) as client,
    ):
        with psycopg.connect(config.database.dsn) as conn:
            for uid in range(FIRST_USER, FIRST_USER + PURCHASES):
                upsert_user(conn, uid, f"user{uid}", f"User {uid}", "en")
        for uid in range(FIRST_USER, FIRST_USER + PURCHASES):
            purchase, _ = await start_checkout_purchase(app, YooKassaCheckout(client), uid, "r1", method="bank_card")
            query = "SELECT payment_id FROM checkout_payments WHERE purchase_id = %s"
            payment_id = scalar(config.database.dsn, query, purchase.id)
            out[str(payment_id)] = purchase.id
    return out


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_sigkill_during_200_yookassa_payments_grants_each_exactly_once(
    fake_telegram: tuple[FakeTelegram, str], db_dsn: str, tmp_path: Path
) -> None:
    rng = random.Random(SEED)
    telegram, telegram_url = fake_telegram
    port = free_port()
    shop = FakeYooKassa(notification_attempts=2, retry_delay=0.2)
    kills: list[str] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_fake_yookassa, shop)
        shop.notification_url = f"http://127.0.0.1:{port}/webhooks/yookassa"
        sections = daemon_sections(
            token=telegram.token,
            telegram_url=telegram_url,
            dsn=db_dsn,
            port=port,
            yookassa={
                "enabled": True, "shop_id": shop.shop_id, "secret_key": shop.secret_key,
                "api_base_url": f"{shop.base_url}/v3", "notify_networks": ["127.0.0.1/32"], "poll_interval": 1.0,
            },
            payments={"currency": "RUB", "purchase_ttl_minutes": 120},
        )  # fmt: skip
        config_path = tmp_path / "config.toml"
        config_path.write_text(config_text(sections, PLANS))
        with trio.fail_after(60):
            payments = await create_purchases(config_path, shop)
        assert len(payments) == PURCHASES

        supervisor = Supervisor(nursery, config_path, tmp_path, port)
        await supervisor.start()
        order = list(payments)
        rng.shuffle(order)

        async def pay_all() -> None:
            for index, payment_id in enumerate(order):
                shop.pay(payment_id)
                if index % 10 == 9:
                    await trio.sleep(0.4)

        with trio.fail_after(120):
            async with trio.open_nursery() as payers:
                payers.start_soon(pay_all)
                for _ in range(KILLS):
                    await trio.sleep(rng.uniform(1.0, 3.0))
                    paid = scalar(db_dsn, "SELECT count(*) FROM purchases WHERE status = 'paid'")
                    await supervisor.kill()
                    kills.append(f"{paid} granted")
                    await supervisor.start(ready=False)
            await supervisor.wait_ready(supervisor.current)
        assert all(p["status"] == "succeeded" for p in shop.payments.values())
        try:
            await until(
                lambda: scalar(db_dsn, "SELECT count(*) FROM purchases WHERE status = 'paid'") == PURCHASES,
                timeout=60,
                step=0.25,
            )
        except trio.TooSlowError:
            raise AssertionError(f"no convergence within 60 s; daemon log:\n{supervisor.tail()}") from None
        assert await supervisor.stop() == 0, supervisor.tail()
        nursery.cancel_scope.cancel()

    rows = sql(db_dsn, "SELECT purchase_id, provider, provider_payment_id, outcome FROM payments")
    assert len(rows) == PURCHASES
    assert {(r[0], r[2]) for r in rows} == {(purchase_id, pid) for pid, purchase_id in payments.items()}
    assert collections.Counter((r[1], r[3]) for r in rows) == {("yookassa", "granted"): PURCHASES}
    spans = sql(db_dsn, "SELECT expires_at - starts_at FROM subscriptions")
    assert len(spans) == PURCHASES and all(span == dt.timedelta(days=30) for (span,) in spans)
    assert scalar(db_dsn, "SELECT count(*) FROM outbox WHERE dedupe_key LIKE 'payment:%%'") == PURCHASES
    acknowledged = len({d.object_id for d in shop.deliveries if d.status_code == 200})
    print(
        f"\nkill -9 during YooKassa payments (seed {SEED}): {PURCHASES} payments, SIGKILLs at: {', '.join(kills)}; "
        f"{acknowledged} acknowledged by a notification, the watcher finalized the rest"
    )
