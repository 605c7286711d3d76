"""Grant hours as well as days, and extend everyone (an outage compensation), through the CLI and the
admin bot (issue 20). Extending everyone is one statement and one audit row, confirmed once."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from tests.admin.harness import give_subscription, seed_users, start_admin_vpnd
from tests.harness import bot_config, button, cli_result, has_button, press, say, sql, text_has, vpnd_cli
from tests.telegram.test_flows import forge_callback
from vpnd.services.admin_actions import parse_duration
from vpnd_sandbox.telegram_fake import FakeTelegram

ADMIN = 1
PAID, TRIAL, EXPIRED, BANNED = 7001, 7002, 7003, 7004


def expiry(dsn: str, user_id: int) -> dt.datetime:
    [(expires_at,)] = sql(dsn, "SELECT expires_at FROM subscriptions WHERE user_id = %s", user_id)
    return expires_at  # type: ignore[no-any-return]


def seed_shop(dsn: str) -> dict[int, dt.datetime]:
    seed_users(dsn, None, PAID, 4)
    give_subscription(dsn, [PAID, EXPIRED, BANNED], kind="paid")
    give_subscription(dsn, [TRIAL], kind="trial")
    sql(dsn, "UPDATE subscriptions SET expires_at = now() - interval '1 day' WHERE user_id = %s", EXPIRED)
    sql(dsn, "UPDATE users SET banned_at = now() WHERE id = %s", BANNED)
    return {uid: expiry(dsn, uid) for uid in (PAID, TRIAL, EXPIRED, BANNED)}


@pytest.mark.parametrize(
    ("text", "expected"),
    [("30", dt.timedelta(days=30)), ("2d", dt.timedelta(days=2)), ("12h", dt.timedelta(hours=12)), (" 36 H ", None)],
)
def test_durations(text: str, expected: dt.timedelta | None) -> None:
    if expected is None:  # a space between number and unit, upper case: still fine
        assert parse_duration(text) == dt.timedelta(hours=36)
    else:
        assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["0", "0h", "-3", "1.5d", "3w", "", "9999999", "3651d", "12hh"])
def test_bad_durations_say_what_is_expected(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_cli_grants_hours_and_says_so(db_dsn: str, write_config: Callable[..., Path]) -> None:
    seed_users(db_dsn, None, PAID, 1)
    run = vpnd_cli(write_config(database={"dsn": db_dsn}))
    done = run("admin", "grant", str(PAID), "12h", "--notify")
    assert done.returncode == 0, done.stderr
    assert f"granted 12 hours to user {PAID}" in done.stdout
    left = expiry(db_dsn, PAID) - sql(db_dsn, "SELECT now()")[0][0]
    assert dt.timedelta(hours=11, minutes=59) < left <= dt.timedelta(hours=12)
    [(text,)] = sql(db_dsn, "SELECT payload ->> 'text' FROM outbox WHERE chat_id = %s", PAID)
    assert "12 hours of VPN access" in text
    bad = run("admin", "grant", str(PAID), "12x")
    assert bad.returncode == 2 and "days (30 or 30d) or hours (12h)" in bad.stderr
    assert sql(db_dsn, "SELECT details ->> 'hours' FROM admin_audit WHERE action = 'grant'") == [("12",)]


def test_cli_extend_all_previews_then_extends_running_paid_subscriptions_once(
    db_dsn: str, write_config: Callable[..., Path]
) -> None:
    before = seed_shop(db_dsn)
    run = vpnd_cli(write_config(database={"dsn": db_dsn}))

    preview = cli_result(run("admin", "extend-all", "2d", "--json"))
    assert preview == {"would_extend": 1, "days": 2, "trials": False}
    assert {uid: expiry(db_dsn, uid) for uid in before} == before  # nothing changed

    done = run("admin", "extend-all", "2d", "--yes")
    assert done.returncode == 0 and "extended 1 running paid subscriptions by 2 days" in done.stdout
    assert expiry(db_dsn, PAID) == before[PAID] + dt.timedelta(days=2)
    for untouched in (TRIAL, EXPIRED, BANNED):  # a trial (not asked), an ended one, a banned user's
        assert expiry(db_dsn, untouched) == before[untouched]

    with_trials = cli_result(run("admin", "extend-all", "12h", "--trials", "--yes", "--json"))
    assert with_trials == {"extended": 2, "hours": 12, "trials": True}
    assert expiry(db_dsn, TRIAL) == before[TRIAL] + dt.timedelta(hours=12)
    assert expiry(db_dsn, PAID) == before[PAID] + dt.timedelta(days=2, hours=12)
    audit = sql(db_dsn, "SELECT details ->> 'count', details ->> 'via' FROM admin_audit WHERE action = 'extend_all'")
    assert audit == [("1", "cli"), ("2", "cli")]


async def test_admin_bot_extends_everyone_once_per_confirmation(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    before = seed_shop(db_dsn)
    fake.add_user(ADMIN, "Admin")
    vpnd = await start_admin_vpnd(nursery, bot_config(write_config, db_dsn, fake, base_url))
    with trio.fail_after(30):
        menu = await say(fake, ADMIN, "/admin", predicate=has_button("adm:xa"))
        await press(fake, ADMIN, menu, "adm:xa", predicate=text_has("Send the time to add"))
        await say(fake, ADMIN, "soon", predicate=text_has("from 1 hour to"))
        confirm = await say(fake, ADMIN, "36h", predicate=has_button("adm:xac:"))
        assert "Add 36 hours" in (confirm.text or "") and "Paid: 1. Paid and trials: 2." in (confirm.text or "")
        data = button(confirm, "adm:xac:36:0:")
        await press(fake, ADMIN, confirm, data, predicate=text_has("Extended 1 subscriptions by 36 hours"))
        forge_callback(fake, ADMIN, confirm, data)  # the same confirmation again
        await fake.wait_for_bot_message(ADMIN, text_has("Already done"))
    assert expiry(db_dsn, PAID) == before[PAID] + dt.timedelta(hours=36)
    assert expiry(db_dsn, TRIAL) == before[TRIAL]
    assert sql(db_dsn, "SELECT count(*) FROM admin_audit WHERE action = 'extend_all'") == [(1,)]
    await vpnd.stop()
