"""Card payments through Telegram Payments, end to end: the daemon, the fake Bot API, a real PostgreSQL.

The fake checks a card invoice like Telegram (a known currency, the provider token BotFather connected,
integer minor units) and pays it with a pre_checkout_query, then a successful_payment carrying both
charge ids. Replays are raw updates injected into the fake, as Telegram may deliver them.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
import trio

from tests.harness import Running, bot_config, sql, start_vpnd
from vpnd.config import Config
from vpnd.db import admin
from vpnd.db.admin import RevenueRow
from vpnd_sandbox.telegram_fake import ChatMessage, FakeTelegram

ALICE = 1001

#: "c1" is sold by card in RUB, JPY and KWD; "m1" (USD only) is not offered for a card in RUB.
CARD_PLAN = """
[[plans]]
code = "c1"
title = { en = "1 month", ru = "1 месяц" }
days = 30
price = "4.99"
currency = "USD"
prices = { RUB = "299", JPY = "500", KWD = "1.5" }
"""


def card_config(
    write_config: Callable[..., Path], db_dsn: str, fake: FakeTelegram, base_url: str, currency: str = "RUB"
) -> Config:
    card = {
        "enabled": True,
        "provider_token": fake.payment_provider_token,
        "currency": currency,
        "receipt": True,
        "vat_code": 4,
    }
    return bot_config(write_config, db_dsn, fake, base_url, plans=CARD_PLAN, telegram_payments=card)


def payments_counted(vpnd: Running, outcome: str) -> float:
    labels = {"provider": "card", "outcome": outcome}
    return vpnd.app.metrics.registry.get_sample_value("vpnd_payments_total", labels) or 0.0


async def card_invoice(fake: FakeTelegram, plan: str = "c1") -> ChatMessage:
    """/buy → the plan → "Card": the invoice message the bot sent."""
    fake.user_sends(ALICE, "/buy")
    plans = await fake.wait_for_bot_message(ALICE, lambda m: f"plan:{plan}" in m.callback_data)
    fake.user_presses_button(ALICE, plans.message_id, f"plan:{plan}")
    methods = await fake.wait_for_bot_message(ALICE, lambda m: f"pay:{plan}:k" in m.callback_data)
    fake.user_presses_button(ALICE, methods.message_id, f"pay:{plan}:k")
    return await fake.wait_for_bot_message(ALICE, lambda m: m.invoice is not None)


async def test_card_purchase_grants_once_however_often_the_payment_arrives(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    vpnd = await start_vpnd(nursery, card_config(write_config, db_dsn, fake, base_url))
    fake.add_user(ALICE, "Alice")
    with trio.fail_after(30):
        # A plan without a price in the card currency is not offered for a card.
        fake.user_sends(ALICE, "/buy")
        plans = await fake.wait_for_bot_message(ALICE, lambda m: "plan:c1" in m.callback_data)
        fake.user_presses_button(ALICE, plans.message_id, "plan:m1")
        methods = await fake.wait_for_bot_message(ALICE, lambda m: "pay:m1:s" in m.callback_data)
        assert "pay:m1:k" not in methods.callback_data

        fake.user_presses_button(ALICE, methods.message_id, "buy")
        plans = await fake.wait_for_bot_message(ALICE, lambda m: "plan:c1" in m.callback_data)
        fake.user_presses_button(ALICE, plans.message_id, "plan:c1")
        methods = await fake.wait_for_bot_message(ALICE, lambda m: "pay:c1:k" in m.callback_data)
        assert "Card (299.00 RUB)" in str(methods.buttons)
        fake.user_presses_button(ALICE, methods.message_id, "pay:c1:k")
        message = await fake.wait_for_bot_message(ALICE, lambda m: m.invoice is not None)
        invoice = message.invoice
        assert invoice is not None
        [(purchase_id, method)] = sql(db_dsn, "SELECT id, method FROM purchases WHERE status = 'pending'")
        assert (invoice.currency, invoice.total_amount, invoice.payload, method) == (
            "RUB", 29900, str(purchase_id), "card"
        )  # fmt: skip
        # The fiscal receipt: one item at the plan's price, with the configured VAT code.
        assert invoice.need_email and invoice.send_email_to_provider and invoice.provider_data is not None
        [item] = json.loads(invoice.provider_data)["receipt"]["items"]
        assert (item["amount"], item["vat_code"], item["quantity"]) == (
            {"value": "299.00", "currency": "RUB"}, 4, "1.00"
        )  # fmt: skip

        fake.user_pays_invoice(ALICE, message.message_id)
        await fake.wait_until(lambda: payments_counted(vpnd, "granted") == 1, timeout=10)
        [paid] = [m for m in fake.transcript(ALICE) if m.successful_payment]
        assert paid.successful_payment is not None
        telegram_charge = paid.successful_payment["telegram_payment_charge_id"]
        provider_charge = paid.successful_payment["provider_payment_charge_id"]

        # Telegram delivers the same successful_payment twice more: nothing changes.
        for _ in range(2):
            fake.inject_update({"message": paid.to_api()})
        await fake.wait_until(lambda: payments_counted(vpnd, "already_paid") == 2, timeout=10)

        # The same provider charge presented for another purchase: refused, alerted, no second grant.
        await card_invoice(fake)
        [(second,)] = sql(db_dsn, "SELECT id FROM purchases WHERE status = 'pending'")
        replay = {**paid.successful_payment, "invoice_payload": str(second), "telegram_payment_charge_id": "tgcX"}
        fake.inject_update({"message": {**paid.to_api(), "successful_payment": replay}})
        await fake.wait_until(lambda: payments_counted(vpnd, "duplicate_payment") == 1, timeout=10)

    assert sql(
        db_dsn,
        "SELECT purchase_id, provider, provider_payment_id, telegram_payment_charge_id, amount_minor, currency, "
        "outcome, granted_days FROM payments",
    ) == [(purchase_id, "card", provider_charge, telegram_charge, 29900, "RUB", "granted", 30)]
    assert sql(db_dsn, "SELECT status FROM purchases ORDER BY id") == [("paid",), ("pending",)]
    [(days,)] = sql(db_dsn, "SELECT round(extract(epoch FROM expires_at - now()) / 86400) FROM subscriptions")
    assert days == 30  # granted once
    alerts = sql(db_dsn, "SELECT count(*) FROM outbox WHERE dedupe_key LIKE 'alert:payment_duplicate:card:%%'")
    assert alerts == [(1,)]  # the one admin
    # Stats and the payments CSV list the method like any other.
    with psycopg.connect(db_dsn) as conn:
        assert RevenueRow("card", "RUB", 29900, 1) in admin.stats(conn).revenue_by_method
        out = io.StringIO()
        assert admin.export_payments_csv(conn, out) == 1
    assert f",card,{provider_charge},29900,RUB,granted" in out.getvalue()
    await vpnd.stop()


async def test_card_pre_checkout_refuses_wrong_amount_currency_and_expired_purchases(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    vpnd = await start_vpnd(nursery, card_config(write_config, db_dsn, fake, base_url))
    fake.add_user(ALICE, "Alice")

    async def refused(change: Callable[[ChatMessage], None], reason: str) -> None:
        message = await card_invoice(fake)
        change(message)
        seen = len(fake.notices_for(ALICE))
        fake.user_pays_invoice(ALICE, message.message_id)
        await fake.wait_until(lambda: len(fake.notices_for(ALICE)) > seen, timeout=10)
        assert reason in fake.notices_for(ALICE)[-1].text

    def amount(message: ChatMessage) -> None:
        assert message.invoice is not None
        message.invoice.total_amount = 100  # 1.00 RUB, not 299.00

    def currency(message: ChatMessage) -> None:
        assert message.invoice is not None
        message.invoice.currency = "USD"

    def expired(message: ChatMessage) -> None:
        sql(db_dsn, "UPDATE purchases SET expires_at = now() - interval '1 minute' WHERE status = 'pending'")

    with trio.fail_after(40):
        await refused(amount, "no longer matches the price")
        await refused(currency, "no longer matches the price")
        await refused(expired, "has expired")
    assert [q.ok for q in fake.pre_checkout_queries.values()] == [False, False, False]
    assert sql(db_dsn, "SELECT count(*) FROM payments") == [(0,)]
    await vpnd.stop()


@pytest.mark.parametrize(("currency", "shown", "minor"), [("JPY", "500 JPY", 500), ("KWD", "1.500 KWD", 1500)])
async def test_card_amounts_are_in_the_currency_minor_units(
    nursery: trio.Nursery,
    fake_telegram: tuple[FakeTelegram, str],
    db_dsn: str,
    write_config: Callable[..., Path],
    currency: str,
    shown: str,
    minor: int,
) -> None:
    """Yen have no minor unit and Kuwaiti dinars 1000 fils: not a hard-coded 2 decimals."""
    fake, base_url = fake_telegram
    vpnd = await start_vpnd(nursery, card_config(write_config, db_dsn, fake, base_url, currency))
    fake.add_user(ALICE, "Alice")
    with trio.fail_after(30):
        message = await card_invoice(fake)
        methods = [m for m in fake.bot_messages(ALICE) if "pay:c1:k" in m.callback_data]
        assert f"Card ({shown})" in str(methods[-1].buttons)
        assert message.invoice is not None
        assert (message.invoice.currency, message.invoice.total_amount) == (currency, minor)
        item = json.loads(message.invoice.provider_data or "{}")["receipt"]["items"][0]
        assert item["amount"]["value"] == shown.split()[0]
        fake.user_pays_invoice(ALICE, message.message_id)
        await fake.wait_until(lambda: payments_counted(vpnd, "granted") == 1, timeout=10)
    assert sql(db_dsn, "SELECT provider, amount_minor, currency, outcome FROM payments") == [
        ("card", minor, currency, "granted")
    ]
    await vpnd.stop()
