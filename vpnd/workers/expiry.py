"""Expiry: active subscriptions past `expires_at` become `expired`, and the user is told.

The change is ONE statement that re-checks `status` and `expires_at` on the row it updates, so a
renewal that commits first wins (PostgreSQL re-evaluates the condition on the newest row version
after waiting for the renewal's lock). A subscription whose auto-renewal is still owed is left for
the renewal worker (`vpnd.db.renewals.RENEWAL_PENDING`). Each batch's commit wakes the Xray writer
(it re-reads who may connect) and the outbox sender for the "expired" messages (`vpnd.db.notify`).

An expired trial gets the trial worker's "trial ended" message under the same dedupe key, so a user
gets one of the two.
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
from vpnd.workers import trials
from vpnd.workers.common import START, BatchResult, PlanPrices, format_date, instant_key, renew_button
from vpnd.workers.renewal import RENEWAL_GRACE

log = logging.getLogger("vpnd.workers.expiry")

WORKER_NAME = "expiry"


@attrs.frozen
class ExpirySettings:
    plans: PlanPrices
    grace: dt.timedelta = RENEWAL_GRACE

    def sql_params(self) -> dict[str, object]:
        return {"grace": self.grace, **self.plans.sql_params()}


def dedupe_key(user_id: int, expires_at: dt.datetime) -> str:
    return f"expired:{user_id}:{instant_key(expires_at)}"


def expire_batch(
    conn: psycopg.Connection[Any], texts: Texts, settings: ExpirySettings, after: tuple[dt.datetime, int], limit: int
) -> BatchResult:
    candidates = subscriptions.expiry_candidates(conn, after, limit)
    if not candidates:
        return BatchResult(0, 0, None)
    expired = subscriptions.expire_subscriptions(conn, [c[0] for c in candidates], settings.sql_params())
    queued = False
    for user_id, kind, expires_at, lang, reachable in expired:
        log.info("event=subscription_expired user_id=%s kind=%s expires_at=%s", user_id, kind, instant_key(expires_at))
        if not reachable:
            continue
        if kind == "trial":
            text, markup = trials.render(texts, lang, "ended", expires_at, "")
            key = trials.dedupe_key(user_id, "ended")
        else:
            text = texts.get(lang, "expiry.expired", expires=format_date(expires_at))
            markup, key = renew_button(texts, lang), dedupe_key(user_id, expires_at)
        queued |= outbox.enqueue(conn, user_id, text, dedupe_key=key, reply_markup=markup)
    last = (candidates[-1][1], candidates[-1][0])
    return BatchResult(len(candidates), len(expired), last, queued=queued, access_changed=bool(expired))


async def expiry_round(app: App, texts: Texts, *, batch_size: int, settings: ExpirySettings | None = None) -> int:
    """Expire everything that is due; returns how many subscriptions were expired."""
    settings = settings or ExpirySettings(PlanPrices.from_config(app.config))
    after = START
    total = 0
    while True:
        result = await app.db.run(expire_batch, texts, settings, after, batch_size)
        total += result.handled
        if result.last is None or result.seen < batch_size:
            return total
        after = result.last
