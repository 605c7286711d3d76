"""Audit B — the database: no nested acquire, finalize and grant on one connection, synchronous
transaction functions.

The seed checked by reading that `finalize_purchase` passed its `conn` to `grant_access`. vpnd makes
it structural (a transaction is a plain function handed its connection by `Database.run`) and these
tests hold it to that:

* the whole end-to-end scenario runs with a pool of exactly one connection and a short acquire
  timeout, so any nested acquire would deadlock (or time out) instead of passing;
* a trigger records the backend pid and transaction id of every row finalize writes: the grant is
  on the same connection, in the same transaction;
* every function handed to `db.run` anywhere in vpnd resolves (AST) to a synchronous function, and
  `db.run` itself refuses an async one at run time (TypeError, nothing touched).
"""

from __future__ import annotations

import ast
import datetime as dt
import functools
import logging
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio

from tests.audit.source import SourceIndex, is_db_run, where
from tests.audit.stack import ADMIN, desired_emails, file_emails, full_config, live_emails, poll, start_full
from tests.harness import has_button, press, say, scalar, sql, text_has
from vpnd.db import Database, open_database
from vpnd_sandbox.cryptopay_fake import FakeCryptoPay
from vpnd_sandbox.telegram_fake import ChatMessage, FakeTelegram
from vpnd_sandbox.xray_fake import FakeXray

# --- transaction functions are synchronous (source) --------------------------------------------


def test_every_function_passed_to_db_run_is_synchronous() -> None:
    """Each `db.run(fn, ...)` in vpnd: `fn` resolves to a plain `def` or a lambda (parameters are followed
    to what every caller passes), and nothing in it calls an `async def` (that would make a coroutine
    that never runs inside the transaction)."""
    index = SourceIndex()
    sites = 0
    offenders = []
    for tree in index.trees.values():
        for call in ast.walk(tree):
            if not (isinstance(call, ast.Call) and is_db_run(call)):
                continue
            sites += 1
            if not call.args:
                offenders.append(f"{where(index, call)}: db.run without a function")
                continue
            for origin, found in index.resolve_all(call.args[0]):
                if isinstance(found, str):
                    offenders.append(f"{where(index, call)}: cannot tell what {ast.unparse(origin)} is ({found})")
                elif isinstance(found, ast.AsyncFunctionDef):
                    offenders.append(f"{where(index, call)}: async def {found.name} ({where(index, found)})")
                else:
                    for inner in index.calls_in(found):
                        target = index.resolve(inner.func)
                        if isinstance(target, ast.AsyncFunctionDef):
                            offenders.append(
                                f"{where(index, inner)}: transaction function calls async def {target.name}"
                            )
    assert sites >= 90, f"the scan found only {sites} db.run calls: is it still reading vpnd?"
    assert offenders == []


#: Every place that opens a PostgreSQL connection outside `Database.run`, and why it may.
CONNECTION_MAKERS = {
    "vpnd/db/pool.py": "the pool itself (`Database.run` is its only user) and a diagnostic connect on failure",
    "vpnd/app.py": "schema check/migration before the pool opens",
    "vpnd/instance_lock.py": "the instance lock's own session (an advisory lock, never a transaction of ours)",
    "vpnd/db/notify.py": "the notify listener's session: LISTEN belongs to a session, so it cannot be pooled",
    "vpnd/cli.py": "`vpnd migrate`, a separate process",
    "vpnd/admin_cli.py": "`vpnd admin ...`, a separate process",
    "vpnd/services/backup.py": "`vpnd restore`'s checks: who holds the instance lock, the version after",
}


def test_connections_are_taken_only_by_the_database_api() -> None:
    """No code reaches around `db.run` for a connection (`pool.connection()`, `getconn`, `psycopg.connect`)."""
    index = SourceIndex()
    makers: dict[str, list[str]] = {}
    for path, tree in index.trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                name, owner = node.func.attr, ast.unparse(node.func.value)
                if (
                    (name == "connect" and owner.endswith("psycopg"))
                    or name in ("connection", "getconn")
                    or (name == "ConnectionPool")
                ):
                    makers.setdefault(path, []).append(f"{path}:{node.lineno} {owner}.{name}")
    assert set(makers) <= set(CONNECTION_MAKERS), {p: v for p, v in makers.items() if p not in CONNECTION_MAKERS}
    pool_uses = [site for site in makers.get("vpnd/db/pool.py", []) if site.endswith((".connection", ".getconn"))]
    assert len(pool_uses) == 1, pool_uses  # the one acquire, inside Database.run


