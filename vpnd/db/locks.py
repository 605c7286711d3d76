"""Advisory locks: session-level (the single-instance lock; `vpnd.instance_lock` owns the connection) and
transaction-level (one admin action of a kind at a time)."""

from __future__ import annotations

from typing import Any

import psycopg

HOLDER = """
SELECT a.pid, a.application_name, a.client_addr::text FROM pg_locks l
JOIN pg_stat_activity a USING (pid) WHERE l.locktype = 'advisory'
AND ((l.classid::bigint << 32) | l.objid::bigint) = %s LIMIT 1
"""


def try_advisory_lock(conn: psycopg.Connection[Any], key: int) -> bool:
    """Take the session lock `key` if it is free (never waits)."""
    row = conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
    return bool(row and row[0])


def advisory_lock_holder(conn: psycopg.Connection[Any], key: int) -> tuple[int, str | None, str | None] | None:
    """(pid, application_name, client address) of the live session holding `key`, if any."""
    row = conn.execute(HOLDER, (key,)).fetchone()
    return None if row is None else (row[0], row[1], row[2])


def advisory_unlock(conn: psycopg.Connection[Any], key: int) -> None:
    conn.execute("SELECT pg_advisory_unlock(%s)", (key,))


def xact_lock(conn: psycopg.Connection[Any], key: int) -> None:
    """Wait for the transaction-level lock `key` (released at commit or rollback)."""
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (key,))
