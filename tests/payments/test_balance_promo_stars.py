"""Balance payments under concurrency, promo code limits, and the Telegram Stars path."""

from __future__ import annotations

import datetime as dt
from typing import Any

import psycopg
import pytest
import trio

from tests.payments.conftest import IO_TIMEOUT, Env
from vpnd.db import promo
from vpnd.db.payments import finalize_purchase
from vpnd.payments import InsufficientBalance, MethodUnavailable, PurchaseNotPayable
from vpnd.payments.service import (
    PRE_CHECKOUT_ALREADY_PAID,
    PRE_CHECKOUT_EXPIRED,
    PRE_CHECKOUT_MISMATCH,
    PRE_CHECKOUT_UNKNOWN,
    apply_promo_code,
    check_pre_checkout,
    finalize_stars_payment,
    pay_purchase_with_balance,
    pay_with_balance,
    quote_plan,
    rules_of,
    start_cryptopay_purchase,
    start_stars_purchase,
)

# --- balance ----------------------------------------------------------------------------------


async def test_balance_never_negative_under_50_concurrent_payments(env: Env) -> None:
    rich, poor = await env.add_user(4001, balance_minor=1600), await env.add_user(4002, balance_minor=400)
    results: list[str] = []

    async def attempt(user: int, plan: str) -> None:
        try:
            outcome = await pay_with_balance(env.app, user, plan)
            results.append(outcome.status)
        except InsufficientBalance:
            results.append("insufficient")

    with trio.fail_after(IO_TIMEOUT):
        async with trio.open_nursery() as nursery:
            for i in range(50):
                # One plan for the rich user: another plan bought while one runs is a pro-rata switch
                # (tests/payments/test_upgrade.py), not more days of the same.
                if i % 2:
                    nursery.start_soon(attempt, rich, "m1")
                else:
                    nursery.start_soon(attempt, poor, "m1" if i % 3 else "m3")

    # 16.00: three m1 (4.99) → 1.03 left — whatever the order, never below zero.
    balances = dict(env.sql("SELECT id, balance_minor FROM users"))
    sums = dict(env.sql("SELECT user_id, sum(delta_minor) FROM balance_ledger GROUP BY user_id"))
    assert balances == {rich: sums[rich], poor: sums[poor]}
    assert all(b >= 0 for b in balances.values())
    charged = env.scalar("SELECT coalesce(-sum(delta_minor), 0) FROM balance_ledger WHERE reason = 'purchase'")
    assert charged == 1600 + 400 - sum(balances.values())
    paid = env.scalar("SELECT count(*) FROM purchases WHERE status = 'paid'")
    assert results.count("granted") == paid == env.scalar("SELECT count(*) FROM payments") > 0
    assert results.count("insufficient") == 50 - paid
    assert poor not in {r[0] for r in env.sql("SELECT user_id FROM payments")}  # 4.00 covers no plan
    # Each paid purchase extended the subscription by its plan's days, exactly.
    days = env.scalar("SELECT sum(days) FROM purchases WHERE status = 'paid'")
    length = env.scalar("SELECT expires_at - starts_at FROM subscriptions WHERE user_id = %s", (rich,))
    assert abs(length - dt.timedelta(days=days)) < dt.timedelta(seconds=30)
    # A refused attempt left no purchase behind: only paid ones exist.
    assert env.scalar("SELECT count(*) FROM purchases WHERE status <> 'paid'") == 0


async def test_balance_payment_of_a_purchase_is_once(env: Env) -> None:
    user = await env.add_user(4003, balance_minor=2000)

    def create(conn: psycopg.Connection[Any]) -> int:
        from vpnd.db.purchases import create_purchase
        from vpnd.pricing import plan_offer

        plan = env.app.config.plan("m1")
        assert plan is not None
        return create_purchase(conn, user, plan_offer(plan), method="balance", ttl_minutes=30, min_price_minor=50).id

    purchase_id = await env.app.db.run(create)
    outcomes: list[str] = []

    async def attempt() -> None:
        try:
            outcomes.append((await pay_purchase_with_balance(env.app, user, purchase_id)).status)
        except PurchaseNotPayable as exc:
            outcomes.append(exc.reason_key)

    with trio.fail_after(IO_TIMEOUT):
        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(attempt)
    assert sorted(outcomes) == ["granted"] + ["payments.already_paid"] * 19
    assert env.scalar("SELECT balance_minor FROM users WHERE id = %s", (user,)) == 2000 - 499
    with pytest.raises(MethodUnavailable):
        await pay_with_balance(env.app, user, "eur")  # priced in another currency than the balance


# --- promo codes ------------------------------------------------------------------------------