# --- transaction functions are synchronous (run time) ----------------------------------------------


async def _an_async_transaction(conn: psycopg.Connection[Any]) -> int:
    conn.execute("INSERT INTO users (id, first_name, referral_code) VALUES (1, 'x', 'x')")
    return 1


async def _an_async_generator(conn: psycopg.Connection[Any]) -> AsyncIterator[int]:
    yield 1


class _Holder:
    async def method(self, conn: psycopg.Connection[Any]) -> int:
        return 1


@pytest.fixture
async def one_connection(db_dsn: str) -> AsyncIterator[Database]:
    async with open_database(db_dsn, min_size=1, max_size=1, connect_timeout=3) as db:
        yield db


async def test_db_run_refuses_async_functions_before_taking_a_connection(one_connection: Database) -> None:
    db = one_connection
    refused: list[Any] = [
        _an_async_transaction,
        _an_async_generator,
        functools.partial(_an_async_transaction),
        _Holder().method,
    ]
    with trio.fail_after(10):
        for fn in refused:
            with pytest.raises(TypeError, match="transaction functions are plain functions"):
                await db.run(fn)
            assert db.stats()["in_flight"] == 0
        # Nothing ran: the async body's INSERT never happened, and the one connection is free.
        assert await db.run(lambda conn: conn.execute("SELECT count(*) FROM users").fetchone()[0]) == 0


async def test_db_run_refuses_a_plain_callable_that_returns_a_coroutine_and_commits_nothing(
    one_connection: Database,
) -> None:
    class AsyncCallable:
        async def __call__(self, conn: psycopg.Connection[Any]) -> int:
            return 1

    def writes_then_returns_a_coroutine(conn: psycopg.Connection[Any]) -> Any:
        conn.execute("INSERT INTO users (id, first_name, referral_code) VALUES (2, 'x', 'x2')")
        return _an_async_transaction(conn)

    sneaky: list[Callable[[psycopg.Connection[Any]], Any]] = [
        lambda conn: _an_async_transaction(conn),
        AsyncCallable(),
        writes_then_returns_a_coroutine,
    ]
    with trio.fail_after(10):
        for fn in sneaky:
            with pytest.raises(TypeError):
                await one_connection.run(fn)
        assert await one_connection.run(lambda conn: conn.execute("SELECT count(*) FROM users").fetchone()[0]) == 0


# --- finalize and grant on one connection, one transaction -------------------------------------------

WRITE_LOG = """
CREATE TABLE audit_writes (
    tbl text NOT NULL, op text NOT NULL, pid int NOT NULL, xid xid8 NOT NULL, row_data jsonb NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE FUNCTION audit_write() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO audit_writes (tbl, op, pid, xid, row_data)
    VALUES (TG_TABLE_NAME, TG_OP, pg_backend_pid(), pg_current_xact_id(), to_jsonb(NEW));
    RETURN NEW;
END $$;
"""
FINALIZE_TABLES = ("purchases", "payments", "subscriptions", "balance_ledger", "users", "outbox")


