"""Reminders before a paid subscription ends: 3 days, 1 day and 3 hours before `expires_at`.

One message per stage per expiry date: the dedupe key holds the user, the exact `expires_at` and the
stage, so a second round (or a restart mid-round) queues nothing new, and a renewal — a new
`expires_at` — re-arms all three. A subscription is reminded only of the closest stage it is in (one
bought for 20 hours gets the 1-day reminder, not the 3-day one as well; after downtime only the
stage that is current is sent).
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

import attrs
import psycopg

from vpnd.app import App
from vpnd.db import outbox, subscriptions
from vpnd.texts import Texts
from vpnd.workers.common import START, BatchResult, format_date, instant_key, renew_button

log = logging.getLogger("vpnd.workers.reminders")

WORKER_NAME = "reminders"


@attrs.frozen
class Stage:
    code: str
    before: dt.timedelta


#: Closest first: a subscription is in the first stage whose horizon covers its time left.
STAGES: tuple[Stage, ...] = (
    Stage("3h", dt.timedelta(hours=3)),
    Stage("1d", dt.timedelta(days=1)),
    Stage("3d", dt.timedelta(days=3)),
)
HORIZON = STAGES[-1].before


def reminder_stage(time_left: dt.timedelta) -> Stage | None:
    """The stage a subscription with `time_left` is in (None: ended already, or too far out)."""
    if time_left <= dt.timedelta(0):
        return None
    for stage in STAGES:
        if time_left <= stage.before:
            return stage
    return None


def dedupe_key(user_id: int, expires_at: dt.datetime, stage: Stage) -> str:
    return f"reminder:{user_id}:{instant_key(expires_at)}:{stage.code}"


def queue_reminders(
    conn: psycopg.Connection[Any], texts: Texts, after: tuple[dt.datetime, int], limit: int
) -> BatchResult:
    """One keyset batch: queue the due reminder of each subscription (a no-op when already queued)."""
    rows = subscriptions.due_reminders(conn, HORIZON, after, limit)
    queued = 0
    for user_id, expires_at, auto_renew, lang, now in rows:
        stage = reminder_stage(expires_at - now)
        if stage is None:
            continue
        text = texts.get(lang, f"reminder.{stage.code}", expires=format_date(expires_at))
        if auto_renew:
            text += "\n" + texts.get(lang, "reminder.auto_renew_on")
        key = dedupe_key(user_id, expires_at, stage)
        if outbox.enqueue(conn, user_id, text, dedupe_key=key, reply_markup=renew_button(texts, lang)):
            queued += 1
    last = (rows[-1][1], rows[-1][0]) if rows else None
    return BatchResult(len(rows), queued, last, queued=queued > 0)


async def reminders_round(app: App, texts: Texts, *, batch_size: int) -> int:
    """Queue every due reminder; returns how many were queued. Each batch's commit wakes the sender."""
    after = START
    total = 0
    while True:
        result = await app.db.run(queue_reminders, texts, after, batch_size)
        total += result.handled
        if result.last is None or result.seen < batch_size:
            return total
        after = result.last
