"""The user card's 📱 Devices in the admin bot: list, reset and one more slot, confirmed once per button."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import trio

from tests.admin.harness import ADMIN, start_admin_vpnd
from tests.devices.harness import PLANS
from tests.harness import bot_config, button, has_button, press, say, sql, text_has
from vpnd.db import subscriptions
from vpnd_sandbox.telegram_fake import FakeTelegram

CAROL = 3001


async def test_admin_lists_resets_and_grants_a_slot(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    vpnd = await start_admin_vpnd(nursery, bot_config(write_config, db_dsn, fake, base_url, plans=PLANS))
    fake.add_user(ADMIN, "Admin")
    fake.add_user(CAROL, "Carol", username="carol")
    with trio.fail_after(40):
        await say(fake, CAROL, "/start")
        await vpnd.app.db.run(lambda conn: subscriptions.grant_days(conn, CAROL, 30, kind="paid", plan_code="five"))
        sql(
            db_dsn,
            "INSERT INTO devices (user_id, hwid, os, os_version, model) VALUES "
            "(%s, 'hw-1', 'Android', '14', 'Pixel <8>'), (%s, 'hw-2', 'iOS', '17', 'iPhone')",
            CAROL,
            CAROL,
        )
        menu = await say(fake, ADMIN, "/admin", predicate=has_button("adm:fu"))
        await press(fake, ADMIN, menu, "adm:fu", predicate=text_has("user id or @username"))
        card = await say(fake, ADMIN, "@carol", predicate=text_has(f"User {CAROL}"))
        listing = await press(fake, ADMIN, card, f"adm:dv:{CAROL}", predicate=text_has("Devices of user"))
        text = listing.text or ""
        assert f"Devices of user {CAROL}: 2 of 5 (extra slots granted: 0)" in text
        assert "Pixel <8> — Android 14" in text and "hw-2" in text

        confirm = await press(fake, ADMIN, listing, f"adm:dvg:{CAROL}", predicate=has_button("adm:dvgc:"))
        data = button(confirm, f"adm:dvgc:{CAROL}:")
        fake.user_presses_button(ADMIN, confirm.message_id, data)
        listing = await fake.wait_for_bot_message(ADMIN, text_has("1 extra device slot"))
        assert "2 of 6 (extra slots granted: 1)" in (listing.text or "")
        fake.inject_update(  # the same confirmation again (a double tap, a replay): nothing more
            {
                "callback_query": {
                    "id": "again",
                    "from": fake.users[ADMIN].to_api(),
                    "message": confirm.to_api(),
                    "chat_instance": "1",
                    "data": data,
                }
            }
        )
        await fake.wait_for_bot_message(ADMIN, text_has("Already done"))
        assert sql(db_dsn, "SELECT extra_devices FROM subscriptions WHERE user_id = %s", CAROL) == [(1,)]

        confirm = await press(fake, ADMIN, listing, f"adm:dvr:{CAROL}", predicate=has_button("adm:dvrc:"))
        listing = await press(fake, ADMIN, confirm, f"adm:dvrc:{CAROL}:", predicate=text_has("Forgot 2 device"))
        assert "0 of 6" in (listing.text or "") and "No device recorded" in (listing.text or "")
        assert sql(db_dsn, "SELECT count(*) FROM devices") == [(0,)]
        audit = sql(db_dsn, "SELECT action, result FROM admin_audit WHERE action LIKE '%%device%%' ORDER BY id")
        assert [a for a in audit if a[0] != "devices"] == [("grant_device", "ok"), ("devices_reset", "ok")]
