"""Promo code kinds and conditions through the fake Bot API, with the codes made by the real CLI:
an amount off, extra days and a balance credit; personal, first-purchase-only and plan-bound codes."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import trio

from tests.harness import bot_config, press, say, scalar, sql, start_vpnd, text_has, vpnd_cli
from vpnd.config import Config
from vpnd_sandbox.telegram_fake import FakeTelegram

ALICE, BOB, CAROL = 1001, 1002, 1003

YEARLY = (
    '[[plans]]\ncode = "y1"\ntitle = { en = "1 year" }\ndays = 365\nprice = "39.99"\ncurrency = "USD"\nstars = 2000\n'
)


def make_code(config: Config, *args: str) -> None:
    done: subprocess.CompletedProcess[str] = vpnd_cli(Path(config.path))("admin", "promo", "create", *args)
    assert done.returncode == 0, done.stderr


def give_balance(dsn: str, user_id: int, minor: int) -> None:
    sql(dsn, "UPDATE users SET balance_minor = balance_minor + %s WHERE id = %s", minor, user_id)
    sql(
        dsn, "INSERT INTO balance_ledger (user_id, delta_minor, reason, reference) VALUES (%s, %s, 'test', %s)",
        user_id, minor, f"seed:{user_id}",
    )  # fmt: skip


async def test_amount_days_and_balance_codes_do_what_they_say(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    config = bot_config(write_config, db_dsn, fake, base_url)
    make_code(config, "TWOOFF", "--kind", "amount", "--value", "2.00")
    make_code(config, "HUGEOFF", "--kind", "amount", "--value", "100")
    make_code(config, "WEEK", "--kind", "days", "--value", "7", "--max-uses", "1")
    make_code(config, "CASH", "--kind", "balance", "--value", "5")
    vpnd = await start_vpnd(nursery, config)
    for user_id, name in ((ALICE, "Alice"), (BOB, "Bob"), (CAROL, "Carol")):
        fake.add_user(user_id, name, language_code="en")
    with trio.fail_after(60):
        for user_id in (ALICE, BOB, CAROL):
            await say(fake, user_id, "/start")

        # An amount off: remembered, shown, and taken off the price.
        accepted = await say(fake, ALICE, "/promo twooff")
        assert "TWOOFF" in (accepted.text or "") and "−2.00 USD on your next purchase" in (accepted.text or "")
        plans = await press(fake, ALICE, accepted, "buy", predicate=lambda m: "plan:m1" in m.callback_data)
        assert "2.99 USD" in str(plans.buttons) and "−2.00 USD" in (plans.text or "")
        methods = await press(fake, ALICE, plans, "plan:m1")
        fake.user_presses_button(ALICE, methods.message_id, "pay:m1:s")
        invoice = await fake.wait_for_bot_message(ALICE, lambda m: m.invoice is not None)
        assert invoice.invoice is not None and invoice.invoice.total_amount == 150  # 250 Stars × 2.99 / 4.99
        assert sql(db_dsn, "SELECT amount_minor, list_amount_minor, promo_code FROM purchases") == [
            (299, 499, "TWOOFF")
        ]
        fake.user_pays_invoice(ALICE, invoice.message_id)
        while scalar(db_dsn, "SELECT count(*) FROM promo_redemptions WHERE code = 'TWOOFF'") != 1:
            await trio.sleep(0.05)
        assert scalar(db_dsn, "SELECT repriced FROM payments") is False  # the discount was honoured

        # More off than the price: never below [payments] min_price (0.10).
        accepted = await say(fake, CAROL, "/promo hugeoff")
        plans = await press(fake, CAROL, accepted, "buy", predicate=lambda m: "plan:m1" in m.callback_data)
        assert "0.10 USD" in str(plans.buttons)

        # Extra days: granted at once, once per user, and the last use goes to one user only.
        days = await say(fake, BOB, "/promo week")
        assert "+7 days added" in (days.text or "") and "sub" in days.callback_data
        left = scalar(db_dsn, "SELECT round(extract(epoch FROM expires_at - now()) / 86400) FROM subscriptions "
                      "WHERE user_id = %s", BOB)  # fmt: skip
        assert left == 7
        again = await say(fake, BOB, "/promo WEEK")
        assert "already used" in (again.text or "")
        used_up = await say(fake, CAROL, "/promo WEEK")
        assert "used up" in (used_up.text or "")
        assert scalar(db_dsn, "SELECT count(*) FROM subscriptions WHERE user_id = %s", CAROL) == 0

        # A balance credit: through the ledger, once.
        cash = await say(fake, CAROL, "/promo cash")
        assert "+5.00 USD on your balance (now 5.00 USD)" in (cash.text or "")
        again = await say(fake, CAROL, "/promo cash")
        assert "already used" in (again.text or "")
    assert sql(db_dsn, "SELECT delta_minor, reason, reference FROM balance_ledger WHERE user_id = %s", CAROL) == [
        (500, "promo", f"promo:CASH:{CAROL}")
    ]
    assert scalar(db_dsn, "SELECT balance_minor FROM users WHERE id = %s", CAROL) == 500
    assert sql(db_dsn, "SELECT code, used_count FROM promo_codes ORDER BY code") == [
        ("CASH", 1), ("HUGEOFF", 0), ("TWOOFF", 1), ("WEEK", 1)
    ]  # fmt: skip
    await vpnd.stop()


async def test_a_personal_promo_used_by_another_user_is_refused_as_no_such_code(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    config = bot_config(write_config, db_dsn, fake, base_url)
    vpnd = await start_vpnd(nursery, config)
    for user_id, name in ((ALICE, "Alice"), (BOB, "Bob")):
        fake.add_user(user_id, name, language_code="en")
    with trio.fail_after(60):
        for user_id in (ALICE, BOB):
            await say(fake, user_id, "/start")
        await trio.to_thread.run_sync(
            lambda: make_code(config, "COMEBACK", "--kind", "balance", "--value", "3", "--user", str(ALICE))
        )
        refused = await say(fake, BOB, "/promo COMEBACK")
        nonexistent = await say(fake, BOB, "/promo NOSUCH")
        assert refused.text == nonexistent.text and "There is no such promo code" in (refused.text or "")
        assert sql(db_dsn, "SELECT code, result FROM promo_attempts WHERE user_id = %s ORDER BY id", BOB) == [
            ("COMEBACK", "not_found"), ("NOSUCH", "not_found")
        ]  # fmt: skip — counted as wrong guesses
        mine = await say(fake, ALICE, "/promo comeback")
        assert "+3.00 USD on your balance" in (mine.text or "")
    assert scalar(db_dsn, "SELECT balance_minor FROM users WHERE id = %s", BOB) == 0
    assert scalar(db_dsn, "SELECT balance_minor FROM users WHERE id = %s", ALICE) == 300
    await vpnd.stop()


async def test_first_purchase_code_is_refused_after_a_payment(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    config = bot_config(write_config, db_dsn, fake, base_url)
    make_code(config, "HELLO", "--kind", "percent", "--value", "30", "--first-purchase")
    vpnd = await start_vpnd(nursery, config)
    for user_id, name in ((ALICE, "Alice"), (BOB, "Bob")):
        fake.add_user(user_id, name, language_code="en")
    with trio.fail_after(60):
        for user_id in (ALICE, BOB):
            await say(fake, user_id, "/start")
        give_balance(db_dsn, ALICE, 1000)
        fake.user_sends(ALICE, "/buy")
        plans = await fake.wait_for_bot_message(ALICE, lambda m: "plan:m1" in m.callback_data)
        methods = await press(fake, ALICE, plans, "plan:m1")
        await press(fake, ALICE, methods, "pay:m1:b", predicate=text_has("Paid from your balance"))

        refused = await say(fake, ALICE, "/promo hello", predicate=text_has("promo code"))
        assert "only for a first purchase" in (refused.text or "")
        assert scalar(db_dsn, "SELECT pending_promo_code FROM users WHERE id = %s", ALICE) is None
        welcome = await say(fake, BOB, "/promo hello")
        assert "30% off" in (welcome.text or "")

        # Accepted before a first payment, the code is re-checked at the next purchase: after a payment
        # made meanwhile (a top-up here), the plan costs its list price.
        give_balance(db_dsn, BOB, 1000)
        sql(
            db_dsn,
            "INSERT INTO purchases (user_id, kind, method, amount_minor, currency, status, expires_at, paid_at) "
            "VALUES (%s, 'topup', 'cryptopay', 100, 'USD', 'paid', now(), now())", BOB,
        )  # fmt: skip
        fake.user_sends(BOB, "/buy")
        plans = await fake.wait_for_bot_message(BOB, lambda m: "plan:m1" in m.callback_data)
        assert "4.99 USD" in str(plans.buttons)
    await vpnd.stop()


async def test_plan_bound_code_discounts_only_that_plan(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    config = bot_config(write_config, db_dsn, fake, base_url, plans=YEARLY)
    make_code(config, "YEARHALF", "--kind", "percent", "--value", "50", "--plan", "y1")
    vpnd = await start_vpnd(nursery, config)
    fake.add_user(ALICE, "Alice", language_code="en")
    with trio.fail_after(60):
        await say(fake, ALICE, "/start")
        give_balance(db_dsn, ALICE, 10_000)
        accepted = await say(fake, ALICE, "/promo yearhalf")
        assert "50% off" in (accepted.text or "") and "plan “1 year” only" in (accepted.text or "")
        plans = await press(fake, ALICE, accepted, "buy", predicate=lambda m: "plan:y1" in m.callback_data)
        assert "4.99 USD" in str(plans.buttons) and "20.00 USD" in str(plans.buttons)

        # The other plan is bought at its list price and the code stays remembered...
        methods = await press(fake, ALICE, plans, "plan:m1")
        assert "YEARHALF is for the plan “1 year” only" in (methods.text or "")
        await press(fake, ALICE, methods, "pay:m1:b", predicate=text_has("Paid from your balance"))
        assert scalar(db_dsn, "SELECT pending_promo_code FROM users WHERE id = %s", ALICE) == "YEARHALF"
        assert sql(db_dsn, "SELECT plan_code, amount_minor, promo_code FROM purchases") == [("m1", 499, None)]
        assert scalar(db_dsn, "SELECT used_count FROM promo_codes") == 0

    assert scalar(db_dsn, "SELECT balance_minor FROM users WHERE id = %s", ALICE) == 10_000 - 499
    await vpnd.stop()
