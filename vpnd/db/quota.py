"""Traffic quotas: usage per period, the 80/95/100 % notices, and the block that takes a user off Xray.

A subscriber's traffic is counted in their *current period* (`traffic_periods`, one current row per
user): the Xray writer adds every node's deltas to it in the transaction that stores them
(`account_usage`). Crossing 80 % or 95 % of the period's quota (the plan's `traffic_gb` plus packs
bought for the period) queues a notice in that same transaction, with the period's `notified` level:
exactly once per period, whatever crashes in between. Reaching 100 % sets `subscriptions.traffic_blocked`
(`block_over_quota`, its own transaction right after) — the desired set leaves blocked users out and the
column's change wakes every node's writer, so the user is taken off at once.

What puts them back: a traffic pack or an admin's grant (`add_extra`), the next period (`roll_due_periods`,
the quota worker), a new plan (`vpnd.db.subscriptions.grant_days` closes the period; the next
opens lazily), or a reload that raised the quota (`unblock_within_quota`).
Each clears the block in one transaction; the commit wakes the writers.

Lock order, the same everywhere: the subscription's row, then its period's. The writer's accounting
(which cannot take subscription locks without risking a deadlock with payments) touches periods only;
blocking is a second transaction that locks the subscriptions first and re-reads the periods.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import psycopg
from psycopg.rows import class_row

from vpnd.db import outbox
from vpnd.quota import LEVELS, Limits, current_usage, format_bytes, period_bounds, usage_level
from vpnd.texts import Texts


@attrs.frozen
class Period:
    user_id: int
    started_at: dt.datetime
    #: The next reset (None: the quota never resets).
    ends_at: dt.datetime | None
    used_bytes: int
    #: Packs and admin grants added to this period's quota.
    extra_bytes: int
    #: The highest usage notice sent in this period (0, 80, 95, 100).
    notified: int


def period_facts(period: Period | None) -> tuple[int, int, dt.datetime | None] | None:
    """What `vpnd.quota.current_usage` needs of a period: (used, extra, ends_at)."""
    return None if period is None else (period.used_bytes, period.extra_bytes, period.ends_at)


PERIOD_COLUMNS = "user_id, started_at, ends_at, used_bytes, extra_bytes, notified"


@attrs.frozen
class QuotaRules:
    """What the quota code needs from the running config and the texts, as values."""

    #: The limits of a subscription of (plan_code, kind): `vpnd.quota.limits_of` over the running config.
    limits_for: Callable[[str | None, str], Limits]
    texts: Texts
    default_language: str = "en"
    #: The smallest quota of any plan (the trial's included), in bytes; 0: not known (every counted user
    #: is looked at). A user below 80 % of it with no notice sent needs nothing, so the accounting reads
    #: only the others — with no plan limiting traffic, almost nobody.
    smallest_quota: int = 0

    @property
    def first_notice_bytes(self) -> int:
        """Usage below which no counted user can be due a notice or a block (see `smallest_quota`)."""
        if self.smallest_quota <= 0:
            return 0
        return -(-self.smallest_quota * LEVELS[0] // 100)


def current_period(conn: psycopg.Connection[Any], user_id: int) -> Period | None:
    with conn.cursor(row_factory=class_row(Period)) as cur:
        return cur.execute(
            f"SELECT {PERIOD_COLUMNS} FROM traffic_periods WHERE user_id = %s AND current", (user_id,)
        ).fetchone()


def total_bytes(limits: Limits, period: Period | None) -> int:
    """The period's whole quota in bytes (0: unlimited)."""
    if not limits.limits_traffic:
        return 0
    return limits.traffic_bytes + (period.extra_bytes if period is not None else 0)


def begin_period(
    conn: psycopg.Connection[Any], user_id: int, started_at: dt.datetime, ends_at: dt.datetime | None, *, used: int = 0
) -> Period:
    """Close the user's current period (kept as history) and start a new one."""
    conn.execute("UPDATE traffic_periods SET current = false WHERE user_id = %s AND current", (user_id,))
    with conn.cursor(row_factory=class_row(Period)) as cur:
        period = cur.execute(
            "INSERT INTO traffic_periods (user_id, started_at, ends_at, used_bytes) VALUES (%s, %s, %s, %s) "
            "ON CONFLICT (user_id, started_at) DO UPDATE SET current = true, ends_at = EXCLUDED.ends_at, "
            "used_bytes = EXCLUDED.used_bytes, extra_bytes = 0, notified = 0 "
            f"RETURNING {PERIOD_COLUMNS}",
            (user_id, started_at, ends_at, used),
        ).fetchone()
    assert period is not None
    return period


