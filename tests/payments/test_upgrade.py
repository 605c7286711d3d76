"""Pro-rata upgrades end to end: the quote, the purchase, finalize (balance, Crypto Pay, Stars), a replayed
webhook, and what happens when the upgraded plan changed between the quote and the payment."""

from __future__ import annotations

import datetime as dt

import pytest
import trio

from tests.payments.conftest import IO_TIMEOUT, Env
from vpnd.db.purchases import UpgradeNotOffered
from vpnd.payments.service import (
    finalize_stars_payment,
    pay_with_balance,
    quote_plan,
    start_cryptopay_purchase,
    start_stars_purchase,
)
from vpnd.pricing import UpgradeTerms

DAY = dt.timedelta(days=1)


def half_used(env: Env, user: int) -> None:
    """The running plan has exactly 15 days left (as if half of a 30-day plan was used)."""
    env.sql("UPDATE subscriptions SET expires_at = now() + interval '15 days' WHERE user_id = %s", (user,))


def left(env: Env, user: int) -> dt.timedelta:
    value: dt.timedelta = env.scalar("SELECT expires_at - now() FROM subscriptions WHERE user_id = %s", (user,))
    return value


def user_texts(env: Env, user: int) -> list[str]:
    return [r[0] for r in env.sql("SELECT payload->>'text' FROM outbox WHERE chat_id = %s ORDER BY id", (user,))]


async def wait_paid(env: Env, purchase_id: int) -> None:
    with trio.fail_after(IO_TIMEOUT):
        while env.scalar("SELECT status FROM purchases WHERE id = %s", (purchase_id,)) != "paid":
            await trio.sleep(0.02)


async def test_upgrade_from_the_balance_credits_the_unused_part_and_switches_now(env: Env) -> None:
    user = await env.add_user(7001, balance_minor=2000)
    await pay_with_balance(env.app, user, "m1")  # 4.99 for 30 days
    half_used(env, user)

    quote = await quote_plan(env.app, user, "m3")
    # floor(499 × 15 days / 30 days) = floor(249.5) = 249; 12.00 − 2.49 = 9.51.
    assert quote.upgrade is not None and quote.upgrade.plan_code == "m1"
    assert quote.upgrade_terms == UpgradeTerms(249, 1200, 951)
    assert quote.price.amount_minor == 951 and quote.balance_covers
    assert quote.upgrade_stars is None  # m1 was not paid in Stars: no Stars credit

    outcome = await pay_with_balance(env.app, user, "m3")
    assert outcome.status == "granted"
    assert env.sql("SELECT plan_code, kind FROM subscriptions WHERE user_id = %s", (user,)) == [("m3", "paid")]
    assert 90 * DAY - dt.timedelta(minutes=1) < left(env, user) <= 90 * DAY  # replaced, not 15 + 90 days
    assert env.scalar("SELECT now() - starts_at FROM subscriptions WHERE user_id = %s", (user,)) < dt.timedelta(
        minutes=1
    )
    assert env.sql(
        "SELECT amount_minor, list_amount_minor, upgrade_from, upgrade_credit_minor FROM purchases WHERE id = %s",
        (outcome.purchase_id,),
    ) == [(951, 1200, "m1", 249)]
    assert env.scalar("SELECT balance_minor FROM users WHERE id = %s", (user,)) == 2000 - 499 - 951
    assert "after a 2.49 USD credit" in user_texts(env, user)[-1]

    # Back to the cheaper plan right after buying the dearer one: the credit covers it, so it is refused.
    with pytest.raises(UpgradeNotOffered):
        await pay_with_balance(env.app, user, "m1")
    quote = await quote_plan(env.app, user, "m1")
    assert quote.upgrade_terms is not None and not quote.fiat_offered
    assert env.scalar("SELECT balance_minor FROM users WHERE id = %s", (user,)) == 2000 - 499 - 951
    assert env.scalar("SELECT count(*) FROM purchases WHERE user_id = %s", (user,)) == 2


async def test_upgrade_through_crypto_pay_replayed_webhook_grants_once(env: Env) -> None:
    user = await env.add_user(7002, balance_minor=499)
    await pay_with_balance(env.app, user, "m1")
    half_used(env, user)
    env.fake.webhook_copies = 3
    with trio.fail_after(IO_TIMEOUT):
        purchase, _url = await start_cryptopay_purchase(env.app, env.client, user, plan_code="m3")
        assert (purchase.amount_minor, purchase.upgrade_from, purchase.upgrade_credit_minor) == (951, "m1", 249)
        assert purchase.invoice_id is not None
        env.fake.pay(purchase.invoice_id)
        await env.fake.wait_until(lambda: len(env.fake.successful_deliveries()) == 3)
    await wait_paid(env, purchase.id)
    assert env.scalar("SELECT count(*) FROM payments WHERE purchase_id = %s", (purchase.id,)) == 1
    assert env.scalar("SELECT amount_minor FROM payments WHERE purchase_id = %s", (purchase.id,)) == 951
    assert 90 * DAY - dt.timedelta(minutes=1) < left(env, user) <= 90 * DAY  # switched once, not stacked thrice
    assert env.scalar("SELECT plan_code FROM subscriptions WHERE user_id = %s", (user,)) == "m3"


