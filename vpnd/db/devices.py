"""Devices seen through the subscription URL: one row per (user, device id the client app sent).

A known device is served and its `last_seen` moved (at most once a minute: a client polling in a loop
writes nothing more). A new device takes a slot under the subscription's row lock, so two new devices
racing for the last slot are serialised: the second counts the first and is refused. The number of
rows per user is bounded even without a limit (`MAX_RECORDED`).
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

import attrs
import psycopg
from psycopg.rows import class_row

from vpnd.devices import DeviceInfo

#: At most this many devices are recorded per user, whatever the plan allows (an unlimited plan's
#: further devices are served without a row).
MAX_RECORDED = 100
#: `last_seen` is moved at most this often per device.
TOUCH_SECONDS = 60


@attrs.frozen
class Device:
    user_id: int
    hwid: str
    os: str
    os_version: str
    model: str
    user_agent: str
    first_seen: dt.datetime
    last_seen: dt.datetime


COLUMNS = "user_id, hwid, os, os_version, model, user_agent, first_seen, last_seen"

#: "known": served; "added": recorded now; "unrecorded": an unlimited plan past `MAX_RECORDED` (served);
#: "limit": a new device over the limit (not served).
Outcome = Literal["known", "added", "unrecorded", "limit"]


@attrs.frozen
class Admission:
    outcome: Outcome
    #: Devices recorded for the user after this request.
    used: int
    #: The user's device limit (0: unlimited).
    limit: int

    @property
    def served(self) -> bool:
        return self.outcome != "limit"


TOUCH = f"""
UPDATE devices SET last_seen = now(), os = %(os)s, os_version = %(os_version)s, model = %(model)s,
    user_agent = %(user_agent)s
WHERE user_id = %(user_id)s AND hwid = %(hwid)s AND last_seen < now() - interval '{TOUCH_SECONDS} seconds'
"""

INSERT = """
INSERT INTO devices (user_id, hwid, os, os_version, model, user_agent)
VALUES (%(user_id)s, %(hwid)s, %(os)s, %(os_version)s, %(model)s, %(user_agent)s)
ON CONFLICT (user_id, hwid) DO NOTHING
"""


def _params(user_id: int, info: DeviceInfo) -> dict[str, Any]:
    return {"user_id": user_id, **attrs.asdict(info)}


def _known(conn: psycopg.Connection[Any], user_id: int, hwid: str) -> bool:
    row = conn.execute("SELECT 1 FROM devices WHERE user_id = %s AND hwid = %s", (user_id, hwid)).fetchone()
    return row is not None


def count_devices(conn: psycopg.Connection[Any], user_id: int) -> int:
    row = conn.execute("SELECT count(*) FROM devices WHERE user_id = %s", (user_id,)).fetchone()
    assert row is not None
    return int(row[0])


def extra_devices(conn: psycopg.Connection[Any], user_id: int) -> int:
    """Device slots an admin granted on top of the plan's (0 without a subscription)."""
    row = conn.execute("SELECT extra_devices FROM subscriptions WHERE user_id = %s", (user_id,)).fetchone()
    return int(row[0]) if row is not None else 0


def admit_device(conn: psycopg.Connection[Any], user_id: int, info: DeviceInfo, plan_devices: int) -> Admission:
    """Let the device `info` fetch the user's links, or not. `plan_devices` is the plan's limit (0:
    unlimited); the admin-granted `subscriptions.extra_devices` are added to it here.

    A known device costs one read (and a write once a minute). A new one locks the subscription's row
    first (the lock order's first lock in this transaction), then counts: concurrent new devices of
    one user queue on that lock, and each sees the rows the previous one committed.
    """
    params = _params(user_id, info)
    if _known(conn, user_id, info.hwid):
        conn.execute(TOUCH, params)
        return Admission("known", count_devices(conn, user_id), _limit(conn, user_id, plan_devices))
    row = conn.execute("SELECT extra_devices FROM subscriptions WHERE user_id = %s FOR UPDATE", (user_id,)).fetchone()
    extra = int(row[0]) if row is not None else 0
    limit = plan_devices + extra if plan_devices > 0 else 0
    if _known(conn, user_id, info.hwid):  # recorded by a request that held the lock before us
        conn.execute(TOUCH, params)
        return Admission("known", count_devices(conn, user_id), limit)
    used = count_devices(conn, user_id)
    if limit and used >= limit:
        return Admission("limit", used, limit)
    if used >= MAX_RECORDED:
        return Admission("unrecorded", used, limit)
    conn.execute(INSERT, params)
    return Admission("added", used + 1, limit)


def _limit(conn: psycopg.Connection[Any], user_id: int, plan_devices: int) -> int:
    return plan_devices + extra_devices(conn, user_id) if plan_devices > 0 else 0


def list_devices(conn: psycopg.Connection[Any], user_id: int, limit: int = MAX_RECORDED) -> list[Device]:
    """The user's devices, the most recently seen first (at most `limit`)."""
    with conn.cursor(row_factory=class_row(Device)) as cur:
        return cur.execute(
            f"SELECT {COLUMNS} FROM devices WHERE user_id = %s ORDER BY last_seen DESC, hwid LIMIT %s",
            (user_id, limit),
        ).fetchall()


def remove_device(conn: psycopg.Connection[Any], user_id: int, hwid: str) -> bool:
    """Forget one of the user's devices (its slot is free); False when the user has no such device."""
    row = conn.execute(
        "DELETE FROM devices WHERE user_id = %s AND hwid = %s RETURNING hwid", (user_id, hwid)
    ).fetchone()
    return row is not None


def reset_devices(conn: psycopg.Connection[Any], user_id: int) -> int:
    """Forget every device of the user; how many were forgotten."""
    return conn.execute("DELETE FROM devices WHERE user_id = %s", (user_id,)).rowcount


def add_extra_devices(conn: psycopg.Connection[Any], user_id: int, count: int) -> int | None:
    """Grant `count` more device slots (negative: take back, never below 0); the new number of extra
    slots, or None when the user has no subscription."""
    row = conn.execute(
        "UPDATE subscriptions SET extra_devices = greatest(0, extra_devices + %s), updated_at = now() "
        "WHERE user_id = %s RETURNING extra_devices",
        (count, user_id),
    ).fetchone()
    return None if row is None else int(row[0])
