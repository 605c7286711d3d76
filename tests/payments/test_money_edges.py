"""Money edge cases (issue 14): one promo code over many invoices, superseded invoices deleted at Crypto Pay.

Purchases are started through the payment service the bot calls; payments arrive as Crypto Pay
does it — a signed webhook over HTTP, or the watcher asking `getInvoices` — and deletions go over
HTTP to the fake Crypto Pay, which answers `deleteInvoice` as the real API does.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import httpx
import pytest
import trio

from tests.payments.conftest import ADMINS, IO_TIMEOUT, Env
from vpnd.cryptopay import SIGNATURE_HEADER, InvoiceNotFound
from vpnd.db import promo
from vpnd.payments.service import (
    apply_promo_code,
    pay_with_balance,
    start_cryptopay_purchase,
    start_stars_purchase,
)
from vpnd.payments.watcher import watch_once
from vpnd_sandbox.cryptopay_fake import FakeApiError


async def test_single_use_code_over_many_invoices_gives_one_discounted_grant(env: Env) -> None:
    """A 1-use code on three invoices (their deletion failing), all three paid: one discounted grant.

    The two superseded invoices are valued at the list price: 4.00 buys no 4.99 plan, so each goes to
    the balance, flagged and alerted. Before the fix every one of them granted 30 days at the discount.
    """
    await env.app.db.run(promo.create_promo, "ONCE", 20, max_uses=1)
    user = await env.add_user(7001)
    assert (await apply_promo_code(env.app, user, "once")).ok
    env.fake.fail_api("http_503", times=None, method="deleteInvoice")  # Crypto Pay cannot delete today
    with trio.fail_after(IO_TIMEOUT):
        bought = [(await start_cryptopay_purchase(env.app, env.client, user, plan_code="m1"))[0] for _ in range(3)]
        assert [p.amount_minor for p in bought] == [400, 400, 400]  # each quoted at the discount
        assert env.fake.deleted == type(env.fake.deleted)()  # nothing could be deleted
        env.fake.clear_api_faults()
        for purchase in bought:
            assert purchase.invoice_id is not None
            env.fake.pay(purchase.invoice_id)
        await env.fake.wait_until(lambda: len(env.fake.successful_deliveries()) == 3)

    old1, old2, current = (p.id for p in bought)
    rows = env.sql(
        "SELECT purchase_id, outcome, repriced, granted_days, credited_minor FROM payments ORDER BY purchase_id"
    )
    assert rows == [
        (old1, "granted", True, None, 400),
        (old2, "granted", True, None, 400),
        (current, "granted", False, 30, 0),
    ]
    assert env.sql("SELECT id, paid_late, superseded_by FROM purchases ORDER BY id") == [
        (old1, True, old2),
        (old2, True, current),
        (current, False, None),
    ]
    assert env.scalar("SELECT used_count FROM promo_codes WHERE code = 'ONCE'") == 1
    assert env.sql("SELECT purchase_id FROM promo_redemptions") == [(current,)]
    assert env.scalar("SELECT balance_minor FROM users WHERE id = %s", (user,)) == 2 * 400
    assert env.sql("SELECT delta_minor, reason FROM balance_ledger WHERE user_id = %s ORDER BY id", (user,)) == [
        (400, "payment_credit"),
        (400, "payment_credit"),
    ]
    expires = env.scalar("SELECT expires_at - now() FROM subscriptions WHERE user_id = %s", (user,))
    assert dt.timedelta(days=29, hours=23) < expires <= dt.timedelta(days=30)  # 30 days, not 90
    alerts = env.sql(
        "SELECT chat_id, payload->>'text' FROM outbox WHERE dedupe_key LIKE 'alert:payment_flagged:%%' ORDER BY id"
    )
    assert sorted(chat for chat, _ in alerts) == sorted(ADMINS * 2)
    assert all("superseded by purchase" in text and "0 days granted, 4.00 USD credited" in text for _, text in alerts)
    user_texts = [t for (t,) in env.sql("SELECT payload->>'text' FROM outbox WHERE chat_id = %s", (user,))]
    assert sum("counts at the full price of 4.99 USD" in t and "4.00 USD was added" in t for t in user_texts) == 2

    # A replayed webhook of a repriced payment is "already paid": nothing at all is written.
    before = env.snapshot()
    replay = env.fake.successful_deliveries()[0]
    async with httpx.AsyncClient() as http:
        with trio.fail_after(IO_TIMEOUT):
            response = await http.post(
                env.webhook_url,
                content=replay.body,
                headers={"Content-Type": "application/json", SIGNATURE_HEADER: replay.signature},
            )
    assert response.json() == {"ok": True, "result": "already_paid"}
    assert env.snapshot() == before


async def test_a_code_with_n_uses_gives_n_discounted_grants_across_users(env: Env) -> None:
    """Two users whose purchases carried a 1-use code (one reservation had lapsed): one discount in total."""
    await env.app.db.run(promo.create_promo, "SOLO", 50, max_uses=1)
    first, second = await env.add_user(7101), await env.add_user(7102)
    with trio.fail_after(IO_TIMEOUT):
        assert (await apply_promo_code(env.app, first, "solo")).ok
        early, _ = await start_cryptopay_purchase(env.app, env.client, first, plan_code="m3")
        # The first reservation lapses (its purchase is past its time, still payable at Crypto Pay) …
        env.sql("UPDATE purchases SET expires_at = now() - interval '1 minute' WHERE id = %s", (early.id,))
        assert (await apply_promo_code(env.app, second, "solo")).ok
        late, _ = await start_cryptopay_purchase(env.app, env.client, second, plan_code="m3")
        assert (early.amount_minor, late.amount_minor) == (600, 600)  # both at half of 12.00
        # … and both pay: the second's reservation is honoured, the first's use is gone.
        assert late.invoice_id is not None and early.invoice_id is not None
        env.fake.pay(late.invoice_id)
        await env.fake.wait_until(lambda: len(env.fake.successful_deliveries()) == 1)
        env.fake.pay(early.invoice_id)
        await env.fake.wait_until(lambda: len(env.fake.successful_deliveries()) == 2)
    assert env.sql("SELECT user_id, repriced, granted_days, credited_minor FROM payments ORDER BY user_id") == [
        (first, True, None, 600),
        (second, False, 90, 0),
    ]
    assert env.scalar("SELECT used_count FROM promo_codes WHERE code = 'SOLO'") == 1
    assert env.sql("SELECT user_id FROM subscriptions") == [(second,)]
    alerts = env.sql("SELECT payload->>'text' FROM outbox WHERE dedupe_key LIKE 'alert:payment_flagged:%%'")
    assert len(alerts) == len(ADMINS) and all("SOLO was used up" in text for (text,) in alerts)


async def test_superseded_invoices_are_deleted_at_crypto_pay(env: Env) -> None:
    """Whatever method the newer purchase uses; a failed deletion fails nothing and the watcher retries it."""
    user = await env.add_user(7201, balance_minor=10_000)
    with trio.fail_after(IO_TIMEOUT):
        first, _ = await start_cryptopay_purchase(env.app, env.client, user, plan_code="m1")
        second, _ = await start_cryptopay_purchase(env.app, env.client, user, plan_code="m1")
        assert list(env.fake.deleted) == [first.invoice_id]
        assert first.invoice_id not in env.fake.invoices
        with pytest.raises(FakeApiError, match="INVOICE_NOT_FOUND"):
            env.fake.pay(first.invoice_id)  # the user can no longer pay it

        # A Stars purchase and a balance purchase supersede too.
        await start_stars_purchase(env.app, user, "m1", cryptopay=env.client)
        assert list(env.fake.deleted) == [first.invoice_id, second.invoice_id]
        third, _ = await start_cryptopay_purchase(env.app, env.client, user, plan_code="m3")
        outcome = await pay_with_balance(env.app, user, "m1", cryptopay=env.client)
        assert outcome.status == "granted"
        assert list(env.fake.deleted) == [first.invoice_id, second.invoice_id, third.invoice_id]

        # Crypto Pay failing to delete does not fail the new purchase; the watcher deletes it later.
        fourth, _ = await start_cryptopay_purchase(env.app, env.client, user, plan_code="m1")
        env.fake.fail_api("http_500", method="deleteInvoice")
        fifth, _ = await start_cryptopay_purchase(env.app, env.client, user, plan_code="m1")
        assert fifth.status == "pending" and fourth.invoice_id in env.fake.invoices
        assert await watch_once(env.app, env.client) == 0
        assert fourth.invoice_id not in env.fake.invoices and env.fake.deleted[-1] == fourth.invoice_id
        assert fifth.invoice_id in env.fake.invoices  # the payable one stays
    assert env.scalar("SELECT status FROM purchases WHERE id = %s", (fifth.id,)) == "pending"


async def test_superseded_invoice_paid_before_deletion_still_arrives(env: Env) -> None:
    """Crypto Pay refuses to delete a paid invoice; its payment (without a discount) gives the plan, alerted."""
    user = await env.add_user(7301)
    env.fake.webhooks_enabled = False  # the payment is seen by the watcher
    with trio.fail_after(IO_TIMEOUT):
        old, _ = await start_cryptopay_purchase(env.app, env.client, user, plan_code="m1")
        assert old.invoice_id is not None
        env.fake.pay(old.invoice_id)
        new, _ = await start_cryptopay_purchase(env.app, env.client, user, plan_code="m1")
        assert new.status == "pending" and list(env.fake.deleted) == []  # refused: it is paid
        assert await watch_once(env.app, env.client) == 1
    assert env.sql("SELECT repriced, granted_days, credited_minor FROM payments") == [(False, 30, 0)]
    assert env.sql("SELECT status, paid_late, superseded_by FROM purchases WHERE id = %s", (old.id,)) == [
        ("paid", True, new.id)
    ]
    alerts = env.sql("SELECT payload->>'text' FROM outbox WHERE dedupe_key LIKE 'alert:payment_flagged:%%'")
    assert len(alerts) == len(ADMINS) and all("4.99 USD: 30 days granted" in text for (text,) in alerts)


async def test_delete_invoice_answers_as_crypto_pay_does(env: Env) -> None:
    with trio.fail_after(IO_TIMEOUT):
        user = await env.add_user(7401)
        purchase, _ = await start_cryptopay_purchase(env.app, env.client, user, plan_code="m1")
        assert purchase.invoice_id is not None
        env.fake.pay(purchase.invoice_id)
        with pytest.raises(InvoiceNotFound) as paid:
            await env.client.delete_invoice(purchase.invoice_id)
        assert (paid.value.code, paid.value.name) == (400, "INVOICE_NOT_FOUND")
        with pytest.raises(InvoiceNotFound):
            await env.client.delete_invoice(999_999)
        other = await env.client.create_invoice(
            amount=Decimal("1.00"), fiat="USD", payload="x", description="x", expires_in=60
        )
        await env.client.delete_invoice(other.invoice_id)
        assert await env.client.get_invoices(invoice_ids=[other.invoice_id]) == []
