"""Traffic periods, notices and the quota block (vpnd.db.quota) on a real PostgreSQL.

Each step is one transaction, as the daemon runs them; the test reads the outbox (what the user would
be sent) and the writer's desired set (who may connect) to see the outcome.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
import pytest

from vpnd.db import quota, subscriptions
from vpnd.db.users import upsert_user
from vpnd.db.xray_state import desired_batch, store_traffic
from vpnd.quota import UNLIMITED, Limits
from vpnd.texts import Texts

GIB = 2**30
USER = 4242
T = TypeVar("T")

PLANS = {
    "q1": Limits("q1", traffic_bytes=GIB, reset="per_period", days=30),
    "q10": Limits("q10", traffic_bytes=10 * GIB, reset="per_period", days=30),
    "mon": Limits("mon", traffic_bytes=GIB, reset="monthly", days=30),
}


class Env:
    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.plans = dict(PLANS)
        self.rules = quota.QuotaRules(limits_for=self.limits_for, texts=Texts.load())

    def limits_for(self, plan_code: str | None, kind: str) -> Limits:
        return self.plans.get(plan_code or "", UNLIMITED)

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """One transaction, committed."""
        with psycopg.connect(self.dsn) as conn:
            return fn(conn, *args, **kwargs)

    def sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            cur = conn.execute(query, params or None)
            return cur.fetchall() if cur.description else []

    def grant(self, plan: str | None, user_id: int = USER, days: int = 30) -> subscriptions.Subscription:
        def work(conn: psycopg.Connection[Any]) -> subscriptions.Subscription:
            upsert_user(conn, user_id, None, f"user {user_id}", "en")
            return subscriptions.grant_days(conn, user_id, days, kind="paid", plan_code=plan)

        return self.run(work)

    def traffic(self, user_id: int, total: int) -> list[int]:
        """The node's raw counter reading for the user (cumulative, as Xray reports it); the writer's
        two transactions: accounting, then the block. Returns the users blocked."""
        stored = self.run(store_traffic, [(user_id, 0, total)], quota=self.rules)
        return self.run(quota.block_over_quota, stored.over_quota, self.rules) if stored.over_quota else []

    def period(self, user_id: int = USER) -> quota.Period | None:
        return self.run(quota.current_period, user_id)

    def notices(self, user_id: int = USER) -> list[str]:
        return [r[0] for r in self.sql("SELECT payload->>'text' FROM outbox WHERE chat_id = %s ORDER BY id", user_id)]

    def desired(self) -> set[str]:
        return {c.email for c in self.run(desired_batch, "", 1000).clients}

    def blocked(self, user_id: int = USER) -> bool:
        return bool(self.sql("SELECT traffic_blocked FROM subscriptions WHERE user_id = %s", user_id)[0][0])

    def grant_extra(self, extra: int, user_id: int = USER) -> quota.Period | None:
        def work(conn: psycopg.Connection[Any]) -> quota.Period | None:
            locked = quota.lock_subscription(conn, user_id)
            assert locked is not None
            return quota.add_extra(conn, user_id, extra, self.limits_for(locked[0], locked[1]))

        return self.run(work)


@pytest.fixture
def env(db_dsn: str) -> Env:
    return Env(db_dsn)


def pct(percent: float, total: int = GIB) -> int:
    return int(total * percent / 100)


def test_accounting_opens_a_period_lazily_from_the_subscription_start(env: Env) -> None:
    sub = env.grant("q1")
    assert env.period() is None
    env.traffic(USER, 1000)
    period = env.period()
    assert period is not None
    assert period.started_at == sub.starts_at
    assert period.ends_at == sub.starts_at + dt.timedelta(days=30)
    assert (period.used_bytes, period.extra_bytes, period.notified) == (1000, 0, 0)
    env.traffic(USER, 5000)  # the counter grew by 4000
    assert env.period().used_bytes == 5000  # type: ignore[union-attr]


def test_notices_at_80_and_95_once_each_then_block_at_100(env: Env) -> None:
    env.grant("q1")
    env.traffic(USER, pct(79))
    assert env.notices() == []
    env.traffic(USER, pct(81))
    assert len(env.notices()) == 1 and "80%" in env.notices()[0]
    # more traffic within the same level, or the same reading again: nothing new
    env.traffic(USER, pct(85))
    env.traffic(USER, pct(85))
    assert len(env.notices()) == 1
    env.traffic(USER, pct(96))
    assert len(env.notices()) == 2 and "95%" in env.notices()[1]
    env.traffic(USER, pct(97))
    assert len(env.notices()) == 2
    assert env.period().notified == 95  # type: ignore[union-attr]
    assert "u4242" in env.desired()

    assert env.traffic(USER, GIB) == [USER]
    assert env.blocked()
    assert "u4242" not in env.desired()
    notices = env.notices()
    assert len(notices) == 3 and "used up" in notices[2] and "1 GB of 1 GB" in notices[2]
    # the block is done once and told once, whatever the writer reads afterwards
    assert env.traffic(USER, GIB + 5000) == []
    assert len(env.notices()) == 3


def test_the_same_accounting_transaction_repeated_queues_nothing_new(env: Env) -> None:
    """Replaying the accounting of a level (a writer that retried after a lost commit reply) gives no
    second notice: the level is in the period row and the outbox key is unique."""
    env.grant("q1")
    env.traffic(USER, pct(82))
    period = env.period()
    assert period is not None

    def replay(conn: psycopg.Connection[Any]) -> None:
        conn.execute("UPDATE traffic_periods SET notified = 0 WHERE user_id = %s AND current", (USER,))
        quota.account_usage(conn, [(USER, 1)], env.rules)

    env.run(replay)
    assert len(env.notices()) == 1


def test_a_jump_past_100_blocks_with_one_notice(env: Env) -> None:
    env.grant("q1")
    assert env.traffic(USER, 2 * GIB) == [USER]
    notices = env.notices()
    assert len(notices) == 1 and "used up" in notices[0]
    assert env.period().notified == 100  # type: ignore[union-attr]


def test_add_extra_lifts_the_block_and_rearms_the_notices(env: Env) -> None:
    env.grant("q1")
    env.traffic(USER, pct(81))
    env.traffic(USER, pct(96))
    env.traffic(USER, GIB)
    assert env.blocked() and len(env.notices()) == 3

    period = env.grant_extra(GIB)
    assert period is not None and period.extra_bytes == GIB
    assert not env.blocked() and "u4242" in env.desired()
    assert period.notified == 0  # 1 GiB of 2 GiB: 50 %, below every notice

    env.traffic(USER, pct(81, 2 * GIB))
    assert len(env.notices()) == 4 and "80%" in env.notices()[3] and "2 GB" in env.notices()[3]
    env.traffic(USER, pct(96, 2 * GIB))
    assert len(env.notices()) == 5
    assert env.traffic(USER, 2 * GIB) == [USER]
    assert len(env.notices()) == 6 and env.blocked()


def test_add_extra_that_is_not_enough_keeps_the_block(env: Env) -> None:
    env.grant("q1")
    env.traffic(USER, 3 * GIB)
    assert env.blocked()
    period = env.grant_extra(GIB)
    assert period is not None and period.notified == 100
    assert env.blocked() and "u4242" not in env.desired()


def test_add_extra_before_any_traffic_opens_the_period(env: Env) -> None:
    """A pack bought (or traffic granted) right after a (re)start, before the first reading: kept."""
    sub = env.grant("q1")
    period = env.grant_extra(5 * GIB)
    assert period is not None and period.extra_bytes == 5 * GIB and period.started_at == sub.starts_at
    env.traffic(USER, 2 * GIB)
    assert not env.blocked()
    assert env.period().extra_bytes == 5 * GIB  # type: ignore[union-attr]


def test_add_extra_without_a_subscription_and_bad_amounts(env: Env) -> None:
    env.run(lambda conn: upsert_user(conn, USER, None, "x", "en"))
    assert env.run(quota.add_extra, USER, GIB, PLANS["q1"]) is None
    env.grant("q1")
    for bad in (0, -GIB):
        with pytest.raises(ValueError, match="positive"):
            env.run(quota.add_extra, USER, bad, PLANS["q1"])


def roll(env: Env) -> quota.RollResult:
    return env.run(quota.roll_due_periods, env.rules, 100)


def age_subscription(env: Env, days: float, user_id: int = USER) -> None:
    """Move the subscription and its current period `days` into the past (as if time had passed)."""
    shift = dt.timedelta(days=days)
    env.sql(
        "UPDATE subscriptions SET starts_at = starts_at - %s, expires_at = expires_at - %s WHERE user_id = %s",
        shift,
        shift,
        user_id,
    )
    env.sql(
        "UPDATE traffic_periods SET started_at = started_at - %s, ends_at = ends_at - %s WHERE user_id = %s",
        shift,
        shift,
        user_id,
    )


def test_the_workers_roll_starts_the_next_period_lifts_the_block_and_tells_the_user(env: Env) -> None:
    sub = env.grant("q1", days=90)
    env.traffic(USER, GIB)
    assert env.blocked() and len(env.notices()) == 1
    assert roll(env) == quota.RollResult(0, 0, False)  # nothing due yet

    age_subscription(env, 31)
    result = roll(env)
    assert (result.rolled, result.unblocked) == (1, 1)
    period = env.period()
    assert period is not None
    starts = sub.starts_at - dt.timedelta(days=31)
    assert period.started_at == starts + dt.timedelta(days=30)
    assert period.ends_at == starts + dt.timedelta(days=60)
    assert (period.used_bytes, period.extra_bytes, period.notified) == (0, 0, 0)
    assert not env.blocked() and "u4242" in env.desired()
    notices = env.notices()
    assert len(notices) == 2 and "started again" in notices[1]
    # the old period is kept as history
    assert env.sql("SELECT count(*) FROM traffic_periods WHERE user_id = %s AND NOT current", USER) == [(1,)]
    assert roll(env).rolled == 0

    # the same counter keeps growing: only the growth counts in the new period
    env.traffic(USER, GIB + 1000)
    assert env.period().used_bytes == 1000  # type: ignore[union-attr]


def test_roll_after_a_long_gap_lands_in_the_period_containing_now(env: Env) -> None:
    env.grant("mon", days=400)
    env.traffic(USER, 100)
    age_subscription(env, 200)
    assert roll(env).rolled == 1
    period = env.period()
    assert period is not None and period.ends_at is not None
    now = env.sql("SELECT now()")[0][0]
    assert period.started_at <= now < period.ends_at


def test_roll_of_an_unblocked_user_sends_nothing(env: Env) -> None:
    env.grant("q1", days=90)
    env.traffic(USER, 100)
    age_subscription(env, 31)
    assert roll(env) == quota.RollResult(1, 0, False)
    assert env.notices() == []


def test_roll_closes_the_period_of_an_expired_subscription(env: Env) -> None:
    env.grant("q1", days=10)
    env.traffic(USER, 100)
    age_subscription(env, 31)  # expired 21 days ago, its period ended a day ago
    assert roll(env).rolled == 1
    assert env.period() is None
    assert env.sql("SELECT count(*) FROM traffic_periods WHERE user_id = %s", USER) == [(1,)]


def test_roll_batches_and_reports_more(env: Env) -> None:
    for uid in range(1, 8):
        env.grant("q1", user_id=uid, days=90)
        env.traffic(uid, 10)
        age_subscription(env, 31, uid)
    first = env.run(quota.roll_due_periods, env.rules, 5)
    assert (first.rolled, first.more) == (5, True)
    second = env.run(quota.roll_due_periods, env.rules, 5)
    assert (second.rolled, second.more) == (2, False)


def test_unblock_within_quota_after_a_reload_raised_the_quota(env: Env) -> None:
    env.grant("q1")
    env.grant("q1", user_id=7)
    env.traffic(USER, GIB)
    env.traffic(7, 3 * GIB)
    assert env.blocked() and env.blocked(7)
    assert env.run(quota.unblock_within_quota, env.rules, 0, 100) == (0, None)

    env.plans["q1"] = Limits("q1", traffic_bytes=2 * GIB, reset="per_period", days=30)  # the reload
    assert env.run(quota.unblock_within_quota, env.rules, 0, 100) == (1, None)
    assert not env.blocked() and env.blocked(7)
    assert "u4242" in env.desired() and "u7" not in env.desired()
    assert env.period().notified == 0  # type: ignore[union-attr]  # 50 %: the notices are armed again

    env.plans["q1"] = UNLIMITED  # the plan's quota removed
    assert env.run(quota.unblock_within_quota, env.rules, 0, 100) == (1, None)
    assert not env.blocked(7)


def test_unblock_within_quota_pages_by_user_id(env: Env) -> None:
    for uid in (3, 5, 9):
        env.grant("q1", user_id=uid)
        env.traffic(uid, GIB)
    env.plans["q1"] = UNLIMITED
    assert env.run(quota.unblock_within_quota, env.rules, 0, 2) == (2, 5)
    assert env.run(quota.unblock_within_quota, env.rules, 5, 2) == (1, None)


def test_a_renewal_of_the_same_plan_keeps_the_period_and_the_block(env: Env) -> None:
    env.grant("q1")
    env.traffic(USER, GIB)
    before = env.period()
    env.grant("q1")
    assert env.period() == before
    assert env.blocked()


def test_a_plan_change_opens_a_new_period_and_lifts_the_block(env: Env) -> None:
    env.grant("q1")
    env.traffic(USER, GIB)
    old = env.period()
    assert old is not None and env.blocked()
    sub = env.grant("q10")
    assert not env.blocked() and "u4242" in env.desired()
    assert env.period() is None  # closed; the next reading opens the new plan's period
    env.traffic(USER, GIB + 500)
    period = env.period()
    assert period is not None and period.started_at == sub.starts_at and period.used_bytes == 500
    assert period.started_at > old.started_at


def test_a_restart_after_expiry_opens_a_new_period(env: Env) -> None:
    env.grant("q1", days=5)
    env.traffic(USER, GIB)
    assert env.blocked()
    env.sql("UPDATE subscriptions SET expires_at = now() - interval '1 day' WHERE user_id = %s", USER)
    sub = env.grant("q1")
    assert sub.expires_at - sub.starts_at == dt.timedelta(days=30)
    assert not env.blocked() and env.period() is None
    env.traffic(USER, GIB + 10)
    assert env.period().used_bytes == 10  # type: ignore[union-attr]


def test_usage_view(env: Env) -> None:
    env.grant("q1")
    view = env.run(quota.usage_of, USER, PLANS["q1"])
    assert (view.used_bytes, view.total_bytes, view.period, view.blocked) == (0, GIB, None, False)
    env.traffic(USER, GIB)
    env.grant_extra(GIB)
    view = env.run(quota.usage_of, USER, PLANS["q1"])
    assert (view.used_bytes, view.total_bytes, view.blocked) == (GIB, 2 * GIB, False)
    assert env.run(quota.usage_of, USER, UNLIMITED).total_bytes == 0


def test_next_reset_is_the_earliest_period_end(env: Env) -> None:
    assert env.run(quota.next_reset)[0] is None
    env.grant("q1")
    env.traffic(USER, 1)
    end, now = env.run(quota.next_reset)
    assert end == env.period().ends_at and end > now  # type: ignore[union-attr]


def test_a_reload_that_raised_the_quota_rearms_the_notices_of_an_unblocked_user(env: Env) -> None:
    env.grant("q1")
    env.traffic(USER, pct(81))
    assert len(env.notices()) == 1
    env.plans["q1"] = Limits("q1", traffic_bytes=2 * GIB, reset="per_period", days=30)
    env.traffic(USER, pct(82))  # 41 % of the new quota: no notice, the 80 % one armed again
    assert len(env.notices()) == 1 and env.period().notified == 0  # type: ignore[union-attr]
    env.traffic(USER, pct(81, 2 * GIB))
    notices = env.notices()
    assert len(notices) == 2 and "80%" in notices[1] and "of 2 GB" in notices[1]


def test_roll_after_the_plan_got_longer_periods_extends_the_current_one(env: Env) -> None:
    sub = env.grant("q1", days=120)
    env.traffic(USER, 100)
    age_subscription(env, 31)
    env.plans["q1"] = Limits("q1", traffic_bytes=GIB, reset="per_period", days=90)
    assert roll(env).rolled == 1
    period = env.period()
    assert period is not None and period.used_bytes == 100  # the same period, longer
    assert period.ends_at == sub.starts_at - dt.timedelta(days=31) + dt.timedelta(days=90)

    env.plans["q1"] = Limits("q1", traffic_bytes=GIB, reset="never")
    env.sql("UPDATE traffic_periods SET ends_at = now() - interval '1 second' WHERE user_id = %s", USER)
    assert roll(env).rolled == 1
    assert env.period().ends_at is None  # type: ignore[union-attr]
    assert env.run(quota.next_reset)[0] is None


def test_housekeeping_prunes_only_old_closed_periods(env: Env) -> None:
    env.grant("q1")
    env.traffic(USER, 1000)  # the current period, opened now
    old = [f"now() - interval '{days} days'" for days in (400, 380, 10)]
    for started in old:  # history: two closed periods past a year, one recent
        env.sql(
            f"INSERT INTO traffic_periods (user_id, started_at, ends_at, used_bytes, current) "
            f"VALUES (%s, {started}, {started} + interval '30 days', 5, false)",
            USER,
        )
    assert env.run(quota.prune_closed_periods, 365, 1) == 1  # batches: oldest first
    assert env.run(quota.prune_closed_periods, 365, 100) == 1
    assert env.run(quota.prune_closed_periods, 365, 100) == 0
    left = env.sql("SELECT current, used_bytes FROM traffic_periods WHERE user_id = %s ORDER BY started_at", USER)
    assert left == [(False, 5), (True, 1000)]
