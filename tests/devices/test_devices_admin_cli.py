"""`vpnd admin devices` and `vpnd admin grant-device` as real subprocesses, audited like every admin action."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.devices.harness import PLANS
from tests.harness import sql, vpnd_cli

Cli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def cli(write_config: Callable[..., Path], db_dsn: str) -> Cli:
    path = write_config(PLANS, database={"dsn": db_dsn})

    return vpnd_cli(path)


def seed(db_dsn: str) -> None:
    import psycopg

    from vpnd.db.subscriptions import grant_days
    from vpnd.db.users import upsert_user

    with psycopg.connect(db_dsn) as conn:
        upsert_user(conn, 300, None, "Carol", "en")
        upsert_user(conn, 301, None, "Dave", "en")
        grant_days(conn, 300, 30, kind="paid", plan_code="five")
    sql(
        db_dsn,
        "INSERT INTO devices (user_id, hwid, os, os_version, model, user_agent) VALUES "
        "(300, 'hw-a', 'Android', '14', 'Pixel 8', 'Happ/3.1'), (300, 'hw-b', 'iOS', '17', '', 'v2RayTun/5')",
    )


def test_list_reset_and_grant_device(cli: Cli, db_dsn: str) -> None:
    seed(db_dsn)
    listed = cli("admin", "devices", "300")
    assert listed.returncode == 0, listed.stderr
    assert "user 300: devices 2 of 5, extra slots granted 0" in listed.stdout
    assert "Pixel 8  Android 14" in listed.stdout and "hwid hw-b" in listed.stdout and "v2RayTun/5" in listed.stdout
    data = json.loads(cli("admin", "devices", "300", "--json").stdout)["result"]
    assert data["limit"] == 5 and data["used"] == 2 and {d["hwid"] for d in data["devices"]} == {"hw-a", "hw-b"}

    granted = cli("admin", "grant-device", "300")
    assert granted.returncode == 0, granted.stderr
    assert "granted 1 device slot(s) to user 300: 1 extra slot(s) in all" in granted.stdout
    assert json.loads(cli("admin", "grant-device", "300", "2", "--json").stdout)["result"]["extra_devices"] == 3
    assert "devices 2 of 8, extra slots granted 3" in cli("admin", "devices", "300").stdout

    reset = cli("admin", "devices", "300", "--reset")
    assert reset.returncode == 0 and "forgot 2 device(s) of user 300" in reset.stdout
    assert sql(db_dsn, "SELECT count(*) FROM devices") == [(0,)]

    audit = sql(db_dsn, "SELECT action, target, result, details->>'via' FROM admin_audit ORDER BY id")
    assert [a[:3] for a in audit] == [
        ("devices", "300", "ok"),
        ("devices", "300", "ok"),
        ("grant_device", "300", "ok"),
        ("grant_device", "300", "ok"),
        ("devices", "300", "ok"),
        ("devices_reset", "300", "ok"),
    ]
    assert {a[3] for a in audit} == {"cli"}


def test_refusals_and_bad_input(cli: Cli, db_dsn: str) -> None:
    seed(db_dsn)
    missing = cli("admin", "devices", "999", "--json")
    assert missing.returncode == 1 and json.loads(missing.stdout) == {"ok": False, "error": "no user 999"}
    nosub = cli("admin", "grant-device", "301")
    assert nosub.returncode == 1 and "user 301 has no subscription" in nosub.stderr
    for count in ("0", "-3", "101"):
        bad = cli("admin", "grant-device", "300", count)
        assert bad.returncode == 2, (count, bad.stdout, bad.stderr)
        assert "from 1 to 100" in bad.stderr
    assert sql(db_dsn, "SELECT extra_devices FROM subscriptions WHERE user_id = 300") == [(0,)]
    audit = sql(db_dsn, "SELECT action, target, result FROM admin_audit ORDER BY id")
    assert audit == [("devices", "999", "not_found"), ("grant_device", "301", "no_subscription")]
