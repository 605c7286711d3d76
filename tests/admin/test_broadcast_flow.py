"""Broadcasts end to end in-process: compose in the bot, segments, progress, pause/resume/cancel."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import trio

from tests.admin.harness import (
    ADMIN,
    bot_message_counts,
    give_subscription,
    seed_users,
    start_admin_vpnd,
    start_broadcast,
)
from tests.harness import bot_config, has_button, press, say, sql, text_has
from vpnd_sandbox.telegram_fake import FakeTelegram


async def test_small_broadcast_reaches_everyone_once_with_progress_and_summary(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    config = bot_config(write_config, db_dsn, fake, base_url, broadcast={"progress_interval": 0.5})
    users = seed_users(db_dsn, fake, 10_000, 30)
    vpnd = await start_admin_vpnd(nursery, config)
    fake.add_user(ADMIN, "Admin")
    with trio.fail_after(60):
        progress = await start_broadcast(
            fake, "<b>Hello</b> from the shop", "all", button="Open site | https://example.com/shop"
        )
        assert "Broadcast #" in (progress.text or "")
        await fake.wait_until(lambda: all(bot_message_counts(fake, users, "Hello from the shop").values()), 30)
        summary = await fake.wait_for_bot_message(ADMIN, text_has("skipped of"), timeout=15)
        assert "30 sent" in (summary.text or "") or "31 sent" in (summary.text or "")  # the admin is a user too
    counts = bot_message_counts(fake, users, "Hello from the shop")
    assert set(counts.values()) == {1}
    first = fake.bot_messages(users[0])[-1]
    assert first.entities and first.entities[0]["type"] == "bold"
    assert first.buttons == [{"text": "Open site", "url": "https://example.com/shop"}]
    rows = sql(db_dsn, "SELECT status, count(*) FROM broadcast_recipients GROUP BY status")
    assert dict(rows) == {"sent": 31}
    assert sql(db_dsn, "SELECT status FROM broadcasts") == [("done",)]
    assert fake.too_many_requests_sent == 0
    await vpnd.stop()


async def test_bad_html_is_refused_by_the_preview(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    vpnd = await start_admin_vpnd(nursery, bot_config(write_config, db_dsn, fake, base_url))
    fake.add_user(ADMIN, "Admin")
    with trio.fail_after(30):
        menu = await say(fake, ADMIN, "/admin", predicate=has_button("adm:bc"))
        await press(fake, ADMIN, menu, "adm:bc", predicate=text_has("broadcast text"))
        refused = await say(fake, ADMIN, "<b>unclosed", predicate=text_has("refused"))
        assert "Telegram refused" in (refused.text or "")
        ok = await say(fake, ADMIN, "<b>closed</b>", predicate=has_button("adm:bn"))
        assert ok is not None
    assert sql(fake_db := db_dsn, "SELECT count(*) FROM broadcasts") == [(0,)], fake_db
    await vpnd.stop()


async def test_no_subscription_segment_excludes_payers_and_trials_and_skips_who_pays_midway(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    config = bot_config(
        write_config, db_dsn, fake, base_url, telegram={"rate_per_second": 5.0}, broadcast={"progress_interval": 0.5}
    )
    free = seed_users(db_dsn, fake, 20_000, 40)
    paying = seed_users(db_dsn, fake, 30_000, 5)
    trials = seed_users(db_dsn, fake, 40_000, 5)
    unreachable = seed_users(db_dsn, fake, 50_000, 3)
    give_subscription(db_dsn, paying, kind="paid")
    give_subscription(db_dsn, trials, kind="trial")
    sql(db_dsn, "UPDATE users SET reachable = false WHERE id = ANY(%s)", unreachable)
    vpnd = await start_admin_vpnd(nursery, config)
    fake.add_user(ADMIN, "Admin")
    with trio.fail_after(60):
        progress = await start_broadcast(fake, "Try our VPN", "nosub")
        assert progress is not None
        # 41 recipients (40 free users + the admin) at 5/s: the last ones are seconds away.
        assert sql(db_dsn, "SELECT total FROM broadcasts") == [(41,)]
        late = free[-3:]
        give_subscription(db_dsn, late, kind="paid")  # they pay while the broadcast runs
        summary = await fake.wait_for_bot_message(ADMIN, text_has("skipped of"), timeout=40)
        assert "3 skipped" in (summary.text or "")
    counts = bot_message_counts(fake, free + paying + trials + unreachable, "Try our VPN")
    assert all(counts[uid] == 1 for uid in free[:-3])
    assert all(counts[uid] == 0 for uid in late + paying + trials + unreachable)
    skipped = sql(db_dsn, "SELECT user_id FROM broadcast_recipients WHERE status = 'skipped' ORDER BY user_id")
    assert [r[0] for r in skipped] == late
    await vpnd.stop()
