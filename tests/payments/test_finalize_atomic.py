"""Cancelled or failing in the middle, finalize is either fully applied or not at all.

The database is slowed down or blocked by the test itself — triggers that `pg_sleep` on every
table finalize writes, a row lock held on the test's own connection, a trigger that raises — and
the call is cancelled from Trio (as SIGTERM's deadline would cancel it). Our functions are not
mocked.
"""

from __future__ import annotations

import datetime as dt

import httpx
import psycopg
import trio

from tests.payments.conftest import IO_TIMEOUT, Env
from vpnd.cryptopay import SIGNATURE_HEADER, Invoice
from vpnd.db import promo
from vpnd.db.subscriptions import grant_days
from vpnd.payments.service import apply_promo_code, finalize_cryptopay_invoice, start_cryptopay_purchase
from vpnd.payments.watcher import watch_once

WRITTEN_TABLES = (
    "purchases",
    "payments",
    "subscriptions",
    "balance_ledger",
    "users",
    "promo_codes",
    "promo_redemptions",
    "outbox",
)


async def paid_invoice(env: Env) -> tuple[int, int, int, Invoice]:
    """A user with a referrer, a promo code and an active subscription; a paid, undelivered invoice."""
    referrer = await env.add_user(7001)
    user = await env.add_user(7002, referred_by=referrer)
    await env.app.db.run(promo.create_promo, "HALF", 50, max_uses=5)
    assert (await apply_promo_code(env.app, user, "HALF")).ok
    await env.app.db.run(lambda conn: grant_days(conn, user, 10, kind="paid"))
    purchase, _ = await start_cryptopay_purchase(env.app, env.client, user, plan_code="m1")
    assert purchase.invoice_id is not None and purchase.amount_minor == 250
    env.fake.webhooks_enabled = False
    env.fake.pay(purchase.invoice_id)
    invoice = await env.client.get_invoice(purchase.invoice_id)
    return user, referrer, purchase.id, invoice


def applied_parts(env: Env, user: int, referrer: int, purchase_id: int, expires_before: dt.datetime) -> dict[str, bool]:
    """Each effect of finalize, observed separately."""
    expires = env.scalar("SELECT expires_at FROM subscriptions WHERE user_id = %s", (user,))
    return {
        "purchase paid": env.scalar("SELECT status FROM purchases WHERE id = %s", (purchase_id,)) == "paid",
        "payment row": env.scalar("SELECT count(*) FROM payments") == 1,
        "extended": expires - expires_before == dt.timedelta(days=30),
        "promo counted": env.scalar("SELECT used_count FROM promo_codes WHERE code = 'HALF'") == 1,
        "promo redeemed": env.scalar("SELECT count(*) FROM promo_redemptions") == 1,
        "promo forgotten": env.scalar("SELECT pending_promo_code FROM users WHERE id = %s", (user,)) is None,
        "referral ledger": env.scalar("SELECT count(*) FROM balance_ledger WHERE reason = 'referral_reward'") == 1,
        "referrer balance": env.scalar("SELECT balance_minor FROM users WHERE id = %s", (referrer,)) == 25,
        "user message": env.scalar("SELECT count(*) FROM outbox WHERE chat_id = %s", (user,)) == 1,
        "referrer message": env.scalar("SELECT count(*) FROM outbox WHERE chat_id = %s", (referrer,)) == 1,
    }


def install_triggers(env: Env, body: str) -> None:
    env.sql(f"CREATE FUNCTION test_hook() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN {body} RETURN NEW; END $$")
    for table in WRITTEN_TABLES:
        env.sql(
            f"CREATE TRIGGER test_hook BEFORE INSERT OR UPDATE ON {table} FOR EACH ROW EXECUTE FUNCTION test_hook()"
        )


def drop_triggers(env: Env) -> None:
    for table in WRITTEN_TABLES:
        env.sql(f"DROP TRIGGER test_hook ON {table}")
    env.sql("DROP FUNCTION test_hook()")


def connections_clean(env: Env) -> bool:
    states = env.sql(
        "SELECT state FROM pg_stat_activity WHERE application_name = 'vpnd' AND datname = current_database()"
    )
    return all(state in ("idle", None) for (state,) in states)


