"""Purchases: the intent to pay for a plan or a balance top-up, by one method, at one price.

A purchase is created `pending` with an expiry (`[payments].purchase_ttl_minutes`); creating one
expires the user's older pending purchases and marks them `superseded_by` the new one, so a user has
at most one payable purchase (the user's row lock serializes this); after commit the service deletes
the superseded invoices at the provider (`superseded_invoice_ids`). It then becomes `paid` exactly
once (`vpnd.db.payments.finalize_purchase`), or `expired` / `cancelled`. A payment that arrives for
an expired or cancelled purchase still gives what it paid for (the money was taken) and is flagged
`paid_late` — though never at a promo discount that was superseded or used up (see finalize).

Lock order, everywhere in payments: the user's row, then the purchase's, then the referrer's user
row, then the promo code's. Follow it in any new transaction that touches these rows.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

import attrs
import psycopg
from psycopg.rows import class_row

from vpnd.db import promo
from vpnd.db.rows import one
from vpnd.money import STARS_CURRENCY
from vpnd.pricing import Offer, Price, UpgradeTerms, price_offer, upgrade_terms

Method = Literal["cryptopay", "stars", "balance", "card", "yookassa"]
PurchaseStatus = Literal["pending", "paid", "expired", "cancelled"]


# --- domain errors (mapped to user text at the edge by their `reason_key`) ---------------------


class PaymentError(Exception):
    """A payment request that cannot proceed; nothing was changed. `reason_key` is a locale key."""

    reason_key = "payments.error"


class UnknownUser(PaymentError):
    reason_key = "payments.unknown_user"


class UnknownPlan(PaymentError):
    reason_key = "payments.unknown_plan"


class MethodUnavailable(PaymentError):
    """The method cannot pay for this (no Stars price, top-up by Stars, other currency than the balance)."""

    reason_key = "payments.method_unavailable"


class PurchaseNotFound(PaymentError):
    reason_key = "payments.purchase_not_found"


class PurchaseNotPayable(PaymentError):
    """The purchase is no longer pending (paid, expired, cancelled) or is not for this method."""

    def __init__(self, reason_key: str) -> None:
        super().__init__(reason_key)
        self.reason_key = reason_key


class UpgradeNotOffered(PaymentError):
    """The unused part of the running plan is worth the new plan's price (down to the floor) or more."""

    reason_key = "buy.upgrade_not_offered"


class PackNotAvailable(PaymentError):
    """A traffic pack for a user whose active plan has no traffic quota (or who has no active plan)."""

    reason_key = "packs.no_quota"


class ProviderUnavailable(PaymentError):
    """The payment provider refused or failed to create an invoice."""

    reason_key = "payments.provider_unavailable"


# --- values -----------------------------------------------------------------------------------


@attrs.frozen
class Purchase:
    id: int
    user_id: int
    kind: str
    plan_code: str | None
    days: int | None
    method: str
    amount_minor: int
    currency: str
    stars: int | None
    promo_code: str | None
    discount_percent: int
    status: str
    invoice_id: int | None
    invoice_url: str | None
    created_at: dt.datetime
    expires_at: dt.datetime
    paid_at: dt.datetime | None
    paid_late: bool
    #: The price before any promo discount (None only for old discounted purchases).
    list_amount_minor: int | None = None
    #: The newer purchase that expired this one.
    superseded_by: int | None = None
    #: A pro-rata upgrade: the plan it replaces (None: not an upgrade), the credit for that plan's
    #: unused part (this purchase's currency; Stars for a Stars purchase), and that plan's end then.
    upgrade_from: str | None = None
    upgrade_credit_minor: int = 0
    upgrade_basis_expires_at: dt.datetime | None = None
    #: A traffic pack's bytes.
    pack_bytes: int | None = None

    def is_payable(self, now: dt.datetime) -> bool:
        return self.status == "pending" and self.expires_at > now


@attrs.frozen
class InvoiceRef:
    """A purchase the Crypto Pay watcher asks about."""

    purchase_id: int
    invoice_id: int
    expires_at: dt.datetime


