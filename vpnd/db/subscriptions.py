"""Subscriptions: the one place that grants, extends, reissues and revokes VPN access.

Every path that gives access (trial, purchase, balance, auto-renewal, admin grant) calls
`grant_days` on the connection of its own transaction, so the rules live here once: an active
subscription is extended from its current expiry, an expired one from now; the UUID is kept on
renewal (no remove/add flap in Xray) and replaced only by `reissue_key`.
"""

from __future__ import annotations

import datetime as dt
import secrets
import uuid
from collections.abc import Mapping
from typing import Any

import attrs
import psycopg
from psycopg.rows import class_row

from vpnd.db.renewals import RENEWAL_PENDING


class ReissueRateLimited(Exception):
    def __init__(self, retry_after_seconds: int) -> None:
        super().__init__(f"too many key reissues; try again in {retry_after_seconds}s")
        self.retry_after_seconds = retry_after_seconds


class NoSubscription(Exception):
    pass


@attrs.frozen
class Subscription:
    user_id: int
    kind: str
    status: str
    uuid: uuid.UUID
    sub_token: str
    plan_code: str | None
    starts_at: dt.datetime
    expires_at: dt.datetime
    auto_renew: bool

    def is_active(self, now: dt.datetime) -> bool:
        return self.status == "active" and self.expires_at > now

    @property
    def xray_email(self) -> str:
        """The stable per-user key Xray knows the client by (survives reissues)."""
        return f"u{self.user_id}"


COLUMNS = "user_id, kind, status, uuid, sub_token, plan_code, starts_at, expires_at, auto_renew"


def new_sub_token() -> str:
    """A random, unguessable subscription URL token (192 bits)."""
    return secrets.token_urlsafe(24)


GRANT = f"""
WITH before AS (
    SELECT s.user_id, s.status = 'active' AND s.expires_at > now() AND s.plan_code IS NOT DISTINCT FROM
           coalesce(%(plan)s::text, s.plan_code) AS continues
    FROM subscriptions s WHERE s.user_id = %(user_id)s
)
INSERT INTO subscriptions AS s (user_id, kind, status, uuid, sub_token, plan_code, starts_at, expires_at)
VALUES (%(user_id)s, %(kind)s, 'active', %(uuid)s, %(token)s, %(plan)s, now(), now() + %(duration)s::interval)
ON CONFLICT (user_id) DO UPDATE SET
    kind = CASE WHEN %(kind)s = 'paid' THEN 'paid' ELSE s.kind END,
    plan_code = coalesce(%(plan)s, s.plan_code),
    status = 'active',
    starts_at = CASE WHEN (SELECT continues FROM before) THEN s.starts_at ELSE now() END,
    expires_at = CASE WHEN s.status = 'active' AND s.expires_at > now() THEN s.expires_at ELSE now() END
                 + %(duration)s::interval,
    traffic_blocked = CASE WHEN (SELECT continues FROM before) THEN s.traffic_blocked ELSE false END,
    updated_at = now()
RETURNING {COLUMNS}, starts_at = now() AS restarted
"""


def grant_days(
    conn: psycopg.Connection[Any], user_id: int, days: int, *, kind: str, plan_code: str | None = None
) -> Subscription:
    """Give `days` of access (creating the subscription if needed); return the new state (`grant_time`)."""
    if days <= 0:
        raise ValueError("days must be positive")
    return grant_time(conn, user_id, dt.timedelta(days=days), kind=kind, plan_code=plan_code)


def grant_time(
    conn: psycopg.Connection[Any], user_id: int, duration: dt.timedelta, *, kind: str, plan_code: str | None = None
) -> Subscription:
    """Give `duration` of access (days, or hours from an admin), creating the subscription if needed.

    A renewal of the same plan while active extends it and keeps its traffic period. A (re)start — a
    new subscription, one that had ended, or another plan — starts at now: its traffic period is closed
    (the next one opens from the new start, `vpnd.db.quota`) and a traffic block is lifted.
    """
    if duration <= dt.timedelta(0):
        raise ValueError("the duration must be positive")
    row = conn.execute(
        GRANT,
        {
            "user_id": user_id,
            "kind": kind,
            "uuid": uuid.uuid4(),
            "token": new_sub_token(),
            "plan": plan_code,
            "duration": duration,
        },
    ).fetchone()
    assert row is not None
    *values, restarted = row
    if restarted:
        conn.execute("UPDATE traffic_periods SET current = false WHERE user_id = %s AND current", (user_id,))
    return Subscription(*values)


