"""Buying through the bot: Crypto Pay (invoice → pay → signed webhook), Stars, balance, promo codes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import trio

from tests.harness import bot_config, scalar, start_shop, start_vpnd
from vpnd_sandbox.cryptopay_fake import FakeCryptoPay
from vpnd_sandbox.telegram_fake import ChatMessage, FakeTelegram

ALICE = 1001


async def press(fake: FakeTelegram, message: ChatMessage, data: str, **wait: Any) -> ChatMessage:
    fake.user_presses_button(ALICE, message.message_id, data)
    return await fake.wait_for_bot_message(ALICE, **wait)


async def open_buy(fake: FakeTelegram) -> ChatMessage:
    fake.user_sends(ALICE, "/buy")
    return await fake.wait_for_bot_message(ALICE, lambda m: "plan:m1" in m.callback_data)


async def test_buy_with_crypto_pay_grants_once_via_signed_webhook(
    nursery: trio.Nursery,
    fake_telegram: tuple[FakeTelegram, str],
    fake_cryptopay: tuple[FakeCryptoPay, str],
    db_dsn: str,
    write_config: Callable[..., Path],
) -> None:
    fake, _ = fake_telegram
    pay, pay_url = fake_cryptopay
    vpnd = await start_shop(nursery, write_config, db_dsn, fake_telegram, fake_cryptopay)
    pay.webhook_copies = 3  # Crypto Pay may deliver more than once
    fake.add_user(ALICE, "Alice")
    with trio.fail_after(30):
        plans = await open_buy(fake)
        assert "4.99 USD" in str(plans.buttons)
        methods = await press(fake, plans, "plan:m1")
        assert {"pay:m1:c", "pay:m1:s"} <= set(methods.callback_data)
        assert "pay:m1:b" not in methods.callback_data  # the balance does not cover it
        invoice_message = await press(fake, methods, "pay:m1:c", predicate=lambda m: "Crypto Pay" in (m.text or ""))
        url = next(b["url"] for b in invoice_message.buttons if "url" in b)
        assert url.startswith(pay_url.removesuffix("/api"))  # the fake's pay page
        purchase_id = scalar(db_dsn, "SELECT id FROM purchases WHERE user_id = %s", ALICE)
        pay.pay(scalar(db_dsn, "SELECT invoice_id FROM purchases WHERE id = %s", purchase_id))
        await pay.wait_until(lambda: len(pay.successful_deliveries()) == 3)
    assert scalar(db_dsn, "SELECT status FROM purchases WHERE id = %s", purchase_id) == "paid"
    assert scalar(db_dsn, "SELECT count(*) FROM payments WHERE purchase_id = %s", purchase_id) == 1
    days = scalar(db_dsn, "SELECT round(extract(epoch FROM expires_at - now()) / 86400) FROM subscriptions")
    assert days == 30  # granted once, not three times
    assert scalar(db_dsn, "SELECT count(*) FROM outbox WHERE chat_id = %s", ALICE) >= 1  # "payment received"
    await vpnd.stop()


async def test_stars_invoice_pre_checkout_and_payment(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    vpnd = await start_vpnd(nursery, bot_config(write_config, db_dsn, fake, base_url))
    fake.add_user(ALICE, "Alice")
    with trio.fail_after(30):
        plans = await open_buy(fake)
        methods = await press(fake, plans, "plan:m1")
        assert "pay:m1:c" not in methods.callback_data  # Crypto Pay is off in this config
        fake.user_presses_button(ALICE, methods.message_id, "pay:m1:s")
        invoice = await fake.wait_for_bot_message(ALICE, lambda m: m.invoice is not None)
        assert invoice.invoice is not None and invoice.invoice.currency == "XTR"
        assert invoice.invoice.total_amount == 250

        # An expired purchase is refused at pre-checkout, with a reason the user can read.
        with psycopg.connect(db_dsn, autocommit=True) as conn:
            conn.execute("UPDATE purchases SET expires_at = now() - interval '1 minute' WHERE user_id = %s", (ALICE,))
        fake.user_pays_invoice(ALICE, invoice.message_id)
        await fake.wait_until(lambda: any("expired" in n.text for n in fake.notices_for(ALICE)), timeout=10)
        assert scalar(db_dsn, "SELECT count(*) FROM payments") == 0

        # A fresh invoice is accepted and paid; the subscription starts.
        plans = await open_buy(fake)
        methods = await press(fake, plans, "plan:m1")
        fake.user_presses_button(ALICE, methods.message_id, "pay:m1:s")
        invoice = await fake.wait_for_bot_message(ALICE, lambda m: m.invoice is not None)
        fake.user_pays_invoice(ALICE, invoice.message_id)
        with trio.fail_after(10):
            while scalar(db_dsn, "SELECT count(*) FROM payments WHERE provider = 'stars'") != 1:
                await trio.sleep(0.05)
    assert scalar(db_dsn, "SELECT kind FROM subscriptions WHERE user_id = %s", ALICE) == "paid"
    await vpnd.stop()


async def test_promo_state_survives_restart_and_discount_applies(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    config = bot_config(write_config, db_dsn, fake, base_url)
    with psycopg.connect(db_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO promo_codes (code, percent, max_uses) VALUES ('SPRING20', 20, 10)")
    vpnd = await start_vpnd(nursery, config)
    fake.add_user(ALICE, "Alice")
    with trio.fail_after(40):
        fake.user_sends(ALICE, "/start")
        menu = await fake.wait_for_bot_message(ALICE)
        ask = await press(fake, menu, "promo")
        assert "promo code" in (ask.text or "").lower()
        await vpnd.stop()  # the daemon restarts while the bot waits for the code

        vpnd = await start_vpnd(nursery, config)
        fake.user_sends(ALICE, "NOPE")
        refused = await fake.wait_for_bot_message(ALICE)
        assert "no such promo code" in (refused.text or "")
        fake.user_sends(ALICE, "spring20")
        accepted = await fake.wait_for_bot_message(ALICE)
        assert "SPRING20" in (accepted.text or "") and "20%" in (accepted.text or "")
        plans = await press(fake, accepted, "buy")
        assert "4.00 USD" in str(plans.buttons)  # 4.99 less 20 % = 3.992, rounded up to the cent
    await vpnd.stop()


async def test_pay_from_balance(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    vpnd = await start_vpnd(nursery, bot_config(write_config, db_dsn, fake, base_url))
    fake.add_user(ALICE, "Alice")
    with trio.fail_after(30):
        fake.user_sends(ALICE, "/start")
        await fake.wait_for_bot_message(ALICE)
        with psycopg.connect(db_dsn, autocommit=True) as conn:
            conn.execute("UPDATE users SET balance_minor = 1000 WHERE id = %s", (ALICE,))
            conn.execute(
                "INSERT INTO balance_ledger (user_id, delta_minor, reason, reference) VALUES (%s, 1000, 'test', 'x')",
                (ALICE,),
            )
        plans = await open_buy(fake)
        methods = await press(fake, plans, "plan:m1")
        done = await press(fake, methods, "pay:m1:b", predicate=lambda m: "Paid from your balance" in (m.text or ""))
        assert "vless://" in (done.text or "")
    assert scalar(db_dsn, "SELECT balance_minor FROM users WHERE id = %s", ALICE) == 1000 - 499
    assert scalar(db_dsn, "SELECT sum(delta_minor) FROM balance_ledger WHERE user_id = %s", ALICE) == 1000 - 499
    await vpnd.stop()


async def test_admin_refunds_a_stars_payment_once(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    vpnd = await start_vpnd(nursery, bot_config(write_config, db_dsn, fake, base_url))
    admin = 1  # bot_config's admin_ids
    fake.add_user(ALICE, "Alice")
    fake.add_user(admin, "Admin")
    with trio.fail_after(40):
        plans = await open_buy(fake)
        methods = await press(fake, plans, "plan:m1")
        fake.user_presses_button(ALICE, methods.message_id, "pay:m1:s")
        invoice = await fake.wait_for_bot_message(ALICE, lambda m: m.invoice is not None)
        fake.user_pays_invoice(ALICE, invoice.message_id)
        while scalar(db_dsn, "SELECT count(*) FROM payments WHERE provider = 'stars'") != 1:
            await trio.sleep(0.05)
        purchase_id = scalar(db_dsn, "SELECT purchase_id FROM payments")

        fake.user_sends(admin, "/admin")
        panel = await fake.wait_for_bot_message(admin, lambda m: "adm:fu" in m.callback_data)
        fake.user_presses_button(admin, panel.message_id, "adm:fu")
        await fake.wait_for_bot_message(admin)
        fake.user_sends(admin, str(ALICE))
        card = await fake.wait_for_bot_message(admin, lambda m: f"adm:rf:{purchase_id}" in m.callback_data)
        fake.user_presses_button(admin, card.message_id, f"adm:rf:{purchase_id}")
        confirm = await fake.wait_for_bot_message(admin, lambda m: f"adm:rfc:{purchase_id}" in m.callback_data)
        fake.user_presses_button(admin, confirm.message_id, f"adm:rfc:{purchase_id}")
        done = await fake.wait_for_bot_message(admin, lambda m: "refunded" in (m.text or ""))
        assert f"adm:rf:{purchase_id}" not in done.callback_data  # no second refund offered
        # A replayed confirmation (an old client, a double tap) is refused by Telegram and changes nothing.
        fake.inject_update(
            {
                "callback_query": {
                    "id": "replayed-refund",
                    "from": fake.users[admin].to_api(),
                    "message": done.to_api(),
                    "chat_instance": "1",
                    "data": f"adm:rfc:{purchase_id}",
                }
            }
        )
        refused = await fake.wait_for_bot_message(admin, lambda m: "refused the refund" in (m.text or ""))
        assert "charge_already_refunded" in (refused.text or "").lower()
    assert scalar(db_dsn, "SELECT outcome FROM payments WHERE purchase_id = %s", purchase_id) == "refunded"
    assert scalar(db_dsn, "SELECT count(*) FROM admin_audit WHERE action = 'refund' AND result = 'ok'") == 1
    assert scalar(db_dsn, "SELECT count(*) FROM admin_audit WHERE action = 'refund' AND result = 'failed'") == 1
    assert any(m.refunded_payment for m in fake.transcript(ALICE))
    await vpnd.stop()
