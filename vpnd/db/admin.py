"""Admin queries: the audit log, stats, user lookup, CSV exports, health facts.

Every admin action — from the bot or the command line, done or refused — writes one `admin_audit`
row in the transaction of the action itself (who, what, target, result, details); the actions are
`vpnd.services.admin_actions`. Attempts by people who are not admins are audited too (result ``denied``).

Confirmed actions carry a *nonce* (from the confirmation button): an action whose nonce already has
an ``ok`` audit row is not done again (`nonce_used`), so a double press of "Confirm" changes nothing
twice. Balance changes use the nonce as their ledger reference as well (`UNIQUE (reason, reference)`).
"""

from __future__ import annotations

import csv
import datetime as dt
from collections.abc import Sequence
from typing import Any, Generic, TextIO, TypeVar

import attrs
import psycopg
from psycopg.rows import class_row
from psycopg.types.json import Jsonb

from vpnd.db import ledger, quota, subscriptions
from vpnd.db.payments import PaymentRecord, payments_of
from vpnd.db.rows import one
from vpnd.db.subscriptions import Subscription
from vpnd.db.users import ReferralStats, User, find_user, get_user, referral_stats
from vpnd.db.xray_state import get_sync_marker

#: The admin id recorded for actions taken on the command line (no Telegram identity there).
CLI_ADMIN_ID = 0


# --- audit ------------------------------------------------------------------------------------


@attrs.frozen
class AuditEntry:
    id: int
    admin_id: int
    action: str
    target: str | None
    result: str
    details: dict[str, Any]
    created_at: dt.datetime


def audit(
    conn: psycopg.Connection[Any],
    admin_id: int,
    action: str,
    target: object | None,
    result: str,
    details: dict[str, Any] | None = None,
) -> int:
    """Append one audit row; return its id."""
    row = one(
        conn.execute(
            "INSERT INTO admin_audit (admin_id, action, target, result, details) VALUES (%s, %s, %s, %s, %s) "
            "RETURNING id",
            (admin_id, action, None if target is None else str(target)[:200], result[:200], Jsonb(details or {})),
        )
    )
    return int(row[0])


def recent_audit(
    conn: psycopg.Connection[Any], *, admin_id: int | None = None, before_id: int | None = None, limit: int = 50
) -> list[AuditEntry]:
    with conn.cursor(row_factory=class_row(AuditEntry)) as cur:
        return cur.execute(
            "SELECT id, admin_id, action, target, result, details, created_at FROM admin_audit "
            "WHERE id < %s AND (%s::bigint IS NULL OR admin_id = %s) ORDER BY id DESC LIMIT %s",
            (before_id if before_id is not None else 2**63 - 1, admin_id, admin_id, limit),
        ).fetchall()


def nonce_used(conn: psycopg.Connection[Any], nonce: str) -> bool:
    """Whether an action confirmed with `nonce` was already done (an index lookup: admin_audit_nonce_idx)."""
    row = conn.execute(
        "SELECT 1 FROM admin_audit WHERE details ? 'nonce' AND details ->> 'nonce' = %s AND result = 'ok' LIMIT 1",
        (nonce,),
    ).fetchone()
    return row is not None


#: A refused stranger writes at most this many `denied` rows per window; later attempts in the
#: window are counted on their latest row (`details.repeats`) instead of adding rows.
DENIED_ROWS_PER_WINDOW = 20
DENIED_WINDOW_MINUTES = 10


def audit_denied(
    conn: psycopg.Connection[Any], user_id: int, action: str, target: str, details: dict[str, Any] | None = None
) -> bool:
    """Audit an attempt by someone who is not an admin, in bounded space; True when a row was added."""
    recent = conn.execute(
        "SELECT id FROM admin_audit WHERE admin_id = %s AND result = 'denied' "
        "AND created_at > now() - make_interval(mins => %s) ORDER BY created_at DESC LIMIT %s",
        (user_id, DENIED_WINDOW_MINUTES, DENIED_ROWS_PER_WINDOW),
    ).fetchall()
    if len(recent) < DENIED_ROWS_PER_WINDOW:
        audit(conn, user_id, action, target, "denied", details)
        return True
    conn.execute(
        "UPDATE admin_audit SET details = jsonb_set(details, '{repeats}', "
        "to_jsonb(coalesce((details ->> 'repeats')::bigint, 0) + 1)) WHERE id = %s",
        (recent[0][0],),
    )
    return False