#: Running subscriptions an outage compensation extends: active and not ended, paid (trials too when
#: asked), not a banned user's.
_COMPENSATED = """
s.status = 'active' AND s.expires_at > now() AND (s.kind = 'paid' OR %(trials)s)
AND NOT EXISTS (SELECT 1 FROM users b WHERE b.id = s.user_id AND b.banned_at IS NOT NULL)
"""


def count_extendable(conn: psycopg.Connection[Any], *, trials: bool) -> int:
    row = conn.execute(f"SELECT count(*) FROM subscriptions s WHERE {_COMPENSATED}", {"trials": trials}).fetchone()
    return int(row[0]) if row else 0


def extend_all(conn: psycopg.Connection[Any], duration: dt.timedelta, *, trials: bool) -> int:
    """Add `duration` to every running subscription (one statement: all or none); how many. The rows'
    `updated_at` stays: nobody joins or leaves Xray, so the writers have nothing to re-send."""
    if duration <= dt.timedelta(0):
        raise ValueError("the duration must be positive")
    cur = conn.execute(
        f"UPDATE subscriptions s SET expires_at = s.expires_at + %(duration)s::interval "
        f"WHERE {_COMPENSATED}",
        {"duration": duration, "trials": trials},
    )
    return cur.rowcount


SWITCH = f"""
UPDATE subscriptions SET
    kind = 'paid',
    plan_code = %(plan)s,
    status = 'active',
    starts_at = now(),
    expires_at = now() + %(days)s * interval '1 day' + %(keep)s * interval '1 second',
    traffic_blocked = false,
    updated_at = now()
WHERE user_id = %(user_id)s
RETURNING {COLUMNS}
"""


def switch_plan(
    conn: psycopg.Connection[Any], user_id: int, days: int, plan_code: str, *, keep_seconds: int = 0
) -> Subscription:
    """Move an existing subscription to `plan_code` starting now, for `days` (plus `keep_seconds`)
    — a pro-rata upgrade: the old plan's rest was credited, so it is replaced, not stacked (`grant_days`
    stacks). The UUID is kept; the traffic period restarts (the current one is closed) and a block is lifted.
    The caller holds the subscription's row lock. Raises NoSubscription when there is none."""
    if days <= 0 or keep_seconds < 0:
        raise ValueError("days must be positive and keep_seconds not negative")
    with conn.cursor(row_factory=class_row(Subscription)) as cur:
        sub = cur.execute(
            SWITCH, {"user_id": user_id, "plan": plan_code, "days": days, "keep": keep_seconds}
        ).fetchone()
    if sub is None:
        raise NoSubscription
    conn.execute("UPDATE traffic_periods SET current = false WHERE user_id = %s AND current", (user_id,))
    return sub


def get_subscription(conn: psycopg.Connection[Any], user_id: int) -> Subscription | None:
    with conn.cursor(row_factory=class_row(Subscription)) as cur:
        return cur.execute(f"SELECT {COLUMNS} FROM subscriptions WHERE user_id = %s", (user_id,)).fetchone()


def get_by_token(conn: psycopg.Connection[Any], token: str) -> Subscription | None:
    """The subscription behind a subscription-URL token; None also when its owner is banned (their URL
    answers like one that never existed)."""
    with conn.cursor(row_factory=class_row(Subscription)) as cur:
        return cur.execute(
            f"SELECT {COLUMNS} FROM subscriptions s WHERE sub_token = %s "
            "AND NOT EXISTS (SELECT 1 FROM users b WHERE b.id = s.user_id AND b.banned_at IS NOT NULL)",
            (token,),
        ).fetchone()


