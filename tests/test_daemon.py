"""`vpnd run` as a real process: READY after readiness, clean SIGTERM, crashes, single instance."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import httpx
import psycopg
import pytest
import trio

from tests.harness import start_daemon, wait_ready
from vpnd.instance_lock import INSTANCE_LOCK_KEY
from vpnd_sandbox.postgres import free_port
from vpnd_sandbox.telegram_fake import FakeTelegram

pytestmark = pytest.mark.slow


def lock_waiters(dsn: str) -> int:
    """Sessions of the test database waiting for a lock (vpnd's, behind the test's LOCK TABLE)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        ).fetchone()
    return int(row[0]) if row else 0


@pytest.fixture
def daemon_config(
    write_config: Callable[..., Path], db_dsn: str, fake_telegram: tuple[FakeTelegram, str]
) -> tuple[Path, str]:
    fake, base_url = fake_telegram
    port = free_port()
    path = write_config(
        telegram={"token": fake.token, "api_base_url": base_url, "poll_timeout": 1},
        database={"dsn": db_dsn, "pool_min": 1, "pool_max": 4},
        http={"listen": f"127.0.0.1:{port}"},
        shutdown={"grace_seconds": 4.0},
    )
    return path, f"http://127.0.0.1:{port}"


async def test_ready_after_readyz_then_sigterm_exits_zero(daemon_config: tuple[Path, str], tmp_path: Path) -> None:
    config, url = daemon_config
    async with trio.open_nursery() as nursery:
        daemon = await start_daemon(nursery, config, tmp_path)
        await wait_ready(daemon, url)
        ready = await daemon.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"]["database"]["ok"] is True
        assert (await daemon.get("/healthz")).json()["status"] == "ok"
        metrics = await daemon.get("/metrics")
        assert "vpnd_db_pool_size" in metrics.text
        lines = daemon.notify.lines()
        assert lines.index("READY=1") > 0 and any(line.startswith("STATUS=") for line in lines)

        daemon.signal(signal.SIGTERM)
        # Bounded by the grace (4 s) plus generous slack for a busy machine: a daemon that ignored the
        # grace deadline would not exit at all.
        assert await daemon.wait(timeout=4.0 + 20.0) == 0, daemon.log()
        await daemon.notify.wait_for("STOPPING=1", timeout=10)
        assert "event=stopped" in daemon.log()
        assert "Traceback" not in daemon.log()
        nursery.cancel_scope.cancel()


async def test_in_flight_request_finishes_before_exit(
    daemon_config: tuple[Path, str], db_dsn: str, tmp_path: Path
) -> None:
    """A /readyz held up by a locked table is answered before the daemon exits on SIGTERM."""
    config, url = daemon_config
    async with trio.open_nursery() as nursery:
        daemon = await start_daemon(nursery, config, tmp_path)
        await wait_ready(daemon, url)
        blocker = await trio.to_thread.run_sync(lambda: psycopg.connect(db_dsn))
        await trio.to_thread.run_sync(lambda: blocker.execute("LOCK TABLE schema_migrations IN ACCESS EXCLUSIVE MODE"))
        responses: list[httpx.Response] = []

        async def slow_request() -> None:
            responses.append(await daemon.get("/readyz", timeout=10))

        nursery.start_soon(slow_request)
        # The request is in flight once its readiness query waits on the test's lock.
        with trio.fail_after(30):
            while not await trio.to_thread.run_sync(lock_waiters, db_dsn):
                await trio.sleep(0.05)
        daemon.signal(signal.SIGTERM)
        await daemon.notify.wait_for("STOPPING=1", timeout=30)  # SIGTERM taken: the stop has begun
        assert daemon.process.returncode is None  # still serving the request in flight
        await trio.to_thread.run_sync(blocker.rollback)  # the request can now finish
        assert await daemon.wait(timeout=30) == 0, daemon.log()
        assert len(responses) == 1 and responses[0].status_code == 200, responses
        blocker.close()
        nursery.cancel_scope.cancel()


async def test_second_instance_is_refused(daemon_config: tuple[Path, str], tmp_path: Path) -> None:
    config, url = daemon_config
    async with trio.open_nursery() as nursery:
        first = await start_daemon(nursery, config, tmp_path)
        await wait_ready(first, url)
        second = await start_daemon(nursery, config, tmp_path)
        assert await second.wait(timeout=30) == 1
        assert "another vpnd is already running on this database" in second.log()
        assert f"pg_advisory_lock({INSTANCE_LOCK_KEY})" in second.log()
        assert "Traceback" not in second.log()
        first.signal(signal.SIGTERM)
        assert await first.wait() == 0
        nursery.cancel_scope.cancel()


