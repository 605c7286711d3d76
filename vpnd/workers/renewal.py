"""Auto-renewal: charge the balance and extend, once per subscription period, before it ends.

A paid subscription with auto-renew on, a configured plan and an `expires_at` within
`[workers] renewal_window_hours` is renewed in ONE transaction: the subscription and user rows are
locked (`FOR UPDATE ... SKIP LOCKED`: a concurrent round skips them instead of waiting), an
`auto_renewals (user_id, period_end)` row claims the period, the price is debited through the
ledger (`UNIQUE (reason, reference)` with the period in the reference) and `grant_days` extends
the subscription from its current end. Two rounds racing for the same period charge once: the
row lock, the period row and the ledger key each guarantee it on their own. Each renewal is a
purchase like any other: a `purchases` row (method `balance`, paid) and its `payments` row
(`vpnd.db.payments.record_auto_renewal`), in the same transaction — so stats, CSV exports and the
user's payment history show it, and `[payments].notify_chat_id` is told of it like any payment.

A balance that does not cover the plan gets one notice per period (the period row records
`insufficient_balance`); if the user tops up before the end, the next round renews after all.

Expiry waits for this decision (`RENEWAL_PENDING`): a subscription whose renewal is still owed is
not expired, so a renewal that is about to happen always wins — for at most `RENEWAL_GRACE` past
the end, after which expiry proceeds even if renewal never came.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

import attrs
import psycopg

from vpnd.app import App
from vpnd.db import history, ledger, outbox, renewals
from vpnd.db.payments import record_auto_renewal
from vpnd.db.subscriptions import grant_days
from vpnd.money import format_money
from vpnd.texts import Texts
from vpnd.workers.common import START, BatchResult, PlanPrices, buy_button, format_date, instant_key

log = logging.getLogger("vpnd.workers.renewal")

WORKER_NAME = "renewal"

#: The ledger reason of an auto-renewal charge.
LEDGER_REASON = "auto_renew"
#: How long past its end a subscription may wait for its renewal before expiry goes ahead anyway.
RENEWAL_GRACE = dt.timedelta(days=1)


def ledger_reference(user_id: int, period_end: dt.datetime) -> str:
    return f"{user_id}:{instant_key(period_end)}"


@attrs.frozen
class RenewalSettings:
    window: dt.timedelta
    plans: PlanPrices
    currency: str
    grace: dt.timedelta = RENEWAL_GRACE
    #: `[payments].notify_chat_id` (0: none) and the language of its notices.
    notify_chat_id: int = 0
    notify_language: str = "en"

    def sql_params(self) -> dict[str, object]:
        return {"window": self.window, "grace": self.grace, **self.plans.sql_params()}


@attrs.frozen
class RenewalCounts:
    charged: int = 0
    insufficient: int = 0


def renew_batch(
    conn: psycopg.Connection[Any],
    texts: Texts,
    settings: RenewalSettings,
    after: tuple[dt.datetime, int],
    limit: int,
) -> tuple[BatchResult, RenewalCounts]:
    """One keyset batch of due renewals, all in this transaction (the rows stay locked until commit)."""
    rows = renewals.due_renewals(conn, settings.sql_params(), after, limit)
    charged = insufficient = 0
    queued = False
    for user_id, period_end, plan_code, balance, lang, reachable, price in rows:
        days = settings.plans.days_of(plan_code)
        if days is None or price is None:  # the plan left the config between statements: impossible
            continue
        period = instant_key(period_end)
        if balance < price:
            if not renewals.claim_period(conn, user_id, period_end, "insufficient_balance"):
                continue
            insufficient += 1
            log.info("event=auto_renew_insufficient user_id=%s balance=%s price=%s", user_id, balance, price)
            if reachable:
                text = texts.get(
                    lang,
                    "renewal.insufficient",
                    price=format_money(price, settings.currency),
                    balance=format_money(balance, settings.currency),
                    expires=format_date(period_end),
                )
                queued |= outbox.enqueue(
                    conn,
                    user_id,
                    text,
                    dedupe_key=f"renewal:{user_id}:{period}:insufficient",
                    reply_markup=buy_button(texts, lang),
                )
            continue
        if not renewals.claim_period(conn, user_id, period_end, "charged"):
            continue  # this period is charged already
        entry = ledger.record(conn, user_id, -price, LEDGER_REASON, ledger_reference(user_id, period_end))
        if entry is None:
            # The ledger has this period's charge but the period row did not: never charge twice,
            # never extend for free. Visible in the log; the subscription ends as it would have.
            log.error("event=auto_renew_inconsistent user_id=%s period_end=%s", user_id, period)
            continue
        sub = grant_days(conn, user_id, days, kind="paid", plan_code=plan_code)
        purchase_id = record_auto_renewal(
            conn,
            user_id,
            plan_code=plan_code,
            days=days,
            amount_minor=price,
            currency=settings.currency,
            ledger_reference=ledger_reference(user_id, period_end),
        )
        if settings.notify_chat_id:
            history.queue_payment_notice(conn, settings.notify_chat_id, texts, settings.notify_language, purchase_id)
        charged += 1
        log.info("event=auto_renewed user_id=%s plan=%s price=%s expires=%s", user_id, plan_code, price, sub.expires_at)
        if reachable:
            text = texts.get(
                lang,
                "renewal.charged",
                price=format_money(price, settings.currency),
                expires=format_date(sub.expires_at),
            )
            queued |= outbox.enqueue(conn, user_id, text, dedupe_key=f"renewal:{user_id}:{period}:charged")
    last = (rows[-1][1], rows[-1][0]) if rows else None
    result = BatchResult(len(rows), charged + insufficient, last, queued=queued, access_changed=charged > 0)
    return result, RenewalCounts(charged, insufficient)


def renewal_settings(app: App) -> RenewalSettings:
    workers = app.config.workers
    return RenewalSettings(
        window=dt.timedelta(hours=workers.renewal_window_hours),
        plans=PlanPrices.from_config(app.config),
        currency=app.config.payments.currency,
        notify_chat_id=app.config.payments.notify_chat_id,
        notify_language=app.config.telegram.default_language,
    )


async def renewal_round(app: App, texts: Texts, *, batch_size: int, settings: RenewalSettings | None = None) -> int:
    """Renew every due subscription; returns how many were charged or notified."""
    settings = settings or renewal_settings(app)
    if not settings.plans.codes:
        return 0
    after = START
    total = 0
    while True:
        result, counts = await app.db.run(renew_batch, texts, settings, after, batch_size)
        total += result.handled
        if counts.charged:
            app.metrics.auto_renewals.labels("charged").inc(counts.charged)
        if counts.insufficient:
            app.metrics.auto_renewals.labels("insufficient_balance").inc(counts.insufficient)
        if result.last is None or result.seen < batch_size:
            return total
        after = result.last
