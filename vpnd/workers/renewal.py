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

A user who consented to keep their card (a YooKassa payment with `save_payment_method`) is charged
on the card first, without them (`renew_by_card`): a purchase row and the period's `card_pending`
decision are committed first, in their own transaction; then the provider is asked to charge the
saved method with an idempotence key of (user, period), so a retry, a second worker or a restart
after kill -9 gets the first charge back, never a second one; the payment is then settled by the
ordinary finalize path (the checkout watcher and the notification are the backstop). A declined
charge marks the period `card_failed`, and the balance renewal below takes it as if no card were
saved (then its insufficient-balance notice, then the reminders).

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
from vpnd.config import PaymentsConfig
from vpnd.db import checkout as checkout_db
from vpnd.db import history, ledger, outbox, purchases, renewals
from vpnd.db.payments import record_auto_renewal
from vpnd.db.purchases import Purchase
from vpnd.db.subscriptions import grant_days
from vpnd.money import format_money
from vpnd.payments.checkout import CheckoutError, HostedCheckout, settle_checkout_payment
from vpnd.pricing import InvalidAmount, Offer, min_price_minor, plan_offer
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


# --- by a saved card ------------------------------------------------------------------------


@attrs.frozen
class CardCharge:
    """A period to charge to the user's saved card, and the purchase that records it."""

    user_id: int
    period_end: dt.datetime
    purchase: Purchase
    method_id: str

    @property
    def key(self) -> str:
        """The idempotence key: one per (user, period), so the provider makes one charge whatever retries."""
        return f"vpnd-renew-{self.user_id}-{instant_key(self.period_end)}"


def card_offers(app: App) -> dict[str, Offer]:
    """Each plan at its price in the checkout's currency (plans not sold in it are left to the balance)."""
    offers = {}
    for plan in app.config.plans:
        if plan.trial:
            continue
        try:
            offers[plan.code] = plan_offer(plan, app.config.yookassa.currency)
        except InvalidAmount:
            continue
    return offers


def begin_card_batch(
    conn: psycopg.Connection[Any],
    settings: RenewalSettings,
    provider: str,
    offers: dict[str, Offer],
    payments: PaymentsConfig,
    after: tuple[dt.datetime, int],
    limit: int,
) -> tuple[list[CardCharge], tuple[dt.datetime, int] | None, int]:
    """Claim a batch of periods for their saved cards (a purchase each), committed before any charge.

    A period claimed earlier whose charge never finished (a crash, a provider outage) comes back
    with its purchase, to be charged again with the same key.
    """
    params = {**settings.sql_params(), "provider": provider}
    rows = renewals.due_card_renewals(conn, params, after, limit)
    charges = []
    for user_id, period_end, plan_code, method_id, purchase_id in rows:
        purchase = purchases.get_purchase(conn, purchase_id) if purchase_id is not None else None
        if purchase is None:
            offer = offers.get(plan_code)
            if offer is None:
                continue
            purchase = purchases.create_purchase(
                conn, user_id, offer, method="yookassa", ttl_minutes=payments.purchase_ttl_minutes,
                min_price_minor=min_price_minor(payments, offer.currency), use_promo=False,
            )  # fmt: skip
            renewals.claim_card_period(conn, user_id, period_end, purchase.id)
        charges.append(CardCharge(user_id, period_end, purchase, method_id))
    last = (rows[-1][1], rows[-1][0]) if rows else None
    return charges, last, len(rows)


def _card_failed(conn: psycopg.Connection[Any], charge: CardCharge) -> None:
    purchases.expire_purchase(conn, charge.purchase.id, status="cancelled")
    renewals.settle_card_period(conn, charge.user_id, charge.period_end, "card_failed")


async def charge_card(app: App, checkout: HostedCheckout, charge: CardCharge) -> str:
    """Charge one claimed period to the saved card and settle it: "charged", "card_failed" or "pending"."""
    try:
        payment = await checkout.charge(
            charge.purchase, saved_method_id=charge.method_id, description=f"Auto-renewal {charge.purchase.plan_code}",
            key=charge.key,
        )  # fmt: skip
    except CheckoutError as exc:
        log.warning("event=card_renew_failed user_id=%s transient=%s error=%s", charge.user_id, exc.transient, exc)
        if exc.transient:
            return "pending"  # the next round asks again, with the same key
        await app.db.run(_card_failed, charge)
        return "card_failed"
    await app.db.run(checkout_db.attach_checkout, charge.purchase.id, checkout.name, payment.payment_id, None)
    try:
        result = await settle_checkout_payment(app, checkout, payment.payment_id)
    except CheckoutError:
        return "pending"  # the watcher settles it
    if result in ("granted", "already_paid"):
        await app.db.run(renewals.settle_card_period, charge.user_id, charge.period_end, "charged")
        log.info("event=card_renewed user_id=%s purchase_id=%s", charge.user_id, charge.purchase.id)
        return "charged"
    if payment.status == "canceled":  # declined (a notification may have settled it first: result "unknown")
        await app.db.run(_card_failed, charge)
        log.info("event=card_renew_declined user_id=%s purchase_id=%s", charge.user_id, charge.purchase.id)
        return "card_failed"
    return "pending"


async def renew_by_card(app: App, checkout: HostedCheckout, settings: RenewalSettings, *, batch_size: int) -> int:
    """Charge every due period to its saved card; how many were charged."""
    offers = card_offers(app)
    after = START
    charged = 0
    while True:
        charges, last, seen = await app.db.run(
            begin_card_batch, settings, checkout.name, offers, app.config.payments, after, batch_size
        )
        for charge in charges:
            outcome = await charge_card(app, checkout, charge)
            app.metrics.auto_renewals.labels(outcome if outcome == "card_failed" else f"card_{outcome}").inc()
            charged += outcome == "charged"
        if last is None or seen < batch_size:
            return charged
        after = last


async def renewal_round(
    app: App,
    texts: Texts,
    *,
    batch_size: int,
    settings: RenewalSettings | None = None,
    checkout: HostedCheckout | None = None,
) -> int:
    """Renew every due subscription (saved cards first, then balances); how many were charged or notified."""
    settings = settings or renewal_settings(app)
    if not settings.plans.codes:
        return 0
    total = 0
    if checkout is not None:
        total += await renew_by_card(app, checkout, settings, batch_size=batch_size)
    after = START
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
