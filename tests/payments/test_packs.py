"""Traffic packs: bought with the balance, Crypto Pay (a replayed webhook grants once) and Stars; refused
without a quota, credited to the balance when the quota is gone by the time the payment lands; refunded."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import trio

from tests.payments.conftest import IO_TIMEOUT, PLANS, Env, open_env
from vpnd.config import GIB
from vpnd.db.payments import reverse_refunded_purchase
from vpnd.db.purchases import PackNotAvailable
from vpnd.payments.service import (
    finalize_stars_payment,
    pay_with_balance,
    rules_of,
    start_cryptopay_purchase,
    start_stars_purchase,
)

PACK_PLANS = (
    PLANS
    + """
[[plans]]
code = "q1"
title = "1 month, 10 GB"
days = 30
price = "3.00"
currency = "USD"
stars = 150
traffic_gb = 10
traffic_reset = "per_period"

[[traffic_packs]]
code = "gb5"
title = { en = "+5 GB" }
gb = 5
price = "1.00"
currency = "USD"
stars = 50
"""
)


@pytest.fixture
async def penv(make_config: Callable[..., Any], db_dsn: str) -> AsyncIterator[Env]:
    async with open_env(make_config, db_dsn, plans=PACK_PLANS) as opened:
        yield opened


def period(env: Env, user: int) -> tuple[int, int]:
    """(used_bytes, extra_bytes) of the user's current traffic period."""
    rows = env.sql("SELECT used_bytes, extra_bytes FROM traffic_periods WHERE user_id = %s AND current", (user,))
    assert len(rows) == 1
    return rows[0][0], rows[0][1]


def last_text(env: Env, user: int) -> str:
    text: str = env.scalar("SELECT payload->>'text' FROM outbox WHERE chat_id = %s ORDER BY id DESC LIMIT 1", (user,))
    return text


async def subscriber(env: Env, user_id: int, *, plan: str = "q1", balance_minor: int = 1000) -> int:
    user = await env.add_user(user_id, balance_minor=balance_minor + 300)
    await pay_with_balance(env.app, user, plan)
    return user


async def test_pack_from_the_balance_adds_to_the_period_and_lifts_the_block(penv: Env) -> None:
    user = await subscriber(penv, 8001)
    # Used up: 10 GB of 10, taken off Xray (the state the quota worker leaves).
    penv.sql(
        "INSERT INTO traffic_periods (user_id, started_at, ends_at, used_bytes, notified) "
        "SELECT user_id, starts_at, expires_at, %s, 100 FROM subscriptions WHERE user_id = %s",
        (10 * GIB, user),
    )
    penv.sql("UPDATE subscriptions SET traffic_blocked = true WHERE user_id = %s", (user,))

    outcome = await pay_with_balance(penv.app, user, "gb5", pack=True)
    assert outcome.status == "granted"
    assert period(penv, user) == (10 * GIB, 5 * GIB)
    assert penv.scalar("SELECT traffic_blocked FROM subscriptions WHERE user_id = %s", (user,)) is False
    assert penv.sql(
        "SELECT p.amount_minor, p.granted_bytes, p.granted_days, u.kind, u.plan_code, u.pack_bytes "
        "FROM payments p JOIN purchases u ON u.id = p.purchase_id WHERE p.purchase_id = %s",
        (outcome.purchase_id,),
    ) == [(100, 5 * GIB, None, "pack", "gb5", 5 * GIB)]
    assert penv.scalar("SELECT balance_minor FROM users WHERE id = %s", (user,)) == 1000 - 100
    assert "5 GB of traffic added: you have used 10 GB of 15 GB" in last_text(penv, user)


async def test_pack_by_crypto_pay_replayed_webhook_grants_once(penv: Env) -> None:
    user = await subscriber(penv, 8002)
    penv.fake.webhook_copies = 4
    with trio.fail_after(IO_TIMEOUT):
        purchase, _url = await start_cryptopay_purchase(penv.app, penv.client, user, plan_code="gb5", pack=True)
        assert (purchase.kind, purchase.amount_minor, purchase.currency) == ("pack", 100, "USD")
        assert purchase.invoice_id is not None
        penv.fake.pay(purchase.invoice_id)
        await penv.fake.wait_until(lambda: len(penv.fake.successful_deliveries()) == 4)
        while penv.scalar("SELECT status FROM purchases WHERE id = %s", (purchase.id,)) != "paid":
            await trio.sleep(0.02)
    assert period(penv, user) == (0, 5 * GIB)  # once, not four times
    assert penv.scalar("SELECT count(*) FROM payments WHERE purchase_id = %s", (purchase.id,)) == 1
    assert "0 B of 15 GB" in last_text(penv, user)


