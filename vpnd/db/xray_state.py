"""Queries of the Xray writer: the desired user set, its sync marker, and per-user traffic totals.

The desired set is every subscription that is active, not expired and not over its traffic quota. It
is streamed in keyset batches ordered by the Xray email in byte order (`COLLATE "C"`, the order the renderer checks), so
no query returns "all users" and each batch is its own short transaction.

The *sync marker* (`daemon_state['xray_synced_at']`) is the database time of the last round after
which Xray's live users and its config file both matched the database. A user whose row changed
after it (minus a safety margin) may be in any state in Xray after a crash or a restart; everyone
else is exactly as the database says. That bounds the work of a resync after a start without a
list of Xray's live users (V2Ray and older Xray cannot list them).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

import attrs
import psycopg

from vpnd.db.quota import QuotaRules, account_usage
from vpnd.db.subscriptions import Subscription, get_by_token

#: Xray's key for a user, in SQL; must equal `Subscription.xray_email` ("u<user_id>").
XRAY_EMAIL = "('u' || s.user_id::text)"
#: The subscription's owner is banned (`vpnd admin ban`): Xray must not know them.
BANNED = "EXISTS (SELECT 1 FROM users b WHERE b.id = s.user_id AND b.banned_at IS NOT NULL)"

SYNC_MARKER_KEY = "xray_synced_at"
#: The node `[xray]` describes (its marker key and traffic rows predate several nodes).
LOCAL_NODE = "local"


def sync_marker_key(node: str) -> str:
    return SYNC_MARKER_KEY if node == LOCAL_NODE else f"{SYNC_MARKER_KEY}:{node}"


@attrs.frozen
class DesiredClient:
    email: str
    uuid: str
    #: The row changed after the `changed_since` given to the query (always True without one).
    changed: bool


@attrs.frozen
class DesiredBatch:
    clients: list[DesiredClient]
    #: The database clock when the batch was read.
    db_now: dt.datetime
    #: The next time an active subscription expires (None: none will), so the writer can wake then.
    next_expiry: dt.datetime | None


DESIRED_BATCH = f"""
SELECT {XRAY_EMAIL} COLLATE "C" AS email,
       s.uuid,
       coalesce(s.updated_at > %(since)s::timestamptz, true) AS changed
FROM subscriptions s
WHERE s.status = 'active' AND s.expires_at > now() AND NOT s.traffic_blocked AND {XRAY_EMAIL} COLLATE "C" > %(after)s
  AND (s.plan_code IS NULL OR s.plan_code <> ALL(%(excluded)s::text[]))
  AND NOT {BANNED}
ORDER BY 1
LIMIT %(limit)s
"""

CLOCK_AND_NEXT_EXPIRY = """
SELECT now(), (SELECT min(expires_at) FROM subscriptions WHERE status = 'active' AND expires_at > now())
"""


def desired_batch(
    conn: psycopg.Connection[Any],
    after: str,
    limit: int,
    changed_since: dt.datetime | None = None,
    excluded_plans: Sequence[str] = (),
) -> DesiredBatch:
    """Up to `limit` users who may connect, with email greater than `after` (byte order), leaving
    out subscriptions of `excluded_plans` (plans restricted to other nodes)."""
    params = {"after": after, "limit": limit, "since": changed_since, "excluded": list(excluded_plans)}
    rows = conn.execute(DESIRED_BATCH, params).fetchall()
    clock = conn.execute(CLOCK_AND_NEXT_EXPIRY).fetchone()
    assert clock is not None
    return DesiredBatch(
        clients=[DesiredClient(email, str(user_uuid), bool(changed)) for email, user_uuid, changed in rows],
        db_now=clock[0],
        next_expiry=clock[1],
    )


UNDESIRED_CHANGED_BATCH = f"""
SELECT s.user_id, {XRAY_EMAIL}
FROM subscriptions s
WHERE (NOT (s.status = 'active' AND s.expires_at > now()) OR s.traffic_blocked
       OR s.plan_code = ANY(%(excluded)s::text[]) OR {BANNED})
  AND (%(since)s::timestamptz IS NULL OR s.updated_at > %(since)s OR s.expires_at > %(since)s
       OR s.plan_code = ANY(%(excluded)s::text[]))
  AND s.user_id > %(after)s
ORDER BY s.user_id
LIMIT %(limit)s
"""


def undesired_changed_batch(
    conn: psycopg.Connection[Any],
    after_user_id: int,
    limit: int,
    since: dt.datetime | None,
    excluded_plans: Sequence[str] = (),
) -> list[tuple[int, str]]:
    """(user_id, email) of users who may not connect (here: a plan of `excluded_plans` counts as not)
    and whose row changed or expired after `since` (every such user when `since` is None), in
    user_id order after `after_user_id`."""
    params = {"after": after_user_id, "limit": limit, "since": since, "excluded": list(excluded_plans)}
    rows = conn.execute(UNDESIRED_CHANGED_BATCH, params).fetchall()
    return [(int(user_id), str(email)) for user_id, email in rows]


def get_sync_marker(conn: psycopg.Connection[Any], node: str = LOCAL_NODE) -> dt.datetime | None:
    row = conn.execute(
        "SELECT (value #>> '{}')::timestamptz FROM daemon_state WHERE key = %s", (sync_marker_key(node),)
    ).fetchone()
    return None if row is None else row[0]


def set_sync_marker(conn: psycopg.Connection[Any], at: dt.datetime, node: str = LOCAL_NODE) -> None:
    """Record that `node`'s Xray matched the database as read at `at` (never moves the marker back)."""
    conn.execute(
        "INSERT INTO daemon_state (key, value) VALUES (%(key)s, to_jsonb(%(at)s::timestamptz)) "
        "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value "
        "WHERE (daemon_state.value #>> '{}')::timestamptz < %(at)s::timestamptz",
        {"key": sync_marker_key(node), "at": at},
    )


