"""Key rotations: every subscription's UUID and subscription token replaced, a batch at a time.

A rotation is a row of `key_rotations` with a cursor (`after_user_id`: the last user id a committed batch
reached). `rotate_batch` runs inside the batch's one transaction: it locks the running rotation, takes
the next `batch_size` subscriptions after the cursor (user id order, keyset), replaces their keys, logs
each in `key_reissues`, and the caller queues the messages and calls `advance` — so the keys, the
messages and the cursor commit together or not at all. The update of `subscriptions.uuid` wakes the
Xray writers at commit (the `vpnd_xray` trigger); they replace each rotated user's key live.

Who is rotated: every subscription, whatever its status (an expired key that leaked would come back to
life with a renewal, which keeps the UUID) and a banned user's too — except a user whose key was
reissued already since the rotation started (by themselves or an admin): that key is new.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any, Literal

import attrs
import psycopg
from psycopg.rows import class_row

from vpnd.db.subscriptions import new_sub_token

Status = Literal["running", "paused", "done", "cancelled"]
Verb = Literal["pause", "resume", "cancel"]

#: The statuses of an open rotation (at most one: `key_rotations_open_idx`).
OPEN: tuple[Status, ...] = ("running", "paused")

#: verb → (the statuses it applies to, the status it sets).
TRANSITIONS: dict[Verb, tuple[tuple[Status, ...], Status]] = {
    "pause": (("running",), "paused"),
    "resume": (("paused",), "running"),
    "cancel": (("running", "paused"), "cancelled"),
}


class RotationOpen(Exception):
    """Another rotation is running or paused."""


@attrs.frozen
class Rotation:
    id: int
    status: str
    batch_size: int
    notify: bool
    after_user_id: int | None
    total: int
    rotated: int
    skipped: int
    notified: int
    created_by: int
    created_at: dt.datetime
    updated_at: dt.datetime
    finished_at: dt.datetime | None

    @property
    def is_open(self) -> bool:
        return self.status in OPEN


COLUMNS = (
    "id, status, batch_size, notify, after_user_id, total, rotated, skipped, notified, created_by, "
    "created_at, updated_at, finished_at"
)


@attrs.frozen
class Rotatable:
    """What a rotation started now would cover: every subscription, and those running now (told, with `--notify`)."""

    subscriptions: int
    running: int


def rotatable(conn: psycopg.Connection[Any]) -> Rotatable:
    row = conn.execute(
        "SELECT count(*), count(*) FILTER (WHERE status = 'active' AND expires_at > now()) FROM subscriptions"
    ).fetchone()
    assert row is not None
    return Rotatable(int(row[0]), int(row[1]))


def create(conn: psycopg.Connection[Any], *, batch_size: int, notify: bool, created_by: int) -> Rotation:
    """A running rotation over every subscription; RotationOpen when one is open already."""
    if not 1 <= batch_size <= 10_000:
        raise ValueError("the batch size is from 1 to 10000")
    total = rotatable(conn).subscriptions
    with conn.cursor(row_factory=class_row(Rotation)) as cur:
        try:
            with conn.transaction():  # a savepoint: the caller's transaction survives the refusal
                row = cur.execute(
                    f"INSERT INTO key_rotations (batch_size, notify, total, created_by) VALUES (%s, %s, %s, %s) "
                    f"RETURNING {COLUMNS}",
                    (batch_size, notify, total, created_by),
                ).fetchone()
        except psycopg.errors.UniqueViolation:
            raise RotationOpen from None
    assert row is not None
    return row


def latest(conn: psycopg.Connection[Any]) -> Rotation | None:
    """The open rotation, else the most recent one (None: there never was one)."""
    with conn.cursor(row_factory=class_row(Rotation)) as cur:
        return cur.execute(
            f"SELECT {COLUMNS} FROM key_rotations ORDER BY status IN ('running', 'paused') DESC, id DESC LIMIT 1"
        ).fetchone()


@attrs.frozen
class Change:
    """After a verb: the open rotation (None: there is none) and whether its status changed."""

    rotation: Rotation | None
    changed: bool


def change_status(conn: psycopg.Connection[Any], verb: Verb, rotation_id: int | None = None) -> Change:
    """Pause, resume or cancel the open rotation (its row locked, so a batch in progress finishes first);
    with `rotation_id`, only when the open one is that one (a button of an older rotation changes nothing)."""
    applies_to, new_status = TRANSITIONS[verb]
    with conn.cursor(row_factory=class_row(Rotation)) as cur:
        current = cur.execute(
            f"SELECT {COLUMNS} FROM key_rotations WHERE status IN ('running', 'paused') FOR UPDATE"
        ).fetchone()
        if current is None or current.status not in applies_to or rotation_id not in (None, current.id):
            return Change(current, False)
        changed = cur.execute(
            f"UPDATE key_rotations SET status = %s, updated_at = now(), "
            f"finished_at = CASE WHEN %s = 'cancelled' THEN now() END WHERE id = %s RETURNING {COLUMNS}",
            (new_status, new_status, current.id),
        ).fetchone()
    return Change(changed, True)


def lock_running(conn: psycopg.Connection[Any]) -> Rotation | None:
    """The running rotation, locked for this transaction (a second daemon's batch waits, then reads the
    moved cursor); None when none is running."""
    with conn.cursor(row_factory=class_row(Rotation)) as cur:
        return cur.execute(f"SELECT {COLUMNS} FROM key_rotations WHERE status = 'running' FOR UPDATE").fetchone()


@attrs.frozen
class Rotated:
    """One user whose key a batch replaced."""

    user_id: int
    sub_token: str
    language: str
    #: Active and not expired, the user reachable and not banned: told of the new key (with `notify`).
    tell: bool


NEXT_USERS = """
SELECT s.user_id FROM subscriptions s
WHERE %(after)s::bigint IS NULL OR s.user_id > %(after)s
ORDER BY s.user_id
LIMIT %(limit)s
"""

ROTATE = """
WITH fresh AS (
    SELECT * FROM unnest(%(ids)s::bigint[], %(uuids)s::uuid[], %(tokens)s::text[]) AS f (user_id, uuid, token)
), rotated AS (
    UPDATE subscriptions s SET uuid = f.uuid, sub_token = f.token, updated_at = now()
    FROM fresh f
    WHERE s.user_id = f.user_id
      AND NOT EXISTS (SELECT 1 FROM key_reissues r WHERE r.user_id = s.user_id AND r.at >= %(since)s)
    RETURNING s.user_id, s.sub_token, s.status = 'active' AND s.expires_at > now() AS running
), logged AS (
    INSERT INTO key_reissues (user_id) SELECT user_id FROM rotated
)
SELECT r.user_id, r.sub_token, u.language, r.running AND u.reachable AND u.banned_at IS NULL
FROM rotated r JOIN users u ON u.id = r.user_id
ORDER BY r.user_id
"""


@attrs.frozen
class Batch:
    #: Subscriptions the batch looked at (fewer than the batch size: this was the last batch).
    seen: int
    #: The last user id looked at (the new cursor; None when nothing was left).
    last_user_id: int | None
    rotated: list[Rotated]


def rotate_batch(conn: psycopg.Connection[Any], rotation: Rotation) -> Batch:
    """Replace the keys of the next `rotation.batch_size` subscriptions after its cursor (the caller holds
    the rotation's lock: `lock_running`). The users are locked in id order first, as a user's own reissue
    locks them (`vpnd.db.subscriptions.reissue_key`)."""
    ids = [
        int(row[0]) for row in conn.execute(NEXT_USERS, {"after": rotation.after_user_id, "limit": rotation.batch_size})
    ]
    if not ids:
        return Batch(0, None, [])
    conn.execute("SELECT id FROM users WHERE id = ANY(%s) ORDER BY id FOR UPDATE", (ids,))
    params = {
        "ids": ids,
        "uuids": [uuid.uuid4() for _ in ids],
        "tokens": [new_sub_token() for _ in ids],
        "since": rotation.created_at,
    }
    rows = conn.execute(ROTATE, params).fetchall()
    rotated = [Rotated(int(user_id), str(token), str(lang), bool(tell)) for user_id, token, lang, tell in rows]
    return Batch(len(ids), ids[-1], rotated)


def advance(
    conn: psycopg.Connection[Any], rotation: Rotation, batch: Batch, *, notified: int, finished: bool
) -> Rotation:
    """Move the cursor past `batch` and add its counts, in the batch's transaction; `finished`: done."""
    with conn.cursor(row_factory=class_row(Rotation)) as cur:
        row = cur.execute(
            f"UPDATE key_rotations SET after_user_id = coalesce(%(last)s, after_user_id), "
            f"rotated = rotated + %(rotated)s, skipped = skipped + %(skipped)s, notified = notified + %(notified)s, "
            f"status = CASE WHEN %(finished)s THEN 'done' ELSE status END, "
            f"finished_at = CASE WHEN %(finished)s THEN now() END, updated_at = now() "
            f"WHERE id = %(id)s RETURNING {COLUMNS}",
            {
                "id": rotation.id,
                "last": batch.last_user_id,
                "rotated": len(batch.rotated),
                "skipped": batch.seen - len(batch.rotated),
                "notified": notified,
                "finished": finished,
            },
        ).fetchone()
    assert row is not None
    return row
