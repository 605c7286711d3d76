"""Backups: `vpnd backup` → drop the database → `vpnd restore` gives the same rows; the refusals that
keep an operator from hurting themselves; a failed dump leaves nothing behind; the scheduled job and
the "backup" health check (through the fake Bot API)."""

from __future__ import annotations

import datetime as dt
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
import trio

from tests.harness import bot_config, config_sections, sql, vpnd_cli, write_config_file
from tests.workers.conftest import poll_until, running, seed_users, start_users
from vpnd.compose import Vpnd
from vpnd.config import BackupConfig
from vpnd.instance_lock import INSTANCE_LOCK_KEY
from vpnd.services import backup
from vpnd_sandbox.postgres import find_bindir
from vpnd_sandbox.telegram_fake import FakeTelegram

ADMIN = 1  # bot_config's [telegram].admin_ids


def client(name: str) -> str:
    """The PostgreSQL client program matching the test server (Debian's wrapper otherwise)."""
    try:
        candidate = find_bindir() / name
        if candidate.is_file():
            return str(candidate)
    except RuntimeError:
        pass
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"no {name} here (Debian package postgresql-client)")
    return found


def backup_section(directory: Path, **more: object) -> dict[str, object]:
    return {"directory": str(directory), "pg_dump": client("pg_dump"), "pg_restore": client("pg_restore"), **more}


def snapshot(dsn: str) -> dict[str, list[tuple[object, ...]]]:
    return {
        "users": sql(dsn, "SELECT id, first_name, language, referral_code, balance_minor FROM users ORDER BY id"),
        "subscriptions": sql(dsn, "SELECT user_id, uuid, sub_token, expires_at FROM subscriptions ORDER BY user_id"),
        "schema_migrations": sql(dsn, "SELECT version FROM schema_migrations ORDER BY version"),
    }


def seed(dsn: str) -> None:
    seed_users(dsn, [11, 12, 13], balance_minor=250)
    sql(
        dsn,
        "INSERT INTO subscriptions (user_id, kind, status, uuid, sub_token, plan_code, expires_at) "
        "SELECT id, 'paid', 'active', gen_random_uuid(), 'token' || id || 'abcdefghijklmnop', 'm1', "
        "now() + interval '30 days' FROM users WHERE id IN (11, 12)",
    )


def write(tmp_path: Path, dsn: str, **sections: dict[str, object]) -> Path:
    return write_config_file(tmp_path / "config.toml", config_sections(dsn, **sections))


def test_backup_drop_restore_gives_the_same_rows(tmp_path: Path, db_dsn: str) -> None:
    seed(db_dsn)
    before = snapshot(db_dsn)
    assert len(before["users"]) == 3 and len(before["subscriptions"]) == 2
    run = vpnd_cli(write(tmp_path, db_dsn, backup=backup_section(tmp_path / "backups")))

    made = run("backup")
    assert made.returncode == 0, made.stderr
    (path_text, *_) = made.stdout.split()
    dump = Path(path_text)
    assert dump.parent == tmp_path / "backups" and dump.read_bytes().startswith(b"PGDMP")
    assert oct(os.stat(dump.parent).st_mode & 0o777) == "0o750"
    listed = run("backup", "--list")
    assert listed.returncode == 0 and str(dump) in listed.stdout

    sql(db_dsn, "DROP SCHEMA public CASCADE")
    sql(db_dsn, "CREATE SCHEMA public")
    assert not sql(db_dsn, "SELECT 1 FROM pg_tables WHERE schemaname = 'public'")

    restored = run("restore", str(dump), "--yes")
    assert restored.returncode == 0, restored.stderr
    assert "schema version" in restored.stdout
    assert snapshot(db_dsn) == before
    # The restored database works as before: a new row obeys the restored constraints and triggers.
    with pytest.raises(psycopg.errors.CheckViolation):
        sql(db_dsn, "UPDATE users SET balance_minor = -1 WHERE id = 11")


def test_restore_refuses_without_yes_garbage_and_a_running_daemon(tmp_path: Path, db_dsn: str) -> None:
    seed(db_dsn)
    before = snapshot(db_dsn)
    run = vpnd_cli(write(tmp_path, db_dsn, backup=backup_section(tmp_path / "backups")))
    made = run("backup")
    assert made.returncode == 0, made.stderr
    dump = made.stdout.split()[0]

    unconfirmed = run("restore", dump)
    assert unconfirmed.returncode == 2 and "--yes" in unconfirmed.stderr

    garbage = tmp_path / "not-a-backup.dump"
    garbage.write_text("DROP TABLE users;")
    refused = run("restore", str(garbage), "--yes")
    assert refused.returncode == 1 and "not a pg_dump custom-format archive" in refused.stderr

    missing = run("restore", str(tmp_path / "nope.dump"), "--yes")
    assert missing.returncode == 1 and "cannot read" in missing.stderr

    with psycopg.connect(db_dsn, autocommit=True, application_name="vpnd") as daemon:  # what a running vpnd holds
        daemon.execute("SELECT pg_advisory_lock(%s)", (INSTANCE_LOCK_KEY,))
        busy = run("restore", dump, "--yes")
    assert busy.returncode == 1 and "vpnd is running on this database" in busy.stderr
    assert "stop it first" in busy.stderr
    assert snapshot(db_dsn) == before