PURCHASE_COLUMNS = (
    "id, user_id, kind, plan_code, days, method, amount_minor, currency, stars, promo_code, discount_percent, "
    "status, invoice_id, invoice_url, created_at, expires_at, paid_at, paid_late, list_amount_minor, superseded_by, "
    "upgrade_from, upgrade_credit_minor, upgrade_basis_expires_at, pack_bytes"
)


@attrs.frozen
class UpgradeBasis:
    """A user's running paid plan and its last payment: what a pro-rata upgrade credits."""

    plan_code: str
    expires_at: dt.datetime
    now: dt.datetime
    #: What the last purchase of the plan was paid (plus the credit it carried, when it was itself an
    #: upgrade: the value it bought), in `paid_currency` ("XTR": Stars).
    paid_minor: int
    paid_currency: str
    #: The days that purchase gave.
    paid_days: int

    @property
    def remaining_seconds(self) -> int:
        return (self.expires_at - self.now) // dt.timedelta(seconds=1)

    def terms(self, price_minor: int, currency: str, floor_minor: int) -> UpgradeTerms | None:
        return upgrade_terms(
            paid_minor=self.paid_minor, paid_currency=self.paid_currency, paid_days=self.paid_days,
            remaining_seconds=self.remaining_seconds, price_minor=price_minor, currency=currency,
            floor_minor=floor_minor,
        )  # fmt: skip


UPGRADE_BASIS = """
SELECT s.plan_code, s.expires_at, now(), p.amount_minor + CASE WHEN pu.upgrade_from IS NOT NULL
       THEN pu.upgrade_credit_minor ELSE 0 END, p.currency, p.granted_days
FROM subscriptions s
JOIN purchases pu ON pu.user_id = s.user_id AND pu.kind = 'plan' AND pu.plan_code = s.plan_code AND pu.status = 'paid'
JOIN payments p ON p.purchase_id = pu.id AND p.outcome = 'granted' AND p.granted_days > 0
WHERE s.user_id = %s AND s.kind = 'paid' AND s.status = 'active' AND s.expires_at > now()
ORDER BY p.id DESC
LIMIT 1
"""


def upgrade_basis(conn: psycopg.Connection[Any], user_id: int) -> UpgradeBasis | None:
    """The user's running paid plan and its last granted payment (None: no active paid plan, or it was
    not bought — an admin's grant credits nothing)."""
    row = conn.execute(UPGRADE_BASIS, (user_id,)).fetchone()
    return UpgradeBasis(*row) if row is not None else None


# --- verbs ------------------------------------------------------------------------------------


def lock_user(conn: psycopg.Connection[Any], user_id: int) -> str | None:
    """Take the user's row lock (first in the lock order); return their remembered promo code."""
    row = conn.execute("SELECT pending_promo_code FROM users WHERE id = %s FOR UPDATE", (user_id,)).fetchone()
    if row is None:
        raise UnknownUser(user_id)
    return row[0] if row[0] else None