def prune_audit(conn: psycopg.Connection[Any], days: int, limit: int) -> int:
    """Delete up to `limit` audit rows older than `days`, oldest first; return how many."""
    cur = conn.execute(
        "DELETE FROM admin_audit WHERE id IN (SELECT id FROM admin_audit "
        "WHERE created_at < now() - make_interval(days => %s) ORDER BY created_at LIMIT %s)",
        (days, limit),
    )
    return cur.rowcount


# --- stats ------------------------------------------------------------------------------------


@attrs.frozen
class RevenueRow:
    key: str  # a day (YYYY-MM-DD), a plan code ("topup" for top-ups) or a method
    currency: str
    amount_minor: int
    payments: int


@attrs.frozen
class TierRow:
    #: The plan's code (a subscription from before plans had codes: its kind, "paid" or "trial").
    plan: str
    #: Active subscriptions.
    subscribers: int
    #: Bytes used in their current traffic periods.
    traffic_bytes: int
    #: Of them, taken off Xray at their traffic quota.
    blocked: int


@attrs.frozen
class Stats:
    users_total: int
    users_today: int
    users_7d: int
    reachable: int
    unreachable: int
    active_paid: int
    active_trials: int
    trials_total: int
    trials_converted: int
    revenue_by_day: list[RevenueRow]
    revenue_by_plan: list[RevenueRow]
    revenue_by_method: list[RevenueRow]
    #: Plans sold by any method — the balance and auto-renewals included (revenue counts money in).
    sales_by_plan: list[RevenueRow] = attrs.field(factory=list)
    #: Active subscriptions by tier, with their traffic this period.
    tiers: list[TierRow] = attrs.field(factory=list)

    @property
    def conversion_percent(self) -> float:
        return 100.0 * self.trials_converted / self.trials_total if self.trials_total else 0.0


_TODAY_UTC = "(date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC')"

USER_COUNTS = f"""
SELECT count(*),
       count(*) FILTER (WHERE created_at >= {_TODAY_UTC}),
       count(*) FILTER (WHERE created_at >= now() - interval '7 days'),
       count(*) FILTER (WHERE reachable),
       count(*) FILTER (WHERE NOT reachable)
FROM users
"""

SUBSCRIPTION_COUNTS = """
SELECT count(*) FILTER (WHERE kind = 'paid'), count(*) FILTER (WHERE kind = 'trial')
FROM subscriptions WHERE status = 'active' AND expires_at > now()
"""

TRIAL_CONVERSION = """
SELECT count(*),
       count(*) FILTER (WHERE EXISTS (
           SELECT 1 FROM payments p JOIN purchases pu ON pu.id = p.purchase_id
           WHERE p.user_id = t.user_id AND pu.kind = 'plan' AND p.outcome = 'granted' AND p.created_at >= t.granted_at))
FROM trials t
"""

#: Money received: granted payments, not those paid from the balance (that money was counted as a top-up).
_REVENUE = """
SELECT {key} AS key, p.currency, sum(p.amount_minor)::bigint, count(*)
FROM payments p JOIN purchases pu ON pu.id = p.purchase_id
WHERE p.outcome = 'granted' AND p.provider <> 'balance' {where}
GROUP BY 1, 2 ORDER BY 1 {order}, 2
"""

REVENUE_BY_DAY = _REVENUE.format(
    key="to_char(p.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
    where=f"AND p.created_at >= {_TODAY_UTC} - interval '29 days'",
    order="DESC",
)
REVENUE_BY_PLAN = _REVENUE.format(key="coalesce(pu.plan_code, pu.kind)", where="", order="")
REVENUE_BY_METHOD = _REVENUE.format(key="p.provider", where="", order="")
#: Plans sold, whatever paid for them (a plan bought from the balance or auto-renewed counts here).
SALES_BY_PLAN = """
SELECT pu.plan_code AS key, p.currency, sum(p.amount_minor)::bigint, count(*)
FROM payments p JOIN purchases pu ON pu.id = p.purchase_id
WHERE p.outcome = 'granted' AND pu.kind = 'plan' AND p.granted_days IS NOT NULL
GROUP BY 1, 2 ORDER BY 1, 2
"""


#: Active subscribers per plan with this period's traffic (one row per plan: a grouped scan of the
#: active subscriptions, their current period by its unique index).
TIERS = """
SELECT coalesce(s.plan_code, s.kind), count(*), coalesce(sum(p.used_bytes), 0)::bigint,
       count(*) FILTER (WHERE s.traffic_blocked)
FROM subscriptions s LEFT JOIN traffic_periods p ON p.user_id = s.user_id AND p.current
WHERE s.status = 'active' AND s.expires_at > now()
GROUP BY 1 ORDER BY 2 DESC, 1
"""


