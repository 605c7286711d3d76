"""The notify listener: turns commit-time notifications into wake-ups of their owners.

The schema's triggers notify a channel from every statement that changes what an owner derives
(`vpnd.db.notify`); this task LISTENs on one dedicated session and nudges the matching `Nudge` on
`App` — from any process's commit, the admin CLI's included. It waits on the session's socket with
`trio.lowlevel.wait_readable`, so no thread is parked and shutdown cancels it at once.

When PostgreSQL goes away (restart, failover, network cut) it reconnects with backoff. After every
(re)connect it nudges every owner: notifications sent while nobody listened are lost, and one extra
round costs little. The owners also poll on their own period, so a listener that is down makes them
slower, never wrong; the readiness check "notify_listener" says when it is.
"""

from __future__ import annotations

import logging
from typing import Any

import attrs
import psycopg
import trio

from vpnd.app import App
from vpnd.db import notify
from vpnd.health import CheckResult
from vpnd.logs import quote
from vpnd.nudge import Nudge

log = logging.getLogger("vpnd.listener")

#: Reconnect delays: first, then doubling up to the cap.
FIRST_BACKOFF = 0.2
MAX_BACKOFF = 5.0


@attrs.define(eq=False)
class ListenerStatus:
    listening: bool = False
    #: Sessions opened so far (1 after a clean start; each reconnect adds one).
    connects: int = 0
    #: Batches of notifications read (a batch nudges each owner named in it once).
    wakeups: int = 0
    last_error: str = ""

    async def readiness(self) -> CheckResult:
        if self.listening:
            return CheckResult(True, f"listening on {', '.join(notify.CHANNELS)}")
        problem = self.last_error or "connecting"
        return CheckResult(False, f"not listening ({problem}); owners wake only on their own period")


def owners(app: App) -> dict[str, Nudge]:
    """The wake-up of each channel's owner."""
    return {notify.XRAY: app.xray_changed, notify.OUTBOX: app.outbox_changed, notify.BROADCASTS: app.broadcasts_changed}


async def run_listener(app: App, *, task_status: trio.TaskStatus[ListenerStatus] = trio.TASK_STATUS_IGNORED) -> None:
    """Listen until shutdown begins. `task_status.started(status)` after the first connection attempt,
    whatever its outcome: without the listener the daemon still works, only slower to react."""
    status = ListenerStatus()
    app.health.add_check("notify_listener", status.readiness)
    first = await _connect(app, status)
    task_status.started(status)

    async def listen_forever(conn: psycopg.Connection[Any] | None) -> None:
        failures = 0
        while True:
            if conn is not None:
                failures = 0
                await _listen(conn, owners(app), status)
            await trio.sleep(min(MAX_BACKOFF, FIRST_BACKOFF * 2**failures))
            failures += 1
            conn = await _connect(app, status)

    await app.lifecycle.run_until_stopping(listen_forever, first)


async def _connect(app: App, status: ListenerStatus) -> psycopg.Connection[Any] | None:
    timeout = app.config.database.connect_timeout_seconds
    try:
        return await trio.to_thread.run_sync(
            lambda: notify.open_listener(app.config.database.dsn, timeout=timeout), abandon_on_cancel=True
        )
    except psycopg.OperationalError as exc:
        _lost(status, exc)
        return None


async def _listen(conn: psycopg.Connection[Any], wakes: dict[str, Nudge], status: ListenerStatus) -> None:
    """Nudge owners from `conn` until its session ends (returns) or the task is cancelled."""
    try:
        status.connects += 1
        status.listening, status.last_error = True, ""
        log.info("event=listener_connected connects=%d", status.connects)
        for nudge in wakes.values():
            nudge.nudge()
        while True:
            await trio.lowlevel.wait_readable(conn.fileno())
            channels = notify.received(conn)
            if channels:
                status.wakeups += 1
            for channel in channels:
                wakes[channel].nudge()
    except psycopg.OperationalError as exc:
        _lost(status, exc)
    finally:
        status.listening = False
        conn.close()


def _lost(status: ListenerStatus, exc: psycopg.OperationalError) -> None:
    text = str(exc).strip()
    status.last_error = text.splitlines()[0] if text else type(exc).__name__
    log.warning("event=listener_disconnected error=%s", quote(status.last_error))
