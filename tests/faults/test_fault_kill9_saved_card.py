"""kill -9 between a saved-card renewal charge and its record: after the restart, one period, one charge.

`python -m vpnd run` renews every few hundred milliseconds. The fake YooKassa makes each saved-card
charge at once but withholds its answer (`hold_saved_charges`), with notifications off: the daemon
has committed the purchase and the period's claim, the card is charged, and nothing of the charge is
recorded when it is SIGKILLed. Restarted, the renewal asks again with the same (user, period) key,
gets the same payment back and grants it: every user is charged once and extended by one period.
"""

from __future__ import annotations

import datetime as dt
import uuid
from pathlib import Path

import psycopg
import pytest
import trio

from tests.faults.support import Supervisor, daemon_sections, until
from tests.harness import config_text, scalar, sql
from vpnd_sandbox.postgres import free_port
from vpnd_sandbox.telegram_fake import FakeTelegram
from vpnd_sandbox.yookassa import FakeYooKassa, serve_fake_yookassa

USERS = range(810_001, 810_011)
PLANS = '\n[[plans]]\ncode = "r1"\ntitle = "1 month"\ndays = 30\nprice = "299.00"\ncurrency = "RUB"\n'


def seed(dsn: str, shop: FakeYooKassa) -> dict[int, dt.datetime]:
    """Users with a saved card (known to the fake) and a paid r1 subscription ending in 12 hours."""
    with psycopg.connect(dsn) as conn:
        for uid in USERS:
            method_id = str(uuid.uuid4())
            shop.saved_methods[method_id] = {"type": "bank_card", "id": method_id, "saved": True}
            conn.execute("INSERT INTO users (id, referral_code) VALUES (%s, 'ref' || %s::text)", (uid, uid))
            conn.execute(
                "INSERT INTO saved_payment_methods (user_id, provider, method_id) VALUES (%s, 'yookassa', %s)",
                (uid, method_id),
            )
            conn.execute(
                "INSERT INTO subscriptions (user_id, kind, status, uuid, sub_token, plan_code, expires_at, auto_renew) "
                "VALUES (%s, 'paid', 'active', gen_random_uuid(), 'tok' || %s::text, 'r1', "
                "date_trunc('second', now()) + interval '12 hours', true)",
                (uid, uid),
            )
    return dict(sql(dsn, "SELECT user_id, expires_at FROM subscriptions"))


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_sigkill_between_card_charge_and_record_charges_once(
    fake_telegram: tuple[FakeTelegram, str], db_dsn: str, tmp_path: Path
) -> None:
    telegram, telegram_url = fake_telegram
    port = free_port()
    shop = FakeYooKassa(notifications_enabled=False, hold_saved_charges=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_fake_yookassa, shop)
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
            workers={"renewal_interval": 0.3},
        )  # fmt: skip
        config_path = tmp_path / "config.toml"
        config_path.write_text(config_text(sections, PLANS))
        supervisor = Supervisor(nursery, config_path, tmp_path, port)
        await supervisor.start()
        before = seed(db_dsn, shop)
        try:
            with trio.fail_after(60):
                await shop.wait_until(lambda: len(shop.saved_charges()) >= 1)  # charged, its answer withheld
        except trio.TooSlowError:
            raise AssertionError(f"no card charge within 60 s; daemon log:\n{supervisor.tail()}") from None
        assert scalar(db_dsn, "SELECT count(*) FROM checkout_payments") == 0  # nothing of it recorded
        await supervisor.kill()
        assert len(shop.saved_charges()) == 1
        shop.release()
        shop.notifications_enabled = True
        await supervisor.start()
        try:
            await until(
                lambda: scalar(db_dsn, "SELECT count(*) FROM auto_renewals WHERE outcome = 'charged'") == len(USERS),
                timeout=60,
                step=0.25,
            )
        except trio.TooSlowError:
            raise AssertionError(f"no convergence within 60 s; daemon log:\n{supervisor.tail()}") from None
        assert await supervisor.stop() == 0, supervisor.tail()
        nursery.cancel_scope.cancel()

    charged = [p["payment_method"]["id"] for p in shop.saved_charges()]
    assert len(charged) == len(USERS) == len(set(charged))  # one charge per user at the provider
    after = dict(sql(db_dsn, "SELECT user_id, expires_at FROM subscriptions"))
    assert after == {uid: end + dt.timedelta(days=30) for uid, end in before.items()}
    rows = sql(db_dsn, "SELECT provider, outcome, count(*) FROM payments GROUP BY 1, 2")
    assert rows == [("yookassa", "granted", len(USERS))]
    assert scalar(db_dsn, "SELECT count(*) FROM balance_ledger WHERE reason = 'auto_renew'") == 0