def stats(conn: psycopg.Connection[Any]) -> Stats:
    users_row = one(conn.execute(USER_COUNTS))
    subs_row = one(conn.execute(SUBSCRIPTION_COUNTS))
    trials_row = one(conn.execute(TRIAL_CONVERSION))

    def revenue(sql: str) -> list[RevenueRow]:
        return [RevenueRow(str(r[0]), str(r[1]), int(r[2]), int(r[3])) for r in conn.execute(sql).fetchall()]

    return Stats(
        users_total=int(users_row[0]),
        users_today=int(users_row[1]),
        users_7d=int(users_row[2]),
        reachable=int(users_row[3]),
        unreachable=int(users_row[4]),
        active_paid=int(subs_row[0]),
        active_trials=int(subs_row[1]),
        trials_total=int(trials_row[0]),
        trials_converted=int(trials_row[1]),
        revenue_by_day=revenue(REVENUE_BY_DAY),
        revenue_by_plan=revenue(REVENUE_BY_PLAN),
        revenue_by_method=revenue(REVENUE_BY_METHOD),
        sales_by_plan=revenue(SALES_BY_PLAN),
        tiers=[TierRow(str(r[0]), int(r[1]), int(r[2]), int(r[3])) for r in conn.execute(TIERS).fetchall()],
    )


# --- user lookup ------------------------------------------------------------------------------


@attrs.frozen
class UserDetails:
    user: User
    created_at: dt.datetime
    subscription: Subscription | None
    trial_ends_at: dt.datetime | None
    payments: Sequence[PaymentRecord]
    referrals: ReferralStats
    now: dt.datetime
    #: Reversals the balance could not cover (e.g. a refunded friend's referral reward).
    owed_minor: int = 0
    #: The subscription's current traffic period (None: none yet, or no subscription).
    traffic_period: quota.Period | None = None
    #: Taken off Xray at the traffic quota.
    traffic_blocked: bool = False
    #: Devices recorded from the subscription URL, and slots granted beyond the plan's.
    devices_used: int = 0
    extra_devices: int = 0


def user_details(conn: psycopg.Connection[Any], query: str | int, *, payments_limit: int = 5) -> UserDetails | None:
    """A user by id or @username with status, expiry, recent payments, balance and referrals."""
    user = get_user(conn, query) if isinstance(query, int) else find_user(conn, query)
    if user is None:
        return None
    row = one(
        conn.execute(
            "SELECT u.created_at, (SELECT ends_at FROM trials WHERE user_id = u.id), now(), "
            "(SELECT count(*) FROM devices WHERE user_id = u.id), "
            "coalesce((SELECT traffic_blocked FROM subscriptions WHERE user_id = u.id), false), "
            "coalesce((SELECT extra_devices FROM subscriptions WHERE user_id = u.id), 0) "
            "FROM users u WHERE u.id = %s",
            (user.id,),
        )
    )
    return UserDetails(
        user=user,
        created_at=row[0],
        subscription=subscriptions.get_subscription(conn, user.id),
        trial_ends_at=row[1],
        payments=payments_of(conn, user.id, limit=payments_limit),
        referrals=referral_stats(conn, user.id),
        now=row[2],
        owed_minor=ledger.owed_of(conn, user.id),
        traffic_period=quota.current_period(conn, user.id),
        traffic_blocked=bool(row[4]),
        devices_used=int(row[3]),
        extra_devices=int(row[5]),
    )


def lock_user(conn: psycopg.Connection[Any], user_id: int) -> User | None:
    """The user, locked for the rest of the transaction (an admin action on them); None if there is none."""
    if conn.execute("SELECT id FROM users WHERE id = %s FOR UPDATE", (user_id,)).fetchone() is None:
        return None
    return get_user(conn, user_id)


# --- health facts -----------------------------------------------------------------------------


@attrs.frozen
class StoredCheck:
    """A health check's last state as the health worker recorded it (`health_checks`)."""

    name: str
    ok: bool
    detail: str
    since: dt.datetime


@attrs.frozen
class HealthFacts:
    db_now: dt.datetime
    outbox_pending: int
    outbox_oldest: dt.datetime | None
    xray_synced_at: dt.datetime | None
    running_broadcasts: int
    paused_broadcasts: int
    stored_checks: Sequence[StoredCheck] = ()

    @property
    def xray_lag_seconds(self) -> float | None:
        return None if self.xray_synced_at is None else max(0.0, (self.db_now - self.xray_synced_at).total_seconds())

    @property
    def outbox_age_seconds(self) -> float:
        return 0.0 if self.outbox_oldest is None else max(0.0, (self.db_now - self.outbox_oldest).total_seconds())


