"""Incident states: one `health_checks` row per check (the alert rules are `vpnd.workers.health`'s)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import psycopg


def incident_is_open(conn: psycopg.Connection[Any], name: str) -> bool:
    """Whether `name` is recorded as failing (a primary-key read)."""
    row = conn.execute("SELECT NOT ok FROM health_checks WHERE name = %s", (name,)).fetchone()
    return bool(row and row[0])


def record_first(conn: psycopg.Connection[Any], name: str, ok: bool, detail: str) -> dt.datetime | None:
    """Insert the first observation of `name`; its time, or None when the check has a row already."""
    row = conn.execute(
        "INSERT INTO health_checks (name, ok, detail) VALUES (%s, %s, %s) ON CONFLICT (name) DO NOTHING "
        "RETURNING since",
        (name, ok, detail),
    ).fetchone()
    return None if row is None else row[0]


def lock_state(conn: psycopg.Connection[Any], name: str) -> tuple[bool, dt.datetime, dt.datetime | None, dt.datetime]:
    """The recorded state of `name`, locked until commit: (ok, since, last_alert_at, now)."""
    row = conn.execute(
        "SELECT ok, since, last_alert_at, now() FROM health_checks WHERE name = %s FOR UPDATE", (name,)
    ).fetchone()
    assert row is not None
    return row[0], row[1], row[2], row[3]


def update_state(
    conn: psycopg.Connection[Any], name: str, ok: bool, detail: str, since: dt.datetime, *, alerted: bool
) -> None:
    conn.execute(
        "UPDATE health_checks SET ok = %s, detail = %s, since = %s, "
        "last_alert_at = CASE WHEN %s THEN now() ELSE last_alert_at END WHERE name = %s",
        (ok, detail, since, alerted, name),
    )
