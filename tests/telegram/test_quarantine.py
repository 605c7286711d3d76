"""An update that cannot be stored or handled is quarantined, acknowledged, and the loop goes on."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import trio

from tests.harness import bot_config, start_vpnd
from vpnd_sandbox.telegram_fake import FakeTelegram

ALICE = 1201


def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"end": True}
    for _ in range(depth):
        value = {"a": value}
    return value


async def test_update_nested_900_levels_is_quarantined_and_polling_goes_on(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    vpnd = await start_vpnd(nursery, bot_config(write_config, db_dsn, fake, base_url))
    fake.add_user(ALICE, "Alice")
    with trio.fail_after(30):
        deep = fake.inject_update({"message": nested(900)})
        fake.user_sends(ALICE, "/start")
        reply = await fake.wait_for_bot_message(ALICE)
    assert "Main menu" in (reply.text or "")
    with psycopg.connect(db_dsn) as conn:
        row = conn.execute(
            "SELECT outcome, handled_at IS NOT NULL, payload->>'reason', length(payload->>'quarantined') "
            "FROM telegram_inbox WHERE update_id = %s",
            (deep,),
        ).fetchone()
        offset = conn.execute("SELECT value FROM daemon_state WHERE key = 'telegram_offset'").fetchone()
    assert row is not None
    outcome, handled, reason, text_length = row
    assert (outcome, handled) == ("quarantined", True)
    assert "nested more than" in reason and 0 < text_length <= 65536
    assert offset is not None and int(offset[0]) > deep  # acknowledged: Telegram will not send it again
    await vpnd.stop()
    # A restart does not trip over it either.
    vpnd = await start_vpnd(nursery, bot_config(write_config, db_dsn, fake, base_url))
    with trio.fail_after(30):
        fake.user_sends(ALICE, "/help")
        assert "Help" in ((await fake.wait_for_bot_message(ALICE)).text or "")
    await vpnd.stop()
