"""Commit-time wake-ups: the channels the schema's triggers notify, and the session that listens.

Triggers (`schema.sql`, migration 0005) call `pg_notify(channel, '')` from every statement that
changes what an owner task derives from the database: subscriptions (the Xray writer), new outbox
rows (the outbox sender), broadcasts created or steered (the broadcasts nursery). PostgreSQL sends a
notification only when its transaction commits and folds identical ones of one transaction into
one, so a bulk change wakes its owner once, and a change made by another process (`vpnd admin
revoke`, psql) wakes the daemon just the same. No call site has to remember to wake anyone.

LISTEN belongs to a session, so the listening connection is opened here, outside the pool, and used
for nothing else. It runs no transaction of ours: it only waits.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

#: The Xray writer: who may connect changed (a subscription inserted, revoked, renewed, reissued...).
XRAY = "vpnd_xray"
#: The outbox sender: messages were queued.
OUTBOX = "vpnd_outbox"
#: The broadcasts nursery: a broadcast was created, paused, resumed or cancelled.
BROADCASTS = "vpnd_broadcasts"
CHANNELS = (XRAY, OUTBOX, BROADCASTS)

#: TCP keepalives, so a peer that vanished without closing (a network cut) is noticed within about a
#: minute instead of never: the listener only waits, it sends nothing that would fail. (libpq
#: ignores them on a unix socket, where the kernel reports a closed server at once.)
KEEPALIVES: dict[str, Any] = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3}


def open_listener(dsn: str, *, timeout: float) -> psycopg.Connection[Any]:
    """Connect (autocommit) and LISTEN on every channel; blocking, bounded by `timeout`."""
    conn = psycopg.connect(
        dsn, autocommit=True, connect_timeout=max(1, int(timeout)), application_name="vpnd-listen", **KEEPALIVES
    )
    try:
        for channel in CHANNELS:
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
    except BaseException:
        conn.close()
        raise
    return conn


def received(conn: psycopg.Connection[Any]) -> set[str]:
    """The channels notified since the last call, without waiting (call it when the socket is readable).

    Raises `psycopg.OperationalError` when the session is gone (PostgreSQL restarted, network cut).
    """
    channels = {notify.channel for notify in conn.notifies(timeout=0)}
    if conn.closed or conn.broken:
        raise psycopg.OperationalError("the listening session ended")
    return channels
