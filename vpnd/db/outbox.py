"""The outbox: messages to users, written in the transaction that causes them.

`enqueue` is called from inside a transaction function (it gets the same connection), so the message
exists if and only if the state change committed. A dedupe key makes a second enqueue of the same
message a no-op (e.g. `reminder:<user>:<expires_at>:3d`). The outbox sender delivers rows after commit.

The sender's side (`vpnd.nurseries.outbox`): `due_batch` reads due rows in delivery order with keyset
pagination; after Telegram answers, one short transaction records the outcome — `mark_sent`,
`drop_unreachable` (403: the user is marked unreachable too), `mark_dropped` (chat not found),
`reschedule` (transient, with a later `not_before`) or `mark_failed` (given up, with the error).
`backlog` feeds the health check and /metrics; `delete_finished_before` is for housekeeping.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import attrs
import psycopg
from psycopg.rows import class_row
from psycopg.types.json import Jsonb

from vpnd.db.users import mark_unreachable

#: A key message (`vpnd.key_message`): `text` is the confirmation, `lang` the user's language. Not a Bot
#: API method: at send time the sender reads the subscription's token, draws its QR code and sends a
#: photo (or, when the key cannot be built, the text alone) — so no image is stored here.
KEY_METHOD = "sendKey"


def enqueue(
    conn: psycopg.Connection[Any],
    chat_id: int,
    text: str,
    *,
    dedupe_key: str | None = None,
    reply_markup: dict[str, Any] | None = None,
    not_before: dt.datetime | None = None,
    method: str = "sendMessage",
    extra: dict[str, Any] | None = None,
) -> bool:
    """Queue a message (HTML text, optional inline keyboard); False when the dedupe key was used already."""
    row_id = enqueue_id(
        conn,
        chat_id,
        text,
        dedupe_key=dedupe_key,
        reply_markup=reply_markup,
        not_before=not_before,
        method=method,
        extra=extra,
    )
    return row_id is not None


def enqueue_id(
    conn: psycopg.Connection[Any],
    chat_id: int,
    text: str,
    *,
    dedupe_key: str | None = None,
    reply_markup: dict[str, Any] | None = None,
    not_before: dt.datetime | None = None,
    method: str = "sendMessage",
    extra: dict[str, Any] | None = None,
) -> int | None:
    """`enqueue`, returning the row's id (None when the dedupe key was used already): for a caller that
    wants to learn the sent message's id later (a relayed support message, see `vpnd.db.support`)."""
    payload: dict[str, Any] = {"text": text, "parse_mode": "HTML", **(extra or {})}
    if reply_markup is not None:
        payload["reply_markup"] = reply_markup
    row = conn.execute(
        "INSERT INTO outbox (chat_id, dedupe_key, method, payload, not_before) "
        "VALUES (%s, %s, %s, %s, coalesce(%s, now())) ON CONFLICT (dedupe_key) DO NOTHING RETURNING id",
        (chat_id, dedupe_key, method, Jsonb(payload), not_before),
    ).fetchone()
    return int(row[0]) if row is not None else None


def payload_json(payload: dict[str, Any]) -> str:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


# --- the sender's side: due rows, outcomes, backlog, retention ----------------------------------


@attrs.frozen
class OutboxRow:
    id: int
    chat_id: int
    method: str
    payload: dict[str, Any]
    not_before: dt.datetime
    attempts: int

    @property
    def key(self) -> tuple[dt.datetime, int]:
        """The keyset position of this row in the due order."""
        return (self.not_before, self.id)


#: The beginning of the due order (before any real row).
START_KEY: tuple[dt.datetime, int] = (dt.datetime(1970, 1, 1, tzinfo=dt.UTC), 0)

# A chat whose message waits for a retry gets nothing newer until that one is settled: messages to
# one chat arrive in the order they were queued ("failing" never after "recovered").
DUE_BATCH = """
WITH held AS (
    SELECT chat_id, min(id) AS first_id FROM outbox WHERE status = 'pending' AND attempts > 0 GROUP BY chat_id
)
SELECT o.id, o.chat_id, o.method, o.payload, o.not_before, o.attempts
FROM outbox o LEFT JOIN held h ON h.chat_id = o.chat_id
WHERE o.status = 'pending' AND o.not_before <= now() AND (o.not_before, o.id) > (%s, %s)
  AND (h.first_id IS NULL OR o.id <= h.first_id)
ORDER BY o.not_before, o.id
LIMIT %s
"""