async def test_crashing_child_exits_nonzero_with_cause_logged_once(
    daemon_config: tuple[Path, str], db_dsn: str, tmp_path: Path
) -> None:
    """Take the instance lock away (terminate its session, grab the lock): the keeper crashes the
    daemon, its siblings (the HTTP server) are cancelled, and the cause is logged once."""
    config, url = daemon_config
    async with trio.open_nursery() as nursery:
        daemon = await start_daemon(nursery, config, tmp_path)
        await wait_ready(daemon, url)

        def steal_lock() -> psycopg.Connection[tuple[object, ...]]:
            conn = psycopg.connect(db_dsn, autocommit=True)
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'vpnd-instance-lock'"
            )
            import time

            deadline = time.monotonic() + 30  # the killed backend frees the lock when it has exited
            while time.monotonic() < deadline:
                row = conn.execute("SELECT pg_try_advisory_lock(%s)", (INSTANCE_LOCK_KEY,)).fetchone()
                if row and row[0]:
                    return conn
                time.sleep(0.1)
            raise AssertionError("could not take the lock")

        thief = await trio.to_thread.run_sync(steal_lock)
        code = await daemon.wait(timeout=40)
        thief.close()
        log = daemon.log()
        assert code == 1, log
        assert log.count("event=crashed") == 1, log
        assert "InstanceLockLost" in log and "another vpnd is already running" in log
        with pytest.raises(httpx.ConnectError):
            await daemon.get("/healthz")
        nursery.cancel_scope.cancel()


async def test_database_newer_than_code_is_refused(
    daemon_config: tuple[Path, str], db_dsn: str, tmp_path: Path
) -> None:
    config, _ = daemon_config
    with psycopg.connect(db_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO schema_migrations (version, name) VALUES (999, 'from the future')")
    async with trio.open_nursery() as nursery:
        daemon = await start_daemon(nursery, config, tmp_path)
        assert await daemon.wait(timeout=30) == 1
        assert "schema is at version 999, newer than this vpnd knows" in daemon.log()
        assert "Traceback" not in daemon.log()
        nursery.cancel_scope.cancel()


async def test_unreachable_database_exits_one_with_reason(write_config: Callable[..., Path], tmp_path: Path) -> None:
    config = write_config(
        telegram={"token": "1:T"},
        database={"dsn": f"postgresql://nobody@127.0.0.1:{free_port()}/x", "connect_timeout_seconds": 2.0},
    )
    async with trio.open_nursery() as nursery:
        daemon = await start_daemon(nursery, config, tmp_path)
        assert await daemon.wait(timeout=30) == 1
        assert "event=crashed" in daemon.log() and "Traceback" not in daemon.log()
        nursery.cancel_scope.cancel()


async def test_json_logs_carry_no_secrets(
    write_config: Callable[..., Path], db_dsn: str, fake_telegram: tuple[FakeTelegram, str], tmp_path: Path
) -> None:
    """Debug-level JSON logs of a daemon at work never show the bot token or the DSN's password."""
    import json

    fake, base_url = fake_telegram
    port = free_port()
    dsn_with_password = db_dsn.replace("postgres@", "postgres:Pa55-w0rd-secret@")
    config = write_config(
        telegram={"token": fake.token, "api_base_url": base_url, "poll_timeout": 1},
        database={"dsn": dsn_with_password, "pool_min": 1, "pool_max": 4},
        http={"listen": f"127.0.0.1:{port}"},
        log={"level": "debug", "format": "json"},
    )
    fake.add_user(77, "Logan")
    async with trio.open_nursery() as nursery:
        daemon = await start_daemon(nursery, config, tmp_path)
        await wait_ready(daemon, f"http://127.0.0.1:{port}")
        fake.user_sends(77, "/start")
        await fake.wait_for_bot_message(77, timeout=20)
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait() == 0
        nursery.cancel_scope.cancel()
    log = daemon.log()
    assert fake.token not in log and fake.token.split(":")[1] not in log
    assert "Pa55-w0rd-secret" not in log
    events = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert len(events) >= 5 and all({"ts", "level", "logger"} <= set(e) for e in events)
    assert any(e.get("event") == "ready" for e in events)
