"""One daemon per database: a PostgreSQL advisory lock held on a dedicated session.

The lock lives as long as its connection, so it is kept outside the pool. A keeper task checks the
session every few seconds; if PostgreSQL restarted, it reconnects and takes the lock again within
`reacquire_within` seconds, and otherwise crashes the daemon (systemd restarts it) — two daemons on
one database must never run at once, and a daemon that cannot prove it is alone must stop.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import psycopg
import trio

from vpnd.db import locks
from vpnd.db.rows import round_trip

log = logging.getLogger("vpnd.instance")

#: pg_advisory_lock key naming "the vpnd daemon" ("vpnd" + "dmon").
INSTANCE_LOCK_KEY = 0x76706E64_646D6F6E
LOCK_NAME = f"pg_advisory_lock({INSTANCE_LOCK_KEY})"


class InstanceLockHeld(Exception):
    """Another vpnd holds the lock on this database."""


class InstanceLockLost(Exception):
    """The lock's session ended and could not be re-established."""


def _connect_and_lock(dsn: str, timeout: float) -> psycopg.Connection[Any]:
    conn = psycopg.connect(
        dsn, autocommit=True, connect_timeout=max(1, int(timeout)), application_name="vpnd-instance-lock"
    )
    taken: bool | None = None
    try:
        taken = locks.try_advisory_lock(conn, INSTANCE_LOCK_KEY)
    finally:
        if taken is None:
            conn.close()
    if not taken:
        holder = locks.advisory_lock_holder(conn, INSTANCE_LOCK_KEY)
        conn.close()
        if holder is None:
            # Taken, yet no live holder: the previous daemon's session is still ending (PostgreSQL
            # frees the lock when that backend exits, just after the client closed). Try again.
            raise _LockReleasing
        raise InstanceLockHeld(
            f"another vpnd is already running on this database: {LOCK_NAME} is taken "
            f"(held by backend pid {holder[0]}, {holder[1] or 'unknown'})"
        )
    return conn


class _LockReleasing(Exception):
    pass


#: How long a start waits for a lock whose previous holder's session is still ending.
RELEASE_WAIT = 5.0


async def _take_lock(dsn: str, timeout: float) -> psycopg.Connection[Any]:
    deadline = trio.current_time() + RELEASE_WAIT
    while True:
        try:
            return await trio.to_thread.run_sync(_connect_and_lock, dsn, timeout, abandon_on_cancel=True)
        except _LockReleasing:
            if trio.current_time() > deadline:
                raise InstanceLockHeld(
                    f"another vpnd is already running on this database: {LOCK_NAME} is taken"
                ) from None
            await trio.sleep(0.1)


def _release(conn: psycopg.Connection[Any]) -> None:
    """Unlock explicitly before closing, so a restart right after us finds the lock free."""
    try:
        locks.advisory_unlock(conn, INSTANCE_LOCK_KEY)
    except psycopg.Error:
        pass  # the session is gone already, and with it the lock
    finally:
        conn.close()


def _still_alive(conn: psycopg.Connection[Any]) -> None:
    round_trip(conn)


@attrs.define(eq=False)
class InstanceLock:
    dsn: str
    timeout: float
    conn: psycopg.Connection[Any]
    check_interval: float = 5.0
    reacquire_within: float = 30.0

    async def keep(self) -> None:
        while True:
            await trio.sleep(self.check_interval)
            try:
                await trio.to_thread.run_sync(_still_alive, self.conn, abandon_on_cancel=True)
                continue
            except psycopg.OperationalError as exc:
                log.warning("event=instance_lock_session_lost error=%s", _first_line(exc))
            await self._reacquire()

    async def _reacquire(self) -> None:
        await trio.to_thread.run_sync(self.conn.close)
        deadline = trio.current_time() + self.reacquire_within
        while True:
            try:
                self.conn = await _take_lock(self.dsn, self.timeout)
                log.info("event=instance_lock_reacquired")
                return
            except InstanceLockHeld as exc:
                raise InstanceLockLost(str(exc)) from None
            except psycopg.OperationalError as exc:
                if trio.current_time() > deadline:
                    raise InstanceLockLost(
                        f"lost the database session holding {LOCK_NAME} and could not reconnect "
                        f"within {self.reacquire_within:g}s: {_first_line(exc)}"
                    ) from None
            await trio.sleep(1.0)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@asynccontextmanager
async def hold_instance_lock(dsn: str, *, timeout: float = 10.0) -> AsyncIterator[InstanceLock]:
    """Take the lock or raise InstanceLockHeld; keep it (and watch it) until the block exits."""
    conn = await _take_lock(dsn, timeout)
    lock = InstanceLock(dsn, timeout, conn)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lock.keep)
            yield lock
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            await trio.to_thread.run_sync(_release, lock.conn)
