"""Maintenance mode end to end: switched by the CLI and by the admin bot, seen by users as a banner,
sales and trials paused, keys and paid invoices untouched, admins not held back, kept over a restart."""

from __future__ import annotations

import base64
import subprocess
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio

from tests.harness import ADMIN, bot_config, cli_result, press, say, scalar, sql, start_shop, start_vpnd, vpnd_cli
from vpnd_sandbox.cryptopay_fake import FakeCryptoPay
from vpnd_sandbox.telegram_fake import ChatMessage, FakeTelegram

ALICE, BOB, CAROL = 1001, 1002, 1003
SUPPORT = 1004  # staff below the owners ([telegram].admin_roles)
BANNER = "Back at 18:00 UTC <maybe>"


def forge_callback(fake: FakeTelegram, user_id: int, message: ChatMessage, data: str) -> None:
    fake.inject_update(
        {
            "callback_query": {
                "id": f"forged-{message.message_id}-{data}",
                "from": fake.users[user_id].to_api(),
                "message": message.to_api(),
                "chat_instance": "1",
                "data": data,
            }
        }
    )


def paused(message: ChatMessage) -> bool:
    return "paused during maintenance" in (message.text or "")


async def run_cli(cli: Callable[..., subprocess.CompletedProcess[str]], *args: str) -> Any:
    """The CLI as a process, off the Trio thread (vpnd runs in this process)."""
    return cli_result(await trio.to_thread.run_sync(partial(cli, *args, "--json")))


async def test_maintenance_by_cli_pauses_sales_keeps_keys_grants_paid_invoices_and_survives_restart(
    nursery: trio.Nursery,
    fake_telegram: tuple[FakeTelegram, str],
    fake_cryptopay: tuple[FakeCryptoPay, str],
    db_dsn: str,
    write_config: Callable[..., Path],
) -> None:
    fake, _ = fake_telegram
    pay, _ = fake_cryptopay
    cli = vpnd_cli(write_config(name="cli.toml", database={"dsn": db_dsn}))
    roles = {"admin_roles": {str(SUPPORT): "support"}}
    vpnd = await start_shop(nursery, write_config, db_dsn, fake_telegram, fake_cryptopay, telegram=roles)
    for user_id, name in ((ALICE, "Alice"), (BOB, "Bob"), (CAROL, "Carol"), (ADMIN, "Admin"), (SUPPORT, "Sam")):
        fake.add_user(user_id, name)
    with trio.fail_after(90):
        # Before maintenance: Alice opens a Crypto Pay invoice, Bob takes the trial (a key and a URL).
        plans = await say(fake, ALICE, "/buy")
        methods = await press(fake, ALICE, plans, "plan:m1")
        await press(fake, ALICE, methods, "pay:m1:c", predicate=lambda m: "Crypto Pay" in (m.text or ""))
        await say(fake, BOB, "/trial")
        token = scalar(db_dsn, "SELECT sub_token FROM subscriptions WHERE user_id = %s", BOB)
        assert (await run_cli(cli, "admin", "maintenance", "status"))["on"] is False

        state = await run_cli(cli, "admin", "maintenance", "on", "--message", BANNER)
        assert state["on"] is True and state["message"] == BANNER
        # Users see the banner (the admin's text, escaped) on the menu; starting anything paid is refused.
        menu = await say(fake, CAROL, "/start")
        assert "Maintenance" in (menu.text or "") and BANNER in (menu.text or "")
        refused = await press(fake, CAROL, menu, "trial")
        assert paused(refused) and BANNER in (refused.text or "")
        assert paused(await say(fake, CAROL, "/buy"))
        assert paused(await say(fake, CAROL, "/promo SPRING"))
        menu = await say(fake, CAROL, "/start")
        for data in ("buy", "plan:m1", "pay:m1:c", "packs", "topup", "promo"):
            forge_callback(fake, CAROL, menu, data)
        fake.user_sends(CAROL, "/menu")
        await fake.wait_for_bot_message(CAROL, lambda m: m.message_id > menu.message_id)
        assert scalar(db_dsn, "SELECT count(*) FROM trials WHERE user_id = %s", CAROL) == 0
        assert scalar(db_dsn, "SELECT count(*) FROM purchases WHERE user_id = %s", CAROL) == 0

        # Existing keys keep working: "My subscription" and the subscription URL.
        details = await say(fake, BOB, "/subscription")
        assert "vless://" in (details.text or "")
        async with httpx.AsyncClient(base_url=vpnd.http_url, timeout=5) as client:
            response = await client.get(f"/sub/{token}")
        assert response.status_code == 200
        assert base64.b64decode(response.content).decode().startswith("vless://")
        # Money that arrives is granted: Alice's invoice, paid now.
        purchase_id = scalar(db_dsn, "SELECT id FROM purchases WHERE user_id = %s", ALICE)
        pay.pay(scalar(db_dsn, "SELECT invoice_id FROM purchases WHERE id = %s", purchase_id))
        await pay.wait_until(lambda: len(pay.successful_deliveries()) == 1)
        assert scalar(db_dsn, "SELECT status FROM purchases WHERE id = %s", purchase_id) == "paid"
        assert scalar(db_dsn, "SELECT kind FROM subscriptions WHERE user_id = %s", ALICE) == "paid"
        # Staff are not held back (an owner, and support checking the shop before it opens again).
        plans = await say(fake, ADMIN, "/buy")
        assert "plan:m1" in plans.callback_data
        plans = await say(fake, SUPPORT, "/buy")
        assert "plan:m1" in plans.callback_data
        await vpnd.stop()

    # Kept in the database: still on after a restart.
    vpnd = await start_shop(nursery, write_config, db_dsn, fake_telegram, fake_cryptopay, telegram=roles)
    with trio.fail_after(60):
        menu = await say(fake, CAROL, "/start")
        assert BANNER in (menu.text or "")
        assert paused(await press(fake, CAROL, menu, "trial"))

        state = await run_cli(cli, "admin", "maintenance", "off")
        assert state["on"] is False
        menu = await say(fake, CAROL, "/start")
        assert "Maintenance" not in (menu.text or "")
        granted = await press(fake, CAROL, menu, "trial")
        assert "free trial is active" in (granted.caption or "")  # the key message: a QR photo
    await vpnd.stop()
    audit = sql(
        db_dsn, "SELECT action, admin_id, details ->> 'via', details ->> 'message' FROM admin_audit ORDER BY id"
    )
    assert audit == [("maintenance_on", 0, "cli", BANNER), ("maintenance_off", 0, "cli", "")]
    # A bad message is refused with exit code 2 and changes nothing.
    too_long = await trio.to_thread.run_sync(partial(cli, "admin", "maintenance", "on", "--message", "x" * 501))
    assert too_long.returncode == 2 and "at most 500" in too_long.stderr
    assert scalar(db_dsn, "SELECT value ->> 'on' FROM daemon_state WHERE key = 'maintenance'") == "false"


