"""Maintenance mode: one durable row (`daemon_state['maintenance']`), so it survives a restart and
every vpnd process (the daemon, a standby, the CLI) reads the same thing. Each turn reads it in the
transaction it opens anyway (one primary-key lookup): no cache to go stale between processes."""

from __future__ import annotations

import datetime as dt
from typing import Any

import attrs
import psycopg

KEY = "maintenance"


@attrs.frozen
class Maintenance:
    on: bool
    #: The admin's text for users (empty: the default text of their language).
    message: str = ""
    #: When it was last switched, and by whom (admin id; 0 for the command line).
    since: dt.datetime | None = None
    by: int | None = None


OFF = Maintenance(False)


def read(conn: psycopg.Connection[Any]) -> Maintenance:
    row = conn.execute(
        "SELECT (value ->> 'on')::boolean, value ->> 'message', (value ->> 'since')::timestamptz, "
        "(value ->> 'by')::bigint FROM daemon_state WHERE key = %s",
        (KEY,),
    ).fetchone()
    if row is None:
        return OFF
    return Maintenance(bool(row[0]), row[1] or "", row[2], row[3])


def write(conn: psycopg.Connection[Any], on: bool, message: str, by: int) -> Maintenance:
    conn.execute(
        "INSERT INTO daemon_state (key, value) "
        "VALUES (%s, jsonb_build_object('on', %s::boolean, 'message', %s::text, 'since', now(), 'by', %s::bigint)) "
        "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
        (KEY, on, message, by),
    )
    return read(conn)
