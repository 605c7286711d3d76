"""Signals of a real `vpnd run`: SIGHUP reloads the config (live keys applied, the rest logged as
needing a restart, a broken file keeps the running config); SIGTERM during start-up exits at once;
the wait for the migration lock is bounded and names the holder."""

from __future__ import annotations

import re
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio

from tests.harness import Daemon, start_daemon, wait_ready
from vpnd.db.migrations import MIGRATION_LOCK_KEY
from vpnd_sandbox.postgres import free_port
from vpnd_sandbox.telegram_fake import FakeTelegram

pytestmark = pytest.mark.slow

ADMIN = 4242


async def wait_for_log(daemon: Daemon, pattern: str, *, count: int = 1, timeout: float = 20) -> str:
    """Wait until `pattern` (a regex) occurs `count` times in the daemon's log; return the log."""
    with trio.fail_after(timeout):
        while True:
            log = daemon.log()
            if len(re.findall(pattern, log)) >= count:
                return log
            if daemon.process.returncode is not None:
                raise AssertionError(f"the daemon exited ({daemon.process.returncode}):\n{log[-3000:]}")
            await trio.sleep(0.1)


async def housekeeping_rounds(daemon: Daemon) -> float:
    text = (await daemon.get("/metrics")).text
    match = re.search(r'^vpnd_worker_rounds_total\{worker="housekeeping"\} (\S+)$', text, re.M)
    return float(match[1]) if match else 0.0


async def admin_menu_shown(fake: FakeTelegram) -> bool:
    """Send /admin as ADMIN; True when the admin menu comes back (not the unknown-command answer)."""
    fake.user_sends(ADMIN, "/admin")
    reply = await fake.wait_for_bot_message(ADMIN, timeout=20)
    return "Admin" in (reply.text or "")


async def test_sighup_reloads_live_keys_logs_restart_keys_and_survives_a_broken_file(
    write_config: Callable[..., Path], db_dsn: str, fake_telegram: tuple[FakeTelegram, str], tmp_path: Path
) -> None:
    fake, base_url = fake_telegram
    port = free_port()
    sections: dict[str, dict[str, Any]] = {
        "telegram": {"token": fake.token, "api_base_url": base_url, "poll_timeout": 1, "admin_ids": []},
        "database": {"dsn": db_dsn, "pool_min": 1, "pool_max": 4},
        "http": {"listen": f"127.0.0.1:{port}"},
        "workers": {"housekeeping_interval": 3600.0},
        "shutdown": {"grace_seconds": 2.0},
    }
    config = write_config(**sections)
    fake.add_user(ADMIN, "Ada")
    async with trio.open_nursery() as nursery:
        daemon = await start_daemon(nursery, config, tmp_path)
        await wait_ready(daemon, f"http://127.0.0.1:{port}")
        assert not await admin_menu_shown(fake)
        assert await housekeeping_rounds(daemon) == 1.0  # hourly: one round so far

        # Live: admin ids, a worker interval, the log level. Restart-only: the listen address.
        write_config(
            **{
                **sections,
                "telegram": {**sections["telegram"], "admin_ids": [ADMIN]},
                "workers": {"housekeeping_interval": 0.5},
                "http": {"listen": f"127.0.0.1:{free_port()}"},
                "log": {"level": "debug"},
            }
        )
        daemon.signal(signal.SIGHUP)
        log = await wait_for_log(daemon, r"event=reloaded ")
        assert "event=config_key_applied key=[telegram].admin_ids" in log
        assert "event=config_key_applied key=[workers].housekeeping_interval" in log
        assert "event=config_key_applied key=[log].level" in log
        assert "event=config_key_needs_restart key=[http].listen" in log
        assert await admin_menu_shown(fake)
        with trio.fail_after(20):  # the hourly worker now runs every half second
            while await housekeeping_rounds(daemon) < 3:
                await trio.sleep(0.2)
        assert (await daemon.get("/healthz")).status_code == 200  # still on the old address

        # A broken file: logged with file and key; the running configuration stays.
        config.write_text(config.read_text().replace('listen = "127.0.0.1:', 'listen = "nohost'))
        daemon.signal(signal.SIGHUP)
        log = await wait_for_log(daemon, r"event=reload_failed ")
        assert re.search(r"event=reload_failed cause=\".*config\.toml: \[http\]\.listen: expected", log), log
        assert await admin_menu_shown(fake)

        assert daemon.process.returncode is None
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait() == 0, daemon.log()[-3000:]
        assert "Traceback" not in daemon.log()
        nursery.cancel_scope.cancel()


def _hold_migration_lock(dsn: str) -> psycopg.Connection[Any]:
    conn = psycopg.connect(dsn, autocommit=True, application_name="migration-held-by-test")
    conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
    return conn


async def _daemon_session_waits(dsn: str, holder: psycopg.Connection[Any]) -> None:
    """Until a daemon session other than the instance lock's is connected (the migration's)."""

    def count() -> int:
        row = holder.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid() "
            "AND application_name <> 'vpnd-instance-lock' AND backend_type = 'client backend'"
        ).fetchone()
        return int(row[0]) if row else 0

    with trio.fail_after(20):
        while await trio.to_thread.run_sync(count) == 0:
            await trio.sleep(0.1)


@pytest.fixture
def startup_config(write_config: Callable[..., Path], db_dsn: str) -> Callable[..., Path]:
    def make(**database: object) -> Path:
        return write_config(
            telegram={"token": "1:T", "api_base_url": f"http://127.0.0.1:{free_port()}"},
            database={"dsn": db_dsn, "pool_min": 1, "pool_max": 2, **database},
            http={"listen": f"127.0.0.1:{free_port()}"},
        )

    return make


async def test_sigterm_while_waiting_for_the_migration_lock_exits_promptly(
    startup_config: Callable[..., Path], db_dsn: str, tmp_path: Path
) -> None:
    holder = await trio.to_thread.run_sync(_hold_migration_lock, db_dsn)
    try:
        async with trio.open_nursery() as nursery:
            daemon = await start_daemon(nursery, startup_config(), tmp_path)
            await _daemon_session_waits(db_dsn, holder)
            daemon.signal(signal.SIGTERM)
            assert await daemon.wait(timeout=10) == 0, daemon.log()[-3000:]
            await daemon.notify.wait_for("STOPPING=1", timeout=1)
            assert "Traceback" not in daemon.log()
            assert "READY=1" not in daemon.notify.lines()
            nursery.cancel_scope.cancel()
    finally:
        holder.close()


async def test_migration_lock_wait_times_out_naming_the_holder(
    startup_config: Callable[..., Path], db_dsn: str, tmp_path: Path
) -> None:
    holder = await trio.to_thread.run_sync(_hold_migration_lock, db_dsn)
    try:
        async with trio.open_nursery() as nursery:
            daemon = await start_daemon(nursery, startup_config(migration_lock_timeout_seconds=2.0), tmp_path)
            assert await daemon.wait(timeout=30) == 1, daemon.log()[-3000:]
            log = daemon.log()
            assert "migration lock" in log and "migration-held-by-test" in log, log[-3000:]
            assert "Traceback" not in log
            nursery.cancel_scope.cancel()
    finally:
        holder.close()