async def test_upgrade_when_the_old_plan_was_renewed_meanwhile_keeps_the_renewal(env: Env) -> None:
    user = await env.add_user(7003, balance_minor=499)
    await pay_with_balance(env.app, user, "m1")
    half_used(env, user)
    with trio.fail_after(IO_TIMEOUT):
        purchase, _url = await start_cryptopay_purchase(env.app, env.client, user, plan_code="m3")
    # Renewed (e.g. by auto-renewal) between the quote and the payment: 30 more days of m1.
    env.sql("UPDATE subscriptions SET expires_at = expires_at + interval '30 days' WHERE user_id = %s", (user,))
    assert purchase.invoice_id is not None
    env.fake.pay(purchase.invoice_id)
    await wait_paid(env, purchase.id)
    # The switch replaces the quoted rest (credited) but keeps the 30 days the renewal added.
    assert 120 * DAY - dt.timedelta(minutes=1) < left(env, user) <= 120 * DAY
    assert "after a 2.49 USD credit" in user_texts(env, user)[-1]


async def test_upgrade_when_the_old_plan_ended_meanwhile_is_a_plain_purchase(env: Env) -> None:
    user = await env.add_user(7004, balance_minor=499)
    await pay_with_balance(env.app, user, "m1")
    half_used(env, user)
    with trio.fail_after(IO_TIMEOUT):
        purchase, _url = await start_cryptopay_purchase(env.app, env.client, user, plan_code="m3")
    env.sql(
        "UPDATE subscriptions SET expires_at = now() - interval '1 minute', status = 'expired' WHERE user_id = %s",
        (user,),
    )
    assert purchase.invoice_id is not None
    env.fake.pay(purchase.invoice_id)
    await wait_paid(env, purchase.id)
    assert env.sql("SELECT plan_code, status FROM subscriptions WHERE user_id = %s", (user,)) == [("m3", "active")]
    assert 90 * DAY - dt.timedelta(minutes=1) < left(env, user) <= 90 * DAY
    text = user_texts(env, user)[-1]
    assert "extended by 90 days" in text and "changed before the payment arrived" in text


async def test_stars_credit_applies_only_to_a_stars_price(env: Env) -> None:
    user = await env.add_user(7005)
    with trio.fail_after(IO_TIMEOUT):
        invoice = await start_stars_purchase(env.app, user, "m1")
        outcome = await finalize_stars_payment(
            env.app, invoice.payload, telegram_payment_charge_id="charge-m1", total_amount=250, currency="XTR"
        )
    assert outcome.status == "granted"
    # 15 days and a minute left: floor(250 × 1296060 / 2592000) = 125 whatever the test's own delays.
    env.sql("UPDATE subscriptions SET expires_at = now() + interval '15 days 1 minute' WHERE user_id = %s", (user,))

    quote = await quote_plan(env.app, user, "m3")
    assert quote.upgrade_terms is None  # paid in Stars: nothing to credit against a USD price
    assert quote.upgrade_stars == UpgradeTerms(125, 600, 475)  # floor(250 × 15 / 30) Stars off 600
    assert (quote.price.amount_minor, quote.price.stars) == (1200, 475)

    with trio.fail_after(IO_TIMEOUT):
        invoice = await start_stars_purchase(env.app, user, "m3")
        assert invoice.amount == 475 and invoice.purchase.upgrade_credit_minor == 125
        await finalize_stars_payment(
            env.app, invoice.payload, telegram_payment_charge_id="charge-m3", total_amount=475, currency="XTR"
        )
    assert 90 * DAY - dt.timedelta(minutes=1) < left(env, user) <= 90 * DAY
    assert env.scalar("SELECT plan_code FROM subscriptions WHERE user_id = %s", (user,)) == "m3"

    # Now on m3 (paid 475 Stars + 125 credit = a 600-Star value); in USD it is a plain purchase at full price.
    with trio.fail_after(IO_TIMEOUT):
        purchase, _url = await start_cryptopay_purchase(env.app, env.client, user, plan_code="m1")
    assert (purchase.amount_minor, purchase.upgrade_from) == (499, None)
