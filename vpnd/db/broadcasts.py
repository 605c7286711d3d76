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
* ``trial``    — a running trial (an active, unexpired subscription of kind ``trial``);
* ``lang``     — users whose bot language is ``arg``;
* ``plan``     — an active, unexpired subscription to the plan ``arg``;
* ``expired``  — a subscription that ran out within the last ``days`` days (and was not renewed);
* ``neverpaid``— nobody who ever paid for anything (a paid purchase);
* ``paid``     — paid for something within the last ``days`` days.

A broadcast may be *scheduled*: it is created without recipients and `start_due` turns it into a
running one (inserting its recipients from the segment as it is then) once ``start_at`` has passed.

The segment's predicate is checked again for each recipient just before sending
(`skip_if_ineligible`), so a user who paid after the broadcast started is skipped by ``nosub``.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from typing import Any, Literal

import attrs
import psycopg
from psycopg.rows import class_row
from psycopg.types.json import Jsonb

from vpnd.db.rows import one

SegmentName = Literal["all", "active", "nosub", "expiring", "trial", "lang", "plan", "expired", "neverpaid", "paid"]
SEGMENTS: tuple[SegmentName, ...] = (
    "all",
    "active",
    "nosub",
    "expiring",
    "trial",
    "lang",
    "plan",
    "expired",
    "neverpaid",
    "paid",
)
#: Segments that take a number of days, and those that take a text argument (a language, a plan code).
DAYS_SEGMENTS = frozenset({"expiring", "expired", "paid"})
ARG_SEGMENTS = frozenset({"lang", "plan"})
SEGMENT_ARG = re.compile(r"[A-Za-z0-9_-]{1,32}")
MediaKind = Literal["photo", "video", "document", "animation"]
MEDIA_KINDS: tuple[MediaKind, ...] = ("photo", "video", "document", "animation")
Status = Literal["scheduled", "running", "paused", "cancelled", "done"]
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
    "lang": f"{_LIVE} AND u.language = %(arg)s",
    "plan": f"{_LIVE} AND {_active_sub(' AND s.plan_code = %(arg)s')}",
    "expired": (
        f"{_LIVE} AND EXISTS (SELECT 1 FROM subscriptions s WHERE s.user_id = u.id AND s.status <> 'revoked' "
        "AND s.expires_at <= now() AND s.expires_at > now() - %(days)s * interval '1 day')"
    ),
    "neverpaid": f"{_LIVE} AND NOT EXISTS (SELECT 1 FROM purchases p WHERE p.user_id = u.id AND p.status = 'paid')",
    "paid": (
        f"{_LIVE} AND EXISTS (SELECT 1 FROM purchases p WHERE p.user_id = u.id AND p.status = 'paid' "
        "AND p.paid_at > now() - %(days)s * interval '1 day')"
    ),
}


