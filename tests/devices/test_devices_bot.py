"""📱 Devices in the bot, against the whole daemon: the fake Bot API, real HTTP to `/sub/<token>`, a real PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import trio

from tests.devices.harness import PLANS, announce_of, happ, links_of, title_of
from tests.harness import bot_config, press, sql, start_vpnd, text_has
from vpnd.db import subscriptions
from vpnd.devices import device_key
from vpnd_sandbox.telegram_fake import ChatMessage, FakeTelegram

ALICE, BOB = 2001, 2002


def forge_callback(fake: FakeTelegram, user_id: int, message: ChatMessage, data: str) -> None:
    """A callback query with data no button carries (a modified client can send anything)."""
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


async def test_removing_a_device_in_the_bot_frees_its_slot(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    config = bot_config(write_config, db_dsn, fake, base_url, plans=PLANS)
    vpnd = await start_vpnd(nursery, config)
    fake.add_user(ALICE, "Alice", language_code="en")
    fake.add_user(BOB, "Bob", language_code="en")
    with trio.fail_after(60):
        fake.user_sends(ALICE, "/start")
        menu = await fake.wait_for_bot_message(ALICE)
        fake.user_sends(BOB, "/start")
        await fake.wait_for_bot_message(BOB)
        sub = await vpnd.app.db.run(
            lambda conn: subscriptions.grant_days(conn, ALICE, 30, kind="paid", plan_code="five")
        )
        await vpnd.app.db.run(lambda conn: subscriptions.grant_days(conn, BOB, 30, kind="paid", plan_code="five"))
        sql(db_dsn, "INSERT INTO devices (user_id, hwid, model) VALUES (%s, 'bob-phone', 'Bob phone')", BOB)

        async with httpx.AsyncClient(base_url=vpnd.http_url, timeout=10) as client:

            async def fetch(hwid: str, model: str = "") -> httpx.Response:
                return await client.get(f"/sub/{sub.sub_token}", headers=happ(hwid, model=model or hwid))

            for n in range(1, 6):
                assert len(links_of(await fetch(f"hw-{n}", f"Phone {n}"))) == 1
            sixth = await fetch("hw-6", "Laptop")
            assert links_of(sixth) == [] and title_of(sixth) == "⚠️ Device limit reached (5 of 5)"
            assert "remove a device" in (announce_of(sixth) or "")

            details = await press(fake, ALICE, menu, "sub")
            assert "dev" in details.callback_data
            listing = await press(fake, ALICE, details, "dev")
            text = listing.text or ""
            assert "5 of 5 slots used" in text
            assert "Phone 3" in text and "Android 14" in text and "last seen" in text
            assert f"dev:rm:{device_key('hw-2')}" in listing.callback_data

            # a crafted callback with Bob's device (or garbage) removes nothing
            for forged in (f"dev:rm:{device_key('bob-phone')}", "dev:rm:zz", "dev:rm:" + "a" * 50):
                mark = fake.change_seq
                forge_callback(fake, ALICE, listing, forged)
                await fake.wait_for_bot_message(ALICE, text_has("not in your list"), since=mark)
                listing = await press(fake, ALICE, await press(fake, ALICE, listing, "sub"), "dev")  # a fresh list
            assert sql(db_dsn, "SELECT user_id, hwid FROM devices WHERE user_id = %s", BOB) == [(BOB, "bob-phone")]
            assert sql(db_dsn, "SELECT count(*) FROM devices WHERE user_id = %s", ALICE) == [(5,)]

            after = await press(fake, ALICE, listing, f"dev:rm:{device_key('hw-2')}", predicate=text_has("Removed"))
            assert "Removed Phone 2: its slot is free." in (after.text or "")
            assert "4 of 5 slots used" in (after.text or "") and "Phone 2" not in (after.text or "").split("free.")[1]

            assert len(links_of(await fetch("hw-6", "Laptop"))) == 1  # the slot went to the sixth
            assert links_of(await fetch("hw-2", "Phone 2")) == []  # and the removed one is now the new one
            for n in (1, 5):  # (the per-token rate limit allows 10 fetches in a burst: this is the 10th)
                assert len(links_of(await fetch(f"hw-{n}"))) == 1
    await vpnd.stop()
