"""Auto-renewal by a saved YooKassa card: consent saves it, a renewal charges it once per period.

The fake YooKassa is a real HTTP server and keeps Idempotence-Keys as YooKassa does; every check
counts the charges *at the fake* (what the payer's bank would see), not only vpnd's rows.
"""

from __future__ import annotations

import datetime as dt

import trio

from tests.payments.conftest import IO_TIMEOUT
from tests.payments.test_yookassa_flow import YkEnv, payment_id_of, yk  # noqa: F401 (the fixture)
from vpnd.db import checkout as checkout_db
from vpnd.payments.checkout import start_checkout_purchase
from vpnd.workers.common import START
from vpnd.workers.renewal import LEDGER_REASON, begin_card_batch, card_offers, renewal_round, renewal_settings

D = dt.timedelta(days=1)


async def save_card(env: YkEnv, user_id: int, *, consent: bool = True) -> None:
    """The user pays for r1 by card (ticking "save for auto-renewal" when `consent`)."""
    await env.add_users(user_id)
    with trio.fail_after(IO_TIMEOUT):
        purchase, _ = await start_checkout_purchase(
            env.app, env.checkout, user_id, "r1", method="bank_card", save_method=consent
        )
        env.fake.pay(payment_id_of(env, purchase.id))
        while env.scalar("SELECT status FROM purchases WHERE id = %s", (purchase.id,)) != "paid":
            await trio.sleep(0.02)


def due_soon(env: YkEnv, user_id: int, *, balance_minor: int = 0) -> dt.datetime:
    """Auto-renew on, the period ending in 12 hours (inside the renewal window); the new end."""
    env.sql(
        "UPDATE subscriptions SET auto_renew = true, expires_at = date_trunc('second', now()) + interval '12 hours' "
        "WHERE user_id = %s",
        (user_id,),
    )
    env.sql("UPDATE users SET balance_minor = %s WHERE id = %s", (balance_minor, user_id))
    if balance_minor:
        env.sql(
            "INSERT INTO balance_ledger (user_id, delta_minor, reason, reference) VALUES (%s, %s, 'test', %s)",
            (user_id, balance_minor, str(user_id)),
        )
    end: dt.datetime = env.scalar("SELECT expires_at FROM subscriptions WHERE user_id = %s", (user_id,))
    return end


def saved_charges(env: YkEnv) -> int:
    return len(env.fake.saved_charges())


async def test_consent_saves_the_card_and_no_consent_does_not(yk: YkEnv) -> None:  # noqa: F811
    await save_card(yk, 6001)
    await save_card(yk, 6002, consent=False)
    asked = [p.get("save_payment_method") for p in yk.fake.payments.values()]
    assert asked == [True, False]
    assert yk.sql("SELECT user_id, provider, title FROM saved_payment_methods") == [
        (6001, "yookassa", "MasterCard *4477")
    ]
    method_id = yk.scalar("SELECT method_id FROM saved_payment_methods")
    assert method_id in yk.fake.saved_methods


async def test_renewal_charges_the_card_once_however_rounds_race(yk: YkEnv) -> None:  # noqa: F811
    await save_card(yk, 6003)
    end = due_soon(yk, 6003, balance_minor=100_000)
    results: list[int] = []

    async def one_round() -> None:
        results.append(await renewal_round(yk.app, yk.app.texts, batch_size=10, checkout=yk.checkout))

    with trio.fail_after(IO_TIMEOUT):
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(one_round)
        await one_round()  # and once more, afterwards
    assert saved_charges(yk) == 1
    assert yk.scalar("SELECT expires_at FROM subscriptions WHERE user_id = 6003") == end + 30 * D
    assert yk.sql("SELECT outcome FROM auto_renewals") == [("charged",)]
    assert yk.scalar("SELECT balance_minor FROM users WHERE id = 6003") == 100_000  # the balance was not touched
    assert yk.scalar("SELECT count(*) FROM balance_ledger WHERE reason = %s", (LEDGER_REASON,)) == 0
    paid = yk.sql("SELECT provider, amount_minor, outcome FROM payments ORDER BY id")
    assert paid == [("yookassa", 29900, "granted")] * 2  # the first purchase and the renewal, each a purchase