@attrs.frozen
class Segment:
    """Who a broadcast goes to (pure value; `predicate()` is its SQL over the alias `u` of users)."""

    name: SegmentName
    days: int | None = None
    arg: str | None = None

    @classmethod
    def parse(cls, name: str, days: int | None = None, arg: str | None = None) -> Segment:
        if name not in SEGMENTS:
            raise BadSegment(f"unknown segment {name!r} (known: {', '.join(SEGMENTS)})")
        if name in DAYS_SEGMENTS:
            if days is None or not 1 <= days <= MAX_EXPIRING_DAYS:
                raise BadSegment(f"the {name} segment needs days from 1 to {MAX_EXPIRING_DAYS}")
            return cls(name, days)
        if name in ARG_SEGMENTS:
            if arg is None or not SEGMENT_ARG.fullmatch(arg):
                raise BadSegment(f"the {name} segment needs a {'language' if name == 'lang' else 'plan code'}")
            return cls(name, arg=arg)
        return cls(name)

    @classmethod
    def from_words(cls, words: list[str]) -> Segment:
        """`["expired", "7"]`, `["lang", "ru"]`, `["all"]` (the bot's callback arguments, the CLI's)."""
        if not words:
            raise BadSegment("no segment")
        name, rest = words[0], words[1:]
        if name in DAYS_SEGMENTS:
            if len(rest) != 1 or not rest[0].isdigit():
                raise BadSegment(f"the {name} segment needs a number of days")
            return cls.parse(name, int(rest[0]))
        if name in ARG_SEGMENTS:
            return cls.parse(name, arg=rest[0] if len(rest) == 1 else None)
        if rest:
            raise BadSegment(f"the {name} segment takes no argument")
        return cls.parse(name)

    def predicate(self) -> str:
        return _PREDICATES[self.name]

    def params(self) -> dict[str, Any]:
        return {"days": self.days or 0, "arg": self.arg or ""}

    def label(self) -> str:
        if self.name in DAYS_SEGMENTS:
            return {
                "expiring": "expiring within",
                "expired": "expired within the last",
                "paid": "paid within the last",
            }[self.name] + f" {self.days} days"
        return f"{self.name} {self.arg}" if self.arg else self.name


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
    media_kind: str | None = None
    media_file_id: str | None = None
    #: [{"text": ..., "url": ...} | {"text": ..., "plan": <plan code>}], one button per row.
    buttons: list[dict[str, str]] = attrs.field(factory=list)
    #: language → text (or caption) for recipients of that language; the others get `text`.
    variants: dict[str, str] = attrs.field(factory=dict)
    segment_arg: str | None = None
    start_at: dt.datetime | None = None

    @property
    def target(self) -> Segment:
        return Segment.parse(self.segment, self.segment_days, self.segment_arg)

    def text_for(self, language: str) -> str:
        return self.variants.get(language) or self.text


COLUMNS = (
    "id, created_by, text, button_text, button_url, segment, segment_days, status, total, "
    "progress_chat_id, progress_message_id, created_at, finished_at, media_kind, media_file_id, buttons, "
    "variants, segment_arg, start_at"
)


@attrs.frozen
class Content:
    """What a broadcast says: a text (the caption when there is media), media by file_id, buttons, variants."""

    text: str
    media_kind: MediaKind | None = None
    media_file_id: str | None = None
    buttons: tuple[tuple[str, str, str], ...] = ()  # (label, "url" | "plan", target)
    variants: tuple[tuple[str, str], ...] = ()  # (language, text)

    def buttons_json(self) -> list[dict[str, str]]:
        return [{"text": label, kind: target} for label, kind, target in self.buttons]


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
    content: Content | None = None,
    start_at: dt.datetime | None = None,
) -> Broadcast:
    """Create a running broadcast and its recipient rows (set-wise from the segment query); with
    `start_at` a scheduled one without recipients (`start_due` adds them when it starts)."""
    if (button_text is None) != (button_url is None):
        raise ValueError("a button needs both a text and a URL")
    content = content or Content(text)
    if (content.media_kind is None) != (content.media_file_id is None):
        raise ValueError("media needs both a kind and a file_id")
    created = one(
        conn.execute(
            "INSERT INTO broadcasts (created_by, text, button_text, button_url, segment, segment_days, segment_arg, "
            "status, progress_chat_id, progress_message_id, media_kind, media_file_id, buttons, variants, start_at) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
            (
                created_by,
                text,
                button_text,
                button_url,
                segment.name,
                segment.days,
                segment.arg,
                "running" if start_at is None else "scheduled",
                progress_chat_id,
                progress_message_id,
                content.media_kind,
                content.media_file_id,
                Jsonb(content.buttons_json()),
                Jsonb(dict(content.variants)),
                start_at,
            ),
        )
    )
    broadcast_id = int(created[0])
    if start_at is not None:
        found = get_broadcast(conn, broadcast_id)
        assert found is not None
        return found
    return _add_recipients(conn, broadcast_id, segment)


