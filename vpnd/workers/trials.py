"""Trial notifications: a check-in after the first day, "ends soon" before the end, "ended" after it.

Each is sent at most once per user (a trial is granted once, ever), only while the user has not paid
(their subscription is still of kind `trial`), and only the notice that is current: after downtime
a user past the end gets "ended", not a stale check-in as well. "Ended" shares its dedupe key with
the expiry worker's message for an expired trial, so a user gets one of the two, never both.

For short trials the marks scale down: the check-in comes after min(1 day, a third of the trial),
"ends soon" when less than min(1 day, a third of the trial) is left.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any, Literal

import psycopg

from vpnd.app import App
from vpnd.db import outbox, subscriptions
from vpnd.telegram.keyboards import Keyboard
from vpnd.texts import Texts
from vpnd.workers.common import START, BatchResult, buy_button, format_date

log = logging.getLogger("vpnd.workers.trials")

WORKER_NAME = "trials"

Notice = Literal["checkin", "ends_soon", "ended"]

MARK = dt.timedelta(days=1)
#: "Ended" is not sent for trials that ended longer ago than this (e.g. on the first deployment).
ENDED_RECENTLY = dt.timedelta(days=3)


def trial_notice(granted_at: dt.datetime, ends_at: dt.datetime, now: dt.datetime, *, paid: bool) -> Notice | None:
    """Which notice is current for a trial (None: nothing, or the user has paid)."""
    if paid:
        return None
    if now >= ends_at:
        return "ended" if now - ends_at <= ENDED_RECENTLY else None
    mark = min(MARK, (ends_at - granted_at) / 3)
    if ends_at - now <= mark:
        return "ends_soon"
    if now - granted_at >= mark:
        return "checkin"
    return None


def dedupe_key(user_id: int, notice: Notice) -> str:
    return f"trial:{user_id}:{notice}"


def render(texts: Texts, lang: str, notice: Notice, ends_at: dt.datetime, support: str) -> tuple[str, Keyboard | None]:
    if notice == "checkin":
        return texts.get(lang, "trial.checkin", expires=format_date(ends_at), support=support), None
    if notice == "ends_soon":
        return texts.get(lang, "trial.ends_soon", expires=format_date(ends_at)), buy_button(texts, lang)
    return texts.get(lang, "trial.ended"), buy_button(texts, lang)


def queue_trial_notices(
    conn: psycopg.Connection[Any], texts: Texts, support: str, after: tuple[dt.datetime, int], limit: int
) -> BatchResult:
    rows = subscriptions.due_trial_notices(conn, ENDED_RECENTLY, after, limit)
    queued = 0
    for user_id, granted_at, ends_at, lang, kind, expires_at, now in rows:
        # A trial extended by hand ends when its subscription does.
        end = max(ends_at, expires_at) if kind == "trial" and expires_at is not None else ends_at
        notice = trial_notice(granted_at, end, now, paid=kind == "paid")
        if notice is None:
            continue
        text, markup = render(texts, lang, notice, end, support)
        if outbox.enqueue(conn, user_id, text, dedupe_key=dedupe_key(user_id, notice), reply_markup=markup):
            queued += 1
    last = (rows[-1][2], rows[-1][0]) if rows else None
    return BatchResult(len(rows), queued, last, queued=queued > 0)


async def trials_round(app: App, texts: Texts, *, batch_size: int) -> int:
    after = START
    total = 0
    support = app.config.telegram.support_contact
    while True:
        result = await app.db.run(queue_trial_notices, texts, support, after, batch_size)
        total += result.handled
        if result.last is None or result.seen < batch_size:
            return total
        after = result.last
