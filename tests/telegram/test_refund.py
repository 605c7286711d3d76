"""A Telegram Stars refund takes back everything the purchase gave: days (Xray at once) and the referral reward."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import trio

from tests.harness import bot_config, start_vpnd
from tests.xray.test_xray_writer import PUBLIC_KEY, TAG, reality_template
from vpnd_sandbox.telegram_fake import FakeTelegram
from vpnd_sandbox.xray_fake import start_fake_xray

ALICE, BOB, ADMIN = 1001, 2002, 1  # ADMIN: bot_config's admin_ids


def rows(dsn: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(query, params or None)
        return cur.fetchall() if cur.description else []


async def until(condition: Callable[[], bool]) -> None:
    """Poll (bounded by the caller's fail_after) until `condition` holds."""
    while not condition():
        await trio.sleep(0.05)


async def test_stars_refund_takes_back_days_and_the_referral_reward(
    nursery: trio.Nursery,
    fake_telegram: tuple[FakeTelegram, str],
    db_dsn: str,
    write_config: Callable[..., Path],
    tmp_path: Path,
) -> None:
    """Alice, invited by Bob, buys 30 days with Stars; Bob gets 10% and spends most of it; the admin
    refunds. Alice's days are gone and Xray drops her at once (the expiry worker is an hour away);
    Bob's reward is debited as far as his balance goes and the rest recorded as owed — never negative.
    Before the fix the refund only marked the payment: Alice kept her access and Bob his reward."""
    fake, base_url = fake_telegram
    template = tmp_path / "template.json"
    template.write_text(json.dumps(reality_template()))
    (tmp_path / "xray").mkdir()
    with start_fake_xray("xray.", inbound_tags=(TAG,)) as xray:
        config = bot_config(
            write_config, db_dsn, fake, base_url,
            referral={"percent": 10},
            workers={"expiry_interval": 3600},
            xray={
                "enabled": True, "template_path": str(template), "config_path": str(tmp_path / "xray" / "config.json"),
                "inbound_tag": TAG, "api_address": xray.address, "public_key": PUBLIC_KEY,
                "short_id": "6ba85179e30d4fc2",
            },
        )  # fmt: skip
        vpnd = await start_vpnd(nursery, config)
        for user_id, name in ((BOB, "Bob"), (ALICE, "Alice"), (ADMIN, "Admin")):
            fake.add_user(user_id, name)
        with trio.fail_after(60):
            fake.user_sends(BOB, "/start")
            await fake.wait_for_bot_message(BOB)
            code = rows(db_dsn, "SELECT referral_code FROM users WHERE id = %s", BOB)[0][0]
            fake.user_sends(ALICE, f"/start ref_{code}")
            await fake.wait_for_bot_message(ALICE)
            fake.user_sends(ALICE, "/buy")
            plans = await fake.wait_for_bot_message(ALICE, lambda m: "plan:m1" in m.callback_data)
            fake.user_presses_button(ALICE, plans.message_id, "plan:m1")
            methods = await fake.wait_for_bot_message(ALICE, lambda m: "pay:m1:s" in m.callback_data)
            fake.user_presses_button(ALICE, methods.message_id, "pay:m1:s")
            invoice = await fake.wait_for_bot_message(ALICE, lambda m: m.invoice is not None)
            fake.user_pays_invoice(ALICE, invoice.message_id)
            await until(lambda: ("add", f"u{ALICE}") in [(op, email) for op, email, _ in xray.operations()])
            (purchase_id,) = rows(db_dsn, "SELECT purchase_id FROM payments WHERE provider = 'stars'")[0]
            assert rows(db_dsn, "SELECT balance_minor FROM users WHERE id = %s", BOB) == [(49,)]  # 10% of 4.99
            # Bob spends 30 of his 49 (through the ledger, as every balance change goes).
            rows(
                db_dsn,
                "WITH spent AS (INSERT INTO balance_ledger (user_id, delta_minor, reason, reference) "
                "VALUES (%s, -30, 'purchase', 'test:spent') RETURNING 1) "
                "UPDATE users SET balance_minor = balance_minor - 30 WHERE id = %s",
                BOB,
                BOB,
            )

            fake.user_sends(ADMIN, "/admin")
            panel = await fake.wait_for_bot_message(ADMIN, lambda m: "adm:fu" in m.callback_data)
            fake.user_presses_button(ADMIN, panel.message_id, "adm:fu")
            await fake.wait_for_bot_message(ADMIN)
            fake.user_sends(ADMIN, str(ALICE))
            card = await fake.wait_for_bot_message(ADMIN, lambda m: f"adm:rf:{purchase_id}" in m.callback_data)
            fake.user_presses_button(ADMIN, card.message_id, f"adm:rf:{purchase_id}")
            confirm = await fake.wait_for_bot_message(ADMIN, lambda m: f"adm:rfc:{purchase_id}" in m.callback_data)
            assert "taken back" in (confirm.text or "")
            fake.user_presses_button(ADMIN, confirm.message_id, f"adm:rfc:{purchase_id}")
            done = await fake.wait_for_bot_message(ADMIN, lambda m: "refunded" in (m.text or ""))
            assert "30 days taken back" in (done.text or "") and "owed: 0.30 USD" in (done.text or "")
            await until(lambda: ("remove", f"u{ALICE}") in [(op, email) for op, email, _ in xray.operations()])
            told = await fake.wait_for_bot_message(ALICE, lambda m: "refunded" in (m.text or ""))
            assert "your access has ended" in (told.text or "")
        await vpnd.stop()

    assert rows(db_dsn, "SELECT outcome FROM payments WHERE purchase_id = %s", purchase_id) == [("refunded",)]
    assert rows(db_dsn, "SELECT status, expires_at <= now() FROM subscriptions WHERE user_id = %s", ALICE) == [
        ("expired", True)
    ]
    assert rows(db_dsn, "SELECT balance_minor FROM users WHERE id = %s", BOB) == [(0,)]
    assert rows(db_dsn, "SELECT delta_minor, reason FROM balance_ledger WHERE user_id = %s ORDER BY id", BOB) == [
        (49, "referral_reward"),
        (-30, "purchase"),
        (-19, "referral_reversal"),
    ]
    assert rows(db_dsn, "SELECT user_id, amount_minor, reason FROM balance_owed") == [(BOB, 30, "referral_reversal")]
    assert any(m.refunded_payment for m in fake.transcript(ALICE))