def create_purchase(
    conn: psycopg.Connection[Any],
    user_id: int,
    offer: Offer,
    *,
    method: Method,
    ttl_minutes: int,
    min_price_minor: int,
    use_promo: bool = True,
) -> Purchase:
    """A new pending purchase of `offer`; the user's older pending purchases are expired.

    The user's remembered promo code discounts a plan when `reserve_discount` allows it; the
    price never goes below `min_price_minor`. Stars need the offer's Stars price.

    A plan other than the user's running paid plan is a pro-rata *upgrade* when that plan's last
    payment was in the currency this purchase is paid in (Stars for `stars`): the price is less the
    credit for the unused part (`vpnd.pricing.upgrade_terms`, on the database's clock), the purchase
    records the credit and the running plan's end (finalize re-checks it), and no promo code applies.
    Raises UpgradeNotOffered when the credit covers the whole price down to the floor.
    """
    if method == "stars" and (offer.kind == "topup" or not offer.stars):
        raise MethodUnavailable("this cannot be bought with Telegram Stars")
    if method in ("balance", "card") and offer.kind == "topup":
        raise MethodUnavailable("the balance cannot top up itself")
    remembered = lock_user(conn, user_id)
    basis = upgrade_basis(conn, user_id) if offer.kind == "plan" else None
    terms: UpgradeTerms | None = None
    if basis is not None and basis.plan_code != offer.plan_code:
        if method == "stars":
            assert offer.stars is not None
            terms = basis.terms(offer.stars, STARS_CURRENCY, 1)
        else:
            terms = basis.terms(offer.price_minor, offer.currency, min_price_minor)
        if terms is not None and terms.price_minor is None:
            raise UpgradeNotOffered(offer.plan_code)
    superseded = [
        int(row[0])
        for row in conn.execute(
            "UPDATE purchases SET status = 'expired' WHERE user_id = %s AND status = 'pending' RETURNING id",
            (user_id,),
        )
    ]
    percent = off = 0
    code: str | None = None
    if use_promo and remembered and offer.kind == "plan" and terms is None:
        check = promo.reserve_discount(conn, user_id, remembered)
        if check.ok and check.promo is not None:
            percent, off = check.promo.discount_for(offer.plan_code, offer.currency)
            code = check.promo.code if percent or off else None  # another plan: the code stays remembered
    price = price_offer(offer, percent, min_price_minor, amount_off_minor=off)
    if terms is not None:
        assert terms.price_minor is not None
        if method == "stars":  # the fiat price stays the list price: the Stars pay for it
            price = Price(offer.price_minor, offer.currency, 0, terms.price_minor)
        else:
            price = Price(terms.price_minor, offer.currency, 0, None)
    with conn.cursor(row_factory=class_row(Purchase)) as cur:
        purchase: Purchase = one(
            cur.execute(
                f"""
                INSERT INTO purchases (user_id, kind, plan_code, days, method, amount_minor, currency, stars,
                                       promo_code, discount_percent, expires_at, list_amount_minor,
                                       upgrade_from, upgrade_credit_minor, upgrade_basis_expires_at, pack_bytes)
                VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, now() + %s * interval '1 minute', %s,
                        %s, %s, %s, %s)
                RETURNING {PURCHASE_COLUMNS}
                """,
                (
                    user_id,
                    offer.kind,
                    offer.plan_code,
                    offer.days,
                    method,
                    price.amount_minor,
                    price.currency,
                    price.stars if method == "stars" else None,
                    code,
                    price.discount_percent,
                    ttl_minutes,
                    offer.price_minor,
                    basis.plan_code if terms is not None and basis is not None else None,
                    terms.credit_minor if terms is not None else 0,
                    basis.expires_at if terms is not None and basis is not None else None,
                    offer.pack_bytes if offer.kind == "pack" else None,
                ),
            )
        )
    if superseded:
        conn.execute("UPDATE purchases SET superseded_by = %s WHERE id = ANY(%s)", (purchase.id, superseded))
    return purchase


def superseded_invoice_ids(conn: psycopg.Connection[Any], purchase_id: int, *, limit: int = 100) -> list[int]:
    """Invoices of the purchases that `purchase_id` superseded (to delete at the provider after commit)."""
    rows = conn.execute(
        "SELECT invoice_id FROM purchases WHERE superseded_by = %s AND invoice_id IS NOT NULL AND status = 'expired' "
        "ORDER BY id LIMIT %s",
        (purchase_id, limit),
    ).fetchall()
    return [int(r[0]) for r in rows]


def get_purchase(conn: psycopg.Connection[Any], purchase_id: int, *, lock: bool = False) -> Purchase | None:
    with conn.cursor(row_factory=class_row(Purchase)) as cur:
        return cur.execute(
            f"SELECT {PURCHASE_COLUMNS} FROM purchases WHERE id = %s" + (" FOR UPDATE" if lock else ""),
            (purchase_id,),
        ).fetchone()


def get_purchase_at_now(conn: psycopg.Connection[Any], purchase_id: int) -> tuple[Purchase | None, dt.datetime]:
    """The purchase and the database's `now()`: whether it is still payable is judged on the DB's clock."""
    row = conn.execute("SELECT now()").fetchone()
    assert row is not None
    return get_purchase(conn, purchase_id), row[0]


