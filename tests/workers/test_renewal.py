"""Auto-renewal: charged once per period however rounds race, and it always beats expiry."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import psycopg
import trio

from tests.harness import sql
from tests.workers.conftest import poll_until, running, seed_subscriptions, seed_users
from tests.xray.test_xray_writer import PUBLIC_KEY, TAG, reality_template
from vpnd.config import Config
from vpnd.db.admin import export_payments_csv
from vpnd.db.ledger import mismatched_balances
from vpnd.nurseries.xray import run_xray
from vpnd.telegram.texts import Texts
from vpnd.workers.expiry import expiry_round
from vpnd.workers.renewal import LEDGER_REASON, renewal_round
from vpnd_sandbox.xray_fake import start_fake_xray

H = dt.timedelta(hours=1)
D = dt.timedelta(days=1)
PRICE = 499  # plan m1: "4.99" USD
TEXTS = Texts.load()


def charges(dsn: str) -> dict[int, int]:
    """user → number of auto-renewal ledger entries."""
    rows = sql(dsn, "SELECT user_id, count(*) FROM balance_ledger WHERE reason = %s GROUP BY user_id", LEDGER_REASON)
    return dict(rows)


def expiries(dsn: str) -> dict[int, tuple[str, dt.datetime]]:
    return {u: (s, e) for u, s, e in sql(dsn, "SELECT user_id, status, expires_at FROM subscriptions")}


async def test_two_rounds_at_once_charge_each_period_once(db_dsn: str, make_config: Callable[..., Config]) -> None:
    users = list(range(1, 301))
    seed_users(db_dsn, users, balance_minor=10_000)
    seed_subscriptions(db_dsn, users, [12 * H + dt.timedelta(seconds=n) for n in users], auto_renew=True)
    before = expiries(db_dsn)
    async with running(make_config(), outbox=False) as services:
        app = services.app
        results: list[int] = []

        async def one_round() -> None:
            results.append(await renewal_round(app, TEXTS, batch_size=7))

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(one_round)
            assert sum(results) == len(users)  # the work was shared, never doubled
            assert await renewal_round(app, TEXTS, batch_size=50) == 0
        assert await app.db.run(mismatched_balances) == []
    assert charges(db_dsn) == dict.fromkeys(users, 1)
    balances = dict(sql(db_dsn, "SELECT id, balance_minor FROM users"))
    assert set(balances.values()) == {10_000 - PRICE}
    after = expiries(db_dsn)
    for uid in users:
        assert after[uid] == ("active", before[uid][1] + 30 * D)
    rows = sql(db_dsn, "SELECT user_id, outcome FROM auto_renewals")
    assert sorted(rows) == [(u, "charged") for u in users]
    notices = sql(db_dsn, "SELECT chat_id, payload->>'text' FROM outbox")
    assert len(notices) == len(users) and all("paid from your balance" in text for _, text in notices)


async def test_renewal_beats_expiry_whoever_runs_first(db_dsn: str, make_config: Callable[..., Config]) -> None:
    """Subscriptions already past their end with a renewal owed: expiry and renewal run at once,
    in any order, and every one of them ends renewed, none expired."""
    users = list(range(1, 201))
    seed_users(db_dsn, users, balance_minor=PRICE)
    seed_subscriptions(db_dsn, users, -dt.timedelta(seconds=1), auto_renew=True)
    async with running(make_config(), outbox=False) as services:
        app = services.app
        with trio.fail_after(60):
            assert await expiry_round(app, TEXTS, batch_size=5) == 0  # expiry first: leaves them alone
            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(lambda: expiry_round(app, TEXTS, batch_size=5))
                    nursery.start_soon(lambda: renewal_round(app, TEXTS, batch_size=5))
            assert await expiry_round(app, TEXTS, batch_size=50) == 0
    now = dt.datetime.now(dt.UTC)
    assert all(status == "active" and expires > now + 29 * D for status, expires in expiries(db_dsn).values())
    assert charges(db_dsn) == dict.fromkeys(users, 1)


async def test_renewal_holding_the_lock_wins_over_expiry(db_dsn: str, make_config: Callable[..., Config]) -> None:
    """A renewal in progress holds the subscription row; expiry waits for it or leaves the row, and
    never expires a subscription the renewal extended. Here the renewal is held up by a third party
    (an admin transaction locking the user) while the subscription's end passes."""
    seed_users(db_dsn, [1], balance_minor=PRICE)
    seed_subscriptions(db_dsn, [1], dt.timedelta(seconds=1), auto_renew=True)
    async with running(make_config(), outbox=False) as services:
        app = services.app
        with psycopg.connect(db_dsn) as blocker:
            blocker.execute("SELECT 1 FROM users WHERE id = 1 FOR UPDATE")
            assert await renewal_round(app, TEXTS, batch_size=10) == 0  # skipped, not waiting
            ended = "SELECT count(*) FROM subscriptions WHERE user_id = 1 AND expires_at < now()"
            await poll_until(lambda: sql(db_dsn, ended)[0][0] == 1, 30)  # the end passes meanwhile
            assert await expiry_round(app, TEXTS, batch_size=10) == 0  # renewal owed: not expired
        assert await renewal_round(app, TEXTS, batch_size=10) == 1
        assert await expiry_round(app, TEXTS, batch_size=10) == 0
    status, expires = expiries(db_dsn)[1]
    assert status == "active" and expires > dt.datetime.now(dt.UTC) + 29 * D
    assert charges(db_dsn) == {1: 1}