def _add_recipients(conn: psycopg.Connection[Any], broadcast_id: int, segment: Segment) -> Broadcast:
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


def start_due(conn: psycopg.Connection[Any]) -> list[Broadcast]:
    """Start every scheduled broadcast whose time has come: running, with its recipients as the segment
    is now. The status change is the claim, so a broadcast starts once however many callers race."""
    started: list[Broadcast] = []
    with conn.cursor(row_factory=class_row(Broadcast)) as cur:
        due = cur.execute(
            f"UPDATE broadcasts SET status = 'running' WHERE id IN (SELECT id FROM broadcasts "
            f"WHERE status = 'scheduled' AND start_at <= now() ORDER BY start_at LIMIT 20 FOR UPDATE SKIP LOCKED) "
            f"RETURNING {COLUMNS}"
        ).fetchall()
    for broadcast in due:
        started.append(_add_recipients(conn, broadcast.id, broadcast.target))
    return started


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

    "send": still pending and still in the segment, and the attempt is recorded (`attempted_at`: see
    `settle_in_doubt`); "skipped": no longer in it (now marked skipped); "not_pending": already handled
    (sent, failed, skipped) — nothing to do.
    """
    row = conn.execute(
        f"SELECT r.status, EXISTS (SELECT 1 FROM users u WHERE u.id = r.user_id AND {segment.predicate()}) "
        f"FROM broadcast_recipients r WHERE r.broadcast_id = %(bid)s AND r.user_id = %(uid)s",
        {"bid": broadcast_id, "uid": user_id, **segment.params()},
    ).fetchone()
    if row is None or row[0] != "pending":
        return "not_pending"
    if row[1]:
        # The attempt, recorded before the Bot API call: after an unclean stop it marks who was in flight.
        conn.execute(
            "UPDATE broadcast_recipients SET attempted_at = now() WHERE broadcast_id = %s AND user_id = %s",
            (broadcast_id, user_id),
        )
        return "send"
    conn.execute(
        "UPDATE broadcast_recipients SET status = 'skipped', error = 'no longer in the segment', sent_at = now() "
        "WHERE broadcast_id = %s AND user_id = %s AND status = 'pending'",
        (broadcast_id, user_id),
    )
    return "skipped"


IN_DOUBT_SKIPPED = "in doubt after an unclean stop: not sent again ([broadcast] resend_in_doubt = false)"


def settle_in_doubt(conn: psycopg.Connection[Any], broadcast_id: int, *, resend: bool) -> list[int]:
    """The recipients whose send was in flight when vpnd last stopped uncleanly (attempted, never marked).

    Telegram cannot say whether they got the message. ``resend``: they go back to plain pending and are
    sent again (nobody skipped; each may get it twice). Otherwise they are marked skipped with
    `IN_DOUBT_SKIPPED` (nobody gets it twice; each may have got nothing). Call it only while no task of
    this daemon sends this broadcast (at the start of a run)."""
    if resend:
        query = (
            "UPDATE broadcast_recipients SET attempted_at = NULL "
            "WHERE broadcast_id = %s AND status = 'pending' AND attempted_at IS NOT NULL RETURNING user_id"
        )
        params: tuple[Any, ...] = (broadcast_id,)
    else:
        query = (
            "UPDATE broadcast_recipients SET status = 'skipped', error = %s, sent_at = now() "
            "WHERE broadcast_id = %s AND status = 'pending' AND attempted_at IS NOT NULL RETURNING user_id"
        )
        params = (IN_DOUBT_SKIPPED, broadcast_id)
    return sorted(int(r[0]) for r in conn.execute(query, params).fetchall())


def mark_sent_many(conn: psycopg.Connection[Any], broadcast_id: int, sent: Sequence[tuple[int, int]]) -> None:
    """Mark recipients sent, `(user_id, message_id)` each, in one statement (rows no longer pending are
    left as they are, so applying the same marks twice changes nothing)."""
    if not sent:
        return
    # One primary-key update per row, pipelined: a join against unnest() was planned as a scan of the
    # broadcast's pending rows (20 ms at 30,000 recipients before autovacuum's first ANALYZE).
    with conn.cursor() as cur:
        cur.executemany(
            "UPDATE broadcast_recipients SET status = 'sent', message_id = %s, sent_at = now(), error = NULL "
            "WHERE broadcast_id = %s AND user_id = %s AND status = 'pending'",
            [(message_id, broadcast_id, user_id) for user_id, message_id in sent],
        )


def record_and_check(
    conn: psycopg.Connection[Any],
    broadcast_id: int,
    user_id: int,
    segment: Segment,
    sent: Sequence[tuple[int, int]],
) -> Eligibility:
    """One transaction per broadcast send: the marks of the sends that finished since the last one
    (`mark_sent_many`), then `skip_if_ineligible` for the next recipient (which records its attempt)."""
    mark_sent_many(conn, broadcast_id, sent)
    return skip_if_ineligible(conn, broadcast_id, user_id, segment)


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
    "cancel": (("scheduled", "running", "paused"), "cancelled"),
}


@attrs.frozen
class StatusChange:
    broadcast: Broadcast | None
    changed: bool

    @property
    def found(self) -> bool:
        return self.broadcast is not None


def change_status(conn: psycopg.Connection[Any], broadcast_id: int, action: Action) -> StatusChange:
    """Pause (running → paused), resume (paused → running) or cancel (scheduled/running/paused → cancelled).

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