def due_batch(conn: psycopg.Connection[Any], after: tuple[dt.datetime, int], limit: int) -> list[OutboxRow]:
    """Pending rows that are due, in delivery order `(not_before, id)`, after the keyset position `after`.

    One sender task owns delivery (the instance lock guarantees one daemon), so reading is claiming:
    a row stays `pending` until its outcome is recorded right after Telegram answered. Rows of a chat
    queued after one of its rows that waits for a retry are held back until that row is settled.
    """
    with conn.cursor(row_factory=class_row(OutboxRow)) as cur:
        return cur.execute(DUE_BATCH, (*after, limit)).fetchall()


def mark_sent(conn: psycopg.Connection[Any], row_id: int) -> bool:
    cur = conn.execute(
        "UPDATE outbox SET status = 'sent', sent_at = now(), attempts = attempts + 1, last_error = NULL "
        "WHERE id = %s AND status = 'pending'",
        (row_id,),
    )
    return cur.rowcount == 1


def mark_dropped(conn: psycopg.Connection[Any], row_id: int, error: str) -> bool:
    """Give up on a row that can never be delivered (chat not found, user unreachable)."""
    cur = conn.execute(
        "UPDATE outbox SET status = 'dropped', attempts = attempts + 1, last_error = %s "
        "WHERE id = %s AND status = 'pending'",
        (error[:500], row_id),
    )
    return cur.rowcount == 1


def drop_unreachable(conn: psycopg.Connection[Any], row_id: int, chat_id: int, error: str) -> bool:
    """403: the user blocked the bot (or is gone). Mark them unreachable and drop the row, together."""
    mark_unreachable(conn, chat_id)
    return mark_dropped(conn, row_id, error)


def mark_failed(conn: psycopg.Connection[Any], row_id: int, error: str) -> bool:
    """Give up visibly: the row stays in the table as `failed` with its last error."""
    cur = conn.execute(
        "UPDATE outbox SET status = 'failed', attempts = attempts + 1, last_error = %s "
        "WHERE id = %s AND status = 'pending'",
        (error[:500], row_id),
    )
    return cur.rowcount == 1


def reschedule(conn: psycopg.Connection[Any], row_id: int, delay_seconds: float, error: str) -> bool:
    """A transient failure: try again after `delay_seconds` (the row keeps its place among equals)."""
    cur = conn.execute(
        "UPDATE outbox SET attempts = attempts + 1, last_error = %s, "
        "not_before = now() + %s * interval '1 second' WHERE id = %s AND status = 'pending'",
        (error[:500], delay_seconds, row_id),
    )
    return cur.rowcount == 1


@attrs.frozen
class Backlog:
    #: Pending rows that are due now (counted up to `BACKLOG_COUNT_CAP`).
    due: int
    #: When the oldest due row became due (None: nothing is due).
    oldest_due: dt.datetime | None
    #: The database's clock when this was read.
    now: dt.datetime

    @property
    def oldest_age_seconds(self) -> float:
        return 0.0 if self.oldest_due is None else max(0.0, (self.now - self.oldest_due).total_seconds())


#: Counting a huge backlog exactly is not worth a long scan; past this we say "at least".
BACKLOG_COUNT_CAP = 100_000


def backlog(conn: psycopg.Connection[Any]) -> Backlog:
    """How many rows are due and how long the oldest has waited (bounded scan of the due index)."""
    row = conn.execute(
        "SELECT (SELECT count(*) FROM (SELECT 1 FROM outbox WHERE status = 'pending' AND not_before <= now() "
        "LIMIT %s) AS due), "
        "(SELECT min(not_before) FROM outbox WHERE status = 'pending' AND not_before <= now()), now()",
        (BACKLOG_COUNT_CAP,),
    ).fetchone()
    assert row is not None
    return Backlog(int(row[0]), row[1], row[2])


def delete_finished_before(conn: psycopg.Connection[Any], days: int, limit: int) -> int:
    """Housekeeping: delete sent/dropped/failed rows created more than `days` ago, at most `limit`."""
    cur = conn.execute(
        "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE status <> 'pending' "
        "AND created_at < now() - %s * interval '1 day' ORDER BY id LIMIT %s)",
        (days, limit),
    )
    return cur.rowcount
