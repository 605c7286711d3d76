"""Amounts are shown in the currency's own minor units, in every view, through the real bot.

The menu used to divide by 100 whatever the currency: a balance of 1500 yen read "15.00 JPY" and
2.500 Kuwaiti dinars (2500 fils) read "25.00 KWD". One formatter (`vpnd.money.format_money`) now
serves the menu, the buy flow and the invoices.
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import attrs
import psycopg
import pytest
import trio

from tests.harness import bot_config, start_vpnd
from vpnd.config import Plan
from vpnd_sandbox.telegram_fake import FakeTelegram

ALICE = 1001


@pytest.mark.parametrize(
    ("currency", "price", "balance_minor", "balance_text", "price_text"),
    [
        ("JPY", "500", 1500, "1500 JPY", "500 JPY"),  # ISO 4217: no minor unit
        ("KWD", "1.250", 2500, "2.500 KWD", "1.250 KWD"),  # three decimals (fils)
    ],
)
async def test_menu_and_buy_flow_show_the_currency_minor_units(
    nursery: trio.Nursery,
    fake_telegram: tuple[FakeTelegram, str],
    db_dsn: str,
    write_config: Callable[..., Path],
    currency: str,
    price: str,
    balance_minor: int,
    balance_text: str,
    price_text: str,
) -> None:
    fake, base_url = fake_telegram
    payments = {"currency": currency, "min_price": "1", "topup_min": "1", "topup_presets": ["10", "20"]}
    config = bot_config(write_config, db_dsn, fake, base_url, payments=payments)
    plan = Plan("m1", {"en": "1 month"}, 30, Decimal(price), currency, 0)
    vpnd = await start_vpnd(nursery, attrs.evolve(config, plans=(plan,)))
    fake.add_user(ALICE, "Alice")
    with trio.fail_after(30):
        fake.user_sends(ALICE, "/start")
        await fake.wait_for_bot_message(ALICE)
        with psycopg.connect(db_dsn, autocommit=True) as conn:
            conn.execute("UPDATE users SET balance_minor = %s WHERE id = %s", (balance_minor, ALICE))

        fake.user_sends(ALICE, "/start")
        menu = await fake.wait_for_bot_message(ALICE, lambda m: "Balance" in (m.text or ""))
        assert f"Balance: {balance_text}" in (menu.text or "")

        fake.user_sends(ALICE, "/buy")
        plans = await fake.wait_for_bot_message(ALICE, lambda m: "plan:m1" in m.callback_data)
        assert f"1 month — {price_text}" in str(plans.buttons)
        fake.user_presses_button(ALICE, plans.message_id, "plan:m1")
        methods = await fake.wait_for_bot_message(ALICE, lambda m: "pay:m1:b" in m.callback_data)
        assert price_text in (methods.text or "")
        assert f"From balance ({balance_text})" in str(methods.buttons)
    await vpnd.stop()
