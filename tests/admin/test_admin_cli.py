"""`vpnd admin ...` / `vpnd broadcast ...` as real subprocesses: output, --json, exit codes, audit."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
import trio

from tests.admin.harness import give_subscription, seed_users, start_admin_vpnd
from tests.harness import bot_config, cli_result, sql, vpnd_cli
from vpnd.db import broadcasts as bdb
from vpnd_sandbox.telegram_fake import FakeTelegram


@pytest.fixture
def cli(write_config: Callable[..., Path], db_dsn: str) -> Callable[..., subprocess.CompletedProcess[str]]:
    path = write_config(database={"dsn": db_dsn})

    return vpnd_cli(path)


result = cli_result


def test_stats_and_user_lookup(cli: Callable[..., subprocess.CompletedProcess[str]], db_dsn: str) -> None:
    seed_users(db_dsn, None, 100, 5)
    sql(db_dsn, "UPDATE users SET username = 'carol' WHERE id = 101")
    give_subscription(db_dsn, [100], kind="trial")
    give_subscription(db_dsn, [101], kind="paid")

    text = cli("admin", "stats")
    assert text.returncode == 0, text.stderr
    assert "users:             5 (today 5" in text.stdout and "active trials:     1" in text.stdout
    stats = result(cli("admin", "stats", "--json"))
    assert stats["users_total"] == 5 and stats["active_paid"] == 1 and stats["active_trials"] == 1
    assert stats["conversion_percent"] == 0.0 and stats["revenue_by_day"] == []

    user = cli("admin", "user", "@CAROL")
    assert user.returncode == 0, user.stderr
    assert "user:          101 (@carol)" in user.stdout and "subscription:  paid, active" in user.stdout
    data = result(cli("admin", "user", "100", "--json"))
    assert data["user"]["id"] == 100 and data["subscription"]["kind"] == "trial"

    missing = cli("admin", "user", "@nobody", "--json")
    assert missing.returncode == 1
    assert json.loads(missing.stdout) == {"ok": False, "error": "no user @nobody"}
    assert "vpnd: no user @nobody" in missing.stderr


def test_grant_and_revoke(cli: Callable[..., subprocess.CompletedProcess[str]], db_dsn: str) -> None:
    seed_users(db_dsn, None, 100, 2)
    sql(db_dsn, "UPDATE users SET language = 'ru' WHERE id = 100")

    granted = cli("admin", "grant", "100", "30", "--notify")
    assert granted.returncode == 0, granted.stderr
    assert "granted 30 days to user 100" in granted.stdout
    assert sql(db_dsn, "SELECT kind, status, expires_at > now() + interval '29 days' FROM subscriptions") == [
        ("paid", "active", True)
    ]
    notice = sql(db_dsn, "SELECT chat_id, payload->>'text' FROM outbox")
    assert notice[0][0] == 100 and "Вам начислено 30 дн." in notice[0][1]  # in the user's language

    again = result(cli("admin", "grant", "100", "5", "--json"))
    assert again["user_id"] == 100 and again["status"] == "active"
    assert cli("admin", "grant", "999", "5").returncode == 1
    assert cli("admin", "grant", "100", "0").returncode == 2
    assert cli("admin", "grant", "100", "many").returncode == 2  # argparse: usage

    assert cli("admin", "revoke", "101").returncode == 1  # no subscription
    revoked = cli("admin", "revoke", "100", "--json")
    assert revoked.returncode == 0 and result(revoked)["status"] == "revoked"

    audit = sql(db_dsn, "SELECT admin_id, action, target, result, details->>'via' FROM admin_audit ORDER BY id")
    assert [row[1:4] for row in audit] == [
        ("grant", "100", "ok"),
        ("grant", "100", "ok"),
        ("grant", "999", "not_found"),
        ("revoke", "101", "no_subscription"),
        ("revoke", "100", "ok"),
    ]
    assert {row[0] for row in audit} == {0} and {row[4] for row in audit} == {"cli"}


def test_promo_create_list_disable(cli: Callable[..., subprocess.CompletedProcess[str]], db_dsn: str) -> None:
    created = cli("admin", "promo", "create", "summer", "15", "--max-uses", "50", "--days", "10")
    assert created.returncode == 0, created.stderr
    assert "created SUMMER: -15%, at most 50 uses, until" in created.stdout
    assert cli("admin", "promo", "create", "SUMMER", "20").returncode == 1  # exists
    assert cli("admin", "promo", "create", "WINTER", "150").returncode == 2  # bad percent
    assert cli("admin", "promo", "create", "bad code!", "10").returncode == 2
    assert cli("admin", "promo", "create", "AUTUMN", "5").returncode == 0

    listing = result(cli("admin", "promo", "list", "--json"))
    assert [(p["code"], p["percent"], p["max_uses"], p["active"]) for p in listing] == [
        ("AUTUMN", 5, None, True),
        ("SUMMER", 15, 50, True),
    ]
    assert cli("admin", "promo", "disable", "summer").returncode == 0
    assert cli("admin", "promo", "disable", "summer").returncode == 1  # not active any more
    text = cli("admin", "promo", "list").stdout
    assert "SUMMER" in text and "disabled" in text and "used 0/50" in text


def test_broadcast_list_pause_resume_cancel(cli: Callable[..., subprocess.CompletedProcess[str]], db_dsn: str) -> None:
    seed_users(db_dsn, None, 100, 3)
    with psycopg.connect(db_dsn) as conn:
        first = bdb.create_broadcast(conn, created_by=1, text="one", segment=bdb.Segment("all")).id
        second = bdb.create_broadcast(conn, created_by=1, text="two", segment=bdb.Segment.parse("expiring", 3)).id

    listing = cli("broadcast", "list")
    assert listing.returncode == 0
    assert listing.stdout.splitlines()[0].startswith(f"#{second}") and "pending 3 of 3" in listing.stdout
    assert "expiring within 3 days" in listing.stdout

    paused = result(cli("broadcast", "pause", str(first), "--json"))
    assert paused["broadcast"]["status"] == "paused" and paused["counts"]["pending"] == 3
    assert cli("broadcast", "pause", str(first)).returncode == 1  # already paused
    assert cli("broadcast", "resume", str(first)).returncode == 0
    assert cli("broadcast", "cancel", str(first)).returncode == 0
    assert cli("broadcast", "resume", str(first)).returncode == 1  # cancelled is final
    assert cli("broadcast", "cancel", "999").returncode == 1
    assert cli("broadcast", "explode", "1").returncode == 2
    only_cancelled = result(cli("broadcast", "list", "--status", "cancelled", "--json"))
    assert [v["broadcast"]["id"] for v in only_cancelled] == [first]


def test_bad_config_and_unreachable_database(write_config: Callable[..., Path]) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "vpnd", *args], capture_output=True, text=True, timeout=60)

    assert run("admin", "stats", "--config", "/nonexistent.toml").returncode == 2
    path = write_config(database={"dsn": "postgresql://nobody@127.0.0.1:1/none", "connect_timeout_seconds": 2})
    down = run("admin", "stats", "--config", str(path), "--json")
    assert down.returncode == 1
    assert json.loads(down.stdout)["error"].startswith("database:")


async def test_cli_pause_reaches_a_running_daemon(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    """`vpnd broadcast pause` is another process: no nudge reaches the daemon, which must notice the
    change by itself and stop sending. (How fast it notices is a figure, printed here; this test only
    asks that it does, long before the broadcast could have ended by itself.)"""
    fake, base_url = fake_telegram
    config = bot_config(write_config, db_dsn, fake, base_url, telegram={"rate_per_second": 20.0})
    # 600 recipients at 20/s: ~30 s of sending, so the pause surely lands mid-broadcast.
    users = seed_users(db_dsn, fake, 10_000, 600)
    with psycopg.connect(db_dsn) as conn:
        broadcast_id = bdb.create_broadcast(conn, created_by=1, text="paced", segment=bdb.Segment("all")).id
    vpnd = await start_admin_vpnd(nursery, config)

    def delivered() -> int:
        return sum(1 for uid in users if fake.messages.get(uid))

    with trio.fail_after(90):
        await fake.wait_until(lambda: delivered() >= 30, timeout=30)
        process = await trio.run_process(
            [sys.executable, "-m", "vpnd", "broadcast", "pause", str(broadcast_id), "--config", config.path],
            capture_stdout=True,
            capture_stderr=True,
        )
        assert process.returncode == 0, process.stderr
        paused_at = trio.current_time()
        with trio.fail_after(30):  # the supervisor re-reads the database every poll_interval (0.5 s)
            while vpnd.broadcasts.tasks:
                await trio.sleep(0.02)
        print(f"\nthe daemon's broadcast task ended {trio.current_time() - paused_at:.2f}s after the CLI's pause")
        # With its task ended nothing sends any more: what was delivered is final, and all of it recorded.
        last = delivered()
        assert last < len(users)
        marked = sql(db_dsn, "SELECT count(*) FROM broadcast_recipients WHERE status = 'sent'")[0][0]
        assert marked == last  # a pause loses nothing: every delivery is recorded
        assert sql(db_dsn, "SELECT status FROM broadcasts") == [("paused",)]
    await vpnd.stop()
