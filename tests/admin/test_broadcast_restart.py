"""Restart guarantee: stop mid-broadcast, start again → every recipient gets the message once
(a graceful stop); after a hard cancel / SIGKILL only the few sends in flight are in doubt (Telegram
has no idempotency key), and `[broadcast] resend_in_doubt` decides: resent (may get it twice) or skipped.

The in-process tests stop vpnd the way SIGTERM does (`lifecycle.request_stop`) or cancel its whole
tree at once (what a second signal does). The subprocess tests send real SIGTERM/SIGKILL to
`vpnd run`; they need the broadcasts nursery wired into the root (`vpnd.compose.open_vpnd`).
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
import trio

from tests.admin.harness import seed_users, start_admin_vpnd
from tests.harness import bot_config, sql, start_daemon, wait_ready
from vpnd.db import broadcasts as bdb
from vpnd.nurseries import broadcasts as broadcasts_nursery
from vpnd_sandbox.postgres import free_port
from vpnd_sandbox.telegram_fake import FakeTelegram

pytestmark = pytest.mark.slow

RECIPIENTS = 1500
RATE = 100.0
TEXT = "Restart-proof news"


def create_broadcast(dsn: str, segment: str = "all") -> int:
    with psycopg.connect(dsn) as conn:
        broadcast = bdb.create_broadcast(conn, created_by=1, text=TEXT, segment=bdb.Segment.parse(segment))
    return broadcast.id


def deliveries(fake: FakeTelegram, users: list[int]) -> dict[int, int]:
    return {uid: sum(1 for m in fake.bot_messages(uid) if m.text == TEXT) for uid in users}


def delivered(fake: FakeTelegram, users: list[int]) -> int:
    return sum(1 for uid in users if fake.messages.get(uid))


def status(dsn: str) -> str:
    return str(sql(dsn, "SELECT status FROM broadcasts")[0][0])


def setup(fake: FakeTelegram, db_dsn: str) -> list[int]:
    fake.global_rate = fake.global_burst = RATE * 1.2
    return seed_users(db_dsn, fake, 100_000, RECIPIENTS)


async def test_graceful_stop_at_40_percent_then_restart_delivers_exactly_once(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    users = setup(fake, db_dsn)
    config = bot_config(write_config, db_dsn, fake, base_url, telegram={"rate_per_second": RATE})
    create_broadcast(db_dsn)
    with trio.fail_after(90):
        vpnd = await start_admin_vpnd(nursery, config)  # resumes the running broadcast at start-up
        await fake.wait_until(lambda: delivered(fake, users) >= RECIPIENTS * 0.4, timeout=30)
        await vpnd.stop()
        at_stop = delivered(fake, users)
        marked = sql(db_dsn, "SELECT count(*) FROM broadcast_recipients WHERE status = 'sent'")[0][0]
        assert marked == at_stop, "every delivery before the stop was persisted"
        assert status(db_dsn) == "running" and at_stop < RECIPIENTS

        vpnd = await start_admin_vpnd(nursery, config)
        with trio.fail_after(60):
            while status(db_dsn) != "done":
                await trio.sleep(0.2)
        await vpnd.stop()
    counts = deliveries(fake, users)
    print(f"\ngraceful stop at {at_stop / RECIPIENTS:.0%}: deliveries per recipient {sorted(set(counts.values()))}")
    assert set(counts.values()) == {1}
    assert fake.too_many_requests_sent == 0


def in_doubt(dsn: str) -> set[int]:
    """Recipients attempted but never marked: the sends in flight when vpnd stopped."""
    rows = sql(dsn, "SELECT user_id FROM broadcast_recipients WHERE status = 'pending' AND attempted_at IS NOT NULL")
    return {int(r[0]) for r in rows}


@pytest.mark.parametrize("resend", [True, False], ids=["resend_in_doubt", "skip_in_doubt"])
async def test_hard_cancel_mid_broadcast_leaves_only_the_sends_in_flight_in_doubt(
    resend: bool,
    nursery: trio.Nursery,
    fake_telegram: tuple[FakeTelegram, str],
    db_dsn: str,
    write_config: Callable[..., Path],
) -> None:
    """Everything cancelled at once (what a kill -9 leaves): vpnd knows exactly which recipients were in
    flight. Resent, they are the only ones who may get it twice; skipped, nobody gets it twice and only
    they may have got nothing."""
    fake, base_url = fake_telegram
    users = setup(fake, db_dsn)
    config = bot_config(
        write_config, db_dsn, fake, base_url, telegram={"rate_per_second": RATE}, broadcast={"resend_in_doubt": resend}
    )
    create_broadcast(db_dsn)
    with trio.fail_after(90):
        async with trio.open_nursery() as doomed:
            await start_admin_vpnd(doomed, config)
            await fake.wait_until(lambda: delivered(fake, users) >= RECIPIENTS * 0.4, timeout=30)
            doomed.cancel_scope.cancel()  # everything at once, sends in flight included
        doubtful = in_doubt(db_dsn)
        assert 0 < len(doubtful) <= broadcasts_nursery.workers_for(RATE)
        vpnd = await start_admin_vpnd(nursery, config)
        with trio.fail_after(60):
            while status(db_dsn) != "done":
                await trio.sleep(0.2)
        await vpnd.stop()
    counts = deliveries(fake, users)
    twice = {uid for uid, c in counts.items() if c == 2}
    never = {uid for uid, c in counts.items() if c == 0}
    print(f"\nhard cancel at 40%: {len(doubtful)} in doubt, {len(twice)} got it twice, {len(never)} never")
    assert max(counts.values()) <= 2 and twice <= doubtful
    metric = "in_doubt_resent" if resend else "in_doubt_skipped"
    assert vpnd.app.metrics.broadcast_sent.labels(metric)._value.get() == len(doubtful)
    if resend:
        assert never == set()
    else:
        assert twice == set() and never <= doubtful
        skipped = sql(db_dsn, "SELECT user_id, error FROM broadcast_recipients WHERE status = 'skipped'")
        assert {int(uid) for uid, _ in skipped} == doubtful
        assert all(error == bdb.IN_DOUBT_SKIPPED for _, error in skipped)
    assert in_doubt(db_dsn) == set()


# --- real signals to `vpnd run` ------------------------------------------------------------------


@pytest.fixture
def daemon_config(
    write_config: Callable[..., Path], db_dsn: str, fake_telegram: tuple[FakeTelegram, str]
) -> tuple[Path, str]:
    fake, base_url = fake_telegram
    port = free_port()
    path = write_config(
        telegram={
            "token": fake.token,
            "api_base_url": base_url,
            "poll_timeout": 1,
            "admin_ids": [1],
            "rate_per_second": RATE,
        },
        database={"dsn": db_dsn, "pool_min": 1, "pool_max": 6},
        http={"listen": f"127.0.0.1:{port}"},
        shutdown={"grace_seconds": 5.0},
    )
    return path, f"http://127.0.0.1:{port}"


@pytest.mark.parametrize("kill", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
async def test_signal_at_40_percent_then_restart(
    kill: signal.Signals,
    daemon_config: tuple[Path, str],
    fake_telegram: tuple[FakeTelegram, str],
    db_dsn: str,
    tmp_path: Path,
) -> None:
    fake, _ = fake_telegram
    users = setup(fake, db_dsn)
    config, url = daemon_config
    create_broadcast(db_dsn)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(120):
            daemon = await start_daemon(nursery, config, tmp_path)
            await wait_ready(daemon, url)
            await fake.wait_until(lambda: delivered(fake, users) >= RECIPIENTS * 0.4, timeout=40)
            daemon.signal(kill)
            code = await daemon.wait(timeout=10)
            assert code == (0 if kill == signal.SIGTERM else -signal.SIGKILL), daemon.log()
            at_stop = delivered(fake, users)
            assert at_stop < RECIPIENTS and status(db_dsn) == "running"
            doubtful = in_doubt(db_dsn)
            assert len(doubtful) <= (0 if kill == signal.SIGTERM else broadcasts_nursery.workers_for(RATE))

            again = await start_daemon(nursery, config, tmp_path)
            await wait_ready(again, url)
            while status(db_dsn) != "done":
                await trio.sleep(0.2)
            again.signal(signal.SIGTERM)
            assert await again.wait(timeout=10) == 0, again.log()
        nursery.cancel_scope.cancel()
    counts = deliveries(fake, users)
    twice = {uid for uid, c in counts.items() if c == 2}
    print(f"\n{kill.name} at {at_stop / RECIPIENTS:.0%}: {len(doubtful)} in doubt, {len(twice)} got it twice")
    assert min(counts.values()) == 1 and max(counts.values()) <= 2
    assert twice <= doubtful  # none at all after SIGTERM