async def test_pack_with_stars_twice_delivered_grants_once(penv: Env) -> None:
    user = await subscriber(penv, 8003)
    with trio.fail_after(IO_TIMEOUT):
        invoice = await start_stars_purchase(penv.app, user, "gb5", pack=True)
        assert (invoice.currency, invoice.amount, invoice.title) == ("XTR", 50, "+5 GB")
        statuses = [
            (
                await finalize_stars_payment(
                    penv.app, invoice.payload, telegram_payment_charge_id="pack-charge", total_amount=50, currency="XTR"
                )
            ).status
            for _ in range(2)
        ]
    assert statuses == ["granted", "already_paid"]
    assert period(penv, user) == (0, 5 * GIB)


async def test_pack_refused_without_a_quota_and_credited_when_the_quota_is_gone_at_payment(penv: Env) -> None:
    unlimited = await subscriber(penv, 8004, plan="m1")
    with pytest.raises(PackNotAvailable):
        await pay_with_balance(penv.app, unlimited, "gb5", pack=True)
    with trio.fail_after(IO_TIMEOUT), pytest.raises(PackNotAvailable):
        await start_cryptopay_purchase(penv.app, penv.client, unlimited, plan_code="gb5", pack=True)
    nobody = await penv.add_user(8005)
    with pytest.raises(PackNotAvailable):
        await start_stars_purchase(penv.app, nobody, "gb5", pack=True)
    assert penv.scalar("SELECT count(*) FROM purchases WHERE kind = 'pack'") == 0

    # Bought while on the quota plan; by the time the payment lands the plan has no quota any more.
    user = await subscriber(penv, 8006)
    with trio.fail_after(IO_TIMEOUT):
        purchase, _url = await start_cryptopay_purchase(penv.app, penv.client, user, plan_code="gb5", pack=True)
    penv.sql("UPDATE subscriptions SET plan_code = 'm1' WHERE user_id = %s", (user,))
    balance = penv.scalar("SELECT balance_minor FROM users WHERE id = %s", (user,))
    assert purchase.invoice_id is not None
    penv.fake.pay(purchase.invoice_id)
    with trio.fail_after(IO_TIMEOUT):
        while penv.scalar("SELECT status FROM purchases WHERE id = %s", (purchase.id,)) != "paid":
            await trio.sleep(0.02)
    assert penv.scalar("SELECT balance_minor FROM users WHERE id = %s", (user,)) == balance + 100
    assert penv.sql("SELECT granted_bytes, credited_minor FROM payments WHERE purchase_id = %s", (purchase.id,)) == [
        (None, 100)
    ]
    assert penv.scalar("SELECT count(*) FROM traffic_periods WHERE user_id = %s AND extra_bytes > 0", (user,)) == 0
    assert "1.00 USD was credited to your balance instead" in last_text(penv, user)


async def test_refunded_pack_takes_back_what_is_left_of_it(penv: Env) -> None:
    user = await subscriber(penv, 8007)
    outcome = await pay_with_balance(penv.app, user, "gb5", pack=True)
    penv.sql("UPDATE traffic_periods SET used_bytes = %s WHERE user_id = %s AND current", (12 * GIB, user))

    reversal = await penv.app.db.run(reverse_refunded_purchase, outcome.purchase_id, rules=rules_of(penv.app))
    # 15 GB quota, 12 used: 3 GB of the pack are left and taken back; the 2 used are not clawed back.
    assert reversal.recorded and reversal.bytes_taken == 3 * GIB
    assert period(penv, user) == (12 * GIB, 2 * GIB)
    assert "3 GB of extra traffic was taken back" in last_text(penv, user)
    again = await penv.app.db.run(reverse_refunded_purchase, outcome.purchase_id, rules=rules_of(penv.app))
    assert not again.recorded and period(penv, user) == (12 * GIB, 2 * GIB)