async def test_promo_with_one_use_left_and_ten_concurrent_purchases(env: Env) -> None:
    await env.app.db.run(promo.create_promo, "last1", 50, max_uses=3)
    env.sql("UPDATE promo_codes SET used_count = 2 WHERE code = 'LAST1'")  # one use left
    users = [await env.add_user(5000 + i) for i in range(10)]
    for user in users:
        assert (await apply_promo_code(env.app, user, " last1 ")).ok
    assert (await quote_plan(env.app, users[0], "m1")).price.amount_minor == 250

    with trio.fail_after(IO_TIMEOUT):
        bought = []
        async with trio.open_nursery() as nursery:

            async def buy(user: int) -> None:
                bought.append(await start_cryptopay_purchase(env.app, env.client, user, plan_code="m1"))

            for user in users:
                nursery.start_soon(buy, user)
        prices = sorted(p.amount_minor for p, _ in bought)
        assert prices == [250] + [499] * 9  # exactly one purchase got the discount
        for purchase, _ in bought:
            assert purchase.invoice_id is not None
            env.fake.pay(purchase.invoice_id)
        await env.fake.wait_until(lambda: len(env.fake.successful_deliveries()) == 10)
    assert env.scalar("SELECT used_count FROM promo_codes") == 3
    assert env.scalar("SELECT count(*) FROM promo_redemptions") == 1
    assert env.scalar("SELECT count(*) FROM payments WHERE outcome = 'granted'") == 10
    # The code is used up: it is forgotten by the others and refused from now on.
    assert env.scalar("SELECT count(*) FROM users WHERE pending_promo_code IS NOT NULL") <= 9
    check = await apply_promo_code(env.app, users[0], "LAST1")
    assert check.reason in ("promo.exhausted", "promo.already_used")


async def test_promo_limit_holds_at_finalize_even_past_reservations(env: Env) -> None:
    """Ten paid purchases all carrying a 1-use code (e.g. reservations that lapsed): counted once."""
    await env.app.db.run(promo.create_promo, "ONE", 20, max_uses=1)
    users = [await env.add_user(5100 + i) for i in range(10)]
    ids = [
        env.scalar(
            "INSERT INTO purchases (user_id, kind, plan_code, days, method, amount_minor, currency, promo_code, "
            "discount_percent, expires_at) VALUES (%s, 'plan', 'm1', 30, 'stars', 400, 'USD', 'ONE', 20, "
            "now() + interval '30 minutes') RETURNING id",
            (user,),
        )
        for user in users
    ]
    env.sql("UPDATE purchases SET stars = 200, list_amount_minor = 499")
    rules = rules_of(env.app)
    with trio.fail_after(IO_TIMEOUT):
        async with trio.open_nursery() as nursery:
            for purchase_id in ids:
                nursery.start_soon(
                    lambda pid: env.app.db.run(
                        finalize_purchase, pid, provider="stars", provider_payment_id=f"ch{pid}",
                        amount_minor=200, currency="XTR", rules=rules,
                    ),
                    purchase_id,
                )  # fmt: skip
    assert env.scalar("SELECT used_count FROM promo_codes WHERE code = 'ONE'") == 1
    assert env.scalar("SELECT count(*) FROM promo_redemptions") == 1
    # One discounted grant; the nine others paid 4.00 at a discount that no longer existed: valued at
    # the list price (4.99) that buys no plan, so it all went to their balances, flagged and alerted.
    assert env.scalar("SELECT count(*) FROM subscriptions") == 1
    assert env.sql("SELECT repriced, granted_days, credited_minor, count(*) FROM payments GROUP BY 1, 2, 3") == [
        (False, 30, 0, 1),
        (True, None, 400, 9),
    ]
    assert env.scalar("SELECT count(*) FROM users WHERE balance_minor = 400") == 9
    assert env.scalar("SELECT count(*) FROM outbox WHERE dedupe_key LIKE 'alert:payment_flagged:%%'") == 9 * 2


async def test_promo_validation_reasons(env: Env) -> None:
    user = await env.add_user(5200)
    await env.app.db.run(promo.create_promo, "OFF", 10)
    await env.app.db.run(promo.create_promo, "OLD", 10, expires_at=dt.datetime(2020, 1, 1, tzinfo=dt.UTC))
    await env.app.db.run(promo.create_promo, "GONE", 10)
    assert await env.app.db.run(promo.disable_promo, "gone")
    with pytest.raises(promo.PromoExists):
        await env.app.db.run(promo.create_promo, "off", 30)
    assert (await apply_promo_code(env.app, user, "nope")).reason == "promo.not_found"
    assert (await apply_promo_code(env.app, user, "old")).reason == "promo.expired"
    assert (await apply_promo_code(env.app, user, "gone")).reason == "promo.inactive"
    assert (await apply_promo_code(env.app, user, "@#!")).reason == "promo.not_found"
    assert env.scalar("SELECT pending_promo_code FROM users WHERE id = %s", (user,)) is None
    assert (await apply_promo_code(env.app, user, "off")).ok
    # Bought with the code: consumed, then refused as already used.
    stars = await start_stars_purchase(env.app, user, "m1")
    assert (stars.purchase.amount_minor, stars.amount, stars.purchase.promo_code) == (450, 225, "OFF")
    await finalize_stars_payment(
        env.app, stars.payload, telegram_payment_charge_id="c1", total_amount=225, currency="XTR"
    )
    assert env.scalar("SELECT pending_promo_code FROM users WHERE id = %s", (user,)) is None
    assert (await apply_promo_code(env.app, user, "off")).reason == "promo.already_used"
    listed = await env.app.db.run(promo.list_promos, limit=2)
    assert [p.code for p in listed] == ["GONE", "OFF"]
    assert [p.code for p in await env.app.db.run(promo.list_promos, after_code="OFF")] == ["OLD"]
    assert [p.used_count for p in listed] == [0, 1]