async def test_cancel_at_every_point_of_finalize(env: Env) -> None:
    with trio.fail_after(IO_TIMEOUT):
        user, referrer, purchase_id, invoice = await paid_invoice(env)
    expires_before = env.scalar("SELECT expires_at FROM subscriptions WHERE user_id = %s", (user,))
    before = env.snapshot()
    install_triggers(env, "PERFORM pg_sleep(0.03);")  # every row written costs 30 ms: ~0.4 s in all

    cancelled_midway = 0
    applied_at = None
    # Cancel after 0, 20, 40 … 780 ms; if finalize (~0.4 s here) takes longer than that on a busy machine,
    # go on with longer delays until one lets it complete.
    delays = [step * 0.02 for step in range(40)]
    with trio.fail_after(120):
        while delays:
            delay = delays.pop(0)
            if not delays and applied_at is None:
                delays.append(delay * 1.5)
            with trio.move_on_after(delay) as scope:
                await finalize_cryptopay_invoice(env.app, invoice)
            parts = applied_parts(env, user, referrer, purchase_id, expires_before)
            assert len(set(parts.values())) == 1, (delay, parts)  # all or nothing
            assert connections_clean(env)
            if not any(parts.values()):
                assert scope.cancelled_caught, delay
                assert env.snapshot() == before
                cancelled_midway += delay > 0.05
            elif applied_at is None:
                # Applied — by a call that completed, or by one whose cancel came after the commit
                # (the caller then sees Cancelled, but the transaction was whole).
                applied_at = delay
    assert applied_at is not None and cancelled_midway >= 5
    # Later attempts (and the watcher) found it already paid: still exactly once.
    drop_triggers(env)
    with trio.fail_after(IO_TIMEOUT):
        await watch_once(env.app, env.client)
        await finalize_cryptopay_invoice(env.app, invoice)
    assert all(applied_parts(env, user, referrer, purchase_id, expires_before).values())


async def test_cancel_while_blocked_on_a_lock_held_by_the_test(env: Env) -> None:
    with trio.fail_after(IO_TIMEOUT):
        user, referrer, purchase_id, invoice = await paid_invoice(env)
    expires_before = env.scalar("SELECT expires_at FROM subscriptions WHERE user_id = %s", (user,))
    before = env.snapshot()
    with psycopg.connect(env.dsn) as blocker:
        # The test holds the subscription's row: finalize gets past the purchase and payment, then waits.
        blocker.execute("SELECT 1 FROM subscriptions WHERE user_id = %s FOR UPDATE", (user,))
        lock_waits = (
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'vpnd' AND wait_event_type = 'Lock'"
        )
        with trio.fail_after(IO_TIMEOUT):
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(finalize_cryptopay_invoice, env.app, invoice)
                    while env.sql(lock_waits) != [(1,)]:  # finalize is blocked on the test's row lock now
                        await trio.sleep(0.02)
                    scope.cancel()
            assert scope.cancelled_caught
            waiting = env.sql(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'vpnd' AND wait_event_type = 'Lock'"
            )
            assert waiting == [(0,)]  # the blocked statement was cancelled on the server, not abandoned
        blocker.rollback()
    assert env.snapshot() == before
    assert not any(applied_parts(env, user, referrer, purchase_id, expires_before).values())
    with trio.fail_after(IO_TIMEOUT):
        outcome = await finalize_cryptopay_invoice(env.app, invoice)
    assert outcome.status == "granted"
    assert all(applied_parts(env, user, referrer, purchase_id, expires_before).values())


async def test_internal_error_in_finalize_answers_200_and_the_watcher_applies_later(env: Env) -> None:
    with trio.fail_after(IO_TIMEOUT):
        user, referrer, purchase_id, _ = await paid_invoice(env)
    expires_before = env.scalar("SELECT expires_at FROM subscriptions WHERE user_id = %s", (user,))
    before = env.snapshot()
    env.sql(
        "CREATE FUNCTION test_fail() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN RAISE EXCEPTION 'disk on fire'; END $$"
    )
    env.sql("CREATE TRIGGER test_fail BEFORE INSERT ON outbox FOR EACH ROW EXECUTE FUNCTION test_fail()")
    (update,) = env.fake.suppressed_updates  # the exact bytes Crypto Pay would have posted
    with trio.fail_after(IO_TIMEOUT):
        async with httpx.AsyncClient(timeout=10) as http:
            response = await http.post(
                env.webhook_url, content=update.body, headers={SIGNATURE_HEADER: update.signature}
            )
        assert response.status_code == 200  # so Crypto Pay stops retrying
        assert env.snapshot() == before  # and nothing half-done was committed
        env.sql("DROP TRIGGER test_fail ON outbox")
        assert await watch_once(env.app, env.client) == 1
    assert all(applied_parts(env, user, referrer, purchase_id, expires_before).values())
