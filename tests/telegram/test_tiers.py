"""Selling tiers through the bot: the tiers side by side, crafted callbacks for plans not on sale, a pro-rata
upgrade paid from the balance, and a traffic pack bought with Telegram Stars (the fake Bot API throughout)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import trio

from tests.harness import bot_config, scalar, start_vpnd
from vpnd.config import GIB
from vpnd_sandbox.telegram.records import CallbackQuery
from vpnd_sandbox.telegram_fake import ChatMessage, FakeTelegram

ALICE = 1001
TIERS = """
[[plans]]
code = "pro"
title = { en = "Pro" }
description = { en = "For families <and> friends." }
days = 90
price = "12.00"
currency = "USD"
stars = 600
devices = 3
traffic_gb = 100
traffic_reset = "monthly"

[[plans]]
code = "legacy"
title = { en = "Legacy" }
days = 30
price = "2.00"
currency = "USD"
stars = 100
visible = false

[[plans]]
code = "lite"
title = { en = "Lite" }
days = 30
price = "3.00"
currency = "USD"
stars = 150
devices = 1
traffic_gb = 10

[[plans]]
code = "free"
title = { en = "Trial" }
days = 3
trial = true
traffic_gb = 1

[[traffic_packs]]
code = "gb5"
title = { en = "+5 GB" }
gb = 5
price = "1.00"
currency = "USD"
stars = 50
"""
_query_ids = itertools.count(7_000_000)


async def press(fake: FakeTelegram, message: ChatMessage, data: str, **wait: Any) -> ChatMessage:
    fake.user_presses_button(ALICE, message.message_id, data)
    return await fake.wait_for_bot_message(ALICE, **wait)


def forge_press(fake: FakeTelegram, message: ChatMessage, data: str) -> None:
    """A modified client's press: callback data that no button of the message carries."""
    query_id = str(next(_query_ids))
    fake.callback_queries[query_id] = CallbackQuery(
        id=query_id, user_id=ALICE, message_id=message.message_id, data=data
    )
    fake.inject_update(
        {
            "callback_query": {
                "id": query_id,
                "from": {"id": ALICE, "is_bot": False, "first_name": "Alice"},
                "message": message.to_api(),
                "chat_instance": "1",
                "data": data,
            }
        }
    )


