"""Money received: `finalize_purchase`, exactly once, in one transaction on one connection.

Whatever calls it — the Crypto Pay webhook, the watcher, Telegram's successful_payment, a balance
payment — and however often, late or concurrently, the first committed call grants and every other
one sees "already paid" and changes nothing:

1. the user's row, then the purchase's row are locked (the lock order of `vpnd.db.purchases`);
   the purchase's status moves to `paid` only from pending/expired/cancelled (compare-and-set);
2. the payment is inserted; `UNIQUE (purchase_id)` and `UNIQUE (provider, provider_payment_id)`
   back the idempotency up in the database itself;
3. the amount and currency are compared with the purchase; a mismatch is recorded (outcome
   `amount_mismatch`), alerted to every admin through the outbox, and grants nothing;
4. access is extended with `grant_days` (a plan) or the balance credited through the ledger (a
   top-up) on the same connection; the promo code is consumed under its use limit; the referrer's
   reward is credited once per purchase (the ledger's `UNIQUE (reason, reference)`);
5. the user's "payment received" message is queued in the outbox with a dedupe key.

No HTTP, no second connection: the caller nudges the Xray writer and the outbox sender after the
commit (`FinalizeOutcome.access_changed` / `.notified`).
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any, Literal

import attrs
import psycopg

from vpnd.config import Config
from vpnd.db import ledger, outbox, promo
from vpnd.db.purchases import (
    MethodUnavailable,
    Purchase,
    PurchaseNotFound,
    PurchaseNotPayable,
    get_purchase,
    lock_user,
)
from vpnd.db.subscriptions import Subscription, grant_days
from vpnd.db.users import language_of
from vpnd.pricing import STARS_CURRENCY, format_money, referral_reward
from vpnd.telegram.texts import Texts

log = logging.getLogger("vpnd.payments")

Provider = Literal["cryptopay", "stars", "balance"]
FinalizeStatus = Literal[
    "granted",  # a plan's days were given
    "credited",  # a top-up reached the balance
    "already_paid",  # this same payment was finalized before: nothing changed
    "amount_mismatch",  # recorded and alerted; no access
    "duplicate_payment",  # another payment already paid this purchase (or this provider id paid another)
    "unknown_purchase",  # alerted; nothing recorded
]


@attrs.frozen
class PaymentRules:
    """The configuration finalize needs (built once from the config)."""

    referral_percent: int = 0
    admin_ids: tuple[int, ...] = ()
    #: The balance (and referral rewards) are kept in this currency.
    balance_currency: str = "USD"
    #: Messages queued for users are rendered in their language (vpnd/locales).
    texts: Texts = attrs.field(factory=Texts.load)
    default_language: str = "en"

    @classmethod
    def from_config(cls, config: Config) -> PaymentRules:
        return cls(
            config.referral.percent,
            tuple(config.telegram.admin_ids),
            config.payments.currency,
            default_language=config.telegram.default_language,
        )

    def text(self, conn: psycopg.Connection[Any], recipient: int, key: str, /, **values: object) -> str:
        """`key` rendered in the language of user `recipient` (values are HTML-escaped)."""
        return self.texts.get(language_of(conn, recipient, self.default_language), key, **values)


@attrs.frozen
class FinalizeOutcome:
    status: FinalizeStatus
    purchase_id: int
    user_id: int | None = None
    paid_late: bool = False
    #: The subscription after a plan was granted.
    subscription: Subscription | None = None
    #: The balance after a top-up was credited.
    balance_minor: int | None = None
    referral_reward_minor: int = 0
    promo_consumed: bool = False
    #: Outbox rows were queued (nudge the outbox sender after commit).
    notified: bool = False

    @property
    def applied(self) -> bool:
        """This call was the one that finalized the purchase (granted or credited)."""
        return self.status in ("granted", "credited")

    @property
    def access_changed(self) -> bool:
        """Who may connect changed (nudge the Xray writer after commit)."""
        return self.status == "granted"


@attrs.frozen
class _Payment:
    provider: str
    provider_payment_id: str
    outcome: str
    purchase_id: int


def _fmt_date(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _alert_admins(conn: psycopg.Connection[Any], rules: PaymentRules, kind: str, key: str, **fields: object) -> bool:
    queued = False
    for admin_id in rules.admin_ids:
        text = rules.text(conn, admin_id, f"admin.{kind}", **fields)
        queued |= outbox.enqueue(conn, admin_id, text, dedupe_key=f"alert:{kind}:{key}:{admin_id}")
    log.warning("event=payment_%s %s", kind, " ".join(f"{k}={v}" for k, v in fields.items()))
    return queued


def _payment_for_purchase(conn: psycopg.Connection[Any], purchase_id: int) -> _Payment | None:
    row = conn.execute(
        "SELECT provider, provider_payment_id, outcome, purchase_id FROM payments WHERE purchase_id = %s",
        (purchase_id,),
    ).fetchone()
    return _Payment(*row) if row else None


def _payment_by_provider_id(conn: psycopg.Connection[Any], provider: str, provider_payment_id: str) -> _Payment | None:
    row = conn.execute(
        "SELECT provider, provider_payment_id, outcome, purchase_id FROM payments "
        "WHERE provider = %s AND provider_payment_id = %s",
        (provider, provider_payment_id),
    ).fetchone()
    return _Payment(*row) if row else None


def _expected(purchase: Purchase, provider: str) -> tuple[int | None, str]:
    """What this purchase must be paid with through `provider` (Stars: the Stars amount, in XTR)."""
    if provider != purchase.method:
        return None, ""
    if provider == "stars":
        return purchase.stars, STARS_CURRENCY
    return purchase.amount_minor, purchase.currency


def finalize_purchase(
    conn: psycopg.Connection[Any],
    purchase_id: int,
    *,
    provider: Provider,
    provider_payment_id: str,
    amount_minor: int,
    currency: str,
    rules: PaymentRules,
) -> FinalizeOutcome:
    """Record a payment received for `purchase_id` and give what was bought, exactly once.

    `amount_minor`/`currency` are what the provider says was paid (Stars: the number of Stars and
    "XTR"). Run it as the whole of a transaction (`await db.run(finalize_purchase, ...)`), or as the
    last step of one (`pay_from_balance`). See the module docstring for the steps.
    """
    received = format_money(amount_minor, currency)
    owner = conn.execute("SELECT user_id FROM purchases WHERE id = %s", (purchase_id,)).fetchone()
    if owner is None:
        notified = _alert_admins(
            conn, rules, "payment_unknown", f"{provider}:{provider_payment_id}",
            purchase_id=purchase_id, received=received, provider=provider, provider_payment_id=provider_payment_id,
        )  # fmt: skip
        return FinalizeOutcome("unknown_purchase", purchase_id, notified=notified)
    user_id = int(owner[0])
    lock_user(conn, user_id)
    purchase = get_purchase(conn, purchase_id, lock=True)
    assert purchase is not None  # purchases are never deleted

    earlier = _payment_for_purchase(conn, purchase_id)
    if earlier is not None and (earlier.provider, earlier.provider_payment_id) == (provider, provider_payment_id):
        return FinalizeOutcome("already_paid", purchase_id, user_id, purchase.paid_late)
    if earlier is None:
        earlier = _payment_by_provider_id(conn, provider, provider_payment_id)
    if earlier is not None:
        notified = _alert_admins(
            conn, rules, "payment_duplicate", f"{provider}:{provider_payment_id}",
            purchase_id=purchase_id, user_id=user_id, received=received, provider=provider,
            provider_payment_id=provider_payment_id,
            first=f"{earlier.provider} {earlier.provider_payment_id} (purchase #{earlier.purchase_id})",
        )  # fmt: skip
        return FinalizeOutcome("duplicate_payment", purchase_id, user_id, notified=notified)

    now = _now(conn)
    paid_late = purchase.status != "pending" or purchase.expires_at <= now
    expected_amount, expected_currency = _expected(purchase, provider)
    matches = expected_amount == amount_minor and expected_currency.upper() == currency.upper()
    conn.execute(
        "UPDATE purchases SET status = 'paid', paid_at = now(), paid_late = %s WHERE id = %s",
        (paid_late, purchase_id),
    )
    conn.execute(
        "INSERT INTO payments (purchase_id, user_id, provider, provider_payment_id, amount_minor, currency, outcome) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s)",
        (purchase_id, user_id, provider, provider_payment_id, amount_minor, currency,
         "granted" if matches else "amount_mismatch"),
    )  # fmt: skip

    if not matches:
        expected = (
            format_money(expected_amount, expected_currency) if expected_amount is not None else f"a {purchase.method}"
        )
        _alert_admins(
            conn, rules, "payment_mismatch", f"{provider}:{provider_payment_id}",
            purchase_id=purchase_id, user_id=user_id, expected=expected, received=received, provider=provider,
            provider_payment_id=provider_payment_id,
        )  # fmt: skip
        mismatch_text = rules.text(conn, user_id, "payments.mismatch_user")
        outbox.enqueue(conn, user_id, mismatch_text, dedupe_key=f"payment:{purchase_id}")
        return FinalizeOutcome("amount_mismatch", purchase_id, user_id, paid_late, notified=True)

    paid = format_money(purchase.amount_minor, purchase.currency)
    if provider == "stars":
        paid = format_money(amount_minor, currency)
    subscription: Subscription | None = None
    balance: int | None = None
    if purchase.kind == "plan":
        if not purchase.days:
            raise ValueError(f"purchase {purchase_id} is a plan without days")
        subscription = grant_days(conn, user_id, purchase.days, kind="paid", plan_code=purchase.plan_code)
        text = rules.text(
            conn,
            user_id,
            "payments.received_plan",
            amount=paid,
            days=purchase.days,
            expires=_fmt_date(subscription.expires_at),
        )
    else:
        ledger.record(conn, user_id, purchase.amount_minor, ledger.TOPUP, ledger.purchase_reference(purchase_id))
        balance = ledger.balance_of(conn, user_id)
        text = rules.text(
            conn, user_id, "payments.received_topup", amount=paid, balance=format_money(balance, purchase.currency)
        )
    if paid_late:
        text += "\n" + rules.text(conn, user_id, "payments.received_late")

    reward = 0
    if purchase.kind == "plan":
        reward = _reward_referrer(conn, purchase, rules)
    consumed = False
    if purchase.promo_code:
        consumed = promo.consume(conn, purchase.promo_code, user_id, purchase_id)
        if not consumed:
            log.warning(
                "event=promo_not_consumed purchase_id=%s code=%s (limit reached or used; granted anyway)",
                purchase_id,
                purchase.promo_code,
            )
    outbox.enqueue(conn, user_id, text, dedupe_key=f"payment:{purchase_id}")
    return FinalizeOutcome(
        "granted" if purchase.kind == "plan" else "credited",
        purchase_id,
        user_id,
        paid_late,
        subscription=subscription,
        balance_minor=balance,
        referral_reward_minor=reward,
        promo_consumed=consumed,
        notified=True,
    )


def _now(conn: psycopg.Connection[Any]) -> dt.datetime:
    row = conn.execute("SELECT now()").fetchone()
    assert row is not None
    value: dt.datetime = row[0]
    return value


def _reward_referrer(conn: psycopg.Connection[Any], purchase: Purchase, rules: PaymentRules) -> int:
    """Credit the referrer's share of a plan purchase, once per purchase; return the reward."""
    if rules.referral_percent <= 0 or purchase.currency.upper() != rules.balance_currency.upper():
        return 0
    row = conn.execute("SELECT referred_by FROM users WHERE id = %s", (purchase.user_id,)).fetchone()
    referrer = row[0] if row else None
    reward = referral_reward(purchase.amount_minor, rules.referral_percent)
    if referrer is None or reward <= 0:
        return 0
    entry = ledger.record(conn, int(referrer), reward, ledger.REFERRAL_REWARD, ledger.purchase_reference(purchase.id))
    if entry is None:
        return 0
    outbox.enqueue(
        conn,
        int(referrer),
        rules.text(conn, int(referrer), "payments.referral_reward", amount=format_money(reward, purchase.currency)),
        dedupe_key=f"referral_reward:{purchase.id}",
    )
    return reward


