"""Backups of the database: `vpnd backup`, `vpnd restore`, the scheduled job and the health check's facts.

A backup is `pg_dump --format=custom` of `[database].dsn` into `[backup].directory`, named
`vpnd-<UTC time>.dump`. It is written under a `.partial` name, flushed to disk and only then renamed,
so a crash, a kill or a full disk never leaves a file that looks like a backup; a failed dump removes
its partial file and keeps every older backup (rotation to `[backup].keep` runs after a success only).
The password reaches pg_dump and pg_restore through their environment (`PGPASSWORD`), never their
command line, which any local user can read in `ps`.

A restore (`pg_restore --clean --if-exists --single-transaction`) replaces the database's contents
with the backup's, all or nothing; it refuses while a vpnd holds the database (the instance lock), and
reports the restored schema version so the operator knows whether `vpnd migrate` is due.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import psycopg
import trio
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from vpnd.config import BackupConfig
from vpnd.db import locks
from vpnd.db.migrations import current_version
from vpnd.instance_lock import INSTANCE_LOCK_KEY

#: A complete backup's file name; the time is when it started, in UTC.
_NAME = re.compile(r"vpnd-(\d{8}T\d{6}Z)\.dump")
_TIME_FORMAT = "%Y%m%dT%H%M%SZ"
PARTIAL_SUFFIX = ".partial"
#: The first bytes of a pg_dump custom-format archive.
ARCHIVE_MAGIC = b"PGDMP"
#: Free space wanted before a dump, as a multiple of the newest backup's size.
FREE_SPACE_FACTOR = 1.5
#: Lines of the client program's error output kept in a failure's message.
ERROR_LINES = 5


class BackupError(Exception):
    """A backup or restore that did not happen, with a message fit to show an operator as is."""


@attrs.frozen
class BackupFile:
    path: Path
    taken_at: dt.datetime
    size: int


@attrs.frozen
class BackupResult:
    file: BackupFile
    seconds: float
    #: Older backups deleted by the rotation.
    deleted: tuple[Path, ...]


@attrs.frozen
class RestoreResult:
    file: Path
    seconds: float
    #: The schema version the database is at after the restore (None: no vpnd schema in it).
    schema_version: int | None


def backup_name(taken_at: dt.datetime) -> str:
    return f"vpnd-{taken_at.astimezone(dt.UTC).strftime(_TIME_FORMAT)}.dump"


def list_backups(directory: str | Path) -> list[BackupFile]:
    """The complete backups in `directory`, newest first (a missing folder has none)."""
    found = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return []
    for entry in entries:
        match = _NAME.fullmatch(entry.name)
        if match is None or not entry.is_file():
            continue
        taken_at = dt.datetime.strptime(match.group(1), _TIME_FORMAT).replace(tzinfo=dt.UTC)
        found.append(BackupFile(Path(entry.path), taken_at, entry.stat().st_size))
    return sorted(found, key=lambda b: b.taken_at, reverse=True)


def newest_age_seconds(directory: str | Path, now: dt.datetime) -> tuple[float | None, BackupFile | None]:
    """How old the newest backup is (None, None: there is none)."""
    backups = list_backups(directory)
    if not backups:
        return None, None
    return max(0.0, (now - backups[0].taken_at).total_seconds()), backups[0]


def client_invocation(dsn: str) -> tuple[str, dict[str, str]]:
    """`--dbname` for a libpq client program and the environment that carries the password."""
    params: dict[str, Any] = conninfo_to_dict(dsn)
    password = params.pop("password", None)
    env = {"PGPASSWORD": str(password)} if password else {}
    return make_conninfo(**params), env


def _environment(extra: Mapping[str, str]) -> dict[str, str]:
    # The caller's environment minus libpq's own variables (a stray PGDATABASE must not change what
    # is dumped), plus the password.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(extra)
    return env


def _program(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise BackupError(
            f"{name!r} not found (the PostgreSQL client programs; Debian: apt install postgresql-client, "
            "or set [backup].pg_dump / pg_restore to their path)"
        )
    return found


def _error_tail(stderr: bytes) -> str:
    lines = [line for line in stderr.decode("utf-8", "replace").splitlines() if line.strip()]
    return " | ".join(lines[-ERROR_LINES:]) or "no error output"


def _check_free_space(directory: Path, previous: BackupFile | None) -> None:
    if previous is None:
        return
    free = shutil.disk_usage(directory).free
    wanted = int(previous.size * FREE_SPACE_FACTOR)
    if free < wanted:
        raise BackupError(
            f"not enough free space in {directory}: {free / 2**20:.1f} MiB free, the last backup took "
            f"{previous.size / 2**20:.1f} MiB; free some space (older backups stay untouched)"
        )


def _sync_and_publish(partial: Path, final: Path) -> None:
    with open(partial, "rb") as handle:
        head = handle.read(len(ARCHIVE_MAGIC))
        os.fsync(handle.fileno())
    if head != ARCHIVE_MAGIC:
        raise BackupError(f"{partial.name}: pg_dump wrote no custom-format archive")
    os.replace(partial, final)
    directory = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _rotate(directory: Path, keep: int) -> tuple[Path, ...]:
    deleted = []
    for old in list_backups(directory)[keep:]:
        old.path.unlink(missing_ok=True)
        deleted.append(old.path)
    return tuple(deleted)


async def create_backup(dsn: str, settings: BackupConfig, *, now: dt.datetime | None = None) -> BackupResult:
    """Dump the database into a new backup file, then rotate. Raises BackupError (nothing half-written
    is left behind, older backups are untouched). Cancellation kills pg_dump and removes its partial file."""
    now = now or dt.datetime.now(dt.UTC)
    directory = Path(settings.directory)
    try:
        await trio.to_thread.run_sync(lambda: directory.mkdir(mode=0o750, parents=True, exist_ok=True))
    except OSError as exc:
        raise BackupError(f"cannot create the backup folder {directory}: {exc.strerror or exc}") from None
    previous = list_backups(directory)
    await trio.to_thread.run_sync(_check_free_space, directory, previous[0] if previous else None)
    final = directory / backup_name(now)
    partial = final.with_name(final.name + PARTIAL_SUFFIX)
    dbname, env = client_invocation(dsn)
    command = [
        _program(settings.pg_dump),
        "--format=custom",
        "--no-password",
        f"--file={partial}",
        f"--dbname={dbname}",
    ]
    started = trio.current_time()
    try:
        with trio.fail_after(settings.timeout_minutes * 60):
            done = await trio.run_process(
                command, env=_environment(env), check=False, capture_stdout=True, capture_stderr=True
            )
        if done.returncode != 0:
            raise BackupError(f"pg_dump failed (exit {done.returncode}): {_error_tail(done.stderr)}")
        await trio.to_thread.run_sync(_sync_and_publish, partial, final)
    except trio.TooSlowError:
        raise BackupError(f"pg_dump took longer than [backup].timeout_minutes = {settings.timeout_minutes:g}") from None
    except OSError as exc:
        raise BackupError(f"cannot write {final}: {exc.strerror or exc}") from None
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(lambda: partial.unlink(missing_ok=True))
    seconds = trio.current_time() - started
    deleted = await trio.to_thread.run_sync(_rotate, directory, settings.keep)
    return BackupResult(BackupFile(final, now, final.stat().st_size), seconds, deleted)


def daemon_holding(dsn: str) -> str | None:
    """Who holds the instance lock of the database (a running vpnd), described; None: nobody."""
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10, application_name="vpnd-restore") as conn:
        holder = locks.advisory_lock_holder(conn, INSTANCE_LOCK_KEY)
    if holder is None:
        return None
    pid, application, address = holder
    return f"{application or 'a session'} (server pid {pid}{', from ' + address if address else ''})"


def schema_version_of(dsn: str) -> int | None:
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10, application_name="vpnd-restore") as conn:
        return current_version(conn)


def check_archive(path: Path) -> None:
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(ARCHIVE_MAGIC))
    except OSError as exc:
        raise BackupError(f"cannot read {path}: {exc.strerror or exc}") from None
    if head != ARCHIVE_MAGIC:
        raise BackupError(f"{path} is not a pg_dump custom-format archive (a `vpnd backup` file)")


async def restore_backup(dsn: str, settings: BackupConfig, path: Path) -> RestoreResult:
    """Replace the database's contents with the backup at `path`, in one transaction. Raises BackupError."""
    await trio.to_thread.run_sync(check_archive, path)
    holder = await trio.to_thread.run_sync(daemon_holding, dsn)
    if holder is not None:
        raise BackupError(f"vpnd is running on this database ({holder}): stop it first (systemctl stop vpnd)")
    dbname, env = client_invocation(dsn)
    command = [
        _program(settings.pg_restore),
        "--clean",
        "--if-exists",
        "--single-transaction",
        "--exit-on-error",
        "--no-owner",
        "--no-privileges",
        "--no-password",
        f"--dbname={dbname}",
        str(path),
    ]
    started = trio.current_time()
    try:
        with trio.fail_after(settings.timeout_minutes * 60):
            done = await trio.run_process(
                command, env=_environment(env), check=False, capture_stdout=True, capture_stderr=True
            )
    except trio.TooSlowError:
        raise BackupError(
            f"pg_restore took longer than [backup].timeout_minutes = {settings.timeout_minutes:g}; "
            "nothing was changed (one transaction)"
        ) from None
    if done.returncode != 0:
        raise BackupError(
            f"pg_restore failed (exit {done.returncode}), nothing was changed: {_error_tail(done.stderr)}"
        )
    version = await trio.to_thread.run_sync(schema_version_of, dsn)
    return RestoreResult(path, trio.current_time() - started, version)


def describe_size(size: int) -> str:
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 2**10:.1f} KiB"