def give_balance(dsn: str, minor: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE users SET balance_minor = balance_minor + %s WHERE id = %s", (minor, ALICE))
        conn.execute(
            "INSERT INTO balance_ledger (user_id, delta_minor, reason, reference) VALUES (%s, %s, 'test', 'seed')",
            (ALICE, minor),
        )


async def test_tiers_side_by_side_and_plans_not_on_sale_refused(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    vpnd = await start_vpnd(nursery, bot_config(write_config, db_dsn, fake, base_url, plans=TIERS))
    fake.add_user(ALICE, "Alice")
    with trio.fail_after(30):
        fake.user_sends(ALICE, "/buy")
        plans = await fake.wait_for_bot_message(ALICE, lambda m: "plan:m1" in m.callback_data)
        text = plans.text or ""
        # One message with every tier on sale; one button each — not the hidden plan, not the trial.
        assert [d for d in plans.callback_data if d.startswith("plan:")] == ["plan:m1", "plan:pro", "plan:lite"]
        assert "Legacy" not in text and "Trial" not in text
        assert "Pro — 12.00 USD for 90 days (4.00 USD / month)" in text
        assert "3 devices · 📶 100 GB / month" in text
        assert "For families <and> friends." in text  # the description, escaped as HTML and shown as text
        assert "1 month — 4.99 USD for 30 days (4.99 USD / month)" in text
        assert "unlimited devices · 📶 unlimited traffic" in text
        assert "1 device · 📶 10 GB / month" in text  # per_period with 30 days

        for crafted in ("plan:legacy", "plan:free"):
            forge_press(fake, plans, crafted)
            refused = await fake.wait_for_bot_message(ALICE, lambda m: "not on sale" in (m.text or ""))
            assert not any(d.startswith("pay:") for d in refused.callback_data)
        # Straight to paying for them is refused too (the service checks, not only the screen).
        give_balance(db_dsn, 1000)
        for count, crafted in enumerate(("pay:legacy:b", "pay:free:b"), 1):
            forge_press(fake, plans, crafted)
            await fake.wait_until(
                lambda n=count: len([x for x in fake.notices_for(ALICE) if "no longer" in x.text]) >= n
            )
    assert scalar(db_dsn, "SELECT count(*) FROM purchases") == 0
    assert scalar(db_dsn, "SELECT count(*) FROM subscriptions") == 0

    # A subscriber of the hidden plan may renew it.
    with psycopg.connect(db_dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO subscriptions (user_id, kind, status, uuid, sub_token, plan_code, starts_at, expires_at) "
            "VALUES (%s, 'paid', 'active', gen_random_uuid(), 'tok-legacy', 'legacy', now(), "
            "now() + interval '5 days')",
            (ALICE,),
        )
    with trio.fail_after(30):
        fake.user_sends(ALICE, "/buy")
        plans = await fake.wait_for_bot_message(ALICE, lambda m: "plan:legacy" in m.callback_data)
        assert "Renew Legacy — 2.00 USD" in str(plans.buttons) and "Legacy" not in (plans.text or "")
        methods = await press(fake, plans, "plan:legacy", predicate=lambda m: "pay:legacy:b" in m.callback_data)
        assert "2.00 USD" in (methods.text or "")
        await press(fake, methods, "pay:legacy:b", predicate=lambda m: "Paid from your balance" in (m.text or ""))
    assert scalar(db_dsn, "SELECT round(extract(epoch FROM expires_at - now()) / 86400) FROM subscriptions") == 35
    await vpnd.stop()


async def test_upgrade_shown_before_paying_and_paid_from_the_balance(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    vpnd = await start_vpnd(nursery, bot_config(write_config, db_dsn, fake, base_url, plans=TIERS))
    fake.add_user(ALICE, "Alice")
    with trio.fail_after(40):
        fake.user_sends(ALICE, "/start")
        await fake.wait_for_bot_message(ALICE)
        give_balance(db_dsn, 2000)
        fake.user_sends(ALICE, "/buy")
        plans = await fake.wait_for_bot_message(ALICE, lambda m: "plan:m1" in m.callback_data)
        methods = await press(fake, plans, "plan:m1", predicate=lambda m: "pay:m1:b" in m.callback_data)
        await press(fake, methods, "pay:m1:b", predicate=lambda m: "Paid from your balance" in (m.text or ""))
        with psycopg.connect(db_dsn, autocommit=True) as conn:  # half of the month used
            conn.execute(
                "UPDATE subscriptions SET expires_at = now() + interval '15 days' WHERE user_id = %s", (ALICE,)
            )

        fake.user_sends(ALICE, "/buy")
        plans = await fake.wait_for_bot_message(ALICE, lambda m: "plan:pro" in m.callback_data)
        methods = await press(fake, plans, "plan:pro", predicate=lambda m: "pay:pro:b" in m.callback_data)
        text = methods.text or ""
        assert "Switching from 1 month" in text
        assert "12.00 USD − 2.49 USD credit = 9.51 USD to pay" in text  # floor(499 × 15 / 30) = 249
        assert "pay:pro:s" in methods.callback_data  # m1 was not paid in Stars: Stars at the full price
        assert "600 ⭐" in str(methods.buttons)
        await press(fake, methods, "pay:pro:b", predicate=lambda m: "Paid from your balance" in (m.text or ""))
        await fake.wait_until(
            lambda: any("after a 2.49 USD credit" in (m.text or m.caption or "") for m in fake.bot_messages(ALICE))
        )

        # Back to m1 right away: the credit covers it, so the switch is not offered, and the user is told why.
        fake.user_sends(ALICE, "/buy")
        plans = await fake.wait_for_bot_message(ALICE, lambda m: "plan:m1" in m.callback_data)
        back = await press(fake, plans, "plan:m1", predicate=lambda m: "switch when your plan ends" in (m.text or ""))
        assert not any(d.startswith("pay:m1:") and d != "pay:m1:s" for d in back.callback_data)
    assert scalar(db_dsn, "SELECT plan_code FROM subscriptions WHERE user_id = %s", ALICE) == "pro"
    assert scalar(db_dsn, "SELECT round(extract(epoch FROM expires_at - now()) / 86400) FROM subscriptions") == 90
    assert scalar(db_dsn, "SELECT balance_minor FROM users WHERE id = %s", ALICE) == 2000 - 499 - 951
    await vpnd.stop()


async def test_traffic_pack_with_stars_from_my_subscription(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    vpnd = await start_vpnd(nursery, bot_config(write_config, db_dsn, fake, base_url, plans=TIERS))
    fake.add_user(ALICE, "Alice")
    with trio.fail_after(40):
        fake.user_sends(ALICE, "/start")
        menu = await fake.wait_for_bot_message(ALICE)
        # Without a quota there is nothing to add traffic to: a crafted "packs" is answered politely.
        forge_press(fake, menu, "packs")
        await fake.wait_for_bot_message(ALICE, lambda m: "traffic limit" in (m.text or ""))
        forge_press(fake, menu, "pp:gb5:s")
        await fake.wait_until(lambda: any("traffic limit" in n.text for n in fake.notices_for(ALICE)))
        assert scalar(db_dsn, "SELECT count(*) FROM purchases") == 0

        give_balance(db_dsn, 300)
        fake.user_sends(ALICE, "/buy")
        plans = await fake.wait_for_bot_message(ALICE, lambda m: "plan:lite" in m.callback_data)
        methods = await press(fake, plans, "plan:lite", predicate=lambda m: "pay:lite:b" in m.callback_data)
        sub = await press(fake, methods, "pay:lite:b", predicate=lambda m: "packs" in m.callback_data)
        assert "Buy traffic" in str(sub.buttons)  # "My subscription" offers traffic for a plan with a quota

        packs = await press(fake, sub, "packs", predicate=lambda m: "pk:gb5" in m.callback_data)
        assert "+5 GB: 5 GB — 1.00 USD · 50 ⭐" in (packs.text or "")
        assert "0 B of 10 GB" in (packs.text or "")
        methods = await press(fake, packs, "pk:gb5", predicate=lambda m: "pp:gb5:s" in m.callback_data)
        fake.user_presses_button(ALICE, methods.message_id, "pp:gb5:s")
        invoice = await fake.wait_for_bot_message(ALICE, lambda m: m.invoice is not None)
        assert invoice.invoice is not None and (invoice.invoice.currency, invoice.invoice.total_amount) == ("XTR", 50)
        fake.user_pays_invoice(ALICE, invoice.message_id)
        done = await fake.wait_for_bot_message(ALICE, lambda m: "of traffic added" in (m.text or ""))
        assert "5 GB of traffic added: you have used 0 B of 15 GB" in (done.text or "")
    assert scalar(db_dsn, "SELECT extra_bytes FROM traffic_periods WHERE user_id = %s AND current", ALICE) == 5 * GIB
    assert scalar(db_dsn, "SELECT granted_bytes FROM payments WHERE provider = 'stars'") == 5 * GIB
    await vpnd.stop()
