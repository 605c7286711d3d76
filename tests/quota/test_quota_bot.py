"""Plan limits as people see them in the bot: "My subscription" (traffic used / total, the reset date,
the device limit) and the admin menu's user card and stats. The fake Bot API, the daemon, a real
PostgreSQL; the usage is set in the database as the writer would have counted it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import psycopg
import trio

from tests.admin.harness import ADMIN, start_admin_vpnd
from tests.harness import bot_config, has_button, press, say, scalar, sql, start_vpnd, text_has
from vpnd.db.subscriptions import grant_days
from vpnd.db.users import upsert_user
from vpnd_sandbox.telegram_fake import FakeTelegram

GIB = 2**30
ALICE = 3001
BOB = 3002
TIER = (
    '\n[[plans]]\ncode = "q1"\ntitle = { en = "Lite", ru = "Лайт" }\ndays = 30\nprice = "1.99"\n'
    'currency = "USD"\nstars = 100\ntraffic_gb = 10\ntraffic_reset = "per_period"\ndevices = 3\n'
)


def subscribe(dsn: str, user_id: int, plan: str, language: str = "en") -> None:
    with psycopg.connect(dsn) as conn:
        upsert_user(conn, user_id, None, f"user {user_id}", language)
        grant_days(conn, user_id, 30, kind="paid", plan_code=plan)


def date_of(dsn: str, expression: str, user_id: int) -> str:
    """A timestamp from the database as the bot shows dates (its day, in UTC)."""
    return str(scalar(dsn, f"SELECT to_char(({expression}) AT TIME ZONE 'UTC', 'YYYY-MM-DD') {FROM}", user_id))


FROM = "FROM subscriptions s LEFT JOIN traffic_periods p ON p.user_id = s.user_id AND p.current WHERE s.user_id = %s"


async def test_my_subscription_shows_traffic_reset_and_devices(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    config = bot_config(write_config, db_dsn, fake, base_url, plans=TIER)
    await start_vpnd(nursery, config)
    fake.add_user(ALICE, "Alice")
    fake.add_user(BOB, "Bob", language_code="ru")
    subscribe(db_dsn, ALICE, "q1")
    subscribe(db_dsn, BOB, "m1", "ru")

    async def my_subscription(user_id: int) -> str:
        menu = await say(fake, user_id, "/start", predicate=has_button("sub"))
        shown = await press(fake, user_id, menu, "sub", predicate=has_button("reissue"))
        return shown.text or ""

    with trio.fail_after(40):
        # no traffic yet: no period, the reset computed from the subscription's start
        text = await my_subscription(ALICE)
        reset = date_of(db_dsn, "s.starts_at + interval '30 days'", ALICE)
        assert "This period: 0 B of 10 GB, resets" in text and reset in text.split("resets")[1].splitlines()[0]
        assert "Devices: up to 3" in text

        sql(
            db_dsn,
            "INSERT INTO traffic_periods (user_id, started_at, ends_at, used_bytes, extra_bytes) "
            "SELECT user_id, starts_at, starts_at + interval '30 days', %s, %s FROM subscriptions WHERE user_id = %s",
            3 * GIB + GIB // 2,
            5 * GIB,
            ALICE,
        )
        sql(db_dsn, "UPDATE subscriptions SET extra_devices = 2 WHERE user_id = %s", ALICE)
        text = await my_subscription(ALICE)
        assert "This period: 3.5 GB of 15 GB, resets" in text
        assert "Devices: up to 5" in text and "used up" not in text

        sql(db_dsn, "UPDATE traffic_periods SET used_bytes = %s WHERE user_id = %s", 15 * GIB, ALICE)
        sql(db_dsn, "UPDATE subscriptions SET traffic_blocked = true WHERE user_id = %s", ALICE)
        text = await my_subscription(ALICE)
        assert "This period: 15 GB of 15 GB" in text and "The quota is used up" in text

        text = await my_subscription(BOB)  # unlimited, in Russian
        assert "Лимит трафика: без ограничений" in text and "Устройства: без ограничений" in text


async def test_admin_user_card_and_stats_show_usage_by_plan(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    await start_admin_vpnd(nursery, bot_config(write_config, db_dsn, fake, base_url, plans=TIER))
    fake.add_user(ADMIN, "Admin")
    subscribe(db_dsn, ALICE, "q1")
    subscribe(db_dsn, BOB, "m1")
    sql(
        db_dsn,
        "INSERT INTO traffic_periods (user_id, started_at, ends_at, used_bytes) "
        "SELECT user_id, starts_at, starts_at + interval '30 days', %s FROM subscriptions WHERE user_id = %s",
        10 * GIB,
        ALICE,
    )
    sql(db_dsn, "UPDATE subscriptions SET traffic_blocked = true WHERE user_id = %s", ALICE)
    sql(db_dsn, "INSERT INTO devices (user_id, hwid) VALUES (%s, 'a'), (%s, 'b')", ALICE, ALICE)
    with trio.fail_after(40):
        menu = await say(fake, ADMIN, "/admin", predicate=has_button("adm:st"))
        stats = await press(fake, ADMIN, menu, "adm:st", predicate=text_has("Stats"))
        text = stats.text or ""
        assert "Active subscribers by plan" in text
        assert "q1: 1 · 10 GB · 1 over quota" in text and "m1: 1 · 0 B · 0 over quota" in text

        menu = await press(fake, ADMIN, stats, "adm", predicate=has_button("adm:fu"))
        await press(fake, ADMIN, menu, "adm:fu", predicate=text_has("user id or @username"))
        card = await say(fake, ADMIN, str(ALICE), predicate=text_has(f"User {ALICE}"))
        text = card.text or ""
        reset = date_of(db_dsn, "p.ends_at", ALICE)
        assert "Plan: Lite" in text
        assert f"Traffic: 10 GB of 10 GB this period, resets {reset}" in text and "over the quota" in text
        assert "Devices: 2 of 3" in text

        menu = await say(fake, ADMIN, "/admin", predicate=has_button("adm:fu"))
        await press(fake, ADMIN, menu, "adm:fu", predicate=text_has("user id or @username"))
        card = await say(fake, ADMIN, str(BOB), predicate=text_has(f"User {BOB}"))
        text = card.text or ""
        assert "Traffic: 0 B this period (unlimited)" in text and "Devices: 0 (unlimited)" in text
