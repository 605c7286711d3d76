"""Admin actions are written once (`vpnd.services.admin_actions`) and the menu's buttons are one typed
set (`vpnd.telegram.admin.verbs`): the bot and the CLI audit an action alike, every verb fits
Telegram's 64 bytes and parses back, and a button that is no verb changes nothing."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from tests.admin.harness import ADMIN, seed_users, start_admin_vpnd
from tests.harness import bot_config, button, has_button, press, say, sql, text_has
from vpnd.telegram.admin import CALLBACKS
from vpnd.telegram.admin import callback_data as wire
from vpnd.telegram.admin.verbs import Verb, parse
from vpnd.telegram.keyboards import MAX_CALLBACK_BYTES
from vpnd_sandbox.telegram_fake import ChatMessage, FakeTelegram

BIG = -(2**63)  # the widest id a verb carries
NONCE = "deadbeef"

#: The longest arguments each verb takes (a new verb must be added here).
WIDEST: dict[Verb, tuple[object, ...]] = {
    Verb.MENU: (),
    Verb.STATS: (),
    Verb.HEALTH: (),
    Verb.NODES: (),
    Verb.CANCEL: (),
    Verb.FIND_USER: (),
    Verb.USER: (BIG,),
    Verb.GRANT: (BIG,),
    Verb.GRANT_CONFIRM: (BIG, 3650, 1, NONCE),
    Verb.REVOKE: (BIG,),
    Verb.REVOKE_CONFIRM: (BIG, NONCE),
    Verb.REISSUE: (BIG,),
    Verb.REISSUE_CONFIRM: (BIG, NONCE),
    Verb.AUTO_RENEW: (BIG, "off"),
    Verb.BAN: (BIG, "off"),
    Verb.BAN_CONFIRM: (BIG, "off", "ffffffff"),
    Verb.BALANCE: (BIG,),
    Verb.BALANCE_CONFIRM: (BIG, BIG, NONCE),
    Verb.DEVICES: (BIG,),
    Verb.DEVICES_RESET: (BIG,),
    Verb.DEVICES_RESET_CONFIRM: (BIG, NONCE),
    Verb.DEVICE_GRANT: (BIG,),
    Verb.DEVICE_GRANT_CONFIRM: (BIG, NONCE),
    Verb.PROMOS: (),
    Verb.PROMO_NEW: (),
    Verb.PROMO_DISABLE: ("X" * 32,),
    Verb.EXPORT: ("payments",),
    Verb.BROADCAST_COMPOSE: (),
    Verb.BROADCAST_NO_BUTTON: (),
    Verb.BROADCAST_SEGMENT: ("plan", "X" * 32),
    Verb.BROADCAST_START: (NONCE,),
    Verb.BROADCAST_TEST: (NONCE,),
    Verb.BROADCAST_SCHEDULE: (NONCE,),
    Verb.BROADCAST_VARIANT: (NONCE,),
    Verb.BROADCAST_REPORT: (2**63 - 1,),
    Verb.BROADCASTS: (),
    Verb.BROADCAST_PAUSE: (2**63 - 1,),
    Verb.BROADCAST_RESUME: (2**63 - 1,),
    Verb.BROADCAST_CANCEL: (2**63 - 1,),
    Verb.REFUND: (2**63 - 1,),
    Verb.REFUND_CONFIRM: (2**63 - 1,),
    Verb.GIFT_REFUND: ("Z" * 12,),
    Verb.GIFT_REFUND_CONFIRM: ("Z" * 12,),
    Verb.EXTEND_ALL: (),
    Verb.EXTEND_ALL_CONFIRM: (999999, 1, "ffffffff"),
    Verb.MAINTENANCE: (),
    Verb.MAINTENANCE_ON: (),
    Verb.MAINTENANCE_OFF: (),
    Verb.ROTATE_KEYS: (),
    Verb.ROTATE_KEYS_NEW: (),
    Verb.ROTATE_KEYS_START: (1, NONCE),
    Verb.ROTATE_KEYS_STEER: (2**63 - 1, "resume"),
    Verb.WITHDRAWAL_APPROVE: (2**63 - 1,),
    Verb.WITHDRAWAL_REJECT: (2**63 - 1,),
    Verb.TRIAL_EXTEND: (BIG,),
    Verb.TRIAL_EXTEND_CONFIRM: (BIG, 7, NONCE),
    Verb.USERS_FILTERS: (),
    Verb.USERS: ("expiring", "uk", "b", 2**63 - 1),
    Verb.AUDIT: ("t" + "X" * 24, BIG),
    Verb.AUDIT_FILTER: (),
}


def test_every_verb_round_trips_through_callback_data_under_64_bytes() -> None:
    assert set(WIDEST) == set(Verb) == set(CALLBACKS), "every verb has its widest arguments and a handler"
    for verb, args in WIDEST.items():
        data = verb.data(*args)
        assert data == wire.PREFIX or data.startswith(f"{wire.PREFIX}:{verb.code}")
        assert len(data.encode()) <= MAX_CALLBACK_BYTES, data
        parsed = parse(data)
        assert parsed is not None and parsed.verb is verb and parsed.args == tuple(str(a) for a in args), data
        # What the router hands the admin menu (the parts after "adm") joins back to the same data.
        assert wire.join(data.split(":")[1:]) == data


def test_data_that_is_no_verb_does_not_parse() -> None:
    for data in [
        "adm:zz",  # unknown verb
        "adm:st:1",  # arguments a verb does not take
        "adm:u:abc",
        "adm:gc:1:10:1",  # missing the nonce
        "adm:gc:1:10:2:deadbeef",
        "adm:gc:1:10:1:DEADBEEF;",
        "adm:ar:1:maybe",
        "adm:bs:expiring",  # expiring needs its days
        "adm:bs:lang:en;drop",  # a segment argument is a plain code
        "adm:ex:secrets",
        "adm:pd:" + "X" * 60,  # over 64 bytes
        "menu",
    ]:
        assert parse(data) is None, data


def test_building_a_button_checks_its_arguments() -> None:
    for verb, args in [(Verb.USER, ("abc",)), (Verb.GRANT_CONFIRM, (1, 10, 1)), (Verb.STATS, (1,))]:
        try:
            verb.data(*args)
        except ValueError:
            continue
        raise AssertionError(f"{verb} built with {args}")


def forge(fake: FakeTelegram, message: ChatMessage, data: str) -> None:
    """A press of `data` on `message` by the admin: a button the bot never made (or made long ago)."""
    fake.inject_update(
        {
            "callback_query": {
                "id": f"forged-{message.message_id}-{data}",
                "from": fake.users[ADMIN].to_api(),
                "message": message.to_api(),
                "chat_instance": "1",
                "data": data,
            }
        }
    )


def snapshot(dsn: str) -> list[object]:
    return [
        sql(dsn, "SELECT user_id, status, expires_at, uuid, auto_renew FROM subscriptions ORDER BY user_id"),
        sql(dsn, "SELECT id, balance_minor FROM users ORDER BY id"),
        sql(dsn, "SELECT count(*) FROM outbox"),
        sql(dsn, "SELECT count(*) FROM admin_audit"),
        sql(dsn, "SELECT count(*) FROM broadcasts"),
    ]


async def test_an_unknown_or_stale_verb_gets_the_polite_answer_and_changes_nothing(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    vpnd = await start_admin_vpnd(nursery, bot_config(write_config, db_dsn, fake, base_url))
    fake.add_user(ADMIN, "Admin")
    (alice,) = seed_users(db_dsn, fake, 1001, 1)
    with trio.fail_after(40):
        await say(fake, ADMIN, "/admin", predicate=has_button("adm:st"))  # the admin is a user now
        before = snapshot(db_dsn)
        for data in [
            "adm:zz",
            f"adm:gc:{alice}:10:1:not-hex!",
            f"adm:gc:{alice}:0:1:abcd1234",  # of the right shape, but 0 days
            f"adm:balc:{alice}:99999:xyz",
            f"adm:ar:{alice}:maybe",
            "adm:bx:first",
            "adm:u:@alice",
        ]:
            menu = await say(fake, ADMIN, "/admin", predicate=has_button("adm:st"))  # a fresh message to edit
            mark = fake.change_seq
            forge(fake, menu, data)
            reply = await fake.wait_for_bot_message(ADMIN, text_has("out of date"), since=mark)
            assert has_button("adm:st")(reply), data  # with the admin menu to go on from
        assert snapshot(db_dsn) == before
    await vpnd.stop()


async def test_the_bot_and_the_cli_write_the_same_audit_record_for_a_grant(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    config = bot_config(write_config, db_dsn, fake, base_url)
    vpnd = await start_admin_vpnd(nursery, config)
    fake.add_user(ADMIN, "Admin")
    by_bot, by_cli = seed_users(db_dsn, fake, 1001, 2)
    with trio.fail_after(60):
        menu = await say(fake, ADMIN, "/admin", predicate=has_button("adm:fu"))
        await press(fake, ADMIN, menu, "adm:fu", predicate=text_has("user id or @username"))
        card = await say(fake, ADMIN, str(by_bot), predicate=has_button(f"adm:g:{by_bot}"))
        await press(fake, ADMIN, card, f"adm:g:{by_bot}", predicate=text_has("How many days"))
        confirm = await say(fake, ADMIN, "10", predicate=has_button("adm:gc:"))
        fake.user_presses_button(ADMIN, confirm.message_id, button(confirm, f"adm:gc:{by_bot}:10:1:"))
        await fake.wait_for_bot_message(ADMIN, text_has("Granted 10 days"))

        process = await trio.run_process(
            [sys.executable, "-m", "vpnd", "admin", "grant", str(by_cli), "10", "--notify", "--config", config.path],
            capture_stdout=True,
            capture_stderr=True,
        )
        assert process.returncode == 0, process.stderr

    rows = sql(db_dsn, "SELECT admin_id, action, target, result, details FROM admin_audit WHERE action = 'grant'")
    records: dict[str, dict[str, Any]] = {
        row[4]["via"]: {"admin_id": row[0], "action": row[1], "target": row[2], "result": row[3], "details": row[4]}
        for row in rows
    }
    bot, cli = records["bot"], records["cli"]
    assert (bot["admin_id"], cli["admin_id"]) == (ADMIN, 0)
    assert (bot["action"], bot["result"], bot["target"]) == ("grant", "ok", str(by_bot))
    assert (cli["action"], cli["result"], cli["target"]) == ("grant", "ok", str(by_cli))
    # The same facts under the same keys; only the channel's own marks differ (the bot's confirmation
    # nonce, the CLI's OS user).
    channel = {"via", "nonce", "os_user"}
    assert set(bot["details"]) - channel == set(cli["details"]) - channel == {"days", "notify", "expires_at"}
    assert {k: bot["details"][k] for k in ("days", "notify")} == {k: cli["details"][k] for k in ("days", "notify")}
    assert set(bot["details"]) & channel == {"via", "nonce"} and set(cli["details"]) & channel == {"via", "os_user"}
    assert len(sql(db_dsn, "SELECT 1 FROM outbox WHERE chat_id IN (%s, %s)", by_bot, by_cli)) == 2
    await vpnd.stop()
