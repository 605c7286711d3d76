"""The one way async code reaches PostgreSQL: `await db.run(fn, *args)`.

`fn` is a plain synchronous function `fn(conn, *args)` that runs in a worker thread inside one
transaction on one pooled connection, and returns a value. Because it is synchronous it cannot
await Telegram, Crypto Pay or Xray, and because it receives its connection it has no reason to
take a second one: "no network I/O inside a transaction" and "no nested acquire" hold by
construction. Work that must happen outside (a message, an Xray change) is written as a row in the
same transaction and carried out after commit by its owner task.

Cancellation: Trio's `to_thread.run_sync` either waits for the thread (and lets the cancelled work
commit) or abandons it (and leaks the connection until the query ends). `run` does neither: when
the calling scope is cancelled it sends PostgreSQL a cancel request for the running statement,
marks the call so that the transaction is rolled back instead of committed, waits for the thread
to return the connection clean, and only then lets `trio.Cancelled` propagate.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack, asynccontextmanager, contextmanager
from contextvars import ContextVar
from functools import partial
from typing import Any, Concatenate, ParamSpec, TypeVar

import attrs
import outcome
import psycopg
import psycopg_pool
import trio

log = logging.getLogger("vpnd.db")

P = ParamSpec("P")
R = TypeVar("R")

#: How long a cancelled call may take to roll back and return its connection before we give up
#: waiting politely (the thread is still awaited; this only bounds the server-side cancel).
CANCEL_REQUEST_TIMEOUT = 5.0


#: Connections the update handlers can never take: background services (outbox, Xray writer,
#: workers, broadcasts, health) always find one, even when every handler waits inside the database.
BACKGROUND_RESERVE = 2


@attrs.define(eq=False)
class _Lane:
    #: Database calls made so far by this update's handler.
    calls: int = 0


#: Set while an update handler runs (see `update_lane`): its database calls share a smaller limit.
_UPDATE_LANE: ContextVar[_Lane | None] = ContextVar("vpnd_db_update_lane", default=None)


@contextmanager
def update_lane() -> Iterator[None]:
    """Mark the database calls made inside the block (and tasks it starts) as an update handler's."""
    token = _UPDATE_LANE.set(_Lane())
    try:
        yield
    finally:
        _UPDATE_LANE.reset(token)


def calls_in_update() -> int:
    """How many database calls this update's handler has made (-1 outside a handler): lets a handler
    reuse what an earlier call of its own read, as long as nothing has been written since."""
    lane = _UPDATE_LANE.get()
    return -1 if lane is None else lane.calls


class DatabaseUnavailable(Exception):
    """The pool could not hand out a working connection in time."""


#: What a database call raises when PostgreSQL is away for a moment (restart, failover, network):
#: long-running loops catch these, back off and carry on; the state they work from is durable.
CONNECTION_ERRORS: tuple[type[Exception], ...] = (DatabaseUnavailable, psycopg.OperationalError)


class _CallCancelled(Exception):
    """Raised inside the worker thread to roll back a call whose Trio caller was cancelled."""


@attrs.define(eq=False)
class _Call:
    """Shared state between a Trio caller and the worker thread running its transaction."""

    lock: threading.Lock = attrs.field(factory=threading.Lock)
    conn: psycopg.Connection[Any] | None = None
    cancelled: bool = False
    finished: bool = False
    #: A cancel request was sent (or is being sent) to `conn`'s backend; set when it has been.
    cancel_sent: bool = False
    cancel_done: threading.Event = attrs.field(factory=threading.Event)

    def attach(self, conn: psycopg.Connection[Any]) -> None:
        with self.lock:
            if self.cancelled:
                raise _CallCancelled
            self.conn = conn

    def release(self) -> None:
        """The connection went back to the pool unused; the call goes on with another."""
        with self.lock:
            self.conn = None

    def detach(self) -> None:
        with self.lock:
            self.conn = None
            self.finished = True

    def check(self) -> None:
        with self.lock:
            if self.cancelled:
                raise _CallCancelled

    def cancel(self) -> psycopg.Connection[Any] | None:
        """Mark cancelled; return the connection whose statement must be cancelled, if any (the caller
        then sends the cancel request and sets `cancel_done`)."""
        with self.lock:
            if self.finished:
                return None
            self.cancelled = True
            self.cancel_sent = self.conn is not None
            return self.conn

    def let_go(self) -> bool:
        """The worker is done with the connection: no cancel can be aimed at it any more. True when one
        was: PostgreSQL may deliver it late, to whatever statement the backend runs next, so the
        connection must not serve another call."""
        with self.lock:
            self.conn = None
            return self.cancel_sent