def install_write_log(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(WRITE_LOG)
        for table in FINALIZE_TABLES:
            conn.execute(
                f"CREATE TRIGGER audit_write AFTER INSERT OR UPDATE ON {table} "
                "FOR EACH ROW EXECUTE FUNCTION audit_write()"
            )


async def buy_with_crypto_pay(fake: FakeTelegram, pay: FakeCryptoPay, dsn: str, user: int) -> int:
    """The user buys plan m1 with Crypto Pay in the bot and pays the invoice at the fake; the purchase id."""
    plans = await say(fake, user, "/buy", predicate=lambda m: "plan:m1" in m.callback_data)
    methods = await press(fake, user, plans, "plan:m1", predicate=lambda m: "pay:m1:c" in m.callback_data)
    await press(fake, user, methods, "pay:m1:c", predicate=text_has("Crypto Pay"))
    purchase_id, invoice_id = sql(
        dsn, "SELECT id, invoice_id FROM purchases WHERE user_id = %s AND status = 'pending'", user
    )[0]
    pay.pay(invoice_id)
    return int(purchase_id)


async def test_finalize_and_grant_share_one_connection_and_one_transaction(
    nursery: trio.Nursery,
    fake_telegram: tuple[FakeTelegram, str],
    fake_cryptopay: tuple[FakeCryptoPay, str],
    db_dsn: str,
    write_config: Callable[..., Path],
    tmp_path: Path,
) -> None:
    fake, _ = fake_telegram
    pay, _ = fake_cryptopay
    config = full_config(write_config, db_dsn, tmp_path, fake_telegram, cryptopay=fake_cryptopay)
    vpnd = await start_full(nursery, config, pay)
    install_write_log(db_dsn)
    alice = 1001
    fake.add_user(alice, "Alice")
    with trio.fail_after(40):
        await say(fake, alice, "/start")
        purchase_id = await buy_with_crypto_pay(fake, pay, db_dsn, alice)
        await poll(lambda: scalar(db_dsn, "SELECT status FROM purchases WHERE id = %s", purchase_id) == "paid", 20)
    await vpnd.stop()

    (paid_pid, paid_xid) = sql(
        db_dsn,
        "SELECT pid, xid::text FROM audit_writes WHERE tbl = 'purchases' AND row_data->>'status' = 'paid' "
        "AND (row_data->>'id')::bigint = %s",
        purchase_id,
    )[0]
    writes = sql(db_dsn, "SELECT tbl, op, pid, xid::text FROM audit_writes WHERE xid::text = %s ORDER BY at", paid_xid)
    tables = {tbl for tbl, _, _, _ in writes}
    assert {"purchases", "payments", "subscriptions", "outbox"} <= tables, writes
    assert {pid for _, _, pid, _ in writes} == {paid_pid}, "finalize's writes came from more than one connection"
    # No other transaction wrote the grant: the subscription row for this user was written only there.
    grants = sql(
        db_dsn,
        "SELECT pid, xid::text FROM audit_writes WHERE tbl = 'subscriptions' AND (row_data->>'user_id')::bigint = %s",
        alice,
    )
    assert grants == [(paid_pid, paid_xid)]


# --- the whole scenario on one pooled connection ---------------------------------------------------


BOB, CAROL, DAVE, ERIN, FRANK = 1002, 1003, 1004, 1005, 1006
ALICE = 1001


def seed_subscription(dsn: str, user_id: int, expires_in: dt.timedelta, *, auto_renew: bool = False,
                      balance_minor: int = 0) -> None:  # fmt: skip
    """A user who paid before (rows as vpnd writes them), for the workers to find."""
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "INSERT INTO users (id, first_name, referral_code, balance_minor) VALUES (%s, %s, %s, %s)",
            (user_id, f"User {user_id}", f"ref{user_id}", balance_minor),
        )
        if balance_minor:
            conn.execute(
                "INSERT INTO balance_ledger (user_id, delta_minor, reason, reference) VALUES (%s, %s, 'topup', %s)",
                (user_id, balance_minor, f"seed:{user_id}"),
            )
        conn.execute(
            "INSERT INTO subscriptions (user_id, kind, status, uuid, sub_token, plan_code, expires_at, auto_renew) "
            "VALUES (%s, 'paid', 'active', gen_random_uuid(), %s, 'm1', now() + %s, %s)",
            (user_id, f"tok{user_id}", expires_in, auto_renew),
        )


def vpnd_backends(dsn: str) -> int:
    return int(
        scalar(
            dsn,
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'vpnd' AND datname = current_database()",
        )
    )


def messages_with(fake: FakeTelegram, user_id: int, fragment: str) -> list[ChatMessage]:
    return [m for m in fake.bot_messages(user_id) if fragment in (m.text or "")]