def get_by_invoice(conn: psycopg.Connection[Any], invoice_id: int) -> Purchase | None:
    with conn.cursor(row_factory=class_row(Purchase)) as cur:
        return cur.execute(f"SELECT {PURCHASE_COLUMNS} FROM purchases WHERE invoice_id = %s", (invoice_id,)).fetchone()


def attach_invoice(conn: psycopg.Connection[Any], purchase_id: int, invoice_id: int, invoice_url: str) -> str | None:
    """Remember the provider's invoice (once; whatever the purchase's status, so a late payment matches).

    Returns the purchase's status then (None if the invoice was not attached): anything but `pending`
    means a newer purchase superseded this one while its invoice was being created.
    """
    row = conn.execute(
        "UPDATE purchases SET invoice_id = %s, invoice_url = %s WHERE id = %s AND invoice_id IS NULL RETURNING status",
        (invoice_id, invoice_url, purchase_id),
    ).fetchone()
    return str(row[0]) if row is not None else None


def expire_purchase(
    conn: psycopg.Connection[Any], purchase_id: int, *, status: Literal["expired", "cancelled"] = "expired"
) -> bool:
    """Compare-and-set pending → expired (or cancelled); False if it was no longer pending."""
    row = conn.execute(
        "UPDATE purchases SET status = %s WHERE id = %s AND status = 'pending' RETURNING id", (status, purchase_id)
    ).fetchone()
    return row is not None


def pending_invoices(conn: psycopg.Connection[Any], *, after_id: int = 0, limit: int = 100) -> list[InvoiceRef]:
    """Pending purchases with a Crypto Pay invoice, in id order after `after_id` (a keyset page)."""
    rows = conn.execute(
        "SELECT id, invoice_id, expires_at FROM purchases WHERE status = 'pending' AND invoice_id IS NOT NULL "
        "AND id > %s ORDER BY id LIMIT %s",
        (after_id, limit),
    ).fetchall()
    return [InvoiceRef(int(r[0]), int(r[1]), r[2]) for r in rows]


def superseded_invoices(
    conn: psycopg.Connection[Any], *, after_id: int = 0, limit: int = 100, grace_seconds: int = 600
) -> list[InvoiceRef]:
    """Expired purchases whose invoice may still be payable (expired early by a newer purchase).

    Crypto Pay keeps such an invoice open until the purchase's own `expires_at`; if it is paid and
    the webhook is lost, only the watcher can notice. (Index suggestion in the payments report:
    `ON purchases (expires_at) WHERE status = 'expired' AND invoice_id IS NOT NULL`.)
    """
    rows = conn.execute(
        "SELECT id, invoice_id, expires_at FROM purchases WHERE status = 'expired' AND invoice_id IS NOT NULL "
        "AND expires_at > now() - %s * interval '1 second' AND id > %s ORDER BY id LIMIT %s",
        (grace_seconds, after_id, limit),
    ).fetchall()
    return [InvoiceRef(int(r[0]), int(r[1]), r[2]) for r in rows]


def expire_stale(conn: psycopg.Connection[Any], *, limit: int = 500) -> int:
    """Expire up to `limit` pending purchases past their expiry that have no invoice to ask about.

    (Those with a Crypto Pay invoice are expired by the watcher once Crypto Pay says so, because
    their invoice may have been paid at the last moment.)
    """
    rows = conn.execute(
        """
        UPDATE purchases SET status = 'expired'
        WHERE id IN (SELECT id FROM purchases
                     WHERE status = 'pending' AND invoice_id IS NULL AND expires_at < now()
                     ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED)
        RETURNING id
        """,
        (limit,),
    ).fetchall()
    return len(rows)


def recent_purchases(
    conn: psycopg.Connection[Any], user_id: int, *, before_id: int | None = None, limit: int = 20
) -> list[Purchase]:
    """A user's purchases, newest first, in keyset pages."""
    with conn.cursor(row_factory=class_row(Purchase)) as cur:
        return cur.execute(
            f"SELECT {PURCHASE_COLUMNS} FROM purchases WHERE user_id = %s AND id < %s ORDER BY id DESC LIMIT %s",
            (user_id, before_id if before_id is not None else 2**63 - 1, limit),
        ).fetchall()
