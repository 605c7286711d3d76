"""Schema versions: a fresh database gets `schema.sql`; an existing one gets pending migrations.

Both run under a PostgreSQL advisory lock, so two `vpnd migrate` (or two starting daemons) at once
are safe: the second waits, then finds nothing to do. A database whose recorded version is newer
than this code knows is refused with a message, never "upgraded" downwards.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from importlib import resources
from typing import Any

import attrs
import psycopg

log = logging.getLogger("vpnd.db")

#: pg_advisory_lock key for schema changes ("vpnd" + "migr" as a number; any fixed value works).
MIGRATION_LOCK_KEY = 0x76706E64_6D696772
BASELINE_VERSION = 1


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


def migrate(conn: psycopg.Connection[Any], schema: Schema) -> list[int]:
    """Bring the database to `schema.version`; return the versions applied.

    `conn` must be in autocommit mode: the advisory lock is held for the session, and each step
    runs in its own transaction so a failure leaves the database at the last good version.
    """
    conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
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
