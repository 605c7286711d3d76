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
# balance" decision while the balance now covers the price. Needs %(plan_codes)s, %(plan_prices)s
# and %(grace)s. The expiry worker's EXPIRE (in vpnd.db.subscriptions) leaves these alone.
RENEWAL_PENDING = """(
    s.auto_renew AND s.kind = 'paid' AND s.expires_at > now() - %(grace)s
    AND EXISTS (
        SELECT 1 FROM unnest(%(plan_codes)s::text[], %(plan_prices)s::bigint[]) AS p(code, price)
        WHERE p.code = s.plan_code
          AND NOT EXISTS (
              SELECT 1 FROM auto_renewals r
              WHERE r.user_id = s.user_id AND r.period_end = s.expires_at
                AND (r.outcome = 'charged' OR u.balance_minor < p.price)
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
  AND (s.expires_at, s.user_id) > (%(after_at)s, %(after_id)s)
ORDER BY s.expires_at, s.user_id
LIMIT %(limit)s
FOR UPDATE OF s, u SKIP LOCKED
"""

CLAIM_PERIOD = """
INSERT INTO auto_renewals AS r (user_id, period_end, outcome) VALUES (%s, %s, %s)
ON CONFLICT (user_id, period_end) DO UPDATE SET outcome = EXCLUDED.outcome, created_at = now()
    WHERE r.outcome = 'insufficient_balance' AND EXCLUDED.outcome = 'charged'
RETURNING 1
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
