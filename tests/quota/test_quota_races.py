"""The quota's edges: a reload that lengthens a plan's periods, the lock order of a period's insert
against a pack or an admin's grant (the users row first: no deadlock), grants to a subscription that
has just run out. Real PostgreSQL, two real transactions racing."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from tests.quota.test_quota_db import GIB, USER, Env, age_subscription, roll
from vpnd.db import quota
from vpnd.db.xray_state import store_traffic
from vpnd.quota import Limits
from vpnd.services import admin_actions


@pytest.fixture
def env(db_dsn: str) -> Env:
    return Env(db_dsn)


def test_a_reload_lengthening_a_per_period_plan_keeps_the_resets(env: Env) -> None:
    sub = env.grant("q1", days=400)
    env.traffic(USER, GIB)  # blocked in the first 30-day period
    assert env.blocked()
    age_subscription(env, 31)  # that period ended a day ago
    env.plans["q1"] = Limits("q1", traffic_bytes=GIB, reset="per_period", days=90)  # a reload: 90-day periods
    roll(env)
    period = env.period()
    assert period is not None
    starts = sub.starts_at - dt.timedelta(days=31)
    # the same period goes on to the new bound (not "never resets": the user would stay blocked for good)
    assert (period.started_at, period.ends_at) == (starts, starts + dt.timedelta(days=90))
    assert env.blocked()


def race(
    env: Env, background: Callable[[Env], object], foreground: Callable[[psycopg.Connection[Any]], None]
) -> list[BaseException]:
    """`background(env)` in a thread while this thread holds the user's row (`admin_db.lock_user`,
    as a pack's payment or an admin's grant does), then `foreground(conn)` and commit."""
    errors: list[BaseException] = []

    def run_background() -> None:
        try:
            background(env)
        except BaseException as exc:
            errors.append(exc)

    with psycopg.connect(env.dsn) as conn:
        conn.execute("SELECT id FROM users WHERE id = %s FOR UPDATE", (USER,))
        thread = threading.Thread(target=run_background)
        thread.start()
        time.sleep(0.5)  # the background transaction now waits for this one
        try:
            foreground(conn)
            conn.commit()
        except BaseException as exc:
            errors.append(exc)
            conn.rollback()
        thread.join()
    return errors


def grant_gib(conn: psycopg.Connection[Any]) -> None:
    locked = quota.lock_subscription(conn, USER)
    assert locked is not None
    quota.add_extra(conn, USER, GIB, Limits("q1", traffic_bytes=GIB, reset="per_period", days=30))


def test_a_grant_racing_the_reading_that_opens_the_period(env: Env) -> None:
    env.grant("q1")
    env.traffic(USER, 100)
    env.grant("q10")  # a plan change closes the period: the next reading opens one
    env.plans["q10"] = env.plans["q1"]
    assert env.period() is None
    errors = race(env, lambda e: e.run(store_traffic, [(USER, 0, 1000)], quota=e.rules), grant_gib)
    assert errors == []
    period = env.period()
    assert period is not None and (period.used_bytes, period.extra_bytes) == (900, GIB)


def test_a_grant_racing_the_workers_roll(env: Env) -> None:
    env.grant("q1", days=90)
    env.traffic(USER, GIB)
    age_subscription(env, 31)
    errors = race(env, roll, grant_gib)
    assert errors == []
    assert not env.blocked()


def test_grant_traffic_refuses_an_expired_subscription(env: Env) -> None:
    env.grant("q1", days=10)
    env.traffic(USER, 100)
    env.sql("UPDATE subscriptions SET expires_at = now() - interval '1 day' WHERE user_id = %s", USER)
    result = env.run(admin_actions.grant_traffic, admin_actions.Actor(1, "cli"), USER, 5, env.limits_for)
    assert isinstance(result, admin_actions.InactiveSubscription)
    period = env.period()
    assert period is not None and period.extra_bytes == 0