# --- traffic -------------------------------------------------------------------------------------


@attrs.frozen
class TrafficTotals:
    uplink: int = 0
    downlink: int = 0


STORE_TRAFFIC = """
WITH sample AS (
    SELECT c.user_id, c.up, c.down
    FROM unnest(%(ids)s::bigint[], %(ups)s::bigint[], %(downs)s::bigint[]) AS c (user_id, up, down)
    WHERE EXISTS (SELECT 1 FROM users u WHERE u.id = c.user_id)
), delta AS (
    SELECT s.user_id, s.up, s.down,
           CASE WHEN seen.user_id IS NULL OR %(reset)s OR s.up < seen.uplink_seen OR s.down < seen.downlink_seen
                THEN s.up ELSE s.up - seen.uplink_seen END AS d_up,
           CASE WHEN seen.user_id IS NULL OR %(reset)s OR s.up < seen.uplink_seen OR s.down < seen.downlink_seen
                THEN s.down ELSE s.down - seen.downlink_seen END AS d_down
    FROM sample s
    LEFT JOIN traffic_seen seen ON seen.node = %(node)s AND seen.user_id = s.user_id
    WHERE seen.user_id IS NULL OR %(reset)s OR s.up <> seen.uplink_seen OR s.down <> seen.downlink_seen
    ORDER BY s.user_id
), seen_rows AS (
    INSERT INTO traffic_seen AS t (node, user_id, uplink_seen, downlink_seen)
    SELECT %(node)s, user_id, up, down FROM delta
    ON CONFLICT (node, user_id) DO UPDATE SET
        uplink_seen = EXCLUDED.uplink_seen, downlink_seen = EXCLUDED.downlink_seen, updated_at = now()
), totals AS (
    INSERT INTO traffic AS t (user_id, uplink_total, downlink_total)
    SELECT user_id, d_up, d_down FROM delta
    ON CONFLICT (user_id) DO UPDATE SET
        uplink_total = t.uplink_total + EXCLUDED.uplink_total,
        downlink_total = t.downlink_total + EXCLUDED.downlink_total,
        updated_at = now()
)
SELECT user_id, d_up + d_down FROM delta WHERE d_up + d_down > 0
"""


@attrs.frozen
class TrafficStored:
    #: Users whose counters moved since the last reading (they were online in between).
    active_users: int
    #: Bytes (both directions) added to the totals.
    bytes: int
    #: Users who reached their traffic quota and are not blocked yet (`vpnd.db.quota.block_over_quota`).
    over_quota: list[int] = attrs.field(factory=list)


def store_traffic(
    conn: psycopg.Connection[Any],
    samples: Sequence[tuple[int, int, int]],
    *,
    counters_reset: bool = False,
    node: str = LOCAL_NODE,
    quota: QuotaRules | None = None,
) -> TrafficStored:
    """Fold `node`'s raw Xray counters `(user_id, uplink, downlink)` (read without reset) into the
    users' monotonic totals (the sum over every node).

    The delta since the node's last reading is added; a counter lower than last seen means that
    Xray restarted and counts from zero, so the raw value itself is the traffic since then.
    `counters_reset` says the caller knows the node restarted since the last reading (a counter may
    already have grown past its old value). Counters of unknown users are ignored. With `quota`, the
    deltas also count against each user's traffic quota (`vpnd.db.quota.account_usage`), in this transaction.
    """
    if not samples:
        return TrafficStored(0, 0)
    ordered = sorted(samples)  # one lock order for every node's writer: no deadlock between them
    rows = conn.execute(
        STORE_TRAFFIC,
        {
            "ids": [s[0] for s in ordered],
            "ups": [max(0, s[1]) for s in ordered],
            "downs": [max(0, s[2]) for s in ordered],
            "reset": counters_reset,
            "node": node,
        },
    ).fetchall()
    deltas = [(int(user_id), int(count)) for user_id, count in rows]
    over = account_usage(conn, deltas, quota) if quota is not None else []
    return TrafficStored(len(deltas), sum(count for _, count in deltas), over)


def traffic_totals(conn: psycopg.Connection[Any], user_id: int) -> TrafficTotals:
    """Bytes a user has sent and received in total (zeros before the first reading)."""
    row = conn.execute("SELECT uplink_total, downlink_total FROM traffic WHERE user_id = %s", (user_id,)).fetchone()
    return TrafficTotals() if row is None else TrafficTotals(int(row[0]), int(row[1]))


@attrs.frozen
class SubscriptionUsage:
    subscription: Subscription
    traffic: TrafficTotals


def subscription_by_token(conn: psycopg.Connection[Any], token: str) -> SubscriptionUsage | None:
    """The subscription behind a subscription-URL token, with its traffic totals."""
    subscription = get_by_token(conn, token)
    if subscription is None:
        return None
    return SubscriptionUsage(subscription, traffic_totals(conn, subscription.user_id))


def user_id_from_email(email: str) -> int | None:
    """The user id of an Xray email written by vpnd ("u<digits>"), or None for anything else."""
    digits = email[1:]
    if email[:1] != "u" or not digits.isascii() or not digits.isdigit() or digits != str(int(digits)):
        return None
    return int(digits)