async def test_maintenance_from_the_admin_bot(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    vpnd = await start_vpnd(nursery, bot_config(write_config, db_dsn, fake, base_url))
    fake.add_user(ADMIN, "Admin")
    fake.add_user(CAROL, "Carol")
    with trio.fail_after(60):
        admin = await say(fake, ADMIN, "/admin")
        status = await press(fake, ADMIN, admin, "adm:mt")
        assert "off" in (status.text or "")
        ask = await press(fake, ADMIN, status, "adm:mton")
        assert "500" in (ask.text or "")
        bad = await say(fake, ADMIN, "y" * 501)
        assert "at most 500" in (bad.text or "")
        assert scalar(db_dsn, "SELECT count(*) FROM daemon_state WHERE key = 'maintenance'") == 0
        done = await say(fake, ADMIN, "Moving to a new server")
        assert "Maintenance is now on" in (done.text or "") and "adm:mtoff" in done.callback_data

        menu = await say(fake, CAROL, "/start")
        assert "Moving to a new server" in (menu.text or "")
        assert paused(await press(fake, CAROL, menu, "trial"))
        # A non-admin's forged switch changes nothing (and is audited as denied).
        forge_callback(fake, CAROL, menu, "adm:mtoff")
        fake.user_sends(CAROL, "/menu")
        await fake.wait_for_bot_message(CAROL, lambda m: m.message_id > menu.message_id)
        assert scalar(db_dsn, "SELECT value ->> 'on' FROM daemon_state WHERE key = 'maintenance'") == "true"

        off = await press(fake, ADMIN, done, "adm:mtoff")
        assert "now off" in (off.text or "")
        menu = await say(fake, CAROL, "/start")
        assert "Moving to a new server" not in (menu.text or "")
        assert "free trial is active" in ((await press(fake, CAROL, menu, "trial")).caption or "")

        # The default text, with "-".
        await press(fake, ADMIN, off, "adm:mton")
        await say(fake, ADMIN, "-")
        menu = await say(fake, CAROL, "/start")
        assert "purchases and trials are paused for a short while" in (menu.text or "")
    await vpnd.stop()
    audit = sql(db_dsn, "SELECT action, admin_id, result, details ->> 'via' FROM admin_audit ORDER BY id")
    assert audit == [
        ("maintenance_on", ADMIN, "ok", "bot"),
        ("callback", CAROL, "denied", "bot"),
        ("maintenance_off", ADMIN, "ok", "bot"),
        ("maintenance_on", ADMIN, "ok", "bot"),
    ]