async def test_short_balance_one_notice_per_period_then_renews_after_top_up(
    db_dsn: str, make_config: Callable[..., Config]
) -> None:
    seed_users(db_dsn, [1], balance_minor=100)
    seed_subscriptions(db_dsn, [1], 6 * H, auto_renew=True)
    async with running(make_config(), outbox=False) as services:
        app = services.app
        assert await renewal_round(app, TEXTS, batch_size=10) == 1
        assert await renewal_round(app, TEXTS, batch_size=10) == 0  # one notice per period
        texts = [r[0] for r in sql(db_dsn, "SELECT payload->>'text' FROM outbox ORDER BY id")]
        assert len(texts) == 1 and "does not cover 4.99 USD" in texts[0] and "1.00 USD" in texts[0]
        sql(
            db_dsn,
            "WITH l AS (INSERT INTO balance_ledger (user_id, delta_minor, reason, reference) "
            "VALUES (1, 500, 'topup', 'test') RETURNING 1) UPDATE users SET balance_minor = balance_minor + 500",
        )
        assert await renewal_round(app, TEXTS, batch_size=10) == 1
        assert await app.db.run(mismatched_balances) == []
    assert sql(db_dsn, "SELECT balance_minor FROM users") == [(101,)]
    assert sql(db_dsn, "SELECT outcome FROM auto_renewals") == [("charged",)]
    assert len(sql(db_dsn, "SELECT 1 FROM outbox")) == 2


async def test_renewals_racing_expiry_never_remove_anyone_from_xray(
    db_dsn: str, make_config: Callable[..., Config], tmp_path: Path
) -> None:
    """End to end: subscriptions run out one after another while the expiry worker (every 50 ms),
    the renewal worker (every 100 ms, a 1 s window) and the Xray writer run. Every user is renewed
    once and stays in Xray the whole time."""
    users = list(range(1, 101))
    seed_users(db_dsn, users, balance_minor=1_000)
    # Ends spread over 1.5 s, starting 2.5 s from now.
    seed_subscriptions(
        db_dsn, users, [dt.timedelta(seconds=2.5) + dt.timedelta(milliseconds=15 * n) for n in users], auto_renew=True
    )
    template = tmp_path / "template.json"
    template.write_text(json.dumps(reality_template()))
    (tmp_path / "xray").mkdir()
    with start_fake_xray("xray.", inbound_tags=(TAG,)) as fake_xray:
        config = make_config(
            xray={
                "enabled": True,
                "template_path": str(template),
                "config_path": str(tmp_path / "xray" / "config.json"),
                "inbound_tag": TAG,
                "api_address": fake_xray.address,
                "public_key": PUBLIC_KEY,
                "short_id": "6ba85179e30d4fc2",
            },
            workers={"expiry_interval": 0.05, "renewal_interval": 0.1, "renewal_window_hours": 1.0 / 3600},
        )
        async with running(config, outbox=False, workers=["expiry", "renewal"]) as services:
            async with trio.open_nursery() as nursery:
                with trio.fail_after(30):
                    await nursery.start(run_xray, services.app)

                    def all_renewed() -> bool:
                        renewed = "SELECT count(*) FROM subscriptions WHERE expires_at > now() + interval '29 days'"
                        return bool(sql(db_dsn, renewed)[0][0] == len(users))

                    await poll_until(all_renewed, 20)
                    await trio.sleep(0.5)
                services.app.lifecycle.request_stop("test")
        operations = fake_xray.operations()
    removed = [email for op, email, _ in operations if op == "remove"]
    added = [email for op, email, _ in operations if op == "add"]
    assert removed == []
    assert sorted(added) == sorted(f"u{u}" for u in users)  # each added once, at the start
    assert charges(db_dsn) == dict.fromkeys(users, 1)
    assert {s for s, _ in expiries(db_dsn).values()} == {"active"}
    assert sql(db_dsn, "SELECT count(*) FROM subscriptions WHERE status = 'expired'") == [(0,)]