async def test_crash_between_charge_and_record_charges_once(yk: YkEnv) -> None:  # noqa: F811
    """The purchase and the claim committed, the card charged, then nothing recorded (the daemon died):
    the next round charges with the same key, gets the same payment back, and grants one period."""
    await save_card(yk, 6004)
    yk.fake.notifications_enabled = False  # nothing tells vpnd of the charge but the next round
    end = due_soon(yk, 6004)
    settings = renewal_settings(yk.app)
    offers = card_offers(yk.app)
    charges, _, _ = await yk.app.db.run(
        begin_card_batch,
        settings,
        "yookassa",
        offers,
        yk.app.config.payments,
        START,
        10,
    )
    [charge] = charges
    with trio.fail_after(IO_TIMEOUT):
        await yk.checkout.charge(charge.purchase, saved_method_id=charge.method_id, description="x", key=charge.key)
        assert saved_charges(yk) == 1
        assert await renewal_round(yk.app, yk.app.texts, batch_size=10, checkout=yk.checkout) >= 1
        assert await renewal_round(yk.app, yk.app.texts, batch_size=10, checkout=yk.checkout) == 0
    assert saved_charges(yk) == 1
    assert yk.scalar("SELECT expires_at FROM subscriptions WHERE user_id = 6004") == end + 30 * D
    assert yk.scalar("SELECT count(*) FROM payments WHERE purchase_id = %s", (charge.purchase.id,)) == 1


async def test_declined_card_falls_back_to_the_balance(yk: YkEnv) -> None:  # noqa: F811
    await save_card(yk, 6005)
    yk.fake.saved_charges_succeed = False
    end = due_soon(yk, 6005, balance_minor=100_000)
    with trio.fail_after(IO_TIMEOUT):
        await renewal_round(yk.app, yk.app.texts, batch_size=10, checkout=yk.checkout)
        await renewal_round(yk.app, yk.app.texts, batch_size=10, checkout=yk.checkout)
    assert saved_charges(yk) == 0
    assert [p["status"] for p in yk.fake.payments.values()] == ["succeeded", "canceled"]  # consent payment, decline
    assert yk.scalar("SELECT count(*) FROM balance_ledger WHERE reason = %s", (LEDGER_REASON,)) == 1
    assert yk.scalar("SELECT balance_minor FROM users WHERE id = 6005") == 100_000 - 29900
    assert yk.scalar("SELECT expires_at FROM subscriptions WHERE user_id = 6005") == end + 30 * D
    assert yk.sql("SELECT outcome FROM auto_renewals") == [("charged",)]


async def test_declined_card_and_short_balance_leave_the_reminder_flow(yk: YkEnv) -> None:  # noqa: F811
    await save_card(yk, 6006)
    yk.fake.saved_charges_succeed = False
    end = due_soon(yk, 6006)
    with trio.fail_after(IO_TIMEOUT):
        await renewal_round(yk.app, yk.app.texts, batch_size=10, checkout=yk.checkout)
        await renewal_round(yk.app, yk.app.texts, batch_size=10, checkout=yk.checkout)
    assert yk.scalar("SELECT expires_at FROM subscriptions WHERE user_id = 6006") == end
    assert yk.sql("SELECT outcome FROM auto_renewals") == [("insufficient_balance",)]
    notices = yk.sql("SELECT dedupe_key FROM outbox WHERE chat_id = 6006 AND dedupe_key LIKE 'renewal:%%'")
    assert len(notices) == 1 and str(notices[0][0]).endswith(":insufficient")


async def test_unlinked_card_is_never_charged(yk: YkEnv) -> None:  # noqa: F811
    await save_card(yk, 6007)
    assert await yk.app.db.run(checkout_db.forget_method, 6007) is True
    assert await yk.app.db.run(checkout_db.forget_method, 6007) is False
    end = due_soon(yk, 6007, balance_minor=100_000)
    with trio.fail_after(IO_TIMEOUT):
        await renewal_round(yk.app, yk.app.texts, batch_size=10, checkout=yk.checkout)
    assert saved_charges(yk) == 0 and len(yk.fake.payments) == 1
    assert yk.scalar("SELECT count(*) FROM balance_ledger WHERE reason = %s", (LEDGER_REASON,)) == 1
    assert yk.scalar("SELECT expires_at FROM subscriptions WHERE user_id = 6007") == end + 30 * D
