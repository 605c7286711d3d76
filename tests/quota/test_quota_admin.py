"""Admin tools for plan limits, as real `vpnd admin` subprocesses on a real PostgreSQL: a user's usage,
devices and limits (`admin user`), a traffic grant (`admin grant-traffic`) and stats by plan."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from tests.admin.harness import seed_users
from tests.harness import PLANS, cli_result, scalar, sql, vpnd_cli
from vpnd.db.subscriptions import grant_days

GIB = 2**30
QUOTA_PLANS = PLANS + (
    '\n[[plans]]\ncode = "q1"\ntitle = { en = "Lite", ru = "Лайт" }\ndays = 30\nprice = "1.99"\n'
    'currency = "USD"\nstars = 100\ntraffic_gb = 1\ntraffic_reset = "per_period"\ndevices = 3\n'
    '\n[[plans]]\ncode = "once"\ntitle = { en = "Once" }\ndays = 30\nprice = "1.99"\n'
    'currency = "USD"\nstars = 100\ntraffic_gb = 5\ntraffic_reset = "never"\n'
)

Cli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def cli(tmp_path: Path, db_dsn: str) -> Cli:
    path = tmp_path / "config.toml"
    path.write_text(f"[database]\ndsn = {json.dumps(db_dsn)}\n\n" + QUOTA_PLANS)

    return vpnd_cli(path)


result = cli_result


def subscribe(dsn: str, user_id: int, plan: str) -> None:
    with psycopg.connect(dsn) as conn:
        grant_days(conn, user_id, 30, kind="paid", plan_code=plan)


def open_period(dsn: str, user_id: int, used: int, *, blocked: bool = False) -> None:
    sql(
        dsn,
        "INSERT INTO traffic_periods (user_id, started_at, ends_at, used_bytes) "
        "SELECT user_id, starts_at, starts_at + interval '30 days', %s FROM subscriptions WHERE user_id = %s",
        used,
        user_id,
    )
    sql(dsn, "UPDATE subscriptions SET traffic_blocked = %s WHERE user_id = %s", blocked, user_id)


def line(output: str, label: str) -> str:
    return next(row for row in output.splitlines() if row.startswith(label + ":"))[len(label) + 1 :].strip()


def test_user_shows_plan_traffic_reset_block_and_devices(cli: Cli, db_dsn: str) -> None:
    seed_users(db_dsn, None, 100, 3)
    subscribe(db_dsn, 100, "q1")
    open_period(db_dsn, 100, 512 * 2**20)
    for hwid in ("phone", "laptop"):
        sql(db_dsn, "INSERT INTO devices (user_id, hwid) VALUES (100, %s)", hwid)
    sql(db_dsn, "INSERT INTO devices (user_id, hwid) VALUES (101, 'other')")  # someone else's
    reset = scalar(db_dsn, "SELECT to_char(ends_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI') FROM traffic_periods")

    shown = cli("admin", "user", "100")
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    assert line(out, "plan") == "q1 (Lite)"
    assert line(out, "traffic") == f"512 MB of 1 GB this period, resets {reset} UTC"
    assert line(out, "blocked") == "no"
    assert line(out, "devices") == "2 of 3"

    usage = result(cli("admin", "user", "100", "--json"))["usage"]
    assert usage["traffic_used_bytes"] == 512 * 2**20 and usage["traffic_total_bytes"] == GIB
    assert usage["devices_used"] == 2 and usage["device_limit"] == 3 and usage["traffic_blocked"] is False

    # over the quota, a slot granted; no period yet for another user: the reset from the subscription's start
    sql(db_dsn, "UPDATE traffic_periods SET used_bytes = %s, extra_bytes = %s", 3 * GIB, GIB)
    sql(db_dsn, "UPDATE subscriptions SET traffic_blocked = true, extra_devices = 1 WHERE user_id = 100")
    out = cli("admin", "user", "100").stdout
    assert line(out, "traffic") == f"3 GB of 2 GB this period, resets {reset} UTC (1 GB added)"
    assert line(out, "blocked").startswith("yes")
    assert line(out, "devices") == "2 of 4 (1 added)"

    subscribe(db_dsn, 101, "q1")
    fresh_reset = scalar(
        db_dsn,
        "SELECT to_char((starts_at + interval '30 days') AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI') "
        "FROM subscriptions WHERE user_id = 101",
    )
    out = cli("admin", "user", "101").stdout
    assert line(out, "traffic") == f"0 B of 1 GB this period, resets {fresh_reset} UTC"
    assert line(out, "devices") == "1 of 3"

    subscribe(db_dsn, 102, "m1")  # unlimited traffic and devices
    out = cli("admin", "user", "102").stdout
    assert line(out, "plan") == "m1 (1 month)"
    assert line(out, "traffic") == "0 B this period (unlimited)"
    assert line(out, "devices") == "0 (unlimited)"


def test_user_with_a_plan_no_longer_configured_and_a_never_resetting_one(cli: Cli, db_dsn: str) -> None:
    seed_users(db_dsn, None, 100, 2)
    subscribe(db_dsn, 100, "gone")
    assert line(cli("admin", "user", "100").stdout, "plan") == "gone (no longer configured: no limits)"
    subscribe(db_dsn, 101, "once")
    assert line(cli("admin", "user", "101").stdout, "traffic") == "0 B of 5 GB this period, never resets"


def test_grant_traffic_puts_a_blocked_user_back_and_is_audited(cli: Cli, db_dsn: str) -> None:
    seed_users(db_dsn, None, 100, 1)
    subscribe(db_dsn, 100, "q1")
    open_period(db_dsn, 100, GIB + 5, blocked=True)
    sql(db_dsn, "UPDATE traffic_periods SET notified = 100")

    done = cli("admin", "grant-traffic", "100", "2")
    assert done.returncode == 0, done.stderr
    assert "added 2 GB to user 100's traffic: 1 GB used of 3 GB this period; the user may connect" in done.stdout
    assert sql(db_dsn, "SELECT extra_bytes, notified FROM traffic_periods WHERE current") == [(2 * GIB, 0)]
    assert scalar(db_dsn, "SELECT traffic_blocked FROM subscriptions") is False
    audit = sql(db_dsn, "SELECT admin_id, action, target, result, details FROM admin_audit")
    assert len(audit) == 1
    admin_id, action, target, outcome, details = audit[0]
    assert (admin_id, action, target, outcome) == (0, "grant_traffic", "100", "ok")
    assert details["gb"] == 2 and details["via"] == "cli" and details["total_bytes"] == 3 * GIB

    data = result(cli("admin", "grant-traffic", "100", "1", "--json"))
    assert data["total_bytes"] == 4 * GIB and data["blocked"] is False


def test_grant_traffic_not_enough_keeps_the_block(cli: Cli, db_dsn: str) -> None:
    seed_users(db_dsn, None, 100, 1)
    subscribe(db_dsn, 100, "q1")
    open_period(db_dsn, 100, 5 * GIB, blocked=True)
    done = cli("admin", "grant-traffic", "100", "1")
    assert done.returncode == 0 and "still over it" in done.stdout
    assert scalar(db_dsn, "SELECT traffic_blocked FROM subscriptions") is True


def test_grant_traffic_before_any_traffic_opens_the_period(cli: Cli, db_dsn: str) -> None:
    seed_users(db_dsn, None, 100, 1)
    subscribe(db_dsn, 100, "q1")
    assert cli("admin", "grant-traffic", "100", "10").returncode == 0
    assert sql(
        db_dsn,
        "SELECT p.extra_bytes, p.started_at = s.starts_at FROM traffic_periods p JOIN subscriptions s USING (user_id)",
    ) == [(10 * GIB, True)]


@pytest.mark.parametrize("gb", ["abc", "0", "1.5", "100001", "1e3", "٣", " ", "-1"])
def test_grant_traffic_rejects_a_bad_number(cli: Cli, db_dsn: str, gb: str) -> None:
    seed_users(db_dsn, None, 100, 1)
    subscribe(db_dsn, 100, "q1")
    done = cli("admin", "grant-traffic", "100", gb)
    assert done.returncode == 2, done.stdout
    assert "GB must be a whole number from 1 to 100000" in done.stderr
    assert scalar(db_dsn, "SELECT count(*) FROM traffic_periods") == 0


def test_grant_traffic_refusals_are_clear_and_audited(cli: Cli, db_dsn: str) -> None:
    seed_users(db_dsn, None, 100, 3)
    subscribe(db_dsn, 101, "m1")
    subscribe(db_dsn, 102, "q1")
    sql(db_dsn, "UPDATE subscriptions SET status = 'revoked' WHERE user_id = 102")
    cases = {
        "999": "no user 999",
        "100": "user 100 has no subscription",
        "101": "user 101's plan has unlimited traffic: there is no quota to add to",
        "102": "user 102's subscription has ended (expired or revoked)",
    }
    for user, message in cases.items():
        done = cli("admin", "grant-traffic", user, "1", "--json")
        assert done.returncode == 1
        assert json.loads(done.stdout) == {"ok": False, "error": message}
    assert sql(db_dsn, "SELECT target, result FROM admin_audit WHERE action = 'grant_traffic' ORDER BY id") == [
        ("999", "not_found"),
        ("100", "no_subscription"),
        ("101", "unlimited"),
        ("102", "inactive"),
    ]
    assert scalar(db_dsn, "SELECT count(*) FROM traffic_periods") == 0


def test_stats_split_by_plan(cli: Cli, db_dsn: str) -> None:
    seed_users(db_dsn, None, 100, 6)
    for uid in (100, 101, 102):
        subscribe(db_dsn, uid, "q1")
    open_period(db_dsn, 100, GIB, blocked=True)
    open_period(db_dsn, 101, GIB // 2)
    subscribe(db_dsn, 103, "m1")
    subscribe(db_dsn, 104, "m1")
    sql(db_dsn, "UPDATE subscriptions SET expires_at = now() - interval '1 minute' WHERE user_id = 104")  # ended
    subscribe(db_dsn, 105, "q1")
    sql(db_dsn, "UPDATE subscriptions SET status = 'revoked' WHERE user_id = 105")

    stats = result(cli("admin", "stats", "--json"))
    assert stats["tiers"] == [
        {"plan": "q1", "subscribers": 3, "traffic_bytes": GIB + GIB // 2, "blocked": 1},
        {"plan": "m1", "subscribers": 1, "traffic_bytes": 0, "blocked": 0},
    ]
    text = cli("admin", "stats").stdout
    section = text.split("active subscribers by plan (traffic this period, blocked at the quota):\n")[1]
    assert section.splitlines()[:2] == [
        "  q1                  3      1.5 GB  blocked 1",
        "  m1                  1         0 B  blocked 0",
    ]
