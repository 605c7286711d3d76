"""Promo codes cannot be brute-forced: wrong codes are limited per user, recorded, counted, and a spike
across many accounts alerts the admins once. Through the fake Bot API and the whole daemon tree."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import trio

from tests.harness import bot_config, sql, start_vpnd
from vpnd_sandbox.telegram_fake import ChatMessage, FakeTelegram

ADMIN, ALICE, BOB, CAROL = 1, 1001, 1002, 1003


async def say(fake: FakeTelegram, user_id: int, text: str) -> ChatMessage:
    fake.user_sends(user_id, text)
    return await fake.wait_for_bot_message(user_id, timeout=10)


def alerts_to(fake: FakeTelegram, chat_id: int, fragment: str) -> list[str]:
    return [m.text or "" for m in fake.bot_messages(chat_id) if fragment in (m.text or "")]


async def test_wrong_codes_are_limited_per_user_recorded_and_a_spike_alerts_admins_once(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    config = bot_config(write_config, db_dsn, fake, base_url, payments={"promo_alert_wrong_attempts": 8})
    vpnd = await start_vpnd(nursery, config)
    for user_id, name in ((ADMIN, "Admin"), (ALICE, "Alice"), (BOB, "Bob"), (CAROL, "Carol")):
        fake.add_user(user_id, name, language_code="en")
    sql(db_dsn, "INSERT INTO promo_codes (code, percent) VALUES ('REAL20', 20)")
    with trio.fail_after(60):
        for user_id in (ADMIN, ALICE, BOB, CAROL):
            await say(fake, user_id, "/start")

        for guess in range(5):
            answer = await say(fake, ALICE, f"/promo GUESS{guess}")
            assert "There is no such promo code" in (answer.text or "")
        # The sixth try is refused whatever it is, even a real code: guessing is slowed to a crawl.
        answer = await say(fake, ALICE, "/promo REAL20")
        assert "Too many wrong promo codes" in (answer.text or "") and "10 min" in (answer.text or "")
        assert sql(db_dsn, "SELECT pending_promo_code FROM users WHERE id = %s", ALICE) == [(None,)]
        # Others are not held back by Alice's limit.
        answer = await say(fake, BOB, "/promo real20")
        assert "REAL20" in (answer.text or "") and "accepted" in (answer.text or "")

        # Every wrong code is on record (the audit trail) and counted.
        assert sql(db_dsn, "SELECT user_id, code, result FROM promo_attempts ORDER BY id") == [
            (ALICE, f"GUESS{n}", "not_found") for n in range(5)
        ]
        registry = vpnd.app.metrics.registry
        assert registry.get_sample_value("vpnd_promo_attempts_total", {"result": "wrong"}) == 5
        assert registry.get_sample_value("vpnd_promo_attempts_total", {"result": "limited"}) == 1
        assert registry.get_sample_value("vpnd_promo_attempts_total", {"result": "ok"}) == 1
        assert alerts_to(fake, ADMIN, "promo_guessing") == []

        # Many accounts guessing at once: 8 wrong codes in the window alert the admins, once.
        for user_id in (BOB, CAROL, CAROL):
            await say(fake, user_id, "/promo NOPE")
        await fake.wait_until(lambda: len(alerts_to(fake, ADMIN, "promo_guessing")) == 1, timeout=10)
        for user_id in (BOB, BOB, CAROL):
            await say(fake, user_id, "/promo NOPE")
        await say(fake, ADMIN, "/start")  # the outbox has had every chance to send another alert
        assert len(alerts_to(fake, ADMIN, "promo_guessing")) == 1
        assert "wrong promo codes" in alerts_to(fake, ADMIN, "promo_guessing")[0]
    await vpnd.stop()
