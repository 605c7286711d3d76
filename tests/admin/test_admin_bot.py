"""/admin in the bot: who may use it, stats, user lookup and actions, promo codes, health, exports."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from pathlib import Path

import psycopg
import trio

from tests.admin.harness import ADMIN, give_subscription, seed_users, start_admin_vpnd, start_broadcast
from tests.harness import bot_config, button, has_button, press, say, sql, text_has
from vpnd.db import broadcasts as bdb
from vpnd_sandbox.telegram_fake import ChatMessage, FakeTelegram

EVE = 666
ALICE = 1001


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


def snapshot(dsn: str) -> list[object]:
    """What a forged admin action could change."""
    return [
        sql(dsn, "SELECT user_id, status, expires_at, uuid FROM subscriptions ORDER BY user_id"),
        sql(dsn, "SELECT id, balance_minor FROM users ORDER BY id"),
        sql(dsn, "SELECT id, status FROM broadcasts ORDER BY id"),
        sql(dsn, "SELECT code, active FROM promo_codes ORDER BY code"),
        sql(dsn, "SELECT count(*) FROM outbox"),
    ]


async def test_non_admin_gets_what_an_unknown_command_gets_nothing_changes_and_it_is_audited(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    vpnd = await start_admin_vpnd(nursery, bot_config(write_config, db_dsn, fake, base_url))
    fake.add_user(EVE, "Eve")
    fake.add_user(ADMIN, "Admin")
    with trio.fail_after(30):
        await say(fake, EVE, "/start")
        await say(fake, ADMIN, "/start")
        give_subscription(db_dsn, [ADMIN], kind="paid")
        sql(db_dsn, "INSERT INTO promo_codes (code, percent) VALUES ('SPRING', 10)")
        # A paused broadcast that forged buttons would try to resume or cancel.
        with psycopg.connect(db_dsn) as conn:
            created = bdb.create_broadcast(conn, created_by=ADMIN, text="for everyone", segment=bdb.Segment("all"))
            bdb.change_status(conn, created.id, "pause")
        before = snapshot(db_dsn)

        unknown = await say(fake, EVE, "/nonexistent")
        refused = await say(fake, EVE, "/admin")
        assert (refused.text, refused.callback_data) == (unknown.text, unknown.callback_data)
        assert "admin" not in (refused.text or "").lower()

        async def forged_reply(data: str) -> ChatMessage:
            fresh = await say(fake, EVE, "/start")  # a welcome menu, which a callback's menu edit changes
            mark = fake.change_seq
            forge_callback(fake, EVE, fresh, data)
            return await fake.wait_for_bot_message(EVE, since=mark)

        unknown_button = await forged_reply("zzz")
        for data in [
            "adm",
            "adm:st",
            f"adm:gc:{EVE}:30:1:abcd1234",
            f"adm:balc:{EVE}:100000:abcd1234",
            f"adm:rvc:{ADMIN}:abcd1234",
            "adm:bx:1",
            "adm:br:1",
            "adm:pd:SPRING",
        ]:
            reply = await forged_reply(data)
            assert (reply.text, reply.callback_data) == (unknown_button.text, unknown_button.callback_data), data
        # A state only admins can be in: still nothing.
        sql(
            db_dsn,
            "INSERT INTO conversation_states (user_id, state, expires_at) VALUES (%s, 'adm_find', "
            "now() + interval '1 hour') ON CONFLICT (user_id) DO UPDATE SET state = 'adm_find'",
            EVE,
        )
        reply = await say(fake, EVE, f"{ADMIN}")
        assert (reply.text, reply.callback_data) == (unknown.text, unknown.callback_data)

    assert snapshot(db_dsn) == before
    denied = sql(db_dsn, "SELECT action, target FROM admin_audit WHERE admin_id = %s AND result = 'denied'", EVE)
    assert ("command", "/admin") in denied
    assert ("callback", "adm:bx:1") in denied and ("callback", f"adm:gc:{EVE}:30:1:abcd1234") in denied
    assert ("state", "adm_find") in denied
    assert len(denied) == 10
    await vpnd.stop()


async def test_stats_lookup_grant_revoke_reissue_balance_and_auto_renew(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    vpnd = await start_admin_vpnd(nursery, bot_config(write_config, db_dsn, fake, base_url))
    fake.add_user(ADMIN, "Admin")
    fake.add_user(ALICE, "Alice", username="alice_w")
    others = seed_users(db_dsn, None, 5000, 4)
    give_subscription(db_dsn, others[:2], kind="trial")
    give_subscription(db_dsn, others[2:3], kind="paid")
    with trio.fail_after(40):
        await say(fake, ALICE, "/start")
        menu = await say(fake, ADMIN, "/admin", predicate=has_button("adm:st"))
        stats = await press(fake, ADMIN, menu, "adm:st", predicate=text_has("Stats"))
        text = stats.text or ""
        assert "Users: 6 (today 6" in text and "Active paid subscriptions: 1" in text and "Active trials: 2" in text

        menu = await press(fake, ADMIN, stats, "adm", predicate=has_button("adm:fu"))
        await press(fake, ADMIN, menu, "adm:fu", predicate=text_has("user id or @username"))
        missing = await say(fake, ADMIN, "@nobody", predicate=text_has("No user"))
        assert "@nobody" in (missing.text or "")
        card = await say(fake, ADMIN, "@ALICE_W", predicate=text_has(f"User {ALICE}"))
        assert "Subscription: none" in (card.text or "")

        # Grant 10 days and notify; pressing the same confirmation twice grants once.
        ask = await press(fake, ADMIN, card, f"adm:g:{ALICE}", predicate=text_has("How many days"))
        await say(fake, ADMIN, "0", predicate=text_has("whole number"))
        confirm = await say(fake, ADMIN, "10", predicate=has_button("adm:gc:"))
        assert ask is not None
        data = button(confirm, f"adm:gc:{ALICE}:10:1:")
        fake.user_presses_button(ADMIN, confirm.message_id, data)
        card = await fake.wait_for_bot_message(ADMIN, text_has("Granted 10 days"))
        expiry = sql(db_dsn, "SELECT expires_at FROM subscriptions WHERE user_id = %s", ALICE)
        fake.inject_update(
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
        assert sql(db_dsn, "SELECT expires_at FROM subscriptions WHERE user_id = %s", ALICE) == expiry
        notice = sql(db_dsn, "SELECT payload->>'text' FROM outbox WHERE chat_id = %s", ALICE)
        assert len(notice) == 1 and "10 days of VPN access" in notice[0][0]

        # Reissue (new UUID), auto-renew on, revoke.
        uuid_before = sql(db_dsn, "SELECT uuid FROM subscriptions WHERE user_id = %s", ALICE)
        confirm = await press(fake, ADMIN, card, f"adm:rk:{ALICE}", predicate=has_button("adm:rkc:"))
        card = await press(fake, ADMIN, confirm, "adm:rkc:", predicate=text_has("New key issued"))
        assert sql(db_dsn, "SELECT uuid FROM subscriptions WHERE user_id = %s", ALICE) != uuid_before
        card = await press(fake, ADMIN, card, f"adm:ar:{ALICE}:on", predicate=text_has("Auto-renew of user"))
        assert sql(db_dsn, "SELECT auto_renew FROM subscriptions WHERE user_id = %s", ALICE) == [(True,)]
        confirm = await press(fake, ADMIN, card, f"adm:rv:{ALICE}", predicate=has_button("adm:rvc:"))
        card = await press(fake, ADMIN, confirm, "adm:rvc:", predicate=text_has("revoked"))
        assert sql(db_dsn, "SELECT status FROM subscriptions WHERE user_id = %s", ALICE) == [("revoked",)]

        # Balance: credit 5, then a debit larger than the balance is refused.
        await press(fake, ADMIN, card, f"adm:bal:{ALICE}", predicate=text_has("Send an amount"))
        await say(fake, ADMIN, "lots", predicate=text_has("not an amount"))
        confirm = await say(fake, ADMIN, "+5", predicate=has_button("adm:balc:"))
        card = await press(fake, ADMIN, confirm, "adm:balc:", predicate=text_has("is now 5.00 USD"))
        await press(fake, ADMIN, card, f"adm:bal:{ALICE}", predicate=text_has("Send an amount"))
        confirm = await say(fake, ADMIN, "-7.50", predicate=has_button("adm:balc:"))
        await press(fake, ADMIN, confirm, "adm:balc:", predicate=text_has("does not cover"))
    assert sql(db_dsn, "SELECT balance_minor FROM users WHERE id = %s", ALICE) == [(500,)]
    assert sql(db_dsn, "SELECT sum(delta_minor) FROM balance_ledger WHERE user_id = %s", ALICE) == [(500,)]
    actions = sql(db_dsn, "SELECT action, result FROM admin_audit WHERE admin_id = %s ORDER BY id", ADMIN)
    assert [a for a in actions if a[0] != "lookup"] == [
        ("stats", "ok"),
        ("grant", "ok"),
        ("reissue", "ok"),
        ("auto_renew", "ok"),
        ("revoke", "ok"),
        ("balance", "ok"),
        ("balance", "insufficient_balance"),
    ]
    await vpnd.stop()


async def test_promo_codes_health_and_csv_export(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    vpnd = await start_admin_vpnd(nursery, bot_config(write_config, db_dsn, fake, base_url))
    fake.add_user(ADMIN, "Admin")
    seed_users(db_dsn, None, 5000, 2500)
    sql(db_dsn, "UPDATE users SET first_name = '=cmd()' WHERE id = 5000")
    with trio.fail_after(40):
        menu = await say(fake, ADMIN, "/admin", predicate=has_button("adm:pr"))
        promos = await press(fake, ADMIN, menu, "adm:pr", predicate=text_has("No promo codes"))
        await press(fake, ADMIN, promos, "adm:pn", predicate=text_has("CODE PERCENT"))
        await say(fake, ADMIN, "SPRING 150", predicate=text_has("Send it as"))
        listed = await say(fake, ADMIN, "spring 20 100 30", predicate=text_has("Created SPRING"))
        assert "SPRING −20% · used 0/100" in (listed.text or "")
        disable_data = button(listed, "adm:pd:SPRING")
        await press(fake, ADMIN, listed, "adm:pn", predicate=text_has("CODE PERCENT"))
        exists = await say(fake, ADMIN, "SPRING 10", predicate=text_has("exists already"))
        menu = await press(fake, ADMIN, exists, "adm", predicate=has_button("adm:pr"))
        promos = await press(fake, ADMIN, menu, "adm:pr", predicate=has_button(disable_data))
        disabled = await press(fake, ADMIN, promos, disable_data, predicate=text_has("SPRING disabled"))
        assert "disabled" in (disabled.text or "") and "adm:pd:SPRING" not in disabled.callback_data

        menu = await press(fake, ADMIN, disabled, "adm", predicate=has_button("adm:hl"))
        health = await press(fake, ADMIN, menu, "adm:hl", predicate=text_has("Health"))
        text = health.text or ""
        assert "✅ database" in text and "Xray sync lag: never synced" in text and "Outbox backlog: 0" in text

        menu = await press(fake, ADMIN, health, "adm", predicate=has_button("adm:ex:users"))
        fake.user_presses_button(ADMIN, menu.message_id, "adm:ex:users")
        document = await fake.wait_for_bot_message(ADMIN, lambda m: m.document is not None, timeout=20)
    assert document.document is not None and document.document.data is not None
    assert document.document.file_name == "users.csv"
    assert "2501 rows" in (document.caption or "")
    rows = list(csv.reader(io.StringIO(document.document.data.decode())))
    assert rows[0][:3] == ["id", "username", "first_name"] and len(rows) == 2502
    assert [r[0] for r in rows[1:]] == sorted((r[0] for r in rows[1:]), key=int)
    assert rows[2][2] == "'=cmd()"  # no spreadsheet formula injection
    assert sql(db_dsn, "SELECT active, max_uses, expires_at > now() + interval '29 days' FROM promo_codes") == [
        (False, 100, True)
    ]
    await vpnd.stop()


async def test_pause_resume_and_cancel_buttons_on_the_progress_message(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    config = bot_config(
        write_config, db_dsn, fake, base_url, telegram={"rate_per_second": 10.0}, broadcast={"progress_interval": 0.5}
    )
    users = seed_users(db_dsn, fake, 10_000, 200)
    vpnd = await start_admin_vpnd(nursery, config)
    fake.add_user(ADMIN, "Admin")

    def delivered() -> int:
        return sum(1 for uid in users if fake.messages.get(uid))

    with trio.fail_after(60):
        progress = await start_broadcast(fake, "Paced news", "all")
        await fake.wait_until(lambda: delivered() >= 20, timeout=30)
        paused = await press(fake, ADMIN, progress, "adm:bp:", predicate=has_button("adm:br:"))
        with trio.fail_after(30):  # the task drained, showed its final state, and ended
            while vpnd.broadcasts.tasks:
                await trio.sleep(0.02)
        assert "paused" in (paused.text or "") and has_button("adm:br:")(paused)
        count = delivered()
        await trio.sleep(1.5)
        assert delivered() == count, "a paused broadcast sends nothing"
        assert sql(db_dsn, "SELECT status FROM broadcasts") == [("paused",)]
        resumed = await press(fake, ADMIN, paused, "adm:br:", predicate=has_button("adm:bp:"))
        await fake.wait_until(lambda: delivered() >= count + 10, timeout=30)
        await press(fake, ADMIN, resumed, "adm:bx:", predicate=text_has("cancelled"))
        summary = await fake.wait_for_bot_message(ADMIN, text_has("skipped of"), timeout=30)
        assert "cancelled" in (summary.text or "")
        listing = await say(fake, ADMIN, "/admin", predicate=has_button("adm:bl"))
        listing = await press(fake, ADMIN, listing, "adm:bl", predicate=text_has("#1 · cancelled"))
    assert all(len(fake.bot_messages(uid)) <= 1 for uid in users)
    assert [
        r[0] for r in sql(db_dsn, "SELECT action FROM admin_audit WHERE action LIKE 'broadcast%%' ORDER BY id")
    ] == [
        "broadcast_create",
        "broadcast_pause",
        "broadcast_resume",
        "broadcast_cancel",
    ]
    await vpnd.stop()
