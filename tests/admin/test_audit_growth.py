"""admin_audit stays bounded: a refused stranger writes a few rows, not one per try; old rows are pruned."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import trio

from tests.harness import bot_config, sql, start_vpnd
from vpnd.db.admin import DENIED_ROWS_PER_WINDOW
from vpnd_sandbox.telegram_fake import FakeTelegram

EVE = 666


async def test_a_refused_stranger_writes_a_bounded_number_of_rows_that_still_count_every_try(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    vpnd = await start_vpnd(nursery, bot_config(write_config, db_dsn, fake, base_url))
    fake.add_user(EVE, "Eve")
    with trio.fail_after(60):
        for _ in range(DENIED_ROWS_PER_WINDOW + 10):
            fake.user_sends(EVE, "/admin")
            reply = await fake.wait_for_bot_message(EVE, timeout=10)
            assert "admin" not in (reply.text or "").lower()
    rows = sql(
        db_dsn,
        "SELECT action, result, coalesce((details ->> 'repeats')::int, 0) FROM admin_audit WHERE admin_id = %s",
        EVE,
    )
    assert len(rows) == DENIED_ROWS_PER_WINDOW, rows  # not one per try
    assert all(action == "command" and result == "denied" for action, result, _ in rows)
    assert len(rows) + sum(repeats for _, _, repeats in rows) == DENIED_ROWS_PER_WINDOW + 10  # every try is on record
    await vpnd.stop()


async def test_housekeeping_prunes_audit_rows_and_promo_attempts_past_retention(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    sql(db_dsn, "INSERT INTO users (id, first_name, referral_code) VALUES (%s, 'Eve', 'refeve')", EVE)
    sql(
        db_dsn,
        "INSERT INTO admin_audit (admin_id, action, result, created_at) "
        "SELECT %s, 'command', 'denied', now() - make_interval(days => d) FROM generate_series(1, 100) d",
        EVE,
    )
    sql(
        db_dsn,
        "INSERT INTO promo_attempts (user_id, code, result, created_at) "
        "SELECT %s, 'X' || d, 'not_found', now() - make_interval(days => d) FROM generate_series(1, 40) d",
        EVE,
    )
    config = bot_config(
        write_config, db_dsn, fake, base_url, workers={"audit_retention_days": 60, "retention_days": 30}
    )
    vpnd = await start_vpnd(nursery, config)  # housekeeping's first round runs at start

    def counts() -> tuple[int, int]:
        row = sql(db_dsn, "SELECT (SELECT count(*) FROM admin_audit), (SELECT count(*) FROM promo_attempts)")[0]
        return int(row[0]), int(row[1])

    with trio.fail_after(30):
        while counts() != (59, 29):  # rows 1..59 and 1..29 days old are within retention
            await trio.sleep(0.1)
    await vpnd.stop()
