"""The Telegram update inbox: every update is recorded before the getUpdates offset moves past it.

`record_updates` inserts a batch and the next offset in one transaction, returning only the update
ids that were new (a re-delivered update is not dispatched twice). A handler's outcome is recorded
with `mark_handled`; rows still unhandled at start-up are dispatched again (`unhandled`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

OFFSET_KEY = "telegram_offset"


def record_updates(
    conn: psycopg.Connection[Any],
    updates: Sequence[tuple[int, int | None, dict[str, Any]]],
    next_offset: int,
    dropped: Sequence[tuple[int, str]] = (),
) -> list[int]:
    """Insert `(update_id, chat_id, payload)` rows and store `next_offset`; return the batch's update
    ids that are not handled yet. `dropped` are `(update_id, outcome)` of updates acknowledged without
    handling (a flooding chat's backlog was full, or the same update was already waiting): they are
    stored as handled with that outcome (`dropped` may also name waiting updates of earlier batches that
    this one supersedes: they are marked the same way). A re-delivered update that is already handled is not returned;
    one recorded by an earlier attempt whose answer was lost (the commit happened, the reply did not)
    is. The dispatcher skips ids it already has queued or running."""
    ids = [update_id for update_id, _, _ in updates]
    outcomes = dict(dropped)
    if updates:
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO telegram_inbox (update_id, chat_id, payload, handled_at, outcome) "
                "VALUES (%s, %s, %s, CASE WHEN %s::text IS NULL THEN NULL ELSE now() END, %s) "
                "ON CONFLICT (update_id) DO NOTHING",
                [(uid, chat, Jsonb(payload), outcomes.get(uid), outcomes.get(uid)) for uid, chat, payload in updates],
            )
    new_ids = set(ids)
    earlier = [(outcome, uid) for uid, outcome in dropped if uid not in new_ids]
    if earlier:  # updates of earlier batches, still waiting, superseded by one of this batch
        with conn.cursor() as cur:
            cur.executemany(
                "UPDATE telegram_inbox SET handled_at = now(), outcome = %s "
                "WHERE update_id = %s AND handled_at IS NULL",
                earlier,
            )
    conn.execute(
        "INSERT INTO daemon_state (key, value) VALUES (%s, %s) ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
        (OFFSET_KEY, Jsonb(next_offset)),
    )
    if not ids:
        return []
    rows = conn.execute(
        "SELECT update_id FROM telegram_inbox WHERE update_id = ANY(%s) AND handled_at IS NULL ORDER BY update_id",
        (ids,),
    ).fetchall()
    return [int(row[0]) for row in rows]


def load_offset(conn: psycopg.Connection[Any]) -> int | None:
    row = conn.execute("SELECT value FROM daemon_state WHERE key = %s", (OFFSET_KEY,)).fetchone()
    return int(row[0]) if row else None


def unhandled(conn: psycopg.Connection[Any], after_update_id: int, limit: int) -> list[tuple[int, dict[str, Any]]]:
    """Unhandled updates in update order, keyset-paginated."""
    rows = conn.execute(
        "SELECT update_id, payload FROM telegram_inbox WHERE handled_at IS NULL AND update_id > %s "
        "ORDER BY update_id LIMIT %s",
        (after_update_id, limit),
    ).fetchall()
    return [(int(uid), payload) for uid, payload in rows]


def mark_handled(conn: psycopg.Connection[Any], update_id: int, outcome: str) -> None:
    conn.execute(
        "UPDATE telegram_inbox SET handled_at = now(), outcome = %s WHERE update_id = %s AND handled_at IS NULL",
        (outcome, update_id),
    )


def mark_handled_many(conn: psycopg.Connection[Any], outcomes: Sequence[tuple[int, str]]) -> None:
    """`mark_handled` for a batch of `(update_id, outcome)`, in one transaction."""
    with conn.cursor() as cur:
        cur.executemany(
            "UPDATE telegram_inbox SET handled_at = now(), outcome = %s WHERE update_id = %s AND handled_at IS NULL",
            [(outcome, update_id) for update_id, outcome in outcomes],
        )


def delete_handled_before(conn: psycopg.Connection[Any], days: int, limit: int) -> int:
    """Housekeeping: drop handled rows older than `days`, at most `limit` per call."""
    cur = conn.execute(
        "DELETE FROM telegram_inbox WHERE update_id IN (SELECT update_id FROM telegram_inbox "
        "WHERE handled_at < now() - %s * interval '1 day' ORDER BY update_id LIMIT %s)",
        (days, limit),
    )
    return cur.rowcount
