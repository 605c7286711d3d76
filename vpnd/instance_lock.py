"""One daemon per database: a PostgreSQL advisory lock held on a dedicated session.

The lock lives as long as its connection, so it is kept outside the pool. A keeper task checks the
session every second, and at once when the server ends it; if PostgreSQL restarted, it reconnects and
takes the lock again within `reacquire_within` seconds, and otherwise crashes the daemon (systemd
restarts it) — two daemons on one database must never run at once, and a daemon that cannot prove it
is alone must stop.

A standby (`vpnd run --standby`, `hold_instance_lock(..., waiting=...)`) waits for the lock instead of
exiting, and once it holds the lock it never tries to take it back after losing its session: a peer
may be taking over at that very moment, so it is fenced — it stops at once, and systemd starts it
again as the new standby. Whoever finds the lock taken by someone else stops at once, in both modes.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import attrs
import psycopg
import trio

from vpnd.db import locks
from vpnd.db.rows import round_trip
from vpnd.logs import quote

log = logging.getLogger("vpnd.instance")

#: pg_advisory_lock key naming "the vpnd daemon" ("vpnd" + "dmon").
INSTANCE_LOCK_KEY = 0x76706E64_646D6F6E
LOCK_NAME = f"pg_advisory_lock({INSTANCE_LOCK_KEY})"


class InstanceLockHeld(Exception):
    """Another vpnd holds the lock on this database."""


class InstanceLockLost(Exception):
    """The lock's session ended and could not be re-established."""


#: TCP settings of the lock session (libpq's; ignored on a Unix socket): when the database host stops
#: answering, the keeper's round trip fails after about 5 s instead of TCP's many minutes of retries,
#: so the daemon stops (fenced) well before PostgreSQL's own keepalives drop the session and a standby
#: takes the lock (README "Two hosts: a standby").
LOCK_SESSION_TCP: dict[str, int] = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 1,
    "keepalives_count": 3,
    "tcp_user_timeout": 5000,
}


def _connect(dsn: str, timeout: float) -> psycopg.Connection[Any]:
    return psycopg.connect(
        dsn,
        autocommit=True,
        connect_timeout=max(1, int(timeout)),
        application_name="vpnd-instance-lock",
        **LOCK_SESSION_TCP,  # type: ignore[arg-type]
    )


def _connect_and_lock(dsn: str, timeout: float) -> psycopg.Connection[Any]:
    conn = _connect(dsn, timeout)
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
#: The shortest gap between two checks of the lock session (see `InstanceLock._quiet_or_ending`).
MIN_CHECK_GAP = 0.05
#: How often a standby tries the lock: the takeover comes at most this long after the holder's session ended.
STANDBY_POLL = 0.5
#: How long a daemon that lost its lock session (not a standby's) waits before taking the lock back.
REACQUIRE_AFTER = 2 * STANDBY_POLL


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


async def _wait_for_lock(dsn: str, timeout: float) -> psycopg.Connection[Any]:
    """Try the lock every STANDBY_POLL seconds on one session of its own until it is ours (a standby).

    The database may come and go meanwhile: a lost session is opened again at the same pace.
    """
    conn: psycopg.Connection[Any] | None = None
    outage = False
    try:
        while True:
            try:
                if conn is None:
                    conn = await trio.to_thread.run_sync(_connect, dsn, timeout, abandon_on_cancel=True)
                # Not abandoned on cancel: the statement takes a round trip, and the session must not
                # be closed under a thread still using it.
                if await trio.to_thread.run_sync(locks.try_advisory_lock, conn, INSTANCE_LOCK_KEY):
                    taken, conn = conn, None
                    return taken
                outage = False
            except psycopg.OperationalError as exc:
                if not outage:
                    log.warning("event=standby_database_unreachable error=%s", _first_line(exc))
                outage = True
                if conn is not None:
                    await trio.to_thread.run_sync(conn.close)
                    conn = None
            await trio.sleep(STANDBY_POLL)
    finally:
        if conn is not None:
            conn.close()


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
    check_interval: float = 1.0
    #: How long to try taking the lock again after its session was lost; 0: never (a standby, fenced).
    reacquire_within: float = 30.0

    async def keep(self) -> None:
        while True:
            try:
                await self._quiet_or_ending()
                await trio.to_thread.run_sync(_still_alive, self.conn, abandon_on_cancel=True)
                continue
            except psycopg.OperationalError as exc:
                log.warning("event=instance_lock_session_lost error=%s", _first_line(exc))
            if self.reacquire_within <= 0:
                log.error("event=fenced detail=%s", "lost_the_lock_session_a_standby_may_take_over")
                raise InstanceLockLost(
                    f"lost the database session holding {LOCK_NAME}; a standby may be taking over, so this "
                    "vpnd stops (fenced)"
                )
            await self._reacquire()

    async def _quiet_or_ending(self) -> None:
        """Wait `check_interval`, or less if the server speaks: on an idle session it does so only to end
        it (pg_terminate_backend, a shutdown), so a fenced daemon stops within a round trip."""
        with trio.move_on_after(self.check_interval) as quiet:
            await trio.lowlevel.wait_readable(self.conn.fileno())
        if not quiet.cancelled_caught:
            await trio.sleep(MIN_CHECK_GAP)  # no busy loop should the session ever stay readable

    async def _reacquire(self) -> None:
        await trio.to_thread.run_sync(self.conn.close)
        deadline = trio.current_time() + self.reacquire_within
        # The loss is seen at once, but whoever waits for the lock (a standby, polling every
        # STANDBY_POLL) gets the first chance at it: taking it back in the same instant would only
        # make the outcome a race. Found taken then, this daemon stops.
        await trio.sleep(REACQUIRE_AFTER)
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


async def _wait_as_standby(
    dsn: str, timeout: float, waiting: Callable[[], AbstractAsyncContextManager[object]]
) -> psycopg.Connection[Any]:
    try:
        return await _take_lock(dsn, timeout)  # free: this one is the primary, it never waited
    except (InstanceLockHeld, psycopg.OperationalError) as exc:
        # Someone else is primary (the message names its session), or the database is away for now.
        log.info("event=standby_because detail=%s", quote(_first_line(exc)))
    started = trio.current_time()
    conn: psycopg.Connection[Any] | None = None
    try:
        async with waiting():
            conn = await _wait_for_lock(dsn, timeout)
    except BaseException:
        if conn is not None:  # taken, then cancelled while the standby's server stopped
            conn.close()
        raise
    log.info("event=standby_takeover waited_seconds=%.1f", trio.current_time() - started)
    return conn


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@asynccontextmanager
async def hold_instance_lock(
    dsn: str, *, timeout: float = 10.0, waiting: Callable[[], AbstractAsyncContextManager[object]] | None = None
) -> AsyncIterator[InstanceLock]:
    """Take the lock or raise InstanceLockHeld; keep it (and watch it) until the block exits.

    With `waiting` (a standby) wait for the lock instead, inside `waiting()` (what a standby serves
    meanwhile), and leave it once the lock is ours; such a lock is fenced on loss (see the module).
    """
    if waiting is None:
        lock = InstanceLock(dsn, timeout, await _take_lock(dsn, timeout))
    else:
        lock = InstanceLock(dsn, timeout, await _wait_as_standby(dsn, timeout, waiting), reacquire_within=0.0)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lock.keep)
            yield lock
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            await trio.to_thread.run_sync(_release, lock.conn)
