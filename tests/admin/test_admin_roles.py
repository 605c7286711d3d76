"""Admin roles in the bot (issue 20): support helps one user and never touches money; an admin does the
shop's work but not what acts on everyone at once; buttons a role may not press are not shown, and a
forged one changes nothing and is audited ``forbidden``. Also the user list and the audit-log viewer."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from tests.admin.harness import give_subscription, seed_users, start_admin_vpnd
from tests.harness import bot_config, has_button, press, say, sql, text_has
from vpnd.config import ConfigError, load_config
from vpnd.roles import ACTIONS, Role, allows, role_of
from vpnd.telegram.admin import STATES, roles
from vpnd.telegram.admin.verbs import Verb
from vpnd_sandbox.telegram_fake import ChatMessage, FakeTelegram

SUPPORT = 2
MANAGER = 3  # role "admin"
ALICE = 1001  # a trial user
BOB = 1002  # a paying user
FORBIDDEN = "Your role does not allow that"

#: What a role must never reach: money, paid days, broadcasts, promo codes, mass actions, exports.
MONEY_AND_MORE = (
    "adm:st",
    "adm:g:",
    "adm:bal:",
    "adm:rf:",
    "adm:gfr:",
    "adm:pr",
    "adm:bc",
    "adm:xa",
    "adm:mt",
    "adm:ex",
)


def staff_config(write_config: Callable[..., Path], db_dsn: str, fake: FakeTelegram, base_url: str) -> object:
    roles_table = {str(SUPPORT): "support", str(MANAGER): "admin"}
    return bot_config(write_config, db_dsn, fake, base_url, telegram={"admin_roles": roles_table})


def forge(fake: FakeTelegram, user_id: int, message: ChatMessage, data: str) -> None:
    """A callback the bot never offered this user (a modified client, a replayed update)."""
    fake.inject_update(
        {
            "callback_query": {
                "id": f"forged-{user_id}-{message.message_id}-{data}",
                "from": fake.users[user_id].to_api(),
                "message": message.to_api(),
                "chat_instance": "1",
                "data": data,
            }
        }
    )


async def forged_reply(fake: FakeTelegram, user_id: int, data: str) -> ChatMessage:
    menu = await say(fake, user_id, "/admin", predicate=has_button("adm:fu"))
    mark = fake.change_seq
    forge(fake, user_id, menu, data)
    return await fake.wait_for_bot_message(user_id, since=mark)


def money_snapshot(dsn: str) -> list[object]:
    return [
        sql(dsn, "SELECT user_id, kind, status, expires_at, uuid FROM subscriptions ORDER BY user_id"),
        sql(dsn, "SELECT id, balance_minor FROM users ORDER BY id"),
        sql(dsn, "SELECT count(*) FROM balance_ledger"),
        sql(dsn, "SELECT count(*) FROM broadcasts"),
        sql(dsn, "SELECT code, active FROM promo_codes ORDER BY code"),
        sql(dsn, "SELECT count(*) FROM outbox"),
        sql(dsn, "SELECT value FROM daemon_state WHERE key = 'maintenance'"),
    ]


def test_role_table_covers_every_verb_and_state_and_orders_roles() -> None:
    assert set(roles.VERB_ACTIONS) == set(Verb), "every button names its action"
    assert set(STATES) <= set(roles.STATE_ACTIONS), "every typed input names its action"
    assert set(roles.VERB_ACTIONS.values()) | set(roles.STATE_ACTIONS.values()) <= set(ACTIONS)
    for money in ("balance", "refund", "gift_refund", "promo", "grant", "broadcast", "extend_all", "maintenance"):
        assert not allows(Role.SUPPORT, money), money
    for owner_only in ("extend_all", "maintenance", "export", "never-heard-of"):
        assert not allows(Role.ADMIN, owner_only) and allows(Role.OWNER, owner_only), owner_only
    assert allows(Role.SUPPORT, "reissue") and allows(Role.SUPPORT, "extend_trial") and not allows(None, "menu")
    assert role_of(7, (7,), {7: "support"}) is Role.OWNER  # an owner stays owner
    assert role_of(8, (7,), {8: "support"}) is Role.SUPPORT and role_of(9, (7,), {8: "admin"}) is None


@pytest.mark.parametrize(
    ("roles_toml", "message"),
    [
        ('{ "abc" = "admin" }', "[telegram].admin_roles: 'abc': expected a Telegram user id"),
        ('{ "12" = "root" }', '[telegram].admin_roles: \'12\': expected "admin" or "support"'),
        ('["12"]', "[telegram].admin_roles: expected a table of user ids and roles"),
        ('{ "5" = "support" }', "[telegram].admin_roles: 5 is an owner already"),
    ],
)
def test_bad_admin_roles_name_the_key(write_config: Callable[..., Path], roles_toml: str, message: str) -> None:
    path = write_config(f"[telegram]\nadmin_ids = [5]\nadmin_roles = {roles_toml}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value)


async def test_support_cannot_grant_money_but_looks_up_reissues_and_extends_trials(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    vpnd = await start_admin_vpnd(nursery, staff_config(write_config, db_dsn, fake, base_url))
    for uid, name in [(SUPPORT, "Sam"), (ALICE, "Alice"), (BOB, "Bob")]:
        fake.add_user(uid, name)
    with trio.fail_after(60):
        for uid in (SUPPORT, ALICE, BOB):
            await say(fake, uid, "/start")
        give_subscription(db_dsn, [ALICE], kind="trial", days=3)
        give_subscription(db_dsn, [BOB], kind="paid")
        sql(db_dsn, "UPDATE users SET balance_minor = 500 WHERE id = %s", BOB)

        # The menu and the cards show support only what support may press.
        menu = await say(fake, SUPPORT, "/admin", predicate=has_button("adm:fu"))
        assert has_button("adm:ulf")(menu) and has_button("adm:hl")(menu)
        assert not any(d.startswith(MONEY_AND_MORE) or d.startswith("adm:au") for d in menu.callback_data)
        await press(fake, SUPPORT, menu, "adm:fu", predicate=text_has("user id"))
        card = await say(fake, SUPPORT, str(BOB), predicate=has_button("adm:rk:"))
        assert not any(d.startswith(MONEY_AND_MORE) for d in card.callback_data), card.callback_data
        assert not any(
            d.startswith(("adm:rv:", "adm:bn1:", "adm:ar:", "adm:dvg:", "adm:te:")) for d in card.callback_data
        )

        before = money_snapshot(db_dsn)
        forged = [
            f"adm:bal:{BOB}",
            f"adm:balc:{BOB}:100000:abcd1234",
            f"adm:balc:{BOB}:-500:abcd1235",
            f"adm:g:{BOB}",
            f"adm:gc:{BOB}:30:1:abcd1236",
            f"adm:gc:{ALICE}:30:0:abcd1237",
            "adm:rf:1",
            "adm:rfc:1",
            "adm:gfrc:ABCDEFGHJKLM",
            "adm:pn",
            "adm:pd:SPRING",
            "adm:bc",
            "adm:xac:48:1:abcd1238",
            "adm:mton",
            "adm:ex:payments",
            "adm:st",
            f"adm:bnc:{BOB}:on:abcd1239",
            "adm:au:-:0",
        ]
        for data in forged:
            reply = await forged_reply(fake, SUPPORT, data)
            assert FORBIDDEN in (reply.text or ""), (data, reply.text)
            assert not any(d.startswith(MONEY_AND_MORE) for d in reply.callback_data), data
        # A typed input of a forbidden action (a state left from before a demotion, say) is refused too.
        sql(
            db_dsn,
            "INSERT INTO conversation_states (user_id, state, data, expires_at) VALUES (%s, 'adm_balance', "
            "jsonb_build_object('user_id', %s::bigint), now() + interval '1 hour') "
            "ON CONFLICT (user_id) DO UPDATE SET state = 'adm_balance', data = excluded.data",
            SUPPORT,
            BOB,
        )
        typed = await say(fake, SUPPORT, "+1000")
        assert FORBIDDEN in (typed.text or "")
        assert money_snapshot(db_dsn) == before
        assert all(d.document is None for d in fake.bot_messages(SUPPORT)), "no export reached support"

        # What support may do: reissue a key, extend a trial (not a paid subscription).
        uuid_before = sql(db_dsn, "SELECT uuid FROM subscriptions WHERE user_id = %s", ALICE)
        card = await press(fake, SUPPORT, await say(fake, SUPPORT, "/admin"), "adm:fu", predicate=text_has("user id"))
        card = await say(fake, SUPPORT, str(ALICE), predicate=has_button("adm:te:"))
        ask = await press(fake, SUPPORT, card, f"adm:rk:{ALICE}", predicate=has_button("adm:rkc:"))
        card = await press(fake, SUPPORT, ask, "adm:rkc:", predicate=has_button("adm:te:"))
        assert sql(db_dsn, "SELECT uuid FROM subscriptions WHERE user_id = %s", ALICE) != uuid_before
        expires = sql(db_dsn, "SELECT expires_at FROM subscriptions WHERE user_id = %s", ALICE)[0][0]
        choices = await press(fake, SUPPORT, card, f"adm:te:{ALICE}", predicate=has_button("adm:tec:"))
        assert {re.sub(r":[0-9a-f]{8}$", "", d) for d in choices.callback_data if d.startswith("adm:tec:")} == {
            f"adm:tec:{ALICE}:{d}" for d in (1, 3, 7)
        }
        three = next(d for d in choices.callback_data if d.startswith(f"adm:tec:{ALICE}:3:"))
        done = await press(fake, SUPPORT, choices, three, predicate=text_has("extended by 3 d"))
        assert "extended by 3 d" in (done.text or "")
        row = sql(db_dsn, "SELECT kind, expires_at - %s FROM subscriptions WHERE user_id = %s", expires, ALICE)
        assert row[0][0] == "trial" and row[0][1].days == 3
        # The same button again (a double press, a replay) gives nothing twice.
        mark = fake.change_seq
        forge(fake, SUPPORT, done, three)
        again = await fake.wait_for_bot_message(SUPPORT, since=mark)
        assert "already" in (again.text or "").lower()
        assert (
            sql(db_dsn, "SELECT expires_at - %s FROM subscriptions WHERE user_id = %s", expires, ALICE)[0][0].days == 3
        )
        # A paying user's days are an admin's to give: refused, audited, nothing changed.
        paid_before = sql(db_dsn, "SELECT expires_at, kind FROM subscriptions WHERE user_id = %s", BOB)
        reply = await forged_reply(fake, SUPPORT, f"adm:tec:{BOB}:7:abcdef01")
        assert "paid subscription" in (reply.text or "")
        assert sql(db_dsn, "SELECT expires_at, kind FROM subscriptions WHERE user_id = %s", BOB) == paid_before

    audit = sql(db_dsn, "SELECT action, target, result, details->>'role' FROM admin_audit WHERE admin_id = %s", SUPPORT)
    refused = [(a, t) for a, t, r, role in audit if r == "forbidden" and role == "support"]
    assert ("balance", f"adm:balc:{BOB}:100000:abcd1234") in refused
    assert ("grant", f"adm:gc:{BOB}:30:1:abcd1236") in refused and ("refund", "adm:rfc:1") in refused
    assert ("gift_refund", "adm:gfrc:ABCDEFGHJKLM") in refused and ("balance", "adm_balance") in refused
    assert len(refused) == len(forged) + 1
    assert ("extend_trial", str(ALICE), "ok", None) in audit and ("reissue", str(ALICE), "ok", None) in audit
    assert ("extend_trial", str(BOB), "not_trial", None) in audit
    await vpnd.stop()


async def test_an_admin_runs_the_shop_but_not_what_acts_on_everyone(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    vpnd = await start_admin_vpnd(nursery, staff_config(write_config, db_dsn, fake, base_url))
    fake.add_user(MANAGER, "Max")
    fake.add_user(BOB, "Bob")
    with trio.fail_after(60):
        await say(fake, MANAGER, "/start")
        await say(fake, BOB, "/start")
        give_subscription(db_dsn, [BOB], kind="paid")
        menu = await say(fake, MANAGER, "/admin", predicate=has_button("adm:fu"))
        for shown in ("adm:st", "adm:pr", "adm:bc", "adm:ulf", "adm:au"):
            assert has_button(shown)(menu), shown
        for hidden in ("adm:xa", "adm:mt", "adm:ex"):
            assert not has_button(hidden)(menu), hidden

        before = sql(db_dsn, "SELECT user_id, expires_at FROM subscriptions ORDER BY user_id")
        maintenance = sql(db_dsn, "SELECT value FROM daemon_state WHERE key = 'maintenance'")
        for data in ("adm:xa", "adm:xac:48:1:abcd1234", "adm:mt", "adm:mton", "adm:mtoff", "adm:ex:users"):
            reply = await forged_reply(fake, MANAGER, data)
            assert FORBIDDEN in (reply.text or ""), data
        assert sql(db_dsn, "SELECT user_id, expires_at FROM subscriptions ORDER BY user_id") == before
        assert sql(db_dsn, "SELECT value FROM daemon_state WHERE key = 'maintenance'") == maintenance
        assert all(m.document is None for m in fake.bot_messages(MANAGER))

        # Money is an admin's: the balance changes.
        reply = await forged_reply(fake, MANAGER, f"adm:balc:{BOB}:250:abcd9999")
        assert FORBIDDEN not in (reply.text or "")
        assert sql(db_dsn, "SELECT balance_minor FROM users WHERE id = %s", BOB) == [(250,)]
        # Staff of any role are not banned (an admin cannot lock out support, or another admin).
        reply = await forged_reply(fake, MANAGER, f"adm:bnc:{SUPPORT}:on:abcd7777")
        assert FORBIDDEN not in (reply.text or "")
        assert sql(db_dsn, "SELECT count(*) FROM users WHERE banned_at IS NOT NULL") == [(0,)]
    refused = sql(db_dsn, "SELECT action FROM admin_audit WHERE admin_id = %s AND result = 'forbidden'", MANAGER)
    assert sorted(a for (a,) in refused) == [
        "export",
        "extend_all",
        "extend_all",
        "maintenance",
        "maintenance",
        "maintenance",
    ]
    await vpnd.stop()


# --- the user list and the audit log --------------------------------------------------------------


def seed_people(dsn: str) -> dict[str, set[int]]:
    """25 users set-wise, in known groups; what each filter must list."""
    ids = seed_users(dsn, None, 3000, 25)
    give_subscription(dsn, ids[0:5], kind="trial")  # 3000-3004
    give_subscription(dsn, ids[5:8], kind="paid", days=2)  # 3005-3007: expiring
    give_subscription(dsn, ids[8:15], kind="paid")  # 3008-3014
    give_subscription(dsn, ids[15:20], kind="paid")  # 3015-3019
    sql(dsn, "UPDATE subscriptions SET expires_at = now() - interval '1 day' WHERE user_id BETWEEN 3015 AND 3017")
    sql(dsn, "UPDATE users SET banned_at = now() WHERE id IN (3018, 3019)")
    sql(dsn, "UPDATE users SET language = 'ru' WHERE id BETWEEN 3020 AND 3024")
    return {
        "trial": set(range(3000, 3005)),
        "expiring": set(range(3005, 3008)),
        "paid": set(range(3005, 3015)),
        "active": set(range(3000, 3015)),
        "expired": set(range(3015, 3018)),
        "banned": {3018, 3019},
        "ru": set(range(3020, 3025)),
    }


def is_filters(message: ChatMessage) -> bool:
    return "adm:ul:trial:-:a:0" in message.callback_data


def is_list(message: ChatMessage) -> bool:
    return "adm:ulf" in message.callback_data


def listed(message: ChatMessage) -> list[int]:
    return [int(d.split(":")[2]) for d in message.callback_data if re.fullmatch(r"adm:u:\d+", d)]


async def test_user_list_filters_and_pages(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    vpnd = await start_admin_vpnd(nursery, staff_config(write_config, db_dsn, fake, base_url))
    fake.add_user(SUPPORT, "Sam")
    with trio.fail_after(90):
        await say(fake, SUPPORT, "/start")
        groups = seed_people(db_dsn)
        everyone = {uid for (uid,) in sql(db_dsn, "SELECT id FROM users")}
        menu = await say(fake, SUPPORT, "/admin", predicate=has_button("adm:ulf"))
        filters = await press(fake, SUPPORT, menu, "adm:ulf", predicate=has_button("adm:ul:"))

        # "All", page by page (10 a page, ascending ids), then back with Prev.
        page = await press(fake, SUPPORT, filters, "adm:ul:all:-:a:0", predicate=has_button("adm:u:"))
        pages = [listed(page)]
        while has_button("adm:ul:all:-:a:")(page):
            page = await press(fake, SUPPORT, page, "adm:ul:all:-:a:", predicate=lambda m, n=pages[-1]: listed(m) != n)
            pages.append(listed(page))
        assert [len(p) for p in pages] == [10, 10, 6]
        assert [uid for p in pages for uid in p] == sorted(everyone)
        back = await press(fake, SUPPORT, page, "adm:ul:all:-:b:", predicate=lambda m: listed(m) == pages[1])
        assert has_button("adm:ul:all:-:a:")(back) and has_button("adm:ul:all:-:b:")(back)
        first = await press(fake, SUPPORT, back, "adm:ul:all:-:b:", predicate=lambda m: listed(m) == pages[0])
        assert not has_button("adm:ul:all:-:b:")(first), "no Prev on the first page"

        filters = await press(fake, SUPPORT, first, "adm:ulf", predicate=is_filters)
        for name in ("trial", "expiring", "paid", "active", "expired", "banned"):
            shown = await press(fake, SUPPORT, filters, f"adm:ul:{name}:-:a:0", predicate=is_list)
            found = listed(shown)
            while has_button(f"adm:ul:{name}:-:a:")(shown):
                shown = await press(
                    fake, SUPPORT, shown, f"adm:ul:{name}:-:a:", predicate=lambda m, n=found[-1]: n not in listed(m)
                )
                found += listed(shown)
            assert sorted(found) == sorted(groups[name]), name
            filters = await press(fake, SUPPORT, shown, "adm:ulf", predicate=is_filters)
        ru = await press(fake, SUPPORT, filters, "adm:ul:all:ru:a:0", predicate=is_list)
        assert set(listed(ru)) == groups["ru"]
        # A user's button opens their card.
        card = await press(fake, SUPPORT, ru, "adm:u:3020", predicate=text_has("3020"))
        assert has_button("adm:rk:")(card) or has_button("adm:te:")(card)
        # A forged page with a cursor past the end: an empty page, politely.
        reply = await forged_reply(fake, SUPPORT, "adm:ul:paid:-:a:999999")
        assert "No users here" in (reply.text or "") and listed(reply) == []
    await vpnd.stop()


async def test_audit_viewer_filters_and_pages(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    vpnd = await start_admin_vpnd(nursery, staff_config(write_config, db_dsn, fake, base_url))
    fake.add_user(MANAGER, "Max")
    with trio.fail_after(60):
        await say(fake, MANAGER, "/start")
        sql(
            db_dsn,
            "INSERT INTO admin_audit (admin_id, action, target, result, details) "
            "SELECT CASE WHEN g % 2 = 0 THEN 77 ELSE 88 END, CASE WHEN g % 3 = 0 THEN 'grant' ELSE 'lookup' END, "
            "(4000 + g % 5)::text, 'ok', '{}' FROM generate_series(1, 40) g",
        )
        menu = await say(fake, MANAGER, "/admin", predicate=has_button("adm:au"))
        newest = await press(fake, MANAGER, menu, "adm:au:-:0", predicate=text_has("Audit log"))
        ids = [int(i) for i in re.findall(r"#(\d+)", newest.text or "")]
        assert len(ids) == 10 and ids == sorted(ids, reverse=True)
        older = await press(fake, MANAGER, newest, "adm:au:-:", predicate=lambda m: f"#{ids[-1]}" not in (m.text or ""))
        older_ids = [int(i) for i in re.findall(r"#(\d+)", older.text or "")]
        assert max(older_ids) < min(ids) and len(older_ids) == 10
        newer = await press(fake, MANAGER, older, "adm:au:-:-", predicate=lambda m: f"#{ids[0]}" in (m.text or ""))
        assert [int(i) for i in re.findall(r"#(\d+)", newer.text or "")] == ids

        await press(fake, MANAGER, newer, "adm:auf", predicate=text_has("filter"))
        bad = await say(fake, MANAGER, "action=grant; DROP TABLE users")
        assert "not a filter" in (bad.text or "")
        grants = await say(fake, MANAGER, "action=grant", predicate=text_has("Audit log"))
        assert re.findall(r"· (\w+) → ", grants.text or "") == ["grant"] * 10
        assert "lookup" not in (grants.text or "")
        await press(fake, MANAGER, grants, "adm:auf", predicate=text_has("filter"))
        by_admin = await say(fake, MANAGER, "admin=77", predicate=text_has("Audit log"))
        assert " · 88 · " not in (by_admin.text or "") and " · 77 · " in (by_admin.text or "")
        await press(fake, MANAGER, by_admin, "adm:auf", predicate=text_has("filter"))
        by_target = await say(fake, MANAGER, "target=4003", predicate=text_has("Audit log"))
        targets = set(re.findall(r"→ (\d+)", by_target.text or ""))
        assert targets == {"4003"}
        assert not has_button("adm:au:t4003:")(by_target), "8 rows: one page"
    await vpnd.stop()
