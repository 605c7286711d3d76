"""Crypto Pay end to end: purchase → invoice at the fake → payment → signed webhook / watcher → access."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest
import trio

from tests.payments.conftest import ADMINS, IO_TIMEOUT, Env
from vpnd.db.subscriptions import grant_days
from vpnd.payments import ProviderUnavailable
from vpnd.payments.service import start_cryptopay_purchase, start_stars_purchase
from vpnd.payments.watcher import run_payment_watcher, watch_once


async def wait_for(env: Env, query: str, expected: object, params: object = None) -> None:
    """Poll the database (bounded by the caller's fail_after) until `query` returns `expected`."""
    while env.scalar(query, params) != expected:
        await trio.sleep(0.02)


async def test_plan_paid_through_the_webhook(env: Env) -> None:
    user = await env.add_user(1001)
    nudges_before = env.app.xray_changed.count
    with trio.fail_after(IO_TIMEOUT):
        purchase, url = await start_cryptopay_purchase(env.app, env.client, user, plan_code="m1")
        assert url.startswith(env.fake.base_url or "")
        assert (purchase.status, purchase.amount_minor, purchase.currency) == ("pending", 499, "USD")
        assert purchase.invoice_id is not None and purchase.invoice_url == url
        invoice = env.fake.invoices[purchase.invoice_id]
        assert (invoice.amount, invoice.fiat, invoice.payload) == (Decimal("4.99"), "USD", str(purchase.id))

        env.fake.pay(purchase.invoice_id)
        await env.fake.wait_until(lambda: bool(env.fake.successful_deliveries()))

    assert env.sql("SELECT status, paid_late FROM purchases WHERE id = %s", (purchase.id,)) == [("paid", False)]
    assert env.sql("SELECT provider, provider_payment_id, amount_minor, currency, outcome FROM payments") == [
        ("cryptopay", str(purchase.invoice_id), 499, "USD", "granted")
    ]
    expires = env.scalar("SELECT expires_at - now() FROM subscriptions WHERE user_id = %s", (user,))
    assert dt.timedelta(days=29, hours=23) < expires <= dt.timedelta(days=30)
    assert env.sql("SELECT chat_id, dedupe_key FROM outbox") == [(user, f"payment:{purchase.id}")]
    with trio.fail_after(IO_TIMEOUT):  # the commit's notification reaches the listener a moment later
        while env.app.xray_changed.count == nudges_before:
            await trio.sleep(0.01)
    assert env.app.xray_changed.count == nudges_before + 1


async def test_same_webhook_delivered_five_times_grants_once(env: Env) -> None:
    user = await env.add_user(1002)
    env.fake.webhook_copies = 5
    with trio.fail_after(IO_TIMEOUT):
        purchase, _ = await start_cryptopay_purchase(env.app, env.client, user, plan_code="m1")
        assert purchase.invoice_id is not None
        env.fake.pay(purchase.invoice_id)
        await env.fake.wait_until(lambda: len(env.fake.successful_deliveries()) == 5)
    assert [d.status_code for d in env.fake.deliveries] == [200] * 5  # every copy acknowledged
    assert env.scalar("SELECT count(*) FROM payments") == 1
    expires = env.scalar("SELECT expires_at - now() FROM subscriptions WHERE user_id = %s", (user,))
    assert expires <= dt.timedelta(days=30)
    assert env.scalar("SELECT count(*) FROM outbox WHERE chat_id = %s", (user,)) == 1


@pytest.mark.timeout(300)
async def test_webhook_and_watcher_race_200_invoices(env: Env) -> None:
    """200 invoices, each paid once and extended once, whichever path sees the payment first.

    Both paths are forced rather than hoped for: 50 invoices are paid before any watcher runs (the webhook
    grants them), 50 have their webhook withheld until the watchers have granted them (then it arrives late,
    twice), and 100 are paid while two watchers poll non-stop and every webhook arrives twice (a real race,
    whichever side wins).
    """
    users = list(range(20_001, 20_201))
    by_webhook, withheld, racing = users[:50], users[50:100], users[100:]
    start = dt.datetime.now(dt.UTC) + dt.timedelta(days=5)

    def seed(conn, ids):  # type: ignore[no-untyped-def]
        for user_id in ids:
            grant_days(conn, user_id, 5, kind="paid")  # an active subscription to extend

    for user in users:
        await env.add_user(user)
    await env.app.db.run(seed, users)
    before = dict(env.sql("SELECT user_id, expires_at FROM subscriptions"))
    assert all(abs(v - start) < dt.timedelta(minutes=1) for v in before.values())

    def paid(group: list[int]) -> int:
        return env.scalar("SELECT count(*) FROM purchases WHERE status = 'paid' AND user_id = ANY(%s)", (group,))

    with trio.fail_after(240):
        invoices: dict[int, int] = {}
        async with trio.open_nursery() as nursery:
            limiter = trio.CapacityLimiter(10)

            async def buy(user_id: int) -> None:
                async with limiter:
                    purchase, _ = await start_cryptopay_purchase(env.app, env.client, user_id, plan_code="m1")
                    assert purchase.invoice_id is not None
                    invoices[user_id] = purchase.invoice_id

            for user in users:
                nursery.start_soon(buy, user)
        env.fake.webhook_copies = 2  # every webhook arrives twice

        # 1. Webhook only: no watcher is running yet.
        for user in by_webhook:
            env.fake.pay(invoices[user])
        await wait_for(env, "SELECT count(*) FROM purchases WHERE status = 'paid'", len(by_webhook))

        by_watcher = 0
        stopping = False
        async with trio.open_nursery() as nursery:

            async def watch_forever() -> None:
                nonlocal by_watcher
                while not stopping:  # whole rounds only: a cancelled round's grants would go uncounted
                    granted = await watch_once(env.app, env.client, batch_size=37)
                    by_watcher += granted  # not `+= await …`: that reads the total before the await
                    await trio.lowlevel.checkpoint()

            for _ in range(2):  # two watchers, as two overlapping rounds would be
                nursery.start_soon(watch_forever)
            # 2. Watcher only: these webhooks are withheld until the watchers have granted every one.
            env.fake.webhooks_enabled = False
            for user in withheld:
                env.fake.pay(invoices[user])
            env.fake.webhooks_enabled = True
            # 3. Both at once: whichever side wins, the other must find the payment already applied.
            for user in racing:
                env.fake.pay(invoices[user])
                await trio.lowlevel.checkpoint()
            while paid(withheld) < len(withheld):
                await trio.sleep(0.02)
            # No webhook of theirs has been delivered: the watchers, and only they, granted these.
            withheld_invoices = {invoices[user] for user in withheld}
            assert not [d for d in env.fake.deliveries if d.invoice_id in withheld_invoices]
            assert env.fake.deliver_suppressed() == len(withheld)  # the withheld webhooks arrive, late
            await env.fake.wait_until(lambda: len(env.fake.successful_deliveries()) == 2 * len(users))
            await wait_for(env, "SELECT count(*) FROM purchases WHERE status = 'paid'", len(users))
            stopping = True

    assert all(d.status_code == 200 for d in env.fake.deliveries)
    assert env.scalar("SELECT count(*) FROM payments") == 200
    assert env.scalar("SELECT count(DISTINCT purchase_id) FROM payments") == 200
    after = dict(env.sql("SELECT user_id, expires_at FROM subscriptions"))
    assert {user: after[user] - before[user] for user in users} == {user: dt.timedelta(days=30) for user in users}
    assert env.scalar("SELECT count(*) FROM outbox WHERE dedupe_key LIKE 'payment:%%'") == 200
    finalized = env.app.metrics.payments
    granted = finalized.labels("cryptopay", "granted")._value.get()
    repeats = finalized.labels("cryptopay", "already_paid")._value.get()
    # 400 webhook deliveries and at least 50 watcher finds, of which 200 granted: the rest were repeats.
    assert granted == 200 and repeats >= 400 + len(withheld) - 200
    # The watchers granted the withheld invoices (and maybe some racing ones), never the webhook-only ones.
    assert len(withheld) <= by_watcher <= len(withheld) + len(racing)
    print(
        f"race: {by_watcher - len(withheld)} of {len(racing)} racing invoices granted by the watcher, {repeats} repeats"
    )


async def test_watcher_finds_payment_when_webhook_is_lost(env: Env) -> None:
    user = await env.add_user(1003)
    env.fake.webhooks_enabled = False
    with trio.fail_after(IO_TIMEOUT):
        purchase, _ = await start_cryptopay_purchase(env.app, env.client, user, plan_code="m3")
        assert purchase.invoice_id is not None
        env.fake.pay(purchase.invoice_id)
        async with trio.open_nursery() as nursery:
            await nursery.start(run_payment_watcher, env.app, env.client)  # started after its first round
            assert env.scalar("SELECT status FROM purchases WHERE id = %s", (purchase.id,)) == "paid"
            nursery.cancel_scope.cancel()
    assert env.scalar("SELECT count(*) FROM payments") == 1
    assert env.scalar("SELECT expires_at - now() FROM subscriptions WHERE user_id = %s", (user,)) > dt.timedelta(
        days=89
    )


async def test_superseded_invoice_paid_late_still_grants(env: Env) -> None:
    """A newer purchase expires the older one; paying the old invoice anyway still grants, flagged late.

    (Its invoice is deleted at Crypto Pay after the newer purchase; here that deletion failed.)
    """
    user = await env.add_user(1004)
    env.fake.webhooks_enabled = False  # and only the watcher can notice
    with trio.fail_after(IO_TIMEOUT):
        old, _ = await start_cryptopay_purchase(env.app, env.client, user, plan_code="m1")
        env.fake.fail_api("http_503", method="deleteInvoice")
        new, _ = await start_cryptopay_purchase(env.app, env.client, user, plan_code="m3")
        assert env.sql("SELECT id, status FROM purchases ORDER BY id") == [(old.id, "expired"), (new.id, "pending")]
        assert old.invoice_id is not None
        env.fake.pay(old.invoice_id)
        assert await watch_once(env.app, env.client) == 1
    assert env.sql("SELECT status, paid_late FROM purchases WHERE id = %s", (old.id,)) == [("paid", True)]
    assert env.scalar("SELECT status FROM purchases WHERE id = %s", (new.id,)) == "pending"
    expires = env.scalar("SELECT expires_at - now() FROM subscriptions WHERE user_id = %s", (user,))
    assert dt.timedelta(days=29) < expires <= dt.timedelta(days=30)
    text = env.scalar("SELECT payload->>'text' FROM outbox WHERE chat_id = %s", (user,))
    assert "after the invoice had expired" in text


async def test_watcher_expires_purchases_whose_invoice_expired(env: Env) -> None:
    user = await env.add_user(1005)
    with trio.fail_after(IO_TIMEOUT):
        purchase, _ = await start_cryptopay_purchase(env.app, env.client, user, plan_code="m1")
        assert purchase.invoice_id is not None
        assert await watch_once(env.app, env.client) == 0
        assert env.scalar("SELECT status FROM purchases WHERE id = %s", (purchase.id,)) == "pending"
        env.fake.expire(purchase.invoice_id)
        assert await watch_once(env.app, env.client) == 1
    assert env.scalar("SELECT status FROM purchases WHERE id = %s", (purchase.id,)) == "expired"
    assert env.scalar("SELECT count(*) FROM payments") == 0


async def test_amount_mismatch_is_recorded_and_alerted_without_access(env: Env) -> None:
    user = await env.add_user(1006)
    with trio.fail_after(IO_TIMEOUT):
        purchase, _ = await start_cryptopay_purchase(env.app, env.client, user, plan_code="m1")
        # An invoice for the same purchase at a different price (as a bug or a tampered payload would make).
        wrong = await env.client.create_invoice(
            amount=Decimal("0.99"), fiat="USD", payload=str(purchase.id), description="x", expires_in=600
        )
        env.fake.pay(wrong.invoice_id)
        await env.fake.wait_until(lambda: bool(env.fake.successful_deliveries()))
    assert env.fake.deliveries[0].status_code == 200
    assert env.sql("SELECT provider_payment_id, amount_minor, currency, outcome FROM payments") == [
        (str(wrong.invoice_id), 99, "USD", "amount_mismatch")
    ]
    assert env.scalar("SELECT count(*) FROM subscriptions") == 0
    alerts = env.sql("SELECT chat_id, payload->>'text' FROM outbox WHERE dedupe_key LIKE 'alert:%%' ORDER BY chat_id")
    assert [chat for chat, _ in alerts] == list(ADMINS)
    assert all("expected 4.99 USD, received 0.99 USD" in text for _, text in alerts)
    # The real invoice paid afterwards is a second payment for the same purchase: alerted, not granted.
    assert purchase.invoice_id is not None
    with trio.fail_after(IO_TIMEOUT):
        env.fake.pay(purchase.invoice_id)
        await env.fake.wait_until(lambda: len(env.fake.successful_deliveries()) == 2)
    assert env.scalar("SELECT count(*) FROM subscriptions") == 0
    assert env.scalar("SELECT count(*) FROM outbox WHERE dedupe_key LIKE 'alert:payment_duplicate:%%'") == 2


async def test_topup_credits_balance_through_the_ledger(env: Env) -> None:
    user = await env.add_user(1007)
    with trio.fail_after(IO_TIMEOUT):
        purchase, _ = await start_cryptopay_purchase(env.app, env.client, user, topup_minor=1000)
        assert (purchase.kind, purchase.amount_minor) == ("topup", 1000)
        assert purchase.invoice_id is not None
        env.fake.webhook_copies = 3
        env.fake.pay(purchase.invoice_id)
        await env.fake.wait_until(lambda: len(env.fake.successful_deliveries()) == 3)
        await watch_once(env.app, env.client)
    assert env.scalar("SELECT balance_minor FROM users WHERE id = %s", (user,)) == 1000
    assert env.sql("SELECT delta_minor, reason, reference FROM balance_ledger WHERE user_id = %s", (user,)) == [
        (1000, "topup", f"purchase:{purchase.id}")
    ]
    assert env.scalar("SELECT count(*) FROM subscriptions") == 0


async def test_referrer_rewarded_once_per_purchase(env: Env) -> None:
    referrer = await env.add_user(1008)
    user = await env.add_user(1009, referred_by=referrer)
    env.fake.webhook_copies = 3
    with trio.fail_after(IO_TIMEOUT):
        for _ in range(2):
            purchase, _ = await start_cryptopay_purchase(env.app, env.client, user, plan_code="m1")
            assert purchase.invoice_id is not None
            env.fake.pay(purchase.invoice_id)
            await watch_once(env.app, env.client)
        await env.fake.wait_until(lambda: len(env.fake.successful_deliveries()) == 6)
    assert env.scalar("SELECT balance_minor FROM users WHERE id = %s", (referrer,)) == 2 * 49  # 10% of 4.99
    assert env.scalar("SELECT count(*) FROM balance_ledger WHERE reason = 'referral_reward'") == 2
    assert env.scalar("SELECT count(*) FROM outbox WHERE chat_id = %s", (referrer,)) == 2


async def test_invoice_failure_cancels_the_purchase(env: Env) -> None:
    user = await env.add_user(1010)
    env.fake.fail_api("http_500")
    with trio.fail_after(IO_TIMEOUT), pytest.raises(ProviderUnavailable):
        await start_cryptopay_purchase(env.app, env.client, user, plan_code="m1")
    assert env.sql("SELECT status, invoice_id FROM purchases") == [("cancelled", None)]


async def test_watcher_expires_stale_and_unknown_invoice_purchases(env: Env) -> None:
    user, other = await env.add_user(1011), await env.add_user(1012)
    with trio.fail_after(IO_TIMEOUT):
        stars = await start_stars_purchase(env.app, user, "m1")
        lost, _ = await start_cryptopay_purchase(env.app, env.client, other, plan_code="m1")
    # A Stars purchase nobody paid, and an invoice Crypto Pay no longer knows, both long expired.
    env.sql("UPDATE purchases SET expires_at = now() - interval '1 hour'")
    env.sql("UPDATE purchases SET invoice_id = 424242 WHERE id = %s", (lost.id,))
    with trio.fail_after(IO_TIMEOUT):
        assert await watch_once(env.app, env.client) == 2
    assert env.sql("SELECT id, status FROM purchases ORDER BY id") == [
        (stars.purchase.id, "expired"),
        (lost.id, "expired"),
    ]
