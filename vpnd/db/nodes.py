"""What each Xray node's writer last saw, for operators (`vpnd admin nodes`, the admin bot's "Nodes").

The writers run in the daemon; the CLI is another process, so each writer records its node's state
here (at most every few seconds, and at once when the node goes down or comes back).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import attrs
import psycopg


@attrs.frozen
class NodeObservation:
    name: str
    reachable: bool
    detail: str
    #: Users live on the node (as far as its writer knows).
    users: int
    #: Users whose traffic counters moved at the last reading.
    online: int
    #: Bytes (both directions) since the last observation, added to today's total.
    traffic_bytes: int
    #: The node matched the database at this round.
    in_sync: bool


RECORD_NODE = """
INSERT INTO xray_nodes AS n (name, reachable, detail, users, online, traffic_day, traffic_today, synced_at)
VALUES (%(name)s, %(reachable)s, %(detail)s, %(users)s, %(online)s, current_date, %(bytes)s,
        CASE WHEN %(in_sync)s THEN now() END)
ON CONFLICT (name) DO UPDATE SET
    reachable = EXCLUDED.reachable,
    detail = EXCLUDED.detail,
    users = EXCLUDED.users,
    online = EXCLUDED.online,
    traffic_today = CASE WHEN n.traffic_day = current_date THEN n.traffic_today ELSE 0 END + EXCLUDED.traffic_today,
    traffic_day = current_date,
    synced_at = coalesce(EXCLUDED.synced_at, n.synced_at),
    updated_at = now()
"""


def record_node(conn: psycopg.Connection[Any], seen: NodeObservation) -> None:
    conn.execute(
        RECORD_NODE,
        {
            "name": seen.name,
            "reachable": seen.reachable,
            "detail": seen.detail[:500],
            "users": seen.users,
            "online": seen.online,
            "bytes": max(0, seen.traffic_bytes),
            "in_sync": seen.in_sync,
        },
    )


def forget_node(conn: psycopg.Connection[Any], name: str) -> None:
    """A node left the configuration and has no user left."""
    conn.execute("DELETE FROM xray_nodes WHERE name = %s", (name,))


@attrs.frozen
class NodeRow:
    name: str
    reachable: bool
    detail: str
    users: int
    online: int
    traffic_today: int
    synced_at: dt.datetime | None
    updated_at: dt.datetime
    db_now: dt.datetime

    @property
    def seconds_since_update(self) -> float:
        return max(0.0, (self.db_now - self.updated_at).total_seconds())


def list_nodes(conn: psycopg.Connection[Any]) -> list[NodeRow]:
    """Every recorded node, by name (today's traffic is 0 once the day it counted has passed)."""
    rows = conn.execute(
        "SELECT name, reachable, detail, users, online,"
        " CASE WHEN traffic_day = current_date THEN traffic_today ELSE 0 END, synced_at, updated_at, now()"
        " FROM xray_nodes ORDER BY name LIMIT 1000"  # nodes are configured by hand: a few, never thousands
    ).fetchall()
    return [NodeRow(*row) for row in rows]
