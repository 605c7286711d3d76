"""CSV exports open safely in a spreadsheet: no cell starts a formula, whatever a user named themselves."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from pathlib import Path

import trio

from tests.admin.harness import ADMIN, seed_users, start_admin_vpnd
from tests.harness import bot_config, has_button, say, sql
from vpnd_sandbox.telegram_fake import FakeTelegram

NAMES = {
    7001: '=HYPERLINK("http://evil")',
    7002: "\t=1+1",  # a leading TAB: spreadsheets strip it and evaluate the rest
    7003: "\r=cmd|' /C calc'!A0",  # a leading CR, likewise
    7004: "\n@SUM(1)",
    7005: "Plain Name",
}


async def test_users_csv_neutralises_every_formula_start(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    vpnd = await start_admin_vpnd(nursery, bot_config(write_config, db_dsn, fake, base_url))
    fake.add_user(ADMIN, "Admin")
    seed_users(db_dsn, None, 7001, len(NAMES))
    for user_id, name in NAMES.items():
        sql(db_dsn, "UPDATE users SET first_name = %s WHERE id = %s", name, user_id)
    with trio.fail_after(40):
        menu = await say(fake, ADMIN, "/admin", predicate=has_button("adm:ex:users"))
        fake.user_presses_button(ADMIN, menu.message_id, "adm:ex:users")
        document = await fake.wait_for_bot_message(ADMIN, lambda m: m.document is not None, timeout=20)
    assert document.document is not None and document.document.data is not None
    rows = list(csv.reader(io.StringIO(document.document.data.decode(), newline="")))
    first_names = {int(row[0]): row[2] for row in rows[1:] if int(row[0]) in NAMES}
    for user_id, name in NAMES.items():
        expected = name if user_id == 7005 else "'" + name
        assert first_names[user_id] == expected, (user_id, first_names[user_id])
    await vpnd.stop()
