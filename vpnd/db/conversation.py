"""Conversation states ("waiting for a promo code"): durable, with an expiry, evicted when stale.

A state survives a restart (it is a row, not memory) and dies on its own: `get_state` ignores an
expired row and the housekeeping worker deletes them in batches.
"""

from __future__ import annotations

from typing import Any

import attrs
import psycopg
from psycopg.types.json import Jsonb


@attrs.frozen
class State:
    name: str
    data: dict[str, Any]


def set_state(
    conn: psycopg.Connection[Any], user_id: int, name: str, ttl_seconds: int, data: dict[str, Any] | None = None
) -> None:
    conn.execute(
        "INSERT INTO conversation_states (user_id, state, data, expires_at) "
        "VALUES (%s, %s, %s, now() + %s * interval '1 second') "
        "ON CONFLICT (user_id) DO UPDATE SET state = EXCLUDED.state, data = EXCLUDED.data, "
        "expires_at = EXCLUDED.expires_at",
        (user_id, name, Jsonb(data or {}), ttl_seconds),
    )


def get_state(conn: psycopg.Connection[Any], user_id: int) -> State | None:
    row = conn.execute(
        "SELECT state, data FROM conversation_states WHERE user_id = %s AND expires_at > now()", (user_id,)
    ).fetchone()
    return State(row[0], row[1]) if row else None


def clear_state(conn: psycopg.Connection[Any], user_id: int) -> None:
    conn.execute("DELETE FROM conversation_states WHERE user_id = %s", (user_id,))


def evict_expired(conn: psycopg.Connection[Any], limit: int) -> int:
    cur = conn.execute(
        "DELETE FROM conversation_states WHERE user_id IN "
        "(SELECT user_id FROM conversation_states WHERE expires_at <= now() LIMIT %s)",
        (limit,),
    )
    return cur.rowcount