# --- Telegram Stars ---------------------------------------------------------------------------


async def test_stars_pre_checkout_and_successful_payment_twice(env: Env) -> None:
    user = await env.add_user(6001)
    stranger = await env.add_user(6002)
    with trio.fail_after(IO_TIMEOUT):
        invoice = await start_stars_purchase(env.app, user, "m3")
        assert (invoice.currency, invoice.amount, invoice.payload) == ("XTR", 600, str(invoice.purchase.id))
        ok = await check_pre_checkout(env.app, invoice.payload, 600, "XTR", user_id=user)
        assert ok == (True, None)
        assert await check_pre_checkout(env.app, invoice.payload, 599, "XTR", user_id=user) == (
            False,
            PRE_CHECKOUT_MISMATCH,
        )
        assert await check_pre_checkout(env.app, invoice.payload, 600, "USD", user_id=user) == (
            False,
            PRE_CHECKOUT_MISMATCH,
        )
        assert (await check_pre_checkout(env.app, invoice.payload, 600, "XTR", user_id=stranger))[1] == (
            PRE_CHECKOUT_UNKNOWN
        )
        assert (await check_pre_checkout(env.app, "garbage", 600, "XTR"))[1] == PRE_CHECKOUT_UNKNOWN
        assert (await check_pre_checkout(env.app, "99999999999999999999999", 600, "XTR"))[1] == PRE_CHECKOUT_UNKNOWN

        outcomes = []
        for _ in range(2):
            outcomes.append(
                await finalize_stars_payment(
                    env.app,
                    invoice.payload,
                    telegram_payment_charge_id="stxCHARGE1",
                    total_amount=600,
                    currency="XTR",
                )
            )
        assert [o.status for o in outcomes] == ["granted", "already_paid"]
        assert (await check_pre_checkout(env.app, invoice.payload, 600, "XTR"))[1] == PRE_CHECKOUT_ALREADY_PAID
    assert env.sql("SELECT provider, provider_payment_id, amount_minor, currency, outcome FROM payments") == [
        ("stars", "stxCHARGE1", 600, "XTR", "granted")
    ]
    expires = env.scalar("SELECT expires_at - now() FROM subscriptions WHERE user_id = %s", (user,))
    assert dt.timedelta(days=89) < expires <= dt.timedelta(days=90)
    assert env.scalar("SELECT count(*) FROM outbox WHERE chat_id = %s", (user,)) == 1


async def test_stars_pre_checkout_refuses_expired_purchases(env: Env) -> None:
    user = await env.add_user(6003)
    with trio.fail_after(IO_TIMEOUT):
        old = await start_stars_purchase(env.app, user, "m1")
        new = await start_stars_purchase(env.app, user, "m1")  # supersedes the old one
        assert await check_pre_checkout(env.app, old.payload, 250, "XTR") == (False, PRE_CHECKOUT_EXPIRED)
        env.sql("UPDATE purchases SET expires_at = now() - interval '1 second' WHERE id = %s", (new.purchase.id,))
        assert await check_pre_checkout(env.app, new.payload, 250, "XTR") == (False, PRE_CHECKOUT_EXPIRED)
        # Telegram took the Stars anyway (the pre-checkout answer raced the expiry): granted, flagged late.
        outcome = await finalize_stars_payment(
            env.app, new.payload, telegram_payment_charge_id="late1", total_amount=250, currency="XTR"
        )
    assert (outcome.status, outcome.paid_late) == ("granted", True)
    with pytest.raises(MethodUnavailable):
        await start_stars_purchase(env.app, user, "eur")  # no Stars price


async def test_stars_wrong_amount_at_payment_is_a_mismatch(env: Env) -> None:
    user = await env.add_user(6004)
    invoice = await start_stars_purchase(env.app, user, "m1")
    outcome = await finalize_stars_payment(
        env.app, invoice.payload, telegram_payment_charge_id="x1", total_amount=1, currency="XTR"
    )
    assert outcome.status == "amount_mismatch"
    assert env.scalar("SELECT count(*) FROM subscriptions") == 0
    assert env.scalar("SELECT count(*) FROM outbox WHERE dedupe_key LIKE 'alert:payment_mismatch:%%'") == 2