def set_blocked(conn: psycopg.Connection[Any], user_id: int, blocked: bool) -> bool:
    """Block or unblock; True when it changed (the commit then wakes the Xray writers)."""
    row = conn.execute(
        "UPDATE subscriptions SET traffic_blocked = %(b)s, updated_at = now() "
        "WHERE user_id = %(id)s AND traffic_blocked <> %(b)s RETURNING user_id",
        {"b": blocked, "id": user_id},
    ).fetchone()
    return row is not None


def _rearm(conn: psycopg.Connection[Any], period: Period, total: int) -> Period:
    """After the quota grew: the notices above the new usage level may be sent again."""
    level = usage_level(period.used_bytes, total)
    if level >= period.notified:
        return period
    conn.execute("UPDATE traffic_periods SET notified = %s WHERE user_id = %s AND current", (level, period.user_id))
    return attrs.evolve(period, notified=level)


def add_extra(conn: psycopg.Connection[Any], user_id: int, extra: int, limits: Limits) -> Period | None:
    """Add `extra` bytes to the current period's quota (a pack, an admin's grant) and lift the block
    when usage is now under it. The caller holds the subscription's row lock (`lock_subscription`).
    A subscription without a current period yet (no traffic since it (re)started) gets its period
    opened here. None when the user has no subscription."""
    if extra <= 0:
        raise ValueError("extra traffic must be positive")
    with conn.cursor(row_factory=class_row(Period)) as cur:
        period = cur.execute(
            "UPDATE traffic_periods SET extra_bytes = extra_bytes + %s WHERE user_id = %s AND current "
            f"RETURNING {PERIOD_COLUMNS}",
            (extra, user_id),
        ).fetchone()
    if period is None:
        row = conn.execute("SELECT starts_at, now() FROM subscriptions WHERE user_id = %s", (user_id,)).fetchone()
        if row is None:
            return None
        start, end = period_bounds(row[0], limits, row[1])
        period = begin_period(conn, user_id, start, end)
        with conn.cursor(row_factory=class_row(Period)) as cur:
            period = cur.execute(
                "UPDATE traffic_periods SET extra_bytes = %s WHERE user_id = %s AND current "
                f"RETURNING {PERIOD_COLUMNS}",
                (extra, user_id),
            ).fetchone()
        assert period is not None
    total = total_bytes(limits, period)
    period = _rearm(conn, period, total)
    if not limits.limits_traffic or period.used_bytes < total:
        set_blocked(conn, user_id, False)
    return period


def lock_subscription(conn: psycopg.Connection[Any], user_id: int) -> tuple[str | None, str, str] | None:
    """Lock the subscription's row (before its period's: the lock order); its (plan_code, kind, status),
    the status "expired" once `expires_at` passed (the row keeps "active" until then: a grant or a pack
    added now would go into a period that the renewal closes)."""
    row = conn.execute(
        "SELECT plan_code, kind, CASE WHEN status = 'active' AND expires_at <= now() THEN 'expired' ELSE status END "
        "FROM subscriptions WHERE user_id = %s FOR UPDATE",
        (user_id,),
    ).fetchone()
    return None if row is None else (row[0], row[1], row[2])


# --- the writer's accounting ------------------------------------------------------------------------

ACCOUNT = """
UPDATE traffic_periods p SET used_bytes = p.used_bytes + d.bytes
FROM unnest(%(ids)s::bigint[], %(bytes)s::bigint[]) AS d (user_id, bytes)
WHERE p.user_id = d.user_id AND p.current
RETURNING p.user_id
"""

USAGE_ROWS = """
SELECT p.user_id, p.started_at, p.ends_at, p.used_bytes, p.extra_bytes, p.notified,
       s.plan_code, s.kind, s.traffic_blocked, u.language
FROM traffic_periods p
JOIN subscriptions s ON s.user_id = p.user_id
JOIN users u ON u.id = p.user_id
WHERE p.current AND p.user_id = ANY(%(ids)s::bigint[]) AND s.status = 'active' AND s.expires_at > now()
  AND (p.notified > 0 OR p.used_bytes >= %(floor)s)
ORDER BY p.user_id
"""