def health_facts(conn: psycopg.Connection[Any]) -> HealthFacts:
    row = one(
        conn.execute(
            "SELECT now(), (SELECT count(*) FROM outbox WHERE status = 'pending'), "
            "(SELECT min(created_at) FROM outbox WHERE status = 'pending'), "
            "(SELECT count(*) FROM broadcasts WHERE status = 'running'), "
            "(SELECT count(*) FROM broadcasts WHERE status = 'paused')"
        )
    )
    return HealthFacts(
        db_now=row[0],
        outbox_pending=int(row[1]),
        outbox_oldest=row[2],
        xray_synced_at=get_sync_marker(conn),
        running_broadcasts=int(row[3]),
        paused_broadcasts=int(row[4]),
        stored_checks=[
            StoredCheck(str(r[0]), bool(r[1]), str(r[2]), r[3])
            for r in conn.execute("SELECT name, ok, detail, since FROM health_checks ORDER BY name LIMIT 100")
        ],
    )


# --- CSV exports ------------------------------------------------------------------------------

USERS_CSV_HEADER = (
    "id", "username", "first_name", "language", "reachable", "balance_minor", "referred_by", "created_at",
    "subscription_kind", "subscription_status", "expires_at", "auto_renew",
)  # fmt: skip
USERS_CSV_QUERY = """
SELECT u.id, u.username, u.first_name, u.language, u.reachable, u.balance_minor, u.referred_by, u.created_at,
       s.kind, s.status, s.expires_at, s.auto_renew
FROM users u LEFT JOIN subscriptions s ON s.user_id = u.id
WHERE u.id > %s ORDER BY u.id LIMIT %s
"""

PAYMENTS_CSV_HEADER = (
    "id", "created_at", "user_id", "purchase_id", "kind", "plan_code", "provider", "provider_payment_id",
    "amount_minor", "currency", "outcome",
)  # fmt: skip
PAYMENTS_CSV_QUERY = """
SELECT p.id, p.created_at, p.user_id, p.purchase_id, pu.kind, pu.plan_code, p.provider, p.provider_payment_id,
       p.amount_minor, p.currency, p.outcome
FROM payments p JOIN purchases pu ON pu.id = p.purchase_id
WHERE p.id > %s ORDER BY p.id LIMIT %s
"""


#: A cell starting with one of these is a formula (or becomes one) in a spreadsheet (OWASP "CSV injection").
CSV_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "\n")


def _csv_value(value: object) -> object:
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).isoformat()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and value.startswith(CSV_FORMULA_STARTS):
        return "'" + value  # no formula injection when the file is opened in a spreadsheet
    return value


def _export(conn: psycopg.Connection[Any], out: TextIO, header: Sequence[str], query: str, batch_size: int) -> int:
    writer = csv.writer(out)
    writer.writerow(header)
    after, written = 0, 0
    while True:
        rows = conn.execute(query, (after, batch_size)).fetchall()
        for row in rows:
            writer.writerow([_csv_value(v) for v in row])
        written += len(rows)
        if len(rows) < batch_size:
            return written
        after = int(rows[-1][0])


def export_users_csv(conn: psycopg.Connection[Any], out: TextIO, *, batch_size: int = 1000) -> int:
    """Every user as CSV, read in keyset batches of `batch_size`; returns the number of rows."""
    return _export(conn, out, USERS_CSV_HEADER, USERS_CSV_QUERY, batch_size)


def export_payments_csv(conn: psycopg.Connection[Any], out: TextIO, *, batch_size: int = 1000) -> int:
    """Every payment as CSV, read in keyset batches of `batch_size`; returns the number of rows."""
    return _export(conn, out, PAYMENTS_CSV_HEADER, PAYMENTS_CSV_QUERY, batch_size)


# --- the user list and the audit log, page by page (keyset: no OFFSET, no "all users") -------------------

#: A user's subscription running now; `s` is the user's subscription (LEFT JOIN: may be NULL).
_RUNNING = "s.status = 'active' AND s.expires_at > now()"
_NOT_BANNED = "u.banned_at IS NULL"

#: The user list's filters: SQL over `u` (users) and `s` (their subscription, may be NULL). Every filter
#: but `banned` and `all` leaves banned users out (they are not customers while banned).
USER_FILTERS: dict[str, str] = {
    "all": "true",
    "active": f"{_NOT_BANNED} AND {_RUNNING}",
    "expiring": f"{_NOT_BANNED} AND {_RUNNING} AND s.expires_at <= now() + make_interval(days => %(days)s)",
    "expired": f"{_NOT_BANNED} AND s.user_id IS NOT NULL AND NOT ({_RUNNING})",
    "trial": f"{_NOT_BANNED} AND {_RUNNING} AND s.kind = 'trial'",
    "paid": f"{_NOT_BANNED} AND {_RUNNING} AND s.kind = 'paid'",
    "banned": "u.banned_at IS NOT NULL",
}