def reissue_key(
    conn: psycopg.Connection[Any], user_id: int, *, limit: int = 3, window_seconds: int = 300
) -> Subscription:
    """New UUID and subscription token (the old ones stop working); at most `limit` per window."""
    conn.execute("SELECT 1 FROM users WHERE id = %s FOR UPDATE", (user_id,))  # serialize per user
    recent = conn.execute(
        "SELECT count(*), min(at) FROM key_reissues WHERE user_id = %s AND at > now() - %s * interval '1 second'",
        (user_id, window_seconds),
    ).fetchone()
    if recent and recent[0] >= limit:
        oldest: dt.datetime = recent[1]
        wait = window_seconds - (dt.datetime.now(dt.UTC) - oldest).total_seconds()
        raise ReissueRateLimited(max(1, int(wait) + 1))
    with conn.cursor(row_factory=class_row(Subscription)) as cur:
        sub = cur.execute(
            f"UPDATE subscriptions SET uuid = %s, sub_token = %s, updated_at = now() WHERE user_id = %s "
            f"RETURNING {COLUMNS}",
            (uuid.uuid4(), new_sub_token(), user_id),
        ).fetchone()
    if sub is None:
        raise NoSubscription
    conn.execute("INSERT INTO key_reissues (user_id) VALUES (%s)", (user_id,))
    return sub


def set_auto_renew(conn: psycopg.Connection[Any], user_id: int, enabled: bool) -> Subscription | None:
    with conn.cursor(row_factory=class_row(Subscription)) as cur:
        return cur.execute(
            f"UPDATE subscriptions SET auto_renew = %s, updated_at = now() WHERE user_id = %s RETURNING {COLUMNS}",
            (enabled, user_id),
        ).fetchone()


def revoke(conn: psycopg.Connection[Any], user_id: int) -> Subscription | None:
    with conn.cursor(row_factory=class_row(Subscription)) as cur:
        return cur.execute(
            f"UPDATE subscriptions SET status = 'revoked', updated_at = now() WHERE user_id = %s RETURNING {COLUMNS}",
            (user_id,),
        ).fetchone()


@attrs.frozen
class TrialOutcome:
    granted: bool
    subscription: Subscription | None


def grant_trial(conn: psycopg.Connection[Any], user_id: int, days: int, plan_code: str | None = None) -> TrialOutcome:
    """Once per user, ever: the `trials` primary key decides, not a check-then-insert."""
    if get_subscription(conn, user_id) is not None:
        # Someone who already had access (paid or trial) is not eligible.
        return TrialOutcome(False, None)
    inserted = conn.execute(
        "INSERT INTO trials (user_id, ends_at) VALUES (%s, now() + %s * interval '1 day') "
        "ON CONFLICT (user_id) DO NOTHING RETURNING user_id",
        (user_id, days),
    ).fetchone()
    if inserted is None:
        return TrialOutcome(False, None)
    return TrialOutcome(True, grant_days(conn, user_id, days, kind="trial", plan_code=plan_code))


@attrs.frozen
class MenuFacts:
    """What the main menu depends on."""

    trial_eligible: bool
    has_subscription: bool


def menu_facts(conn: psycopg.Connection[Any], user_id: int) -> MenuFacts:
    row = conn.execute(
        "SELECT NOT EXISTS (SELECT 1 FROM trials WHERE user_id = %(id)s), "
        "EXISTS (SELECT 1 FROM subscriptions WHERE user_id = %(id)s)",
        {"id": user_id},
    ).fetchone()
    assert row is not None
    no_trial, subscribed = bool(row[0]), bool(row[1])
    return MenuFacts(trial_eligible=no_trial and not subscribed, has_subscription=subscribed)


def trial_eligible(conn: psycopg.Connection[Any], user_id: int) -> bool:
    row = conn.execute(
        "SELECT NOT EXISTS (SELECT 1 FROM trials WHERE user_id = %(id)s) "
        "AND NOT EXISTS (SELECT 1 FROM subscriptions WHERE user_id = %(id)s)",
        {"id": user_id},
    ).fetchone()
    return bool(row and row[0])