# --- delivery report --------------------------------------------------------------------------

#: A failure that means the person can no longer be messaged (403 blocked, chat gone): they were marked
#: unreachable when it happened, so later broadcasts leave them out.
_BLOCKED_ERRORS = ("unreachable:%", "chat not found:%")


@attrs.frozen
class Report:
    sent: int
    blocked: int
    failed: int
    skipped: int
    pending: int


@attrs.frozen
class RecipientOutcome:
    user_id: int
    outcome: str  # sent | blocked | failed | skipped | pending
    error: str | None
    sent_at: dt.datetime | None


_OUTCOME = "CASE WHEN status = 'failed' AND (error LIKE %(b0)s OR error LIKE %(b1)s) THEN 'blocked' ELSE status END"


def report(conn: psycopg.Connection[Any], broadcast_id: int) -> Report:
    rows = conn.execute(
        f"SELECT {_OUTCOME}, count(*) FROM broadcast_recipients WHERE broadcast_id = %(bid)s GROUP BY 1",
        {"bid": broadcast_id, "b0": _BLOCKED_ERRORS[0], "b1": _BLOCKED_ERRORS[1]},
    ).fetchall()
    by = {str(r[0]): int(r[1]) for r in rows}
    return Report(
        by.get("sent", 0), by.get("blocked", 0), by.get("failed", 0), by.get("skipped", 0), by.get("pending", 0)
    )


def recipient_outcomes(
    conn: psycopg.Connection[Any], broadcast_id: int, *, after_user_id: int = 0, limit: int = 5000
) -> list[RecipientOutcome]:
    """One keyset page of recipients in user id order, with their outcome (for the CSV)."""
    with conn.cursor(row_factory=class_row(RecipientOutcome)) as cur:
        return cur.execute(
            f"SELECT user_id, {_OUTCOME} AS outcome, error, sent_at FROM broadcast_recipients "
            f"WHERE broadcast_id = %(bid)s AND user_id > %(after)s ORDER BY user_id LIMIT %(limit)s",
            {
                "bid": broadcast_id,
                "after": after_user_id,
                "limit": limit,
                "b0": _BLOCKED_ERRORS[0],
                "b1": _BLOCKED_ERRORS[1],
            },
        ).fetchall()