async def test_each_auto_renewal_is_a_purchase_in_stats_csv_and_history(
    db_dsn: str, make_config: Callable[..., Config], write_config: Callable[..., Path]
) -> None:
    """The renewal worker, running on its own period, records every renewal as a paid purchase and its
    payment: `vpnd admin stats` counts it as a plan sold, the payments CSV lists it, `vpnd admin user`
    shows it in the user's history. Before, a renewal left only a ledger row and an `auto_renewals` row."""
    seed_users(db_dsn, [1, 2], balance_minor=2_000)
    seed_subscriptions(db_dsn, [1, 2], 6 * H, auto_renew=True)
    config = make_config(workers={"renewal_interval": 0.1}, payments={"notify_chat_id": -100777})
    async with running(config, outbox=False, workers=["renewal"]) as services:
        await poll_until(lambda: len(sql(db_dsn, "SELECT 1 FROM payments")) == 2, 20)
        csv_out = io.StringIO()
        await services.app.db.run(lambda conn: export_payments_csv(conn, csv_out))
    bought = "SELECT user_id, kind, plan_code, days, method, amount_minor, status FROM purchases ORDER BY user_id"
    assert sql(db_dsn, bought) == [
        (1, "plan", "m1", 30, "balance", PRICE, "paid"),
        (2, "plan", "m1", 30, "balance", PRICE, "paid"),
    ]
    paid = "SELECT user_id, provider, provider_payment_id, outcome, granted_days FROM payments ORDER BY user_id"
    payments = sql(db_dsn, paid)
    assert [(u, p, o, d) for u, p, _, o, d in payments] == [
        (1, "balance", "granted", 30),
        (2, "balance", "granted", 30),
    ]
    assert all(pid.startswith("auto_renew:") for _, _, pid, _, _ in payments)
    assert charges(db_dsn) == {1: 1, 2: 1}  # one charge each, as before
    notices = sql(db_dsn, "SELECT payload->>'text' FROM outbox WHERE chat_id = -100777 ORDER BY id")
    assert sorted(text.split("\n")[1] for (text,) in notices) == ["User: 1", "User: 2"]  # one each, in the admin chat
    assert all("4.99 USD via balance (auto-renewal)" in text and "Plan: m1" in text for (text,) in notices)
    rows = list(csv.DictReader(io.StringIO(csv_out.getvalue())))
    assert [(r["user_id"], r["kind"], r["plan_code"], r["provider"], r["amount_minor"]) for r in rows] == [
        ("1", "plan", "m1", "balance", str(PRICE)),
        ("2", "plan", "m1", "balance", str(PRICE)),
    ]

    cli_config = write_config(database={"dsn": db_dsn})

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "vpnd", *args, "--config", str(cli_config)]
        return subprocess.run(command, capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})

    stats = cli("admin", "stats", "--json")
    assert stats.returncode == 0, stats.stderr
    sold = json.loads(stats.stdout)["result"]["sales_by_plan"]
    assert sold == [{"key": "m1", "currency": "USD", "amount_minor": 2 * PRICE, "payments": 2}]
    history = cli("admin", "user", "1")
    assert history.returncode == 0, history.stderr
    assert "4.99 USD balance (auto-renewal) granted" in history.stdout