@attrs.define(eq=False)
class Database:
    """A psycopg connection pool bridged to Trio. Build it with `open_database`."""

    pool: psycopg_pool.ConnectionPool[psycopg.Connection[Any]]
    limiter: trio.CapacityLimiter
    acquire_timeout: float
    #: The update handlers' share of the worker threads (= connections): the pool size less
    #: BACKGROUND_RESERVE, at least one.
    update_limiter: trio.CapacityLimiter | None = None
    #: Calls currently running in a worker thread (for /metrics and tests).
    in_flight: int = 0

    async def run(
        self,
        fn: Callable[Concatenate[psycopg.Connection[Any], P], R],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> R:
        """Run `fn(conn, *args, **kwargs)` in one transaction in a worker thread; return its result."""
        lane = _UPDATE_LANE.get()
        if lane is not None and self.update_limiter is not None:
            lane.calls += 1
            async with self.update_limiter:
                return await self._run(fn, *args, **kwargs)
        return await self._run(fn, *args, **kwargs)

    async def _run(
        self,
        fn: Callable[Concatenate[psycopg.Connection[Any], P], R],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> R:
        if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
            # A transaction function must not be able to await (network I/O inside a transaction).
            raise TypeError(f"{getattr(fn, '__qualname__', fn)!r} is async; transaction functions are plain functions")
        call = _Call()

        def transaction(conn: psycopg.Connection[Any]) -> R:
            with ExitStack() as stack:
                try:
                    stack.enter_context(conn.transaction())  # sends BEGIN
                except psycopg.OperationalError as exc:
                    raise _StaleConnection from exc
                result = fn(conn, *args, **kwargs)
                if inspect.isawaitable(result):
                    # A callable that *returns* a coroutine (a lambda around an async def): refuse
                    # before the transaction ends, so it rolls back.
                    if inspect.iscoroutine(result):
                        result.close()
                    raise TypeError(f"{fn!r} returned an awaitable; transaction functions are sync")
                call.check()  # a cancel that came during fn rolls back instead of committing
            return result

        def work() -> R:
            try:
                for attempt in (1, 2):
                    with self.pool.connection(timeout=self.acquire_timeout) as conn:
                        call.attach(conn)
                        try:
                            return transaction(conn)
                        except _StaleConnection as exc:
                            # The server closed this pooled connection while it sat in the pool (a
                            # restart): nothing ran yet, so another connection may take the call, once.
                            if attempt == 2:
                                raise exc.__cause__ or exc from None
                            call.release()
                        finally:
                            conn._vpnd_used_at = time.monotonic()  # type: ignore[attr-defined]
                            if call.let_go():
                                # A cancel request went to this backend; it may land after our rollback,
                                # on the next call's statement ("canceling statement due to user
                                # request"). So once it has been sent, close the connection: the pool
                                # replaces it.
                                call.cancel_done.wait(CANCEL_REQUEST_TIMEOUT + 1.0)
                                conn.close()
                raise AssertionError("unreachable")
            except psycopg_pool.PoolTimeout as exc:
                raise DatabaseUnavailable(f"no database connection within {self.acquire_timeout:g}s") from exc
            finally:
                call.detach()

        self.in_flight += 1
        try:
            async with self.limiter:
                result = await _in_worker_thread(work, call)
        finally:
            self.in_flight -= 1
        if isinstance(result, outcome.Error) and (
            isinstance(result.error, _CallCancelled)
            or (call.cancelled and isinstance(result.error, psycopg.errors.QueryCanceled))
        ):
            # We rolled back because the caller was cancelled: this checkpoint raises trio.Cancelled,
            # which is what the caller must see.
            await trio.lowlevel.checkpoint()
            raise AssertionError("a database call was rolled back without a cancel")
        return result.unwrap()

    def stats(self) -> dict[str, int]:
        """Pool counters (size, available, waiting) for /metrics."""
        raw = self.pool.get_stats()
        return {
            "size": raw.get("pool_size", 0),
            "available": raw.get("pool_available", 0),
            "waiting": raw.get("requests_waiting", 0),
            "in_flight": self.in_flight,
        }


async def _in_worker_thread(work: Callable[[], R], call: _Call) -> outcome.Outcome[R]:
    """Run `work` in one of Trio's cached threads and park this task until it returns: its outcome.

    The hand-off `trio.to_thread.run_sync` makes, without its per-call extras (a context copy, the
    limiter bookkeeping, and here a nursery with a watcher task for cancellation), which were most of
    the bridge's cost on the update path. Cancellation: the abort function marks the call cancelled and
    sends PostgreSQL a cancel request (from another thread, since that blocks); the task stays parked
    until the worker has rolled back and returned its connection, and the caller then raises
    `trio.Cancelled` at its next checkpoint.
    """
    task = trio.lowlevel.current_task()
    token = trio.lowlevel.current_trio_token()

    def deliver(result: outcome.Outcome[R]) -> None:
        token.run_sync_soon(trio.lowlevel.reschedule, task, outcome.Value(result))

    def abort(raise_cancel: Any) -> trio.lowlevel.Abort:
        conn = call.cancel()
        if conn is not None:
            trio.lowlevel.start_thread_soon(partial(_cancel_statement, conn), lambda _: call.cancel_done.set())
        return trio.lowlevel.Abort.FAILED

    trio.lowlevel.start_thread_soon(work, deliver)
    result: outcome.Outcome[R] = await trio.lowlevel.wait_task_rescheduled(abort)
    return result


class _StaleConnection(Exception):
    """BEGIN failed on a pooled connection: the server went away or restarted; nothing has run."""


#: A pooled connection idle longer than this is checked (one round trip) before it is handed out;
#: busy ones are not (a check on every checkout was 7 % of the update path's CPU). A busy connection
#: that a server restart closed fails at BEGIN, and the call is retried once on another connection.
IDLE_CHECK_SECONDS = 5.0


def _check_if_idle(conn: psycopg.Connection[Any]) -> None:
    if time.monotonic() - getattr(conn, "_vpnd_used_at", 0.0) > IDLE_CHECK_SECONDS:
        psycopg_pool.ConnectionPool.check_connection(conn)


def _cancel_statement(conn: psycopg.Connection[Any]) -> None:
    try:
        conn.cancel_safe(timeout=CANCEL_REQUEST_TIMEOUT)
    except psycopg.Error as exc:  # the statement may have ended meanwhile; the rollback still happens
        log.debug("event=db_cancel_failed error=%s", type(exc).__name__)


@asynccontextmanager
async def open_database(
    dsn: str,
    *,
    min_size: int = 2,
    max_size: int = 10,
    statement_timeout_ms: int = 15000,
    connect_timeout: float = 10.0,
    application_name: str = "vpnd",
) -> AsyncIterator[Database]:
    """Open the pool (waiting until `min_size` connections work) and close it on exit.

    The worker-thread limiter equals the pool size, so a thread never waits for a connection that
    another thread of ours holds; callers wait in Trio instead, where they can be cancelled.
    """
    options = f"-c statement_timeout={statement_timeout_ms}" if statement_timeout_ms else ""
    pool: psycopg_pool.ConnectionPool[psycopg.Connection[Any]] = psycopg_pool.ConnectionPool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        open=False,
        timeout=connect_timeout,
        kwargs={
            "autocommit": True,
            "options": options,
            "application_name": application_name,
            "connect_timeout": max(1, int(connect_timeout)),
        },
        check=_check_if_idle,
        name="vpnd",
    )
    try:
        with trio.fail_after(connect_timeout + 1):
            await trio.to_thread.run_sync(lambda: pool.open(wait=True, timeout=connect_timeout), abandon_on_cancel=True)
    except (psycopg_pool.PoolTimeout, trio.TooSlowError) as exc:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(pool.close)
            reason = await trio.to_thread.run_sync(_describe_connect_error, dsn)
        raise DatabaseUnavailable(f"cannot connect to PostgreSQL within {connect_timeout:g}s: {reason}") from exc
    try:
        yield Database(
            pool=pool,
            limiter=trio.CapacityLimiter(max_size),
            acquire_timeout=connect_timeout,
            update_limiter=trio.CapacityLimiter(max(1, max_size - BACKGROUND_RESERVE)),
        )
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(lambda: pool.close(timeout=5.0))


def _describe_connect_error(dsn: str) -> str:
    """Try one direct connection to get PostgreSQL's own reason (the pool only says 'timeout')."""
    try:
        with psycopg.connect(dsn, connect_timeout=3):
            return "the server answered, but the pool could not fill"
    except psycopg.Error as exc:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