def account_usage(conn: psycopg.Connection[Any], deltas: Sequence[tuple[int, int]], rules: QuotaRules) -> list[int]:
    """Add each user's new bytes `(user_id, bytes)` to their current period; queue the 80/95 % notices
    that are due; return the users who reached 100 % and are not blocked yet (for `block_over_quota`,
    in a transaction of its own). Runs in the writer's traffic transaction; locks periods only."""
    moved = sorted((user_id, count) for user_id, count in deltas if count > 0)
    if not moved:
        return []
    ids = [user_id for user_id, _ in moved]
    counted = {int(r[0]) for r in conn.execute(ACCOUNT, {"ids": ids, "bytes": [c for _, c in moved]}).fetchall()}
    missing = [(user_id, count) for user_id, count in moved if user_id not in counted]
    if missing:
        _open_missing_periods(conn, missing, rules)
    over = []
    for user_id, started_at, ends_at, used, extra, notified, plan_code, kind, blocked, lang in conn.execute(
        USAGE_ROWS, {"ids": ids, "floor": rules.first_notice_bytes}
    ).fetchall():
        limits = rules.limits_for(plan_code, kind)
        period = Period(user_id, started_at, ends_at, used, extra, notified)
        total = total_bytes(limits, period)
        level = usage_level(used, total)
        if level >= 100:
            if not blocked:
                over.append(int(user_id))
        elif level != notified:
            # Up: the notice of the level reached. Down: the quota grew (a reload raised the plan's
            # quota): the notices above the usage may come again, for the bigger quota.
            conn.execute("UPDATE traffic_periods SET notified = %s WHERE user_id = %s AND current", (level, user_id))
            if level > notified:
                _notify_level(conn, rules, lang, period, total, level)
    return over


def _open_missing_periods(conn: psycopg.Connection[Any], missing: Sequence[tuple[int, int]], rules: QuotaRules) -> None:
    """Users counted before they had a period (a subscription that just (re)started, or older than
    quotas): open one from the subscription's start, with these bytes in it. Another node's writer
    may open it first (the insert then waits for it and does nothing): the bytes go to that one."""
    # The users rows first (the lock order): the insert's foreign key takes a key-share lock on each,
    # and taking it after the period's row would deadlock with a pack or an admin's grant for the
    # same user (users row locked, then the period opened by `add_extra`).
    rows = conn.execute(
        "SELECT s.user_id, s.plan_code, s.kind, s.starts_at, now() FROM subscriptions s "
        "JOIN users u ON u.id = s.user_id WHERE s.user_id = ANY(%s) ORDER BY s.user_id FOR KEY SHARE OF u",
        ([user_id for user_id, _ in missing],),
    ).fetchall()
    counts = dict(missing)
    raced = []
    for user_id, plan_code, kind, starts_at, now in rows:
        start, end = period_bounds(starts_at, rules.limits_for(plan_code, kind), now)
        inserted = conn.execute(
            "INSERT INTO traffic_periods (user_id, started_at, ends_at, used_bytes) VALUES (%s, %s, %s, %s) "
            "ON CONFLICT DO NOTHING RETURNING user_id",
            (user_id, start, end, counts[user_id]),
        ).fetchone()
        if inserted is None:
            raced.append(user_id)
    if raced:
        conn.execute(ACCOUNT, {"ids": raced, "bytes": [counts[user_id] for user_id in raced]})


def _notice_key(period: Period, total: int, level: int) -> str:
    # The whole quota is in the key: after a pack, a grant or a reload that raised the plan's quota, the
    # same level of the bigger quota is a new notice; the same level of the same quota never is.
    return f"traffic:{period.user_id}:{period.started_at.timestamp():.0f}:{total}:{level}"