#: "expiring": ends within this many days.
EXPIRING_DAYS = 3


@attrs.frozen
class UserRow:
    id: int
    username: str | None
    first_name: str
    language: str
    banned: bool
    kind: str | None
    status: str | None
    expires_at: dt.datetime | None


R = TypeVar("R")


@attrs.frozen
class Page(Generic[R]):
    """One page of a keyset listing; `more_after` / `more_before`: whether rows of greater / smaller ids
    lie beyond it (the user list runs up by id, the audit log down: newest first)."""

    rows: list[R]
    more_after: bool
    more_before: bool


def _users_query(where: str, cursor: str, order: str) -> str:
    return (
        "SELECT u.id, u.username, u.first_name, u.language, u.banned_at IS NOT NULL AS banned, "
        "s.kind, s.status, s.expires_at FROM users u LEFT JOIN subscriptions s ON s.user_id = u.id "
        f"WHERE ({where}) AND (%(lang)s::text IS NULL OR u.language = %(lang)s) AND u.id {cursor} %(cursor)s "
        f"ORDER BY u.id {order} LIMIT %(limit)s"
    )


def list_users(
    conn: psycopg.Connection[Any],
    filter_name: str,
    *,
    language: str | None = None,
    after: int | None = None,
    before: int | None = None,
    limit: int = 10,
) -> Page[UserRow]:
    """Users matching `filter_name` (and `language`) by id: the `limit` after id `after` (from the first
    without), or the `limit` before id `before`. KeyError for an unknown filter."""
    where = USER_FILTERS[filter_name]
    params: dict[str, Any] = {"days": EXPIRING_DAYS, "lang": language}

    def fetch(cursor: str, order: str, value: int, count: int) -> list[UserRow]:
        with conn.cursor(row_factory=class_row(UserRow)) as cur:
            query = _users_query(where, cursor, order)
            return cur.execute(query, {**params, "cursor": value, "limit": count}).fetchall()

    if before is not None:
        rows = fetch("<", "DESC", before, limit + 1)
        more_before, rows = len(rows) > limit, rows[:limit][::-1]
        more_after = not rows or bool(fetch(">", "", rows[-1].id, 1))
    else:
        rows = fetch(">", "", after if after is not None else -(2**63), limit + 1)
        more_after, rows = len(rows) > limit, rows[:limit]
        more_before = after is not None and (not rows or bool(fetch("<", "DESC", rows[0].id, 1)))
    return Page(rows, more_after, more_before)


def _audit_query(cursor: str, order: str) -> str:
    return (
        "SELECT id, admin_id, action, target, result, details, created_at FROM admin_audit "
        "WHERE (%(action)s::text IS NULL OR action = %(action)s) "
        "AND (%(admin)s::bigint IS NULL OR admin_id = %(admin)s) "
        f"AND (%(target)s::text IS NULL OR target = %(target)s) AND id {cursor} %(cursor)s "
        f"ORDER BY id {order} LIMIT %(limit)s"
    )


def audit_page(
    conn: psycopg.Connection[Any],
    *,
    action: str | None = None,
    admin_id: int | None = None,
    target: str | None = None,
    before: int | None = None,
    after: int | None = None,
    limit: int = 10,
) -> Page[AuditEntry]:
    """Audit rows, newest first, matching every filter given: the `limit` older than id `before` (the
    newest without), or the `limit` newer than id `after`."""
    params: dict[str, Any] = {"action": action, "admin": admin_id, "target": target}

    def fetch(cursor: str, order: str, value: int, count: int) -> list[AuditEntry]:
        with conn.cursor(row_factory=class_row(AuditEntry)) as cur:
            return cur.execute(_audit_query(cursor, order), {**params, "cursor": value, "limit": count}).fetchall()

    if after is not None:
        rows = fetch(">", "", after, limit + 1)
        more_after, rows = len(rows) > limit, rows[:limit][::-1]
        more_before = not rows or bool(fetch("<", "DESC", rows[-1].id, 1))
    else:
        rows = fetch("<", "DESC", before if before is not None else 2**63 - 1, limit + 1)
        more_before, rows = len(rows) > limit, rows[:limit]
        more_after = before is not None and (not rows or bool(fetch(">", "", rows[0].id, 1)))
    return Page(rows, more_after, more_before)
