"""The database bridge: one transaction per call, cancel-aware, no leaked connections."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
import trio

from vpnd.db import Database, DatabaseUnavailable, open_database


def insert_user(conn: psycopg.Connection[Any], user_id: int, sleep: float = 0.0) -> int:
    conn.execute("INSERT INTO users (id, first_name, referral_code) VALUES (%s, 'x', %s)", (user_id, f"r{user_id}"))
    if sleep:
        conn.execute("SELECT pg_sleep(%s)", (sleep,))
    return user_id


def count_users(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT count(*) FROM users").fetchone()
    assert row is not None
    return int(row[0])


def backend_states(conn: psycopg.Connection[Any]) -> list[tuple[str, str | None]]:
    return conn.execute(
        "SELECT state, query FROM pg_stat_activity WHERE application_name = 'vpnd' AND pid <> pg_backend_pid()"
    ).fetchall()


async def test_run_commits_and_returns(database: Database) -> None:
    assert await database.run(insert_user, 1) == 1
    assert await database.run(count_users) == 1


async def test_exception_rolls_back(database: Database) -> None:
    def fail(conn: psycopg.Connection[Any]) -> None:
        insert_user(conn, 2)
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        await database.run(fail)
    assert await database.run(count_users) == 0


@pytest.mark.alone  # the cancel must land inside pg_sleep, 0.3 s after the call started
async def test_cancel_mid_transaction_rolls_back_and_keeps_pool_intact(database: Database) -> None:
    """A cancelled call is cancelled on the server, rolled back, and its connection returned clean."""
    with trio.fail_after(30):  # far below pg_sleep(30) plus the rest: only a server-side cancel gets here
        with trio.move_on_after(0.3) as scope:
            await database.run(insert_user, 3, 30.0)  # pg_sleep(30) inside the transaction
        assert scope.cancelled_caught
        # The server-side statement was cancelled: we are back long before pg_sleep(30) would end.
        assert await database.run(count_users) == 0
        stats = database.stats()
        assert stats["in_flight"] == 0
        # Every connection of the pool is idle again (none stuck "idle in transaction" or active).
        states = await database.run(backend_states)
        assert all(state == "idle" for state, _ in states if state is not None), states
        # The pool still serves as many concurrent calls as it has connections.
        async with trio.open_nursery() as nursery:
            for user_id in range(10, 14):
                nursery.start_soon(database.run, insert_user, user_id, 0.1)
        assert await database.run(count_users) == 4


def sleep_noting_the_backend(conn: psycopg.Connection[Any], pids: list[int], seconds: float) -> None:
    row = conn.execute("SELECT pg_backend_pid()").fetchone()
    assert row is not None
    pids.append(int(row[0]))
    conn.execute("SELECT pg_sleep(%s)", (seconds,))


def backend_alive(conn: psycopg.Connection[Any], pid: int) -> bool:
    row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
    return bool(row and row[0])


async def test_a_cancelled_calls_connection_serves_no_other_call(database: Database) -> None:
    """PostgreSQL may deliver a cancel request after the cancelled statement has ended — to the next
    statement on that backend, which would fail "canceling statement due to user request" (seen in CI:
    a broadcast cancelled, then its final report's query on the same pooled connection). So a connection
    a cancel was sent to is closed, not handed to the next call; and quick cancels next to other calls
    never fail those."""
    pids: list[int] = []
    with trio.fail_after(60):
        with trio.move_on_after(0.3):
            await database.run(sleep_noting_the_backend, pids, 30.0)
        with trio.fail_after(5):
            while await database.run(backend_alive, pids[0]):
                await trio.sleep(0.05)

        async def bystander() -> None:
            for _ in range(40):
                await database.run(sleep_noting_the_backend, [], 0.01)  # never cancelled: must not fail

        async with trio.open_nursery() as nursery:
            nursery.start_soon(bystander)
            for attempt in range(40):
                with trio.move_on_after(0.005 + 0.001 * (attempt % 10)):
                    await database.run(sleep_noting_the_backend, [], 0.015)
    assert database.stats()["in_flight"] == 0


HOLD_KEY = 4_242_001


def insert_user_then_wait_for_the_test(conn: psycopg.Connection[Any], user_id: int) -> int:
    """Insert, then wait (holding the connection) until the test releases its advisory lock."""
    insert_user(conn, user_id)
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (HOLD_KEY,))
    return user_id


def waiting_for_the_test(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = %s AND NOT granted", (HOLD_KEY,)
    ).fetchone()
    return bool(row and row[0])


async def test_cancel_before_connection_runs_nothing(db_dsn: str) -> None:
    with psycopg.connect(db_dsn, autocommit=True) as gate:
        gate.execute("SELECT pg_advisory_lock(%s)", (HOLD_KEY,))
        async with open_database(db_dsn, min_size=1, max_size=1) as db:
            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(db.run, insert_user_then_wait_for_the_test, 20)  # holds the only connection
                    while not await trio.to_thread.run_sync(lambda: waiting_for_the_test(gate)):
                        await trio.sleep(0.02)
                    with trio.move_on_after(0.1) as scope:
                        await db.run(insert_user, 21)  # waits for the limiter, then is cancelled
                    assert scope.cancelled_caught
                    gate.execute("SELECT pg_advisory_unlock(%s)", (HOLD_KEY,))
                assert await db.run(count_users) == 1


async def test_transaction_functions_cannot_nest_pool_use(db_dsn: str) -> None:
    """With one connection, a nested acquire would deadlock; `run` gives fn its connection instead."""
    async with open_database(db_dsn, min_size=1, max_size=1) as db:
        with trio.fail_after(30):
            assert await db.run(lambda conn: insert_user(conn, 30) + count_users(conn)) == 31


async def test_unreachable_database_is_a_clear_error() -> None:
    with pytest.raises(DatabaseUnavailable, match="cannot connect to PostgreSQL"):
        async with open_database("postgresql://nobody@127.0.0.1:1/none", connect_timeout=1):
            pass
