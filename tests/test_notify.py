"""Changes wake their owner by themselves: commit-time notifications, from any process, reach the owners.

The real daemon runs against a real PostgreSQL and the fake Xray, with the Xray writer's reconcile
period at 600 s and the workers an hour apart: a change that reaches Xray within a couple of seconds
can only have been carried by the notification its commit sent.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psycopg
import trio

from tests.faults.test_fault_postgres_restart import make_database, pg_restart_fast
from tests.harness import Running, bot_config, start_vpnd
from tests.xray.test_xray_writer import PUBLIC_KEY, TAG, reality_template
from vpnd.db import notify
from vpnd.db.subscriptions import grant_days
from vpnd_sandbox.postgres import throwaway_cluster
from vpnd_sandbox.telegram_fake import FakeTelegram
from vpnd_sandbox.xray_fake import FakeXray, start_fake_xray

#: From a commit to its effect (Xray changed, message sent): the reconcile period is 600 s.
PROMPT = 2.0
HOUR = 3600
USER = 5001


def sql(dsn: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(query, params or None)
        return cur.fetchall() if cur.description else []


def add_users(dsn: str, first: int, count: int, *, days: int | None = None) -> list[int]:
    """Users first..first+count-1, each with `days` of paid access when given."""
    ids = list(range(first, first + count))
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "INSERT INTO users (id, first_name, referral_code) "
            "SELECT g, 'User ' || g, 'ref' || g FROM unnest(%s::bigint[]) g",
            (ids,),
        )
        for user_id in ids if days else ():
            grant_days(conn, user_id, days, kind="paid")
    return ids


def emails(xray: FakeXray) -> set[str]:
    return set(xray.users(TAG))


async def until(condition: Callable[[], bool], timeout: float) -> float:
    """Poll until `condition` holds; return how long it took (fails past `timeout`)."""
    started = time.monotonic()
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.01)
    return time.monotonic() - started


async def vpnd_admin(config: Path, *args: str) -> str:
    """`vpnd admin ...` as its own process (it wakes nobody itself: the commit does)."""
    command = [sys.executable, "-m", "vpnd", "admin", *args, "--config", str(config)]
    result = await trio.run_process(command, capture_stdout=True, capture_stderr=True, check=False)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


@asynccontextmanager
async def daemon_with_xray(
    nursery: trio.Nursery,
    fake_telegram: tuple[FakeTelegram, str],
    dsn: str,
    write_config: Callable[..., Path],
    tmp_path: Path,
) -> AsyncIterator[tuple[Running, FakeXray]]:
    """vpnd against the fake Xray, its periodic rounds far apart (the writer's 600 s, the workers' an hour)."""
    fake, base_url = fake_telegram
    template = tmp_path / "template.json"
    template.write_text(json.dumps(reality_template()))
    (tmp_path / "xray").mkdir()
    with start_fake_xray("xray.", inbound_tags=(TAG,)) as xray:
        config = bot_config(
            write_config, dsn, fake, base_url,
            workers={
                "expiry_interval": HOUR, "reminders_interval": HOUR, "trial_interval": HOUR, "renewal_interval": HOUR,
            },
            xray={
                "enabled": True, "template_path": str(template), "config_path": str(tmp_path / "xray" / "config.json"),
                "inbound_tag": TAG, "api_address": xray.address, "public_key": PUBLIC_KEY,
                "short_id": "6ba85179e30d4fc2", "reconcile_interval": 600,
            },
        )  # fmt: skip
        vpnd = await start_vpnd(nursery, config)
        try:
            yield vpnd, xray
        finally:
            await vpnd.stop()


async def test_cli_revoke_and_grant_reach_xray_at_once(
    nursery: trio.Nursery,
    fake_telegram: tuple[FakeTelegram, str],
    db_dsn: str,
    write_config: Callable[..., Path],
    tmp_path: Path,
) -> None:
    """Before: `vpnd admin revoke` wrote the database and woke nobody, so the user kept VPN access until
    the next reconcile (up to 60 s; here 600). Now the commit itself wakes the Xray writer."""
    add_users(db_dsn, USER, 1)
    cli_config = write_config(name="cli.toml", database={"dsn": db_dsn})
    async with daemon_with_xray(nursery, fake_telegram, db_dsn, write_config, tmp_path) as (vpnd, xray):
        assert (await vpnd.app.health.checks["notify_listener"]()).ok
        await vpnd_admin(cli_config, "grant", str(USER), "30")
        granted_in = await until(lambda: f"u{USER}" in emails(xray), PROMPT)
        await vpnd_admin(cli_config, "revoke", str(USER))
        revoked_in = await until(lambda: f"u{USER}" not in emails(xray), PROMPT)
    print(f"CLI grant reached Xray in {granted_in:.3f}s, revoke in {revoked_in:.3f}s")
    assert [op for op, email, _ in xray.operations() if email == f"u{USER}"] == ["add", "remove"]


async def test_outbox_row_from_another_connection_is_sent_promptly(
    nursery: trio.Nursery,
    fake_telegram: tuple[FakeTelegram, str],
    db_dsn: str,
    write_config: Callable[..., Path],
    tmp_path: Path,
) -> None:
    """A message queued by another process's commit is sent at once, not at the sender's next poll."""
    fake, _ = fake_telegram
    add_users(db_dsn, USER, 1)
    fake.add_user(USER, "User").started = True
    async with daemon_with_xray(nursery, fake_telegram, db_dsn, write_config, tmp_path) as (vpnd, _):
        for n in range(3):
            wakes = vpnd.app.outbox_changed.count
            sql(db_dsn, "INSERT INTO outbox (chat_id, payload) VALUES (%s, %s)", USER, json.dumps({"text": f"hi {n}"}))
            with trio.fail_after(PROMPT):
                await fake.wait_for_bot_message(USER, lambda m, n=n: m.text == f"hi {n}")
            assert vpnd.app.outbox_changed.count == wakes + 1  # the commit's notification, once
            await trio.sleep(0.3)


async def test_bulk_change_in_one_transaction_wakes_the_writer_once(
    nursery: trio.Nursery,
    fake_telegram: tuple[FakeTelegram, str],
    db_dsn: str,
    write_config: Callable[..., Path],
    tmp_path: Path,
) -> None:
    """Revoking 200 subscriptions in one transaction (200 statements) sends one notification: one round."""
    users = add_users(db_dsn, 6000, 200, days=30)
    async with daemon_with_xray(nursery, fake_telegram, db_dsn, write_config, tmp_path) as (vpnd, xray):
        await until(lambda: len(emails(xray)) == len(users), 30)
        assert vpnd.started.xray is not None
        status = vpnd.started.xray.status()
        with trio.fail_after(30):  # the start-up rounds (first reconcile, the listener's connect nudge) are done
            while True:
                wakes, rounds = vpnd.app.xray_changed.count, status.rounds
                await trio.sleep(1.0)
                if (vpnd.app.xray_changed.count, status.rounds) == (wakes, rounds):
                    break
        with psycopg.connect(db_dsn) as conn:
            for user_id in users:
                conn.execute("UPDATE subscriptions SET status = 'revoked' WHERE user_id = %s", (user_id,))
        await until(lambda: not emails(xray), PROMPT)
        await trio.sleep(0.5)
        assert (vpnd.app.xray_changed.count, status.rounds) == (wakes + 1, rounds + 1)


def test_notifications_are_sent_at_commit_once_per_transaction(db_dsn: str) -> None:
    """The triggers' contract, seen from a listening session: nothing before commit or after a
    rollback; one notification per channel per transaction, however many statements and rows."""
    add_users(db_dsn, 7000, 3)
    with notify.open_listener(db_dsn, timeout=5) as listener, psycopg.connect(db_dsn) as conn:
        for user_id in (7000, 7001, 7002):
            grant_days(conn, user_id, 30, kind="paid")
        conn.execute("INSERT INTO outbox (chat_id, payload) VALUES (7000, '{}'), (7001, '{}')")
        conn.execute("INSERT INTO outbox (chat_id, payload) VALUES (7002, '{}')")
        assert [n.channel for n in listener.notifies(timeout=0.3)] == []  # not yet committed
        conn.commit()
        assert sorted(n.channel for n in listener.notifies(timeout=1.0)) == [notify.OUTBOX, notify.XRAY]
        conn.execute("UPDATE subscriptions SET status = 'revoked'")
        conn.rollback()
        conn.execute("UPDATE subscriptions SET auto_renew = true")  # not something Xray reads
        conn.commit()
        assert [n.channel for n in listener.notifies(timeout=0.5)] == []


async def test_listener_survives_a_postgres_restart(
    nursery: trio.Nursery,
    fake_telegram: tuple[FakeTelegram, str],
    write_config: Callable[..., Path],
    tmp_path: Path,
) -> None:
    """`pg_ctl restart -m fast` ends the listening session; the listener reconnects by itself, wakes
    every owner (notifications sent meanwhile are lost), and later commits wake them as before."""
    with throwaway_cluster("vpnd-pg-notify-") as cluster:
        dsn = make_database(cluster)
        add_users(dsn, USER, 2, days=30)
        async with daemon_with_xray(nursery, fake_telegram, dsn, write_config, tmp_path) as (vpnd, xray):
            await until(lambda: emails(xray) == {f"u{USER}", f"u{USER + 1}"}, 30)
            check = vpnd.app.health.checks["notify_listener"]
            await trio.to_thread.run_sync(pg_restart_fast, cluster)
            listening = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'vpnd-listen'"
            reconnected_in = await until(lambda: sql(dsn, listening) == [(1,)], 30)
            with trio.fail_after(5):
                while not (await check()).ok:
                    await trio.sleep(0.05)
            sql(dsn, "UPDATE subscriptions SET status = 'revoked' WHERE user_id = %s", USER)
            revoked_in = await until(lambda: f"u{USER}" not in emails(xray), PROMPT)
        print(f"listener back {reconnected_in:.2f}s after the restart; a revoke then reached Xray in {revoked_in:.3f}s")