def _notify_level(
    conn: psycopg.Connection[Any], rules: QuotaRules, lang: str | None, period: Period, total: int, level: int
) -> bool:
    language = lang or rules.default_language
    values = {
        "percent": level,
        "used": format_bytes(period.used_bytes),
        "total": format_bytes(total),
        "reset": _reset_text(rules, language, period),
    }
    text = rules.texts.get(language, "quota.exhausted" if level >= 100 else "quota.warn", **values)
    markup = {"inline_keyboard": [[{"text": rules.texts.get(language, "quota.buy_pack"), "callback_data": "packs"}]]}
    return outbox.enqueue(conn, period.user_id, text, dedupe_key=_notice_key(period, total, level), reply_markup=markup)


def _reset_text(rules: QuotaRules, language: str, period: Period) -> str:
    if period.ends_at is None:
        return rules.texts.get(language, "quota.no_reset")
    return rules.texts.get(language, "quota.resets", date=period.ends_at.strftime("%Y-%m-%d %H:%M UTC"))


LOCK_SUBSCRIPTIONS = """
SELECT s.user_id, s.plan_code, s.kind, s.traffic_blocked, u.language
FROM subscriptions s JOIN users u ON u.id = s.user_id
WHERE s.user_id = ANY(%(ids)s::bigint[]) AND s.status = 'active'
ORDER BY s.user_id
FOR UPDATE OF s
"""


def block_over_quota(conn: psycopg.Connection[Any], user_ids: Sequence[int], rules: QuotaRules) -> list[int]:
    """Block the users of `user_ids` whose current period is (still) at its quota and tell them, once
    per period. Locks their subscriptions first, then reads the periods afresh (a pack committed in
    between is seen). Returns the users blocked now."""
    if not user_ids:
        return []
    blocked_now = []
    locked = conn.execute(LOCK_SUBSCRIPTIONS, {"ids": sorted(set(user_ids))}).fetchall()
    for user_id, plan_code, kind, blocked, lang in locked:
        period = current_period(conn, user_id)
        limits = rules.limits_for(plan_code, kind)
        total = total_bytes(limits, period)
        if period is None or usage_level(period.used_bytes, total) < 100:
            continue
        if not blocked and set_blocked(conn, user_id, True):
            blocked_now.append(int(user_id))
        if period.notified < 100:
            conn.execute("UPDATE traffic_periods SET notified = 100 WHERE user_id = %s AND current", (user_id,))
            _notify_level(conn, rules, lang, period, total, 100)
    return blocked_now


# --- the quota worker --------------------------------------------------------------------------------

DUE_PERIODS = """
SELECT p.user_id FROM traffic_periods p
WHERE p.current AND p.ends_at <= now()
ORDER BY p.ends_at, p.user_id
LIMIT %(limit)s
"""


@attrs.frozen
class RollResult:
    rolled: int
    #: Users put back on Xray by their new period.
    unblocked: int
    #: More periods may be due (the batch was full).
    more: bool


def roll_due_periods(conn: psycopg.Connection[Any], rules: QuotaRules, limit: int) -> RollResult:
    """Start the next period of up to `limit` subscriptions whose period ended (usage back to zero,
    a block lifted, the user told). A subscription that is no longer active has its period closed:
    the next purchase opens one."""
    due = [int(r[0]) for r in conn.execute(DUE_PERIODS, {"limit": limit}).fetchall()]
    if not due:
        return RollResult(0, 0, False)
    # The users rows first (the lock order): the new period's foreign key takes a key-share lock on
    # each, which after the subscription's would deadlock with a pack or an admin's grant.
    conn.execute("SELECT 1 FROM users WHERE id = ANY(%s) ORDER BY id FOR KEY SHARE", (sorted(due),))
    rows = conn.execute(
        "SELECT s.user_id, s.plan_code, s.kind, s.status = 'active' AND s.expires_at > now(), s.starts_at, "
        "s.traffic_blocked, u.language, now() "
        "FROM subscriptions s JOIN users u ON u.id = s.user_id "
        "WHERE s.user_id = ANY(%s) ORDER BY s.user_id FOR UPDATE OF s",
        (sorted(due),),
    ).fetchall()
    rolled = unblocked = 0
    for user_id, plan_code, kind, active, starts_at, blocked, lang, now in rows:
        period = current_period(conn, user_id)
        if period is None or period.ends_at is None or period.ends_at > now:
            continue  # rolled meanwhile
        rolled += 1
        if not active:
            conn.execute("UPDATE traffic_periods SET current = false WHERE user_id = %s AND current", (user_id,))
            continue
        limits = rules.limits_for(plan_code, kind)
        start, end = period_bounds(starts_at, limits, now)
        if start <= period.started_at:
            # The plan's reset changed (to "never", or to longer periods) since this one began: it now
            # lasts to the end of the period that contains now (None: it never resets).
            conn.execute("UPDATE traffic_periods SET ends_at = %s WHERE user_id = %s AND current", (end, user_id))
            continue
        begin_period(conn, user_id, start, end)
        if blocked and set_blocked(conn, user_id, False):
            unblocked += 1
            language = lang or rules.default_language
            outbox.enqueue(
                conn, user_id, rules.texts.get(language, "quota.restored"),
                dedupe_key=f"traffic:{user_id}:{start.timestamp():.0f}:restored",
            )  # fmt: skip
    # Keep from looping on rows whose subscription is gone (never: user rows are kept), or that were skipped.
    return RollResult(rolled, unblocked, len(due) >= limit and rolled > 0)