def pay_from_balance(
    conn: psycopg.Connection[Any], user_id: int, purchase_id: int, *, rules: PaymentRules
) -> FinalizeOutcome:
    """Pay a pending `balance` purchase from the user's balance, in the caller's transaction.

    With the user's row locked: the purchase must be this user's, a plan, pending and unexpired, in
    the balance currency; the debit goes through the ledger (reason `purchase`, reference
    `purchase:<id>`), then `finalize_purchase` grants. Raises (and so rolls back everything):
    PurchaseNotFound, PurchaseNotPayable, MethodUnavailable, ledger.InsufficientBalance.
    """
    lock_user(conn, user_id)
    purchase = get_purchase(conn, purchase_id, lock=True)
    if purchase is None or purchase.user_id != user_id:
        raise PurchaseNotFound(purchase_id)
    if purchase.status == "paid":
        raise PurchaseNotPayable("payments.already_paid")
    if purchase.method != "balance" or purchase.kind != "plan":
        raise PurchaseNotPayable("payments.wrong_method")
    if not purchase.is_payable(_now(conn)):
        raise PurchaseNotPayable("payments.expired")
    if purchase.currency.upper() != rules.balance_currency.upper():
        raise MethodUnavailable("the plan is priced in another currency than the balance")
    reference = ledger.purchase_reference(purchase_id)
    if ledger.record(conn, user_id, -purchase.amount_minor, ledger.PURCHASE, reference) is None:
        raise PurchaseNotPayable("payments.already_paid")
    return finalize_purchase(
        conn,
        purchase_id,
        provider="balance",
        provider_payment_id=reference,
        amount_minor=purchase.amount_minor,
        currency=purchase.currency,
        rules=rules,
    )


