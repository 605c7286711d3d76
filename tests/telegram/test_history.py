"""My payments, and the admin chat's notice of each payment, through the fake Bot API and a real PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from tests.harness import bot_config, has_button, press, say, scalar, sql, start_vpnd, text_has
from vpnd_sandbox.cryptopay_fake import FakeCryptoPay
from vpnd_sandbox.telegram_fake import FakeTelegram

ALICE, BOB, OPERATOR = 1001, 1002, 9001
NOTICE = "💸"


async def until(dsn: str, query: str, expected: object, *params: Any) -> None:
    """Poll the database (bounded by the caller's fail_after) until `query` returns `expected`."""
    while scalar(dsn, query, *params) != expected:
        await trio.sleep(0.05)


def seed_payment(
    dsn: str, user_id: int, amount_minor: int, days_ago: int, *, method: str = "balance", outcome: str = "granted",
    kind: str = "plan",
) -> None:  # fmt: skip
    """A paid purchase and its payment, `days_ago` days back (set up on the test's own connection)."""
    sql(
        dsn,
        "WITH pu AS (INSERT INTO purchases (user_id, kind, plan_code, days, method, amount_minor, currency, status, "
        "expires_at, paid_at, created_at) VALUES (%s, %s, %s, %s, %s, %s, 'USD', 'paid', now(), now(), "
        "now() - %s * interval '1 day') RETURNING id) "
        "INSERT INTO payments (purchase_id, user_id, provider, provider_payment_id, amount_minor, currency, outcome, "
        "created_at) SELECT id, %s, %s, 'seed:' || id, %s, 'USD', %s, now() - %s * interval '1 day' FROM pu",
        user_id, kind, "m1" if kind == "plan" else None, 30 if kind == "plan" else None, method, amount_minor,
        days_ago, user_id, method, amount_minor, outcome, days_ago,
    )  # fmt: skip


async def buy_m1(fake: FakeTelegram, method: str) -> None:
    """Alice picks plan m1 and pays with `method` ("c": Crypto Pay, "s": Stars) — until the invoice is shown."""
    plans = await say(fake, ALICE, "/buy", predicate=has_button("plan:m1"))
    methods = await press(fake, ALICE, plans, "plan:m1", predicate=has_button(f"pay:m1:{method}"))
    fake.user_presses_button(ALICE, methods.message_id, f"pay:m1:{method}")


async def test_history_pages_newest_first_and_never_shows_another_users_rows(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    vpnd = await start_vpnd(nursery, bot_config(write_config, db_dsn, fake, base_url))
    fake.add_user(ALICE, "Alice")
    fake.add_user(BOB, "Bob")
    with trio.fail_after(30):
        menu = await say(fake, ALICE, "/start", predicate=has_button("pays"))
        empty = await press(fake, ALICE, menu, "pays", predicate=text_has("My payments"))
        assert "No payments yet" in (empty.text or "") and "pays:1" not in empty.callback_data
        await say(fake, BOB, "/start")

        # Alice: 12 payments, 1.01 USD twelve days ago … 1.12 USD yesterday; one a top-up, one refunded.
        for n in range(1, 13):
            seed_payment(
                db_dsn, ALICE, 100 + n, 13 - n, kind="topup" if n == 3 else "plan",
                outcome="refunded" if n == 12 else "granted", method="stars" if n == 11 else "balance",
            )  # fmt: skip
        seed_payment(db_dsn, BOB, 777, 0)

        first = await say(fake, ALICE, "/payments", predicate=text_has("page 1"))
        lines = (first.text or "").splitlines()[1:]
        assert [line.split(" · ")[2] for line in lines] == [f"1.{n:02d} USD" for n in range(12, 2, -1)]
        assert lines[0].endswith("1 month · 1.12 USD · balance · refunded")
        assert " · 1.11 USD · Telegram Stars · paid" in lines[1]
        assert lines[-1].split(" · ")[1:] == ["balance top-up", "1.03 USD", "balance", "paid"]
        assert "pays:1" in first.callback_data and "pays:0" not in first.callback_data

        second = await press(fake, ALICE, first, "pays:1", predicate=text_has("My payments"))
        assert "page 2" in (second.text or "")
        assert [line.split(" · ")[2] for line in (second.text or "").splitlines()[1:]] == ["1.02 USD", "1.01 USD"]
        assert second.callback_data[:1] == ["pays:0"] and "pays:2" not in second.callback_data

        # Bob forges Alice's buttons: the page is all a button carries; the rows are always the sender's own.
        own = await say(fake, BOB, "/payments", predicate=text_has("page 1"))
        assert "7.77 USD" in (own.text or "") and "1.12 USD" not in (own.text or "")
        for n, data in enumerate(("pays:1", "pays:0", "pays:99999999", "pays:²")):
            mark = fake.change_seq
            forged = {**own.to_api(), "message_id": 10**6 + n}  # gone: the answer comes as a new message
            fake.inject_update(
                {"callback_query": {"id": f"forged{data}", "from": fake.users[BOB].to_api(), "message": forged,
                                    "chat_instance": "1", "data": data}}
            )  # fmt: skip
            shown = await fake.wait_for_bot_message(BOB, text_has("My payments"), since=mark)
            assert "USD" not in (shown.text or "").replace("7.77 USD", ""), (data, shown.text)
    await vpnd.stop()


async def test_each_payment_is_announced_once_to_the_admin_chat(
    nursery: trio.Nursery,
    fake_telegram: tuple[FakeTelegram, str],
    fake_cryptopay: tuple[FakeCryptoPay, str],
    db_dsn: str,
    write_config: Callable[..., Path],
) -> None:
    """A Crypto Pay invoice found paid by the watcher and then by two late webhooks, and a Stars payment
    delivered twice: one notice each, with the user, plan, amount, method, promo code and referrer."""
    fake, base_url = fake_telegram
    pay, pay_url = fake_cryptopay
    config = bot_config(
        write_config, db_dsn, fake, base_url,
        cryptopay={"enabled": True, "token": pay.token, "api_base_url": pay_url, "poll_interval": 0.2},
        payments={"notify_chat_id": OPERATOR},
    )  # fmt: skip
    sql(db_dsn, "INSERT INTO promo_codes (code, percent, max_uses) VALUES ('SPRING20', 20, 10)")
    vpnd = await start_vpnd(nursery, config)
    pay.webhook_url = f"{vpnd.http_url}/webhooks/cryptopay"
    fake.add_user(OPERATOR, "Operator")
    fake.add_user(BOB, "Bob", username="bob")
    fake.add_user(ALICE, "Alice", username="alice")
    with trio.fail_after(60):
        for user in (OPERATOR, BOB):
            await say(fake, user, "/start")
        code = scalar(db_dsn, "SELECT referral_code FROM users WHERE id = %s", BOB)
        await say(fake, ALICE, f"/start ref_{code}")
        await say(fake, ALICE, "/promo SPRING20", predicate=text_has("SPRING20"))

        # Crypto Pay: the webhook is withheld until the watcher has granted, then arrives twice.
        await buy_m1(fake, "c")
        await fake.wait_for_bot_message(ALICE, text_has("Crypto Pay"))
        purchase = scalar(db_dsn, "SELECT id FROM purchases WHERE user_id = %s AND method = 'cryptopay'", ALICE)
        pay.webhooks_enabled = False
        pay.pay(scalar(db_dsn, "SELECT invoice_id FROM purchases WHERE id = %s", purchase))
        await until(db_dsn, "SELECT status FROM purchases WHERE id = %s", "paid", purchase)  # the watcher's
        pay.webhooks_enabled, pay.webhook_copies = True, 2
        assert pay.deliver_suppressed() == 1
        await pay.wait_until(lambda: len(pay.successful_deliveries()) == 2)

        # Stars: paid, then the same successful_payment delivered again.
        await buy_m1(fake, "s")
        invoice = await fake.wait_for_bot_message(ALICE, lambda m: m.invoice is not None)
        fake.user_pays_invoice(ALICE, invoice.message_id)
        await until(db_dsn, "SELECT count(*) FROM payments WHERE provider = 'stars'", 1)
        paid = next(m for m in fake.transcript(ALICE) if m.successful_payment is not None)
        fake.inject_update({"message": paid.to_api()})
        await fake.wait_until(lambda: not fake.pending_updates)

        await fake.wait_until(lambda: len([m for m in fake.bot_messages(OPERATOR) if NOTICE in (m.text or "")]) == 2)
        await trio.sleep(1)  # time for a second notice, were one queued
    notices = [m.text or "" for m in fake.bot_messages(OPERATOR) if NOTICE in (m.text or "")]
    assert len(notices) == 2
    assert scalar(db_dsn, "SELECT count(*) FROM outbox WHERE chat_id = %s AND dedupe_key LIKE 'payment_notice:%%'",
                  OPERATOR) == 2  # fmt: skip
    crypto, stars = notices
    assert f"{ALICE} (@alice)" in crypto and f"{BOB} (@bob)" in crypto
    assert "4.00 USD via Crypto Pay" in crypto and "Plan: m1" in crypto and "Promo code: SPRING20" in crypto
    assert "250 ⭐ via Telegram Stars" in stars and "Promo code: —" in stars and f"{BOB} (@bob)" in stars
    assert scalar(db_dsn, "SELECT count(*) FROM payments") == 2
    await vpnd.stop()


async def test_no_notice_without_notify_chat_id(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    vpnd = await start_vpnd(nursery, bot_config(write_config, db_dsn, fake, base_url))
    fake.add_user(ALICE, "Alice")
    with trio.fail_after(30):
        await buy_m1(fake, "s")
        invoice = await fake.wait_for_bot_message(ALICE, lambda m: m.invoice is not None)
        fake.user_pays_invoice(ALICE, invoice.message_id)
        await fake.wait_for_bot_message(ALICE, text_has("Payment received"))
    assert sql(db_dsn, "SELECT chat_id, dedupe_key FROM outbox WHERE chat_id <> %s", ALICE) == []
    assert scalar(db_dsn, "SELECT count(*) FROM payments WHERE outcome = 'granted'") == 1
    await vpnd.stop()
