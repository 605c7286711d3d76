"""The root of the task tree: signals, sd_notify and the graceful deadline around the composition root.

    outer nursery ── signal watcher (SIGTERM/SIGINT: 1st stop, 2nd cancel now; SIGHUP: reload)
    ├── standby only: WATCHDOG=1 while it waits for the instance lock and starts after taking it
    └── open_vpnd (instance lock — a standby waits for it, serving its /healthz —, schema, database
                   pool — closed last; bot, sender, router)
        └── root nursery ── notify listener, xray writer, outbox sender, workers (incl. payment
                            watcher), telegram (polling + handler nursery), broadcasts, http, watchdog

`vpnd.compose.open_vpnd` starts every service in dependency order with `await nursery.start(...)`
and sends READY=1 only after the last one reported started. On the first SIGTERM/SIGINT
`app.lifecycle.stopping` is set (services stop taking new work and drain) and the root nursery gets
a deadline of `[shutdown].grace_seconds`; what is still running then is cancelled. A second signal
cancels at once. A signal before READY=1 (start-up: waiting for the migration lock, for Telegram,
...) cancels the start at once: nothing has been promised yet, and every wait there is cancellable.
A child that crashes cancels its siblings and the exception travels up to the CLI.

SIGHUP re-reads the config file and applies what can change live (`vpnd.reload`); a broken file
keeps the running configuration. A SIGHUP before READY=1 is applied once start-up is done.
"""

from __future__ import annotations

import logging
import signal
import time

import trio

from vpnd.app import App
from vpnd.compose import Services, Vpnd, open_vpnd
from vpnd.config import Config
from vpnd.reload import reload_config
from vpnd.sdnotify import Notifier, watchdog_interval

log = logging.getLogger("vpnd.root")


async def run_daemon(
    config: Config,
    *,
    notifier: Notifier | None = None,
    services: Services | None = None,
    standby: bool = False,
    task_status: trio.TaskStatus[App] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run vpnd (every service, or `services`) until a signal or a crash; return after a clean shutdown.

    `standby`: wait for the instance lock (`vpnd run --standby`) instead of failing when it is taken.
    """
    notifier = notifier or Notifier.from_environ()
    try:
        async with trio.open_nursery() as outer:
            cancel_all = trio.CancelScope()
            box: list[Vpnd] = []
            serving = trio.Event()
            outer.start_soon(_watch_signals, box, serving, cancel_all, notifier)
            if standby:
                outer.start_soon(_watchdog_until_serving, serving, notifier)
            with cancel_all:
                chosen = services or Services.all()
                async with open_vpnd(config, chosen, standby=standby, notifier=notifier) as vpnd:
                    box.append(vpnd)
                    serving.set()
                    task_status.started(vpnd.app)
                    await vpnd.app.lifecycle.stopping.wait()
            outer.cancel_scope.cancel()
    finally:
        notifier.close()


async def _watch_signals(
    box: list[Vpnd], serving: trio.Event, cancel_all: trio.CancelScope, notifier: Notifier
) -> None:
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            count = 0
            deferred = False
            async for signum in signals:
                name = signal.Signals(signum).name
                ready = bool(box)
                if signum == signal.SIGHUP:
                    if ready and not box[0].app.lifecycle.stopping.is_set():
                        await _reload(box[0], notifier)
                    elif ready:
                        log.info("event=reload_ignored signal=%s detail=%s", name, "stopping")
                    elif not deferred:
                        deferred = True
                        log.info("event=reload_deferred signal=%s detail=%s", name, "applied_once_start-up_is_done")
                        nursery.start_soon(_reload_when_ready, box, serving, notifier)
                    continue
                count += 1
                if count == 1 and ready:
                    box[0].app.lifecycle.request_stop(name)
                elif count == 1:
                    log.warning("event=stopped_during_startup signal=%s", name)
                    await notifier.notify("STOPPING=1", "STATUS=stopping: signal during start-up")
                    cancel_all.cancel()
                else:
                    log.warning("event=cancel_now signal=%s", name)
                    await notifier.notify("STOPPING=1")
                    cancel_all.cancel()


async def _watchdog_until_serving(serving: trio.Event, notifier: Notifier) -> None:
    """WATCHDOG=1 for a standby, which said READY=1 already (so systemd's watchdog runs): while it waits
    and while it starts after the takeover, until the daemon's own watchdog takes over once it serves."""
    interval = watchdog_interval()
    if interval is None:
        return
    while not serving.is_set():
        await notifier.notify("WATCHDOG=1")
        with trio.move_on_after(interval):
            await serving.wait()


async def _reload(vpnd: Vpnd, notifier: Notifier) -> None:
    """Reload, telling systemd (RELOADING=1 ... READY=1) so `systemctl reload` waits for it."""
    await notifier.notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
    result = reload_config(vpnd.app)
    status = "configuration reloaded" if result is not None else "reload failed, running configuration kept"
    await notifier.notify("READY=1", f"STATUS=serving on {vpnd.http_url} ({status})")


async def _reload_when_ready(box: list[Vpnd], serving: trio.Event, notifier: Notifier) -> None:
    """Reload the config once the daemon is serving (a SIGHUP that came during start-up)."""
    await serving.wait()  # start-up is bounded by TimeoutStartSec; a stop cancels this task
    if not box[0].app.lifecycle.stopping.is_set():
        await _reload(box[0], notifier)
