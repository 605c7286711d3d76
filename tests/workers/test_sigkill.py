"""SIGKILL in the middle of a reminder round of 2,000 users, then a restart: every user gets the 3-day
reminder exactly once, except at most the messages that were in flight when the process died."""

from __future__ import annotations

import datetime as dt
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from tests.harness import bot_config, sql, start_daemon, wait_ready
from tests.workers.conftest import seed_subscriptions, seed_users, start_users
from vpnd.nurseries.outbox import OutboxSettings
from vpnd_sandbox.postgres import free_port
from vpnd_sandbox.telegram_fake import FakeTelegram

USERS = list(range(100_001, 102_001))
IN_FLIGHT = OutboxSettings().concurrency


def prepare(fake: FakeTelegram, db_dsn: str) -> None:
    fake.global_rate = fake.global_burst = 300.0
    start_users(fake, USERS)
    seed_users(db_dsn, USERS)
    seed_subscriptions(db_dsn, USERS, dt.timedelta(days=2, hours=12))


def delivered(fake: FakeTelegram) -> int:
    return sum(len(fake.bot_messages(uid)) for uid in USERS)


def check_exactly_once(fake: FakeTelegram, db_dsn: str) -> int:
    counts = [len(fake.bot_messages(uid)) for uid in USERS]
    assert min(counts) == 1, "a user never got the reminder"
    duplicated = sum(1 for c in counts if c > 1)
    assert max(counts) <= 2 and duplicated <= IN_FLIGHT, duplicated
    assert all("ends in 3 days" in (m.text or "") for uid in USERS[:50] for m in fake.bot_messages(uid))
    # (Only the users' reminders: the daemon may also alert the admin, e.g. about the missing REALITY key.)
    reminders = "SELECT status, count(*) FROM outbox WHERE chat_id = ANY(%s) GROUP BY status"
    assert sql(db_dsn, reminders, list(USERS)) == [("sent", len(USERS))]
    return duplicated


#: What the SIGKILL'd process runs: the outbox sender and the reminders, no polling, no HTTP.
ONLY_REMINDERS = ("run", "--services", "outbox,reminders")


@pytest.mark.slow
async def test_sigkill_mid_reminder_round_then_restart_reminds_everyone_once(
    fake_telegram: tuple[FakeTelegram, str],
    db_dsn: str,
    write_config: Callable[..., Path],
    tmp_path: Path,
    nursery: trio.Nursery,
) -> None:
    fake, base_url = fake_telegram
    prepare(fake, db_dsn)
    config = bot_config(
        write_config,
        db_dsn,
        fake,
        base_url,
        telegram={"rate_per_second": 200.0},
        workers={"reminders_interval": 60.0, "batch_size": 10},
    )
    with trio.fail_after(120):
        first = await start_daemon(nursery, Path(config.path), tmp_path, args=ONLY_REMINDERS)
        await fake.wait_until(lambda: fake.requests["sendMessage"] >= 100, timeout=30)
        first.signal(signal.SIGKILL)
        assert await first.wait() == -signal.SIGKILL
        at_kill = delivered(fake)
        queued_at_kill = sql(db_dsn, "SELECT count(*) FROM outbox")[0][0]
        sent_at_kill = sql(db_dsn, "SELECT count(*) FROM outbox WHERE status = 'sent'")[0][0]

        second = await start_daemon(nursery, Path(config.path), tmp_path, args=ONLY_REMINDERS)
        await fake.wait_until(lambda: all(fake.bot_messages(uid) for uid in USERS), timeout=60)
        second.signal(signal.SIGTERM)  # duplicates sent until it exits are counted below
        assert await second.wait() == 0, second.log()[-3000:]
    duplicated = check_exactly_once(fake, db_dsn)
    print(
        f"\nSIGKILL after {at_kill} delivered ({sent_at_kill} marked sent, {queued_at_kill} of {len(USERS)} queued); "
        f"after restart: {len(USERS)} users, {duplicated} got a second copy (in flight at the kill)"
    )
    assert at_kill - sent_at_kill <= IN_FLIGHT


@pytest.mark.slow
async def test_daemon_sigkill_mid_reminder_round_then_restart(
    fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path], tmp_path: Path
) -> None:
    """The same against `python -m vpnd run` (the whole daemon)."""
    fake, base_url = fake_telegram
    prepare(fake, db_dsn)
    port = free_port()
    config_path = write_config(
        telegram={
            "token": fake.token,
            "api_base_url": base_url,
            "poll_timeout": 1,
            "rate_per_second": 200.0,
            "admin_ids": [1],
        },
        database={"dsn": db_dsn, "pool_min": 1, "pool_max": 8},
        http={"listen": f"127.0.0.1:{port}"},
        shutdown={"grace_seconds": 5.0},
        workers={"reminders_interval": 60.0, "batch_size": 10},
    )
    async with trio.open_nursery() as nursery:
        daemon = await start_daemon(nursery, config_path, tmp_path)
        await fake.wait_until(lambda: fake.requests["sendMessage"] >= 100, timeout=60)
        daemon.signal(signal.SIGKILL)
        assert await daemon.wait() == -signal.SIGKILL
        at_kill = delivered(fake)

        restarted = await start_daemon(nursery, config_path, tmp_path)
        await wait_ready(restarted, f"http://127.0.0.1:{port}")
        await fake.wait_until(lambda: all(fake.bot_messages(uid) for uid in USERS), timeout=90)
        restarted.signal(signal.SIGTERM)  # duplicates sent until it exits are counted below
        assert await restarted.wait() == 0, restarted.log()[-3000:]
        nursery.cancel_scope.cancel()
    duplicated = check_exactly_once(fake, db_dsn)
    print(f"\ndaemon SIGKILL after {at_kill} delivered; {duplicated} duplicates after restart")
