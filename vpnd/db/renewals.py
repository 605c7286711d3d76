"""Auto-renewal: which subscriptions are due a charge, and the one decision per period (`auto_renewals`).

The rules (what is charged, what is written to the user) are `vpnd.workers.renewal`'s; the plan prices
come in as parameters (`plan_codes`, `plan_prices`: the configured plans, in minor units).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

import psycopg

# True for a subscription (s) of a user (u) whose renewal for the current period is still owed:
# auto-renew on, a configured plan, and no decision yet for this period — or an "insufficient
# balance" decision while the balance now covers the price, or a saved-card charge that failed
# (the balance may still pay). A card charge in flight ('card_pending') is a decision. Needs
# %(plan_codes)s, %(plan_prices)s and %(grace)s. The expiry worker's EXPIRE (in vpnd.db.subscriptions)
# leaves these alone.
RENEWAL_PENDING = """(
    s.auto_renew AND s.kind = 'paid' AND s.expires_at > now() - %(grace)s
    AND EXISTS (
        SELECT 1 FROM unnest(%(plan_codes)s::text[], %(plan_prices)s::bigint[]) AS p(code, price)
        WHERE p.code = s.plan_code
          AND NOT EXISTS (
              SELECT 1 FROM auto_renewals r
              WHERE r.user_id = s.user_id AND r.period_end = s.expires_at
                AND (r.outcome IN ('charged', 'card_pending')
                     OR (r.outcome = 'insufficient_balance' AND u.balance_minor < p.price))
          )
    )
)"""

DUE = f"""
SELECT s.user_id, s.expires_at, s.plan_code, u.balance_minor, u.language, u.reachable,
       (SELECT p.price FROM unnest(%(plan_codes)s::text[], %(plan_prices)s::bigint[]) AS p(code, price)
         WHERE p.code = s.plan_code)
FROM subscriptions s JOIN users u ON u.id = s.user_id
WHERE s.status = 'active' AND s.expires_at <= now() + %(window)s
  AND {RENEWAL_PENDING}
  AND u.banned_at IS NULL
  AND (s.expires_at, s.user_id) > (%(after_at)s, %(after_id)s)
ORDER BY s.expires_at, s.user_id
LIMIT %(limit)s
FOR UPDATE OF s, u SKIP LOCKED
"""

CLAIM_PERIOD = """
INSERT INTO auto_renewals AS r (user_id, period_end, outcome) VALUES (%s, %s, %s)
ON CONFLICT (user_id, period_end) DO UPDATE SET outcome = EXCLUDED.outcome, created_at = now()
    WHERE (r.outcome IN ('insufficient_balance', 'card_failed') AND EXCLUDED.outcome = 'charged')
       OR (r.outcome = 'card_failed' AND EXCLUDED.outcome = 'insufficient_balance')
RETURNING 1
"""

# Due subscriptions whose user saved a card, with no decision for the period yet or a card charge
# still in flight (its purchase: a retry after a crash charges that one, with the same key).
CARD_DUE = """
SELECT s.user_id, s.expires_at, s.plan_code, m.method_id, r.purchase_id
FROM subscriptions s
JOIN saved_payment_methods m ON m.user_id = s.user_id AND m.provider = %(provider)s
LEFT JOIN auto_renewals r ON r.user_id = s.user_id AND r.period_end = s.expires_at
WHERE s.status = 'active' AND s.auto_renew AND s.kind = 'paid'
  AND s.expires_at <= now() + %(window)s AND s.expires_at > now() - %(grace)s
  AND NOT EXISTS (SELECT 1 FROM users b WHERE b.id = s.user_id AND b.banned_at IS NOT NULL)
  AND s.plan_code = ANY(%(plan_codes)s::text[])
  AND (r.outcome IS NULL OR r.outcome = 'card_pending')
  AND (s.expires_at, s.user_id) > (%(after_at)s, %(after_id)s)
ORDER BY s.expires_at, s.user_id
LIMIT %(limit)s
FOR UPDATE OF s SKIP LOCKED
"""


def due_renewals(
    conn: psycopg.Connection[Any], params: Mapping[str, object], after: tuple[dt.datetime, int], limit: int
) -> list[tuple[Any, ...]]:
    """One keyset batch of renewals due within `params["window"]`, locked (SKIP LOCKED) until commit:
    (user_id, expires_at, plan_code, balance_minor, language, reachable, price)."""
    return conn.execute(DUE, {**params, "after_at": after[0], "after_id": after[1], "limit": limit}).fetchall()


def claim_period(conn: psycopg.Connection[Any], user_id: int, period_end: dt.datetime, outcome: str) -> bool:
    """Record this period's decision; False when it was decided already ("charged" never twice)."""
    return conn.execute(CLAIM_PERIOD, (user_id, period_end, outcome)).fetchone() is not None


def due_card_renewals(
    conn: psycopg.Connection[Any], params: Mapping[str, object], after: tuple[dt.datetime, int], limit: int
) -> list[tuple[Any, ...]]:
    """One keyset batch of renewals to charge to a saved card, locked (SKIP LOCKED) until commit:
    (user_id, expires_at, plan_code, method_id, purchase_id or None)."""
    return conn.execute(CARD_DUE, {**params, "after_at": after[0], "after_id": after[1], "limit": limit}).fetchall()


def claim_card_period(conn: psycopg.Connection[Any], user_id: int, period_end: dt.datetime, purchase_id: int) -> None:
    """This period is being charged to the saved card, by this purchase (committed before the charge)."""
    conn.execute(
        "INSERT INTO auto_renewals (user_id, period_end, outcome, purchase_id) VALUES (%s, %s, 'card_pending', %s)",
        (user_id, period_end, purchase_id),
    )


def settle_card_period(conn: psycopg.Connection[Any], user_id: int, period_end: dt.datetime, outcome: str) -> bool:
    """The card charge of the period ended: 'charged', or 'card_failed' (the balance renewal may pay)."""
    return (
        conn.execute(
            "UPDATE auto_renewals SET outcome = %s WHERE user_id = %s AND period_end = %s "
            "AND outcome = 'card_pending' RETURNING 1",
            (outcome, user_id, period_end),
        ).fetchone()
        is not None
    )
