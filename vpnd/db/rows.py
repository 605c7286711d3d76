"""Small helpers shared by the per-domain query modules."""

from __future__ import annotations

from typing import Any

import psycopg


def one(cursor: psycopg.Cursor[Any]) -> Any:
    """The single row a statement must return (an INSERT ... RETURNING, an aggregate)."""
    row = cursor.fetchone()
    if row is None:
        raise LookupError("the statement returned no row")
    return row


def round_trip(conn: psycopg.Connection[Any]) -> None:
    """One trivial statement: the database answers (the health check's probe)."""
    conn.execute("SELECT 1").fetchone()
