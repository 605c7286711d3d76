"""Hosted checkout payments (YooKassa): the provider's payment behind a purchase.

One row per purchase paid on a provider's page (`checkout_payments`): the provider's payment id —
unique per provider, so a notification or a watcher round finds the purchase by it — the page the
payer is sent to, and the provider's status as last seen. The money itself is recorded by
`vpnd.db.payments.finalize_purchase`, exactly once, like every other provider's.
"""

from __future__ import annotations

from typing import Any

import attrs
import psycopg

from vpnd.db.purchases import expire_purchase


@attrs.frozen
class CheckoutRef:
    purchase_id: int
    provider: str
    payment_id: str


def attach_checkout(
    conn: psycopg.Connection[Any], purchase_id: int, provider: str, payment_id: str, confirmation_url: str | None
) -> str | None:
    """Remember the provider's payment of a purchase (once); the purchase's status then (None: not attached).

    Anything but `pending` means a newer purchase superseded this one while the payment was being created.
    """
    conn.execute(
        "INSERT INTO checkout_payments (purchase_id, provider, payment_id, confirmation_url) "
        "VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING",
        (purchase_id, provider, payment_id, confirmation_url),
    )
    row = conn.execute(
        "SELECT p.status FROM purchases p JOIN checkout_payments c ON c.purchase_id = p.id "
        "WHERE p.id = %s AND c.provider = %s AND c.payment_id = %s",
        (purchase_id, provider, payment_id),
    ).fetchone()
    return str(row[0]) if row else None


def purchase_of(conn: psycopg.Connection[Any], provider: str, payment_id: str) -> int | None:
    """The purchase a provider's payment belongs to (as we recorded it), None for a payment we never made."""
    row = conn.execute(
        "SELECT purchase_id FROM checkout_payments WHERE provider = %s AND payment_id = %s", (provider, payment_id)
    ).fetchone()
    return int(row[0]) if row else None


def checkout_of(conn: psycopg.Connection[Any], purchase_id: int) -> CheckoutRef | None:
    row = conn.execute(
        "SELECT purchase_id, provider, payment_id FROM checkout_payments WHERE purchase_id = %s", (purchase_id,)
    ).fetchone()
    return CheckoutRef(int(row[0]), str(row[1]), str(row[2])) if row else None


@attrs.frozen
class CheckoutCharge:
    """A granted hosted-checkout payment: what a refund at the provider needs."""

    user_id: int
    provider: str
    payment_id: str
    amount_minor: int
    currency: str


def granted_charge(conn: psycopg.Connection[Any], purchase_id: int) -> CheckoutCharge | None:
    row = conn.execute(
        "SELECT p.user_id, c.provider, c.payment_id, p.amount_minor, p.currency FROM payments p "
        "JOIN checkout_payments c ON c.purchase_id = p.purchase_id AND c.provider = p.provider "
        "AND c.payment_id = p.provider_payment_id WHERE p.purchase_id = %s AND p.outcome = 'granted'",
        (purchase_id,),
    ).fetchone()
    return CheckoutCharge(int(row[0]), str(row[1]), str(row[2]), int(row[3]), str(row[4])) if row else None


def pending_checkouts(
    conn: psycopg.Connection[Any], provider: str, *, after_id: int = 0, limit: int = 100
) -> list[CheckoutRef]:
    """Payments the provider has not settled as far as we know, in purchase id order after `after_id`."""
    rows = conn.execute(
        "SELECT purchase_id, provider, payment_id FROM checkout_payments "
        "WHERE status = 'pending' AND provider = %s AND purchase_id > %s ORDER BY purchase_id LIMIT %s",
        (provider, after_id, limit),
    ).fetchall()
    return [CheckoutRef(int(r[0]), str(r[1]), str(r[2])) for r in rows]


def settle_checkout(conn: psycopg.Connection[Any], purchase_id: int, status: str) -> bool:
    """The provider settled the payment (`succeeded` or `canceled`): the watcher stops asking.

    A canceled payment's pending purchase is expired with it (nothing can pay it any more).
    """
    row = conn.execute(
        "UPDATE checkout_payments SET status = %s WHERE purchase_id = %s AND status = 'pending' RETURNING purchase_id",
        (status, purchase_id),
    ).fetchone()
    if row is not None and status == "canceled":
        expire_purchase(conn, purchase_id)
    return row is not None


@attrs.frozen
class SavedMethod:
    """A payment method the user let the provider keep (their consent), charged by auto-renewal."""

    provider: str
    method_id: str
    title: str


def save_method(conn: psycopg.Connection[Any], user_id: int, provider: str, method_id: str, title: str) -> None:
    """Remember the user's saved method (one per user: the newest consent wins)."""
    conn.execute(
        "INSERT INTO saved_payment_methods (user_id, provider, method_id, title) VALUES (%s, %s, %s, %s) "
        "ON CONFLICT (user_id) DO UPDATE SET provider = EXCLUDED.provider, method_id = EXCLUDED.method_id, "
        "title = EXCLUDED.title, created_at = now()",
        (user_id, provider, method_id, title),
    )


def saved_method(conn: psycopg.Connection[Any], user_id: int) -> SavedMethod | None:
    row = conn.execute(
        "SELECT provider, method_id, title FROM saved_payment_methods WHERE user_id = %s", (user_id,)
    ).fetchone()
    return SavedMethod(str(row[0]), str(row[1]), str(row[2])) if row else None


def forget_method(conn: psycopg.Connection[Any], user_id: int) -> bool:
    """The user unlinked their card: no renewal charges it again. False when none was saved."""
    return (
        conn.execute("DELETE FROM saved_payment_methods WHERE user_id = %s RETURNING 1", (user_id,)).fetchone()
        is not None
    )
