"""Rotate everyone's key after a leak: start, pause, resume, cancel (audited) and one batch (the daemon's).

The actions run in the caller's transaction like every admin action (`vpnd.services.admin_actions`),
for the bot's admin menu and `vpnd admin rotate-keys` alike. The work itself is the daemon's: the
`key_rotation` worker (`vpnd.workers.key_rotation`) runs `rotate_next_batch` every
`[xray] rotate_interval_seconds`, one batch of the rotation's `batch_size` users per transaction —
their keys, their messages (with `notify`, exactly once: a dedupe key per rotation and user) and the
cursor commit together, so a restart or a kill -9 resumes where the last commit left off. The commit
wakes the Xray writers, which replace the rotated users' keys live: the old UUIDs leave Xray batch by
batch as the new ones are sent. The pace (batch size over interval) keeps a big shop's Xray API and
the outbox from being flooded.
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs
import psycopg

from vpnd.db import admin as admin_db
from vpnd.db import key_rotation as db
from vpnd.db import outbox, users
from vpnd.db.key_rotation import Rotatable, Rotation
from vpnd.services.admin_actions import Actor, Refused
from vpnd.telegram.keyboards import button, keyboard
from vpnd.texts import Texts

Conn = psycopg.Connection[Any]


@attrs.frozen
class RotationRunning(Refused):
    """A rotation is open (running or paused) already: finish, or cancel it, first."""

    rotation: Rotation | None = None
    reason: ClassVar[str] = "open"


@attrs.frozen
class NoRotation(Refused):
    """No rotation is open (or the open one is not in a status the verb applies to)."""

    rotation: Rotation | None = None
    verb: str = ""
    reason: ClassVar[str] = "unchanged"


@attrs.frozen
class Started:
    rotation: Rotation
    #: The nonce was used: nothing was started again.
    repeated: bool = False


def _audit(conn: Conn, actor: Actor, action: str, target: object, result: str = "ok", **facts: Any) -> None:
    admin_db.audit(conn, actor.admin_id, action, target, result, actor.details(**facts))


def rotatable(conn: Conn) -> Rotatable:
    """How many keys a rotation started now would replace (the confirmation shows it)."""
    return db.rotatable(conn)


def start(
    conn: Conn, actor: Actor, *, batch_size: int, notify: bool, nonce: str | None = None
) -> Started | RotationRunning:
    """Start rotating every subscription's key (once per `nonce`, a confirmation button's); refused while
    another rotation is open. ValueError for a batch size out of 1..10000."""
    if nonce is not None and admin_db.nonce_used(conn, nonce):
        found = db.latest(conn)
        assert found is not None  # the nonce's rotation
        return Started(found, repeated=True)
    facts: dict[str, Any] = {"batch_size": batch_size, "notify": notify}
    try:
        rotation = db.create(conn, batch_size=batch_size, notify=notify, created_by=actor.admin_id)
    except db.RotationOpen:
        open_one = db.latest(conn)
        target = open_one.id if open_one else None
        _audit(conn, actor, "rotate_keys", target, RotationRunning.reason, **facts)
        return RotationRunning(target, open_one)
    _audit(conn, actor, "rotate_keys", rotation.id, total=rotation.total, **facts, **_nonce(nonce))
    return Started(rotation)


def _nonce(nonce: str | None) -> dict[str, str]:
    return {"nonce": nonce} if nonce is not None else {}


def status(conn: Conn) -> Rotation | None:
    """The open rotation, else the latest one."""
    return db.latest(conn)


def change(conn: Conn, actor: Actor, verb: db.Verb, rotation_id: int | None = None) -> Rotation | NoRotation:
    """Pause, resume or cancel the open rotation (only if it is `rotation_id`, when given); refused
    (audited) when there is none in a status the verb applies to. A batch in progress commits first
    (the row lock): what it rotated stays rotated."""
    done = db.change_status(conn, verb, rotation_id)
    action = f"rotate_keys_{verb}"
    target = done.rotation.id if done.rotation is not None else None
    if not done.changed:
        _audit(conn, actor, action, target, NoRotation.reason)
        return NoRotation(target, done.rotation, verb)
    assert done.rotation is not None
    _audit(conn, actor, action, target, rotated=done.rotation.rotated, total=done.rotation.total)
    return done.rotation


# --- the daemon's batches ------------------------------------------------------------------------


@attrs.frozen
class Messages:
    """What a rotated user (and the admin who started the rotation, at its end) is told."""

    texts: Texts
    public_base_url: str
    default_language: str

    def user_text(self, language: str, sub_token: str) -> str:
        return self.texts.get(language, "admin.rotate.user_text", sub_url=f"{self.public_base_url}/sub/{sub_token}")

    def user_markup(self, language: str) -> dict[str, Any]:
        return keyboard([button(self.texts.get(language, "menu.subscription"), "sub")])


def user_dedupe_key(rotation_id: int, user_id: int) -> str:
    return f"key_rotation:{rotation_id}:{user_id}"


@attrs.frozen
class BatchDone:
    rotation: Rotation
    rotated: int
    notified: int


def rotate_next_batch(conn: Conn, messages: Messages) -> BatchDone | None:
    """One batch of the running rotation, in this one transaction: keys, messages, cursor. None when no
    rotation is running. The last batch (fewer subscriptions than the batch size were left) marks the
    rotation done and tells the admin who started it from the bot."""
    rotation = db.lock_running(conn)
    if rotation is None:
        return None
    batch = db.rotate_batch(conn, rotation)
    notified = 0
    if rotation.notify:
        for user in batch.rotated:
            if user.tell and outbox.enqueue(
                conn,
                user.user_id,
                messages.user_text(user.language, user.sub_token),
                dedupe_key=user_dedupe_key(rotation.id, user.user_id),
                reply_markup=messages.user_markup(user.language),
            ):
                notified += 1
    finished = batch.seen < rotation.batch_size
    after = db.advance(conn, rotation, batch, notified=notified, finished=finished)
    if finished and after.created_by > 0:
        admin = users.get_user(conn, after.created_by)
        language = admin.language if admin is not None else messages.default_language
        text = messages.texts.get(
            language, "admin.rotate.finished", id=after.id, rotated=after.rotated, notified=after.notified
        )
        outbox.enqueue(conn, after.created_by, text, dedupe_key=f"key_rotation_done:{after.id}")
    return BatchDone(after, len(batch.rotated), notified)