def test_failed_dump_leaves_no_partial_file_and_keeps_older_backups(tmp_path: Path, db_dsn: str) -> None:
    directory = tmp_path / "backups"
    good = vpnd_cli(write(tmp_path, db_dsn, backup=backup_section(directory)))
    assert good("backup").returncode == 0
    first = sorted(directory.iterdir())
    assert len(first) == 1

    broken_dsn = db_dsn.rsplit("/", 1)[0] + "/no_such_database"
    (tmp_path / "broken").mkdir()
    broken = vpnd_cli(write(tmp_path / "broken", broken_dsn, backup=backup_section(directory)))
    failed = broken("backup")
    assert failed.returncode == 1
    assert "pg_dump failed" in failed.stderr and "no_such_database" in failed.stderr
    assert sorted(directory.iterdir()) == first  # no .partial, the older backup kept


def test_unreadable_folder_is_a_clear_error(tmp_path: Path, db_dsn: str) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    run = vpnd_cli(write(tmp_path, db_dsn, backup=backup_section(blocker / "backups")))
    failed = run("backup")
    assert failed.returncode == 1 and "cannot create the backup folder" in failed.stderr


async def test_rotation_keeps_the_newest_and_only_after_a_success(tmp_path: Path, db_dsn: str) -> None:
    settings = BackupConfig(directory=str(tmp_path), keep=2, pg_dump=client("pg_dump"))
    start = dt.datetime(2026, 12, 1, 3, 0, tzinfo=dt.UTC)
    for day in range(4):
        result = await backup.create_backup(db_dsn, settings, now=start + dt.timedelta(days=day))
        assert result.file.path.exists()
    names = [b.path.name for b in backup.list_backups(tmp_path)]
    assert names == ["vpnd-20261204T030000Z.dump", "vpnd-20261203T030000Z.dump"]
    assert result.deleted == (tmp_path / "vpnd-20261202T030000Z.dump",)

    broken = db_dsn.rsplit("/", 1)[0] + "/no_such_database"
    with pytest.raises(backup.BackupError):
        await backup.create_backup(broken, settings, now=start + dt.timedelta(days=9))
    assert [b.path.name for b in backup.list_backups(tmp_path)] == names


async def test_cancelled_dump_removes_its_partial_file(tmp_path: Path, db_dsn: str) -> None:
    """SIGTERM during a scheduled backup: pg_dump is killed, nothing that looks like a backup stays."""
    slow = tmp_path / "slow_pg_dump"
    slow.write_text("#!/bin/sh\nfor a; do case $a in --file=*) echo PGDMP > ${a#--file=};; esac; done\nsleep 30\n")
    slow.chmod(0o755)
    settings = BackupConfig(directory=str(tmp_path / "out"), pg_dump=str(slow))
    with trio.move_on_after(1.0):
        await backup.create_backup(db_dsn, settings)
    assert list((tmp_path / "out").iterdir()) == []


def test_password_goes_through_the_environment_not_argv() -> None:
    dbname, env = backup.client_invocation("postgresql://vpnd:s3cr%40t@db.example:5433/shop?sslmode=require")
    assert "s3cr" not in dbname
    assert env == {"PGPASSWORD": "s3cr@t"}
    assert "dbname=shop" in dbname and "port=5433" in dbname and "sslmode=require" in dbname


async def test_scheduled_backup_runs_once_across_restarts(
    tmp_path: Path, db_dsn: str, write_config: Callable[..., Path], fake_telegram: tuple[FakeTelegram, str]
) -> None:
    fake, base_url = fake_telegram
    directory = tmp_path / "backups"
    config = bot_config(write_config, db_dsn, fake, base_url, backup=backup_section(directory, interval_hours=24))

    def rounds(vpnd: Vpnd) -> float:
        return vpnd.app.metrics.registry.get_sample_value("vpnd_worker_rounds_total", {"worker": "backup"}) or 0

    for _ in range(2):  # a restart does not add a backup: the newest is not a day old
        async with running(config, outbox=False, workers=["backup"]) as vpnd:
            metrics = vpnd.app.metrics.registry
            await poll_until(lambda: rounds(vpnd) >= 1, 60)
    backups = backup.list_backups(directory)
    assert len(backups) == 1
    assert metrics.get_sample_value("vpnd_backups_total", {"result": "ok"}) is None  # the second run made none


async def test_health_check_alerts_the_admins_when_no_backup_is_recent(
    tmp_path: Path, db_dsn: str, write_config: Callable[..., Path], fake_telegram: tuple[FakeTelegram, str]
) -> None:
    fake, base_url = fake_telegram
    start_users(fake, [ADMIN])
    directory = tmp_path / "backups"
    config = bot_config(
        write_config,
        db_dsn,
        fake,
        base_url,
        workers={"health_interval": 0.3},
        backup=backup_section(directory, max_age_hours=1),
    )
    async with running(config, workers=["health"]) as vpnd:
        await poll_until(lambda: any("backup" in (m.text or "") for m in fake.bot_messages(ADMIN)), 30)
        alert = next(m.text or "" for m in fake.bot_messages(ADMIN) if "backup" in (m.text or ""))
        assert alert.startswith("🚨 Health check backup is failing: no backup in")
        assert vpnd.app.metrics.registry.get_sample_value("vpnd_backup_age_seconds") == -1

        result = await backup.create_backup(db_dsn, config.backup)
        assert result.file.path.exists()
        await poll_until(lambda: any("recovered" in (m.text or "") for m in fake.bot_messages(ADMIN)), 30)
        age = vpnd.app.metrics.registry.get_sample_value("vpnd_backup_age_seconds")
        assert age is not None and 0 <= age < 60
