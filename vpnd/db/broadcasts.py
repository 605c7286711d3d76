"""Broadcasts: segments, creation with recipients, per-recipient progress, status changes.

A broadcast is created in one transaction together with its recipient rows, which are inserted
set-wise by `INSERT ... SELECT` from the segment query — users are never loaded into Python.
Progress lives in `broadcast_recipients` (pending → sent / failed / skipped), one row per user, so a
restart resumes exactly where the last committed mark left off.

Segments (every one of them only reachable users who are not banned):

* ``all``      — every reachable user;
* ``active``   — an active, unexpired *paid* subscription;
* ``nosub``    — no active subscription at all (neither paid nor a running trial);
* ``expiring`` — an active subscription (paid or trial) that expires within ``days`` days;
* ``trial``    — a running trial (an active, unexpired subscription of kind ``trial``).

The segment's predicate is checked again for each recipient just before sending
(`skip_if_ineligible`), so a user who paid after the broadcast started is skipped by ``nosub``.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

import attrs
import psycopg
from psycopg.rows import class_row

from vpnd.db.rows import one

SegmentName = Literal["all", "active", "nosub", "expiring", "trial"]
SEGMENTS: tuple[SegmentName, ...] = ("all", "active", "nosub", "expiring", "trial")
Status = Literal["running", "paused", "cancelled", "done"]
Action = Literal["pause", "resume", "cancel"]

MAX_EXPIRING_DAYS = 365


class BadSegment(ValueError):
    pass


def _active_sub(extra: str = "") -> str:
    return (
        "EXISTS (SELECT 1 FROM subscriptions s WHERE s.user_id = u.id AND s.status = 'active' "
        f"AND s.expires_at > now(){extra})"
    )


_PAID = " AND s.kind = 'paid'"
_TRIAL = " AND s.kind = 'trial'"
_WITHIN_DAYS = " AND s.expires_at <= now() + %(days)s * interval '1 day'"
#: Every segment: people who can get a message and are not banned.
_LIVE = "u.reachable AND u.banned_at IS NULL"
_PREDICATES: dict[str, str] = {
    "all": _LIVE,
    "active": f"{_LIVE} AND {_active_sub(_PAID)}",
    "nosub": f"{_LIVE} AND NOT {_active_sub()}",
    "expiring": f"{_LIVE} AND {_active_sub(_WITHIN_DAYS)}",
    "trial": f"{_LIVE} AND {_active_sub(_TRIAL)}",
}


@attrs.frozen
class Segment:
    """Who a broadcast goes to (pure value; `predicate()` is its SQL over the alias `u` of users)."""

    name: SegmentName
    days: int | None = None

    @classmethod
    def parse(cls, name: str, days: int | None = None) -> Segment:
        if name not in SEGMENTS:
            raise BadSegment(f"unknown segment {name!r} (known: {', '.join(SEGMENTS)})")
        if name == "expiring":
            if days is None or not 1 <= days <= MAX_EXPIRING_DAYS:
                raise BadSegment(f"the expiring segment needs days from 1 to {MAX_EXPIRING_DAYS}")
            return cls("expiring", days)
        return cls(name)

    def predicate(self) -> str:
        return _PREDICATES[self.name]

    def params(self) -> dict[str, Any]:
        return {"days": self.days or 0}

    def label(self) -> str:
        return f"expiring within {self.days} days" if self.name == "expiring" else self.name


@attrs.frozen
class Broadcast:
    id: int
    created_by: int
    text: str
    button_text: str | None
    button_url: str | None
    segment: str
    segment_days: int | None
    status: str
    total: int
    progress_chat_id: int | None
    progress_message_id: int | None
    created_at: dt.datetime
    finished_at: dt.datetime | None

    @property
    def target(self) -> Segment:
        return Segment.parse(self.segment, self.segment_days)


COLUMNS = (
    "id, created_by, text, button_text, button_url, segment, segment_days, status, total, "
    "progress_chat_id, progress_message_id, created_at, finished_at"
)


@attrs.frozen
class Counts:
    total: int = 0
    pending: int = 0
    sent: int = 0
    failed: int = 0
    skipped: int = 0

    @property
    def processed(self) -> int:
        return self.sent + self.failed + self.skipped


# --- creation ---------------------------------------------------------------------------------


def count_segment(conn: psycopg.Connection[Any], segment: Segment) -> int:
    """How many users the segment has now (the figure the admin confirms)."""
    row = one(conn.execute(f"SELECT count(*) FROM users u WHERE {segment.predicate()}", segment.params()))
    return int(row[0])


def create_broadcast(
    conn: psycopg.Connection[Any],
    *,
    created_by: int,
    text: str,
    segment: Segment,
    button_text: str | None = None,
    button_url: str | None = None,
    progress_chat_id: int | None = None,
    progress_message_id: int | None = None,
) -> Broadcast:
    """Create a running broadcast and its recipient rows (set-wise from the segment query)."""
    if (button_text is None) != (button_url is None):
        raise ValueError("a button needs both a text and a URL")
    created = one(
        conn.execute(
            "INSERT INTO broadcasts (created_by, text, button_text, button_url, segment, segment_days, status, "
            "progress_chat_id, progress_message_id) VALUES (%s, %s, %s, %s, %s, %s, 'running', %s, %s) RETURNING id",
            (
                created_by,
                text,
                button_text,
                button_url,
                segment.name,
                segment.days,
                progress_chat_id,
                progress_message_id,
            ),
        )
    )
    broadcast_id = int(created[0])
    inserted = conn.execute(
        f"INSERT INTO broadcast_recipients (broadcast_id, user_id) "
        f"SELECT %(bid)s, u.id FROM users u WHERE {segment.predicate()}",
        {"bid": broadcast_id, **segment.params()},
    ).rowcount
    with conn.cursor(row_factory=class_row(Broadcast)) as cur:
        broadcast: Broadcast = one(
            cur.execute(f"UPDATE broadcasts SET total = %s WHERE id = %s RETURNING {COLUMNS}", (inserted, broadcast_id))
        )
    return broadcast


def set_progress_message(conn: psycopg.Connection[Any], broadcast_id: int, chat_id: int, message_id: int) -> None:
    conn.execute(
        "UPDATE broadcasts SET progress_chat_id = %s, progress_message_id = %s WHERE id = %s",
        (chat_id, message_id, broadcast_id),
    )


# --- reading ----------------------------------------------------------------------------------


def get_broadcast(conn: psycopg.Connection[Any], broadcast_id: int) -> Broadcast | None:
    with conn.cursor(row_factory=class_row(Broadcast)) as cur:
        return cur.execute(f"SELECT {COLUMNS} FROM broadcasts WHERE id = %s", (broadcast_id,)).fetchone()


def list_broadcasts(
    conn: psycopg.Connection[Any], *, before_id: int | None = None, limit: int = 20, status: str | None = None
) -> list[Broadcast]:
    """Newest first, a keyset page at a time (`before_id` = the last id of the previous page)."""
    with conn.cursor(row_factory=class_row(Broadcast)) as cur:
        return cur.execute(
            f"SELECT {COLUMNS} FROM broadcasts WHERE id < %s AND (%s::text IS NULL OR status = %s) "
            f"ORDER BY id DESC LIMIT %s",
            (before_id if before_id is not None else 2**63 - 1, status, status, limit),
        ).fetchall()


def status_of(conn: psycopg.Connection[Any], broadcast_id: int) -> str | None:
    row = conn.execute("SELECT status FROM broadcasts WHERE id = %s", (broadcast_id,)).fetchone()
    return None if row is None else str(row[0])


def statuses(conn: psycopg.Connection[Any], known_ids: list[int]) -> dict[int, str]:
    """Every running broadcast, plus the current status of `known_ids` (whatever it is now)."""
    rows = conn.execute(
        "SELECT id, status FROM broadcasts WHERE status = 'running' OR id = ANY(%s::bigint[]) ORDER BY id", (known_ids,)
    ).fetchall()
    return {int(r[0]): str(r[1]) for r in rows}


def counts(conn: psycopg.Connection[Any], broadcast_id: int) -> Counts:
    rows = conn.execute(
        "SELECT status, count(*) FROM broadcast_recipients WHERE broadcast_id = %s GROUP BY status", (broadcast_id,)
    ).fetchall()
    by_status = {str(r[0]): int(r[1]) for r in rows}
    return Counts(
        total=sum(by_status.values()),
        pending=by_status.get("pending", 0),
        sent=by_status.get("sent", 0),
        failed=by_status.get("failed", 0),
        skipped=by_status.get("skipped", 0),
    )


def next_pending(conn: psycopg.Connection[Any], broadcast_id: int, after_user_id: int, limit: int) -> list[int]:
    """The next pending recipients in user id order after `after_user_id` (keyset; partial index)."""
    rows = conn.execute(
        "SELECT user_id FROM broadcast_recipients WHERE broadcast_id = %s AND status = 'pending' AND user_id > %s "
        "ORDER BY user_id LIMIT %s",
        (broadcast_id, after_user_id, limit),
    ).fetchall()
    return [int(r[0]) for r in rows]


# --- per-recipient progress -------------------------------------------------------------------


Eligibility = Literal["send", "skipped", "not_pending"]


def skip_if_ineligible(conn: psycopg.Connection[Any], broadcast_id: int, user_id: int, segment: Segment) -> Eligibility:
    """Re-check the segment for one recipient just before sending.

    "send": still pending and still in the segment; "skipped": no longer in it (now marked skipped);
    "not_pending": already handled (sent, failed, skipped) — nothing to do.
    """
    row = conn.execute(
        f"SELECT r.status, EXISTS (SELECT 1 FROM users u WHERE u.id = r.user_id AND {segment.predicate()}) "
        f"FROM broadcast_recipients r WHERE r.broadcast_id = %(bid)s AND r.user_id = %(uid)s",
        {"bid": broadcast_id, "uid": user_id, **segment.params()},
    ).fetchone()
    if row is None or row[0] != "pending":
        return "not_pending"
    if row[1]:
        return "send"
    conn.execute(
        "UPDATE broadcast_recipients SET status = 'skipped', error = 'no longer in the segment', sent_at = now() "
        "WHERE broadcast_id = %s AND user_id = %s AND status = 'pending'",
        (broadcast_id, user_id),
    )
    return "skipped"


def mark_sent(conn: psycopg.Connection[Any], broadcast_id: int, user_id: int, message_id: int) -> None:
    conn.execute(
        "UPDATE broadcast_recipients SET status = 'sent', message_id = %s, sent_at = now(), error = NULL "
        "WHERE broadcast_id = %s AND user_id = %s AND status = 'pending'",
        (message_id, broadcast_id, user_id),
    )


def mark_failed(
    conn: psycopg.Connection[Any], broadcast_id: int, user_id: int, error: str, *, unreachable: bool = False
) -> None:
    """A permanent failure; `unreachable` (403: blocked the bot) also marks the user unreachable."""
    conn.execute(
        "UPDATE broadcast_recipients SET status = 'failed', error = %s, sent_at = now() "
        "WHERE broadcast_id = %s AND user_id = %s AND status = 'pending'",
        (error[:300], broadcast_id, user_id),
    )
    if unreachable:
        conn.execute("UPDATE users SET reachable = false, updated_at = now() WHERE id = %s", (user_id,))


# --- status -----------------------------------------------------------------------------------

_TRANSITIONS: dict[str, tuple[tuple[str, ...], str]] = {
    "pause": (("running",), "paused"),
    "resume": (("paused",), "running"),
    "cancel": (("running", "paused"), "cancelled"),
}


@attrs.frozen
class StatusChange:
    broadcast: Broadcast | None
    changed: bool

    @property
    def found(self) -> bool:
        return self.broadcast is not None


def change_status(conn: psycopg.Connection[Any], broadcast_id: int, action: Action) -> StatusChange:
    """Pause (running → paused), resume (paused → running) or cancel (running/paused → cancelled).

    `changed` is False when the broadcast was not in a state the action applies to (it is returned
    as it is) or does not exist (`broadcast` is None).
    """
    sources, target = _TRANSITIONS[action]
    with conn.cursor(row_factory=class_row(Broadcast)) as cur:
        updated = cur.execute(
            f"UPDATE broadcasts SET status = %s, "
            f"finished_at = CASE WHEN %s = 'cancelled' THEN now() ELSE finished_at END "
            f"WHERE id = %s AND status = ANY(%s) RETURNING {COLUMNS}",
            (target, target, broadcast_id, list(sources)),
        ).fetchone()
    if updated is not None:
        return StatusChange(updated, True)
    return StatusChange(get_broadcast(conn, broadcast_id), False)


def finish_if_complete(conn: psycopg.Connection[Any], broadcast_id: int) -> Broadcast | None:
    """Mark a running broadcast done when no recipient is pending; the finished broadcast or None."""
    with conn.cursor(row_factory=class_row(Broadcast)) as cur:
        return cur.execute(
            f"UPDATE broadcasts b SET status = 'done', finished_at = now() "
            f"WHERE b.id = %s AND b.status = 'running' AND NOT EXISTS "
            f"(SELECT 1 FROM broadcast_recipients r WHERE r.broadcast_id = b.id AND r.status = 'pending') "
            f"RETURNING {COLUMNS}",
            (broadcast_id,),
        ).fetchone()
