"""Schema versions: a fresh database gets `schema.sql`; an existing one gets pending migrations.

Both run under a PostgreSQL advisory lock, so two `vpnd migrate` (or two starting daemons) at once
are safe: the second waits, then finds nothing to do. The wait is bounded (`lock_timeout`): past it,
`SchemaError` names the session holding the lock. It polls `pg_try_advisory_lock` rather than
blocking in `pg_advisory_lock`, so a caller can stop it between attempts (`check_cancelled`: the
daemon passes `trio.from_thread.check_cancelled`, so SIGTERM during start-up is not stuck here).
A database whose recorded version is newer than this code knows is refused with a message, never
"upgraded" downwards.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any

import attrs
import psycopg

log = logging.getLogger("vpnd.db")

#: pg_advisory_lock key for schema changes ("vpnd" + "migr" as a number; any fixed value works).
MIGRATION_LOCK_KEY = 0x76706E64_6D696772
LOCK_NAME = f"pg_advisory_lock({MIGRATION_LOCK_KEY})"
BASELINE_VERSION = 1
#: Seconds between attempts to take the migration lock while another session holds it.
LOCK_POLL_INTERVAL = 0.2


class SchemaError(Exception):
    """The database's schema cannot be used by this version of vpnd."""


@attrs.frozen
class Migration:
    version: int
    name: str
    sql: str


@attrs.frozen
class Schema:
    """The current schema (`schema.sql`) and the migrations that lead to it."""

    baseline_sql: str
    migrations: tuple[Migration, ...] = ()

    @property
    def version(self) -> int:
        return max([BASELINE_VERSION, *(m.version for m in self.migrations)])


def packaged_schema() -> Schema:
    """The schema shipped with this version of vpnd."""
    root = resources.files("vpnd.db")
    baseline = (root / "schema.sql").read_text("utf-8")
    migrations = []
    for entry in (root / "migrations").iterdir():
        match = re.fullmatch(r"(\d{4})_(\w+)\.sql", entry.name)
        if match:
            migrations.append(Migration(int(match[1]), match[2], entry.read_text("utf-8")))
    migrations.sort(key=lambda m: m.version)
    return Schema(baseline, tuple(migrations))


def current_version(conn: psycopg.Connection[Any]) -> int | None:
    """The database's schema version, or None for a database vpnd has never touched."""
    exists = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return None
    row = conn.execute("SELECT max(version) FROM schema_migrations").fetchone()
    return int(row[0]) if row and row[0] is not None else None


def check_version(conn: psycopg.Connection[Any], schema: Schema) -> int | None:
    """Return the database version; raise SchemaError when it is newer than `schema`."""
    version = current_version(conn)
    if version is not None and version > schema.version:
        raise SchemaError(
            f"the database schema is at version {version}, newer than this vpnd knows "
            f"(up to {schema.version}); run the matching or a newer vpnd, or restore a backup"
        )
    return version


def _lock_holder(conn: psycopg.Connection[Any]) -> str:
    row = conn.execute(
        "SELECT a.pid, a.application_name, a.client_addr::text, a.backend_start FROM pg_locks l "
        "JOIN pg_stat_activity a USING (pid) WHERE l.locktype = 'advisory' AND l.granted "
        "AND ((l.classid::bigint << 32) | l.objid::bigint) = %s LIMIT 1",
        (MIGRATION_LOCK_KEY,),
    ).fetchone()
    if row is None:
        return "a session that has just ended"
    pid, application, client, since = row
    return (
        f"backend pid {pid} (application_name {application or 'unknown'!r}, "
        f"client {client or 'local socket'}, connected since {since:%Y-%m-%d %H:%M:%S %Z})"
    )


def take_migration_lock(
    conn: psycopg.Connection[Any],
    *,
    timeout: float | None = None,
    check_cancelled: Callable[[], None] | None = None,
) -> None:
    """Take the migration lock, waiting at most `timeout` seconds (None: no bound)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    announced = False
    while True:
        row = conn.execute("SELECT pg_try_advisory_lock(%s)", (MIGRATION_LOCK_KEY,)).fetchone()
        if row and row[0]:
            return
        if not announced:
            log.warning("event=waiting_for_migration_lock holder=%s", _quote(_lock_holder(conn)))
            announced = True
        if deadline is not None and time.monotonic() >= deadline:
            raise SchemaError(
                f"gave up after {timeout:g}s waiting for the migration lock {LOCK_NAME}: it is held by "
                f"{_lock_holder(conn)}; wait for that migration to finish, or end that session "
                f"([database].migration_lock_timeout_seconds)"
            )
        if check_cancelled is not None:
            check_cancelled()
        time.sleep(LOCK_POLL_INTERVAL)


def _quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def migrate(
    conn: psycopg.Connection[Any],
    schema: Schema,
    *,
    lock_timeout: float | None = None,
    check_cancelled: Callable[[], None] | None = None,
) -> list[int]:
    """Bring the database to `schema.version`; return the versions applied.

    `conn` must be in autocommit mode: the advisory lock is held for the session, and each step
    runs in its own transaction so a failure leaves the database at the last good version.
    """
    take_migration_lock(conn, timeout=lock_timeout, check_cancelled=check_cancelled)
    try:
        version = check_version(conn, schema)
        applied: list[int] = []
        if version is None:
            with conn.transaction():
                conn.execute(schema.baseline_sql.encode())
                conn.execute(
                    "INSERT INTO schema_migrations (version, name) SELECT v, 'schema.sql' "
                    "FROM generate_series(1, %s) AS v",
                    (schema.version,),
                )
            log.info("event=schema_created version=%d", schema.version)
            return list(range(1, schema.version + 1))
        for migration in schema.migrations:
            if migration.version <= version:
                continue
            with conn.transaction():
                conn.execute(migration.sql.encode())
                conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                    (migration.version, migration.name),
                )
            log.info("event=migration_applied version=%d name=%s", migration.version, migration.name)
            applied.append(migration.version)
        return applied
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))


def pending(conn: psycopg.Connection[Any], schema: Schema) -> Sequence[int]:
    """Versions not yet applied (all of them for an empty database)."""
    version = check_version(conn, schema)
    if version is None:
        return list(range(1, schema.version + 1))
    return [m.version for m in schema.migrations if m.version > version]