# --- the periodic workers' batches (keyset order, bounded) ---------------------------------------

EXPIRY_CANDIDATES = """
SELECT user_id, expires_at FROM subscriptions
WHERE status = 'active' AND expires_at <= now() AND (expires_at, user_id) > (%(after_at)s, %(after_id)s)
ORDER BY expires_at, user_id
LIMIT %(limit)s
"""

EXPIRE = f"""
UPDATE subscriptions AS s SET status = 'expired', updated_at = now()
FROM users u
WHERE u.id = s.user_id AND s.user_id = ANY(%(ids)s)
  AND s.status = 'active' AND s.expires_at <= now()
  AND NOT {RENEWAL_PENDING}
RETURNING s.user_id, s.kind, s.expires_at, u.language, u.reachable
"""

DUE_REMINDERS = """
SELECT s.user_id, s.expires_at, s.auto_renew, u.language, now()
FROM subscriptions s JOIN users u ON u.id = s.user_id
WHERE s.status = 'active' AND s.kind = 'paid' AND u.reachable AND u.banned_at IS NULL
  AND s.expires_at > now() AND s.expires_at <= now() + %(horizon)s
  AND (s.expires_at, s.user_id) > (%(after_at)s, %(after_id)s)
ORDER BY s.expires_at, s.user_id
LIMIT %(limit)s
"""

# Trials that are running or ended recently, in keyset order of their end.
DUE_TRIAL_NOTICES = """
SELECT t.user_id, t.granted_at, t.ends_at, u.language, s.kind, s.expires_at, now()
FROM trials t
JOIN users u ON u.id = t.user_id
LEFT JOIN subscriptions s ON s.user_id = t.user_id
WHERE u.reachable AND t.ends_at > now() - %(recent)s
  AND (s.status IS NULL OR s.status <> 'revoked')
  AND (t.ends_at, t.user_id) > (%(after_at)s, %(after_id)s)
ORDER BY t.ends_at, t.user_id
LIMIT %(limit)s
"""


def expiry_candidates(
    conn: psycopg.Connection[Any], after: tuple[dt.datetime, int], limit: int
) -> list[tuple[Any, ...]]:
    """Active subscriptions past their end, after `after` (expires_at, user_id): (user_id, expires_at)."""
    return conn.execute(EXPIRY_CANDIDATES, {"after_at": after[0], "after_id": after[1], "limit": limit}).fetchall()


def expire_subscriptions(
    conn: psycopg.Connection[Any], user_ids: list[int], renewal_params: Mapping[str, object]
) -> list[tuple[Any, ...]]:
    """Expire those of `user_ids` still due (and not waiting for their renewal, see `RENEWAL_PENDING`):
    (user_id, kind, expires_at, language, reachable) of each one expired."""
    return conn.execute(EXPIRE, {"ids": user_ids, **renewal_params}).fetchall()


def due_reminders(
    conn: psycopg.Connection[Any], horizon: dt.timedelta, after: tuple[dt.datetime, int], limit: int
) -> list[tuple[Any, ...]]:
    """Paid subscriptions ending within `horizon`: (user_id, expires_at, auto_renew, language, now)."""
    params = {"horizon": horizon, "after_at": after[0], "after_id": after[1], "limit": limit}
    return conn.execute(DUE_REMINDERS, params).fetchall()


def due_trial_notices(
    conn: psycopg.Connection[Any], recent: dt.timedelta, after: tuple[dt.datetime, int], limit: int
) -> list[tuple[Any, ...]]:
    """Trials running or ended within `recent`:
    (user_id, granted_at, ends_at, language, subscription kind, subscription expires_at, now)."""
    params = {"recent": recent, "after_at": after[0], "after_id": after[1], "limit": limit}
    return conn.execute(DUE_TRIAL_NOTICES, params).fetchall()