def next_reset(conn: psycopg.Connection[Any]) -> tuple[dt.datetime | None, dt.datetime]:
    """The earliest end of a current period (None: none ends), and the database clock."""
    row = conn.execute(
        "SELECT (SELECT min(ends_at) FROM traffic_periods WHERE current AND ends_at IS NOT NULL), now()"
    ).fetchone()
    assert row is not None
    return row[0], row[1]


BLOCKED_BATCH = """
SELECT s.user_id, s.plan_code, s.kind
FROM subscriptions s
WHERE s.traffic_blocked AND s.user_id > %(after)s
ORDER BY s.user_id
LIMIT %(limit)s
FOR UPDATE
"""


def unblock_within_quota(
    conn: psycopg.Connection[Any], rules: QuotaRules, after: int, limit: int
) -> tuple[int, int | None]:
    """Lift the block of blocked users (keyset after `after`) whose quota now covers their usage — a
    reload raised it, made it unlimited, or moved them to another plan. Returns (unblocked, last id
    seen or None at the end)."""
    rows = conn.execute(BLOCKED_BATCH, {"after": after, "limit": limit}).fetchall()
    unblocked = 0
    for user_id, plan_code, kind in rows:
        limits = rules.limits_for(plan_code, kind)
        period = current_period(conn, user_id)
        total = total_bytes(limits, period)
        if not limits.limits_traffic or period is None or period.used_bytes < total:
            if set_blocked(conn, user_id, False):
                unblocked += 1
            if period is not None:
                _rearm(conn, period, total)
    last = int(rows[-1][0]) if len(rows) >= limit else None
    return unblocked, last


@attrs.frozen
class UsageView:
    """A subscriber's traffic as shown to them and to admins (and in `Subscription-Userinfo`)."""

    used_bytes: int
    #: The whole quota of the period (0: unlimited).
    total_bytes: int
    period: Period | None
    blocked: bool
    #: When the quota starts again (None: never, or no quota); before the first period, from the
    #: subscription's start.
    resets_at: dt.datetime | None = None
    #: Device slots granted beyond the plan's.
    extra_devices: int = 0


def usage_of(conn: psycopg.Connection[Any], user_id: int, limits: Limits) -> UsageView:
    period = current_period(conn, user_id)
    row = conn.execute(
        "SELECT traffic_blocked, starts_at, now(), extra_devices FROM subscriptions WHERE user_id = %s", (user_id,)
    ).fetchone()
    if row is None:
        return UsageView(0, 0, period, False)
    usage = current_usage(limits, row[1], row[2], period_facts(period))
    return UsageView(
        used_bytes=usage.used,
        total_bytes=usage.total,
        period=period,
        blocked=bool(row[0]),
        resets_at=usage.resets_at,
        extra_devices=int(row[3]),
    )


def prune_closed_periods(conn: psycopg.Connection[Any], days: int, limit: int) -> int:
    """Delete up to `limit` closed periods (history) that started more than `days` ago, oldest first."""
    cur = conn.execute(
        "DELETE FROM traffic_periods WHERE (user_id, started_at) IN (SELECT user_id, started_at FROM traffic_periods "
        "WHERE NOT current AND started_at < now() - make_interval(days => %s) ORDER BY started_at LIMIT %s)",
        (days, limit),
    )
    return cur.rowcount