@attrs.frozen
class PaymentRecord:
    id: int
    purchase_id: int
    user_id: int
    provider: str
    provider_payment_id: str
    amount_minor: int
    currency: str
    outcome: str
    created_at: dt.datetime


def payments_of(
    conn: psycopg.Connection[Any], user_id: int, *, before_id: int | None = None, limit: int = 20
) -> list[PaymentRecord]:
    """A user's payments, newest first, in keyset pages (for admin lookup)."""
    rows = conn.execute(
        "SELECT id, purchase_id, user_id, provider, provider_payment_id, amount_minor, currency, outcome, created_at "
        "FROM payments WHERE user_id = %s AND id < %s ORDER BY id DESC LIMIT %s",
        (user_id, before_id if before_id is not None else 2**63 - 1, limit),
    ).fetchall()
    return [PaymentRecord(*row) for row in rows]


def stars_charge(conn: psycopg.Connection[Any], purchase_id: int) -> tuple[int, str] | None:
    """(user_id, telegram_payment_charge_id) of a purchase paid with Stars — what refundStarPayment needs."""
    row = conn.execute(
        "SELECT user_id, provider_payment_id FROM payments WHERE purchase_id = %s AND provider = 'stars'",
        (purchase_id,),
    ).fetchone()
    return (int(row[0]), str(row[1])) if row else None


def mark_refunded(conn: psycopg.Connection[Any], purchase_id: int) -> bool:
    """Record that the payment of a purchase was refunded (after refundStarPayment succeeded)."""
    row = conn.execute(
        "UPDATE payments SET outcome = 'refunded' WHERE purchase_id = %s AND outcome <> 'refunded' RETURNING id",
        (purchase_id,),
    ).fetchone()
    return row is not None