async def admin_opens_user(fake: FakeTelegram, user_id: int) -> ChatMessage:
    menu = await say(fake, ADMIN, "/admin", predicate=has_button("adm:fu"))
    await press(fake, ADMIN, menu, "adm:fu", predicate=text_has("user id or @username"))
    return await say(fake, ADMIN, str(user_id), predicate=text_has(f"User {user_id}"))


@pytest.mark.slow
async def test_end_to_end_with_one_pooled_connection(
    nursery: trio.Nursery,
    fake_telegram: tuple[FakeTelegram, str],
    fake_cryptopay: tuple[FakeCryptoPay, str],
    fake_xray: FakeXray,
    db_dsn: str,
    write_config: Callable[..., Path],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """start, trial, Crypto Pay (signed webhook), balance, the watcher, reminders, expiry, auto-renew, a
    broadcast and an admin grant — every service of the daemon sharing ONE database connection. A nested
    acquire anywhere would wait for the connection its own caller holds: with `connect_timeout_seconds = 3`
    it fails as DatabaseUnavailable (or the scenario's deadline passes) instead of completing."""
    caplog.set_level(logging.INFO)
    fake, _ = fake_telegram
    pay, _ = fake_cryptopay
    config = full_config(
        write_config,
        db_dsn,
        tmp_path,
        fake_telegram,
        cryptopay=fake_cryptopay,
        xray=fake_xray,
        database={"pool_min": 1, "pool_max": 1, "connect_timeout_seconds": 3.0},
    )
    # Users the workers act on: a reminder is due (20 h left), an auto-renewal is due (2 h left, balance
    # enough), one subscription has just run out.
    seed_subscription(db_dsn, DAVE, dt.timedelta(hours=20))
    seed_subscription(db_dsn, ERIN, dt.timedelta(hours=2), auto_renew=True, balance_minor=1000)
    seed_subscription(db_dsn, FRANK, dt.timedelta(seconds=-30))
    for uid, name in [(ADMIN, "Admin"), (ALICE, "Alice"), (BOB, "Bob"), (CAROL, "Carol"), (DAVE, "Dave"),
                      (ERIN, "Erin"), (FRANK, "Frank")]:  # fmt: skip
        fake.add_user(uid, name).started = True
    erin_expiry = scalar(db_dsn, "SELECT expires_at FROM subscriptions WHERE user_id = %s", ERIN)

    with trio.fail_after(120):
        vpnd = await start_full(nursery, config, pay)
        assert vpnd.app.db.stats()["size"] == 1 and vpnd.app.config.database.pool_max == 1

        # start and trial
        menu = await say(fake, ALICE, "/start", predicate=has_button("trial"))
        await press(fake, ALICE, menu, "trial", predicate=text_has("free trial is active"))

        # Crypto Pay: invoice in the bot, paid at the fake, signed webhook to our HTTP server
        purchase = await buy_with_crypto_pay(fake, pay, db_dsn, ALICE)
        await poll(lambda: scalar(db_dsn, "SELECT status FROM purchases WHERE id = %s", purchase) == "paid", 20)
        # (the fake records the delivery once our answer arrived, just after the commit the poll saw)
        await poll(lambda: bool(pay.deliveries), 10, what="the webhook delivery is recorded")
        assert [d.status_code for d in pay.deliveries] == [200]

        # admin credits Bob's balance in the bot; Bob pays from it
        await say(fake, BOB, "/start")
        card = await admin_opens_user(fake, BOB)
        await press(fake, ADMIN, card, f"adm:bal:{BOB}", predicate=text_has("Send an amount"))
        confirm = await say(fake, ADMIN, "+10", predicate=has_button("adm:balc:"))
        await press(fake, ADMIN, confirm, "adm:balc:", predicate=text_has("is now 10.00 USD"))
        plans = await say(fake, BOB, "/buy", predicate=lambda m: "plan:m1" in m.callback_data)
        methods = await press(fake, BOB, plans, "plan:m1", predicate=lambda m: "pay:m1:b" in m.callback_data)
        await press(fake, BOB, methods, "pay:m1:b", predicate=text_has("Paid from your balance"))

        # the watcher: Carol's invoice is paid but the webhook is lost
        await say(fake, CAROL, "/start")
        pay.webhooks_enabled = False
        carol_purchase = await buy_with_crypto_pay(fake, pay, db_dsn, CAROL)
        await poll(lambda: scalar(db_dsn, "SELECT status FROM purchases WHERE id = %s", carol_purchase) == "paid", 20)
        pay.webhooks_enabled = True

        # admin grant: 10 days for Frank, whose subscription ran out
        await poll(lambda: scalar(db_dsn, "SELECT status FROM subscriptions WHERE user_id = %s", FRANK) == "expired",
                   20, what="the expiry worker marked Frank's subscription expired")  # fmt: skip
        card = await admin_opens_user(fake, FRANK)
        await press(fake, ADMIN, card, f"adm:g:{FRANK}", predicate=text_has("How many days"))
        confirm = await say(fake, ADMIN, "10", predicate=has_button("adm:gc:"))
        await press(fake, ADMIN, confirm, f"adm:gc:{FRANK}:10:1:", predicate=text_has("Granted 10 days"))

        # reminders, auto-renewal, expiry notice: delivered through the outbox
        await poll(lambda: bool(messages_with(fake, DAVE, "")), 20, what="Dave's reminder")
        await poll(lambda: scalar(db_dsn, "SELECT expires_at FROM subscriptions WHERE user_id = %s", ERIN)
                   > erin_expiry, 20, what="Erin's auto-renewal")  # fmt: skip
        await poll(lambda: len(fake.bot_messages(FRANK)) >= 2, 20, what="Frank's expiry notice and grant notice")

        # a broadcast to everyone, composed by the admin
        await run_broadcast(fake, [ALICE, BOB, CAROL, DAVE, ERIN, FRANK])

        # Xray converges to the database: live users and the file
        await poll(lambda: live_emails(fake_xray) == desired_emails(db_dsn), 20, what="live Xray users = desired")
        await poll(lambda: file_emails(config) == desired_emails(db_dsn), 20, what="Xray file = desired")
        assert vpnd_backends(db_dsn) <= 1
        await vpnd.stop()

    # Each payment granted once, the balance equals its ledger, and nothing failed for lack of a connection.
    # (Erin's auto-renewal is a purchase paid from the balance too.)
    assert scalar(db_dsn, "SELECT count(*) FROM payments") == 4
    assert sql(db_dsn, "SELECT provider, count(*) FROM payments GROUP BY 1 ORDER BY 1") == [
        ("balance", 2),
        ("cryptopay", 2),
    ]
    renewed = scalar(db_dsn, "SELECT expires_at FROM subscriptions WHERE user_id = %s", ERIN)
    assert renewed - erin_expiry == dt.timedelta(days=30)
    assert sql(db_dsn, "SELECT u.id FROM users u LEFT JOIN balance_ledger l ON l.user_id = u.id GROUP BY u.id "
                       "HAVING u.balance_minor <> coalesce(sum(l.delta_minor), 0)") == []  # fmt: skip
    logged = [(r.levelno, r.getMessage()) for r in caplog.records]
    problems = [m for level, m in logged if level >= logging.ERROR or re.search(r"DatabaseUnavailable|PoolTimeout", m)]
    assert problems == []


async def run_broadcast(fake: FakeTelegram, users: list[int]) -> None:
    """The admin composes and starts a broadcast to everyone; each user gets it once."""
    text = "Audit B news"
    menu = await say(fake, ADMIN, "/admin", predicate=has_button("adm:bc"))
    await press(fake, ADMIN, menu, "adm:bc", predicate=text_has("broadcast text"))
    ask_button = await say(fake, ADMIN, text, predicate=has_button("adm:bn"))
    segments = await press(fake, ADMIN, ask_button, "adm:bn", predicate=has_button("adm:bs:"))
    confirm = await press(fake, ADMIN, segments, "adm:bs:all", predicate=has_button("adm:bgo:"))
    await press(fake, ADMIN, confirm, "adm:bgo:", predicate=has_button("adm:bp:"))
    await poll(lambda: all(messages_with(fake, uid, text) for uid in users), 20, what="the broadcast reached all")
    assert all(len(messages_with(fake, uid, text)) == 1 for uid in users)
