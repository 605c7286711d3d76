"""The root of the task tree: signals, sd_notify, start order and the graceful deadline.

    outer nursery ── signal watcher (SIGTERM/SIGINT: 1st stop, 2nd cancel now; SIGHUP: reload)
    └── open_app (instance lock, schema, database pool — closed last)
        └── root nursery ── xray writer, outbox sender, workers (incl. payment watcher),
                            telegram (polling + handler nursery), broadcasts, http, watchdog

Children start in dependency order with `await nursery.start(...)`; READY=1 goes to systemd only
after the last one reported started. On the first SIGTERM/SIGINT `app.lifecycle.stopping` is set
(services stop taking new work and drain) and the root nursery gets a deadline of
`[shutdown].grace_seconds`; what is still running then is cancelled. A second signal cancels at
once. A signal before READY=1 (start-up: waiting for the migration lock, for Telegram, ...)
cancels the start at once: nothing has been promised yet, and every wait there is cancellable.
A child that crashes cancels its siblings and the exception travels up to the CLI.

SIGHUP re-reads the config file and applies what can change live (`vpnd.reload`); a broken file
keeps the running configuration. A SIGHUP before READY=1 is applied once start-up is done.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import trio

from vpnd.app import App, open_app
from vpnd.config import Config
from vpnd.cryptopay import CryptoPayClient, open_cryptopay_client
from vpnd.logs import quote
from vpnd.nurseries.broadcasts import run_broadcasts
from vpnd.nurseries.http import build_router, run_http
from vpnd.nurseries.listener import run_listener
from vpnd.nurseries.outbox import run_outbox
from vpnd.nurseries.telegram import run_telegram
from vpnd.nurseries.workers import run_workers
from vpnd.nurseries.xray import run_xray
from vpnd.payments.checkout import HostedCheckout, YooKassaCheckout, run_checkout_watcher
from vpnd.payments.checkout_webhook import add_checkout_routes
from vpnd.payments.watcher import run_payment_watcher
from vpnd.payments.webhook import add_payment_routes
from vpnd.reload import reload_config, set_log_level
from vpnd.sdnotify import Notifier, watchdog_interval
from vpnd.subscription_url import add_subscription_routes
from vpnd.telegram.client import Sender, open_bot
from vpnd.telegram.ratelimit import OutboundLimiter
from vpnd.telegram.router import default_routes, make_apology, make_drop_notice, make_update_handler
from vpnd.telegram.turn import BotContext
from vpnd.yookassa import open_yookassa_client

log = logging.getLogger("vpnd.root")


async def run_daemon(
    config: Config,
    *,
    notifier: Notifier | None = None,
    task_status: trio.TaskStatus[App] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run vpnd until a signal (or a crash); return normally after a clean shutdown."""
    notifier = notifier or Notifier.from_environ()
    try:
        async with trio.open_nursery() as outer:
            cancel_all = trio.CancelScope()
            app_box: list[App] = []
            app_opened = trio.Event()
            outer.start_soon(_watch_signals, app_box, app_opened, cancel_all, notifier)
            with cancel_all:
                await notifier.notify("STATUS=starting: database")
                async with open_app(config) as app:
                    app_box.append(app)
                    app_opened.set()
                    await serve_app(app, notifier, task_status=task_status)
            outer.cancel_scope.cancel()
    finally:
        notifier.close()


async def serve_app(
    app: App, notifier: Notifier | None = None, *, task_status: trio.TaskStatus[App] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run every service of `app` until `app.lifecycle.stopping`, then drain within the grace period.

    `run_daemon` calls this under signal handling; tests call it directly and stop it with
    `app.lifecycle.request_stop(...)`.
    """
    notifier = notifier or Notifier(None)
    config = app.config
    async with open_bot(config.telegram) as bot, _open_cryptopay(app) as cryptopay, _open_checkout(app) as checkout:
        limiter = OutboundLimiter.from_config(config)
        app.reload_hooks.append(set_log_level)
        app.reload_hooks.append(limiter.apply)
        sender = Sender(bot, limiter, app.metrics)
        ctx = BotContext(app, bot, sender, app.texts, cryptopay, checkout)
        async with trio.open_nursery() as root:
            router = build_router(app)
            add_subscription_routes(router, app)
            if cryptopay is not None:
                add_payment_routes(router, app, config.cryptopay.token)
            if checkout is not None:
                add_checkout_routes(router, app, checkout)
            await notifier.notify("STATUS=starting: services")
            # Dependency order: the owners of derived state first, then the sources of work
            # (updates), HTTP last since it serves everyone's routes.
            await root.start(run_listener, app)
            app.xray_status = await root.start(partial(run_xray, app, texts=ctx.texts))
            await root.start(run_outbox, app, sender)
            watcher = [partial(run_payment_watcher, app, cryptopay)] if cryptopay is not None else []
            watcher += [partial(run_checkout_watcher, app, checkout)] if checkout is not None else []
            await root.start(partial(run_workers, app, sender, extra=watcher))
            await root.start(
                partial(run_telegram, drop_notice=make_drop_notice(ctx)),
                app,
                bot,
                make_update_handler(ctx, default_routes()),
                make_apology(ctx),
            )
            await root.start(run_broadcasts, app, sender)
            url = app.http_url = await root.start(run_http, app, router)
            root.start_soon(_watchdog, app, notifier)
            await _wait_until_ready(app, notifier)
            await notifier.notify("READY=1", f"STATUS=serving on {url}")
            log.info("event=ready http=%s", url)
            app.lifecycle.ready.set()
            task_status.started(app)

            await app.lifecycle.stopping.wait()
            grace = app.config.shutdown.grace_seconds  # not `config`: a reload may have changed it
            await notifier.notify("STOPPING=1", f"STATUS=stopping ({app.lifecycle.reason}), grace {grace:g}s")
            log.info("event=stopping reason=%s grace_seconds=%g", app.lifecycle.reason, grace)
            root.cancel_scope.deadline = trio.current_time() + grace
        if root.cancel_scope.cancelled_caught:
            log.warning("event=grace_expired detail=%s", "work still running after the grace period was cancelled")
    log.info("event=stopped")


@asynccontextmanager
async def _open_cryptopay(app: App) -> AsyncIterator[CryptoPayClient | None]:
    if not app.config.cryptopay.enabled:
        yield None
        return
    async with open_cryptopay_client(app.config.cryptopay.token, app.config.cryptopay.api_base_url) as client:
        yield client


@asynccontextmanager
async def _open_checkout(app: App) -> AsyncIterator[HostedCheckout | None]:
    config = app.config.yookassa
    if not config.enabled:
        yield None
        return
    async with open_yookassa_client(config.shop_id, config.secret_key, config.api_base_url) as client:
        yield YooKassaCheckout(client)


#: Checks without which vpnd cannot do its job at all: READY=1 waits for them (systemd's
#: TimeoutStartSec bounds the wait). Other checks get STARTUP_PATIENCE seconds, then vpnd serves
#: degraded (and /readyz says why) rather than never starting because, say, Xray is down.
CRITICAL_CHECKS = {"database", "telegram"}
STARTUP_PATIENCE = 20.0


async def _wait_until_ready(app: App, notifier: Notifier) -> None:
    """READY=1 means /readyz answers 200: wait for the readiness checks to pass.

    A check that keeps failing is logged every round.
    """
    patience_until = trio.current_time() + STARTUP_PATIENCE
    while True:
        results = await app.health.readiness()
        failing = {name: r.detail for name, r in results.items() if not r.ok}
        if not failing:
            return
        if not (set(failing) & CRITICAL_CHECKS) and trio.current_time() > patience_until:
            # What is left is degraded, not broken (e.g. Xray's API is down): the bot, payments and
            # the database work, and the failing part retries on its own. Say so and serve.
            detail = "; ".join(f"{name}: {text}" for name, text in sorted(failing.items()))
            log.error("event=ready_degraded failing=%s", quote(detail))
            await notifier.notify(f"STATUS=degraded: {', '.join(sorted(failing))}")
            return
        detail = "; ".join(f"{name}: {text}" for name, text in sorted(failing.items()))
        log.warning("event=not_ready_yet failing=%s", quote(detail))
        await notifier.notify(f"STATUS=starting: waiting for {', '.join(sorted(failing))}")
        await trio.sleep(1.0)


async def _watch_signals(
    app_box: list[App], app_opened: trio.Event, cancel_all: trio.CancelScope, notifier: Notifier
) -> None:
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            count = 0
            deferred = False
            async for signum in signals:
                name = signal.Signals(signum).name
                ready = bool(app_box) and app_box[0].lifecycle.ready.is_set()
                if signum == signal.SIGHUP:
                    if ready and not app_box[0].lifecycle.stopping.is_set():
                        await _reload(app_box[0], notifier)
                    elif ready:
                        log.info("event=reload_ignored signal=%s detail=%s", name, "stopping")
                    elif not deferred:
                        deferred = True
                        log.info("event=reload_deferred signal=%s detail=%s", name, "applied_once_start-up_is_done")
                        nursery.start_soon(_reload_when_ready, app_box, app_opened, notifier)
                    continue
                count += 1
                if count == 1 and ready:
                    app_box[0].lifecycle.request_stop(name)
                elif count == 1:
                    log.warning("event=stopped_during_startup signal=%s", name)
                    await notifier.notify("STOPPING=1", "STATUS=stopping: signal during start-up")
                    cancel_all.cancel()
                else:
                    log.warning("event=cancel_now signal=%s", name)
                    await notifier.notify("STOPPING=1")
                    cancel_all.cancel()


async def _reload(app: App, notifier: Notifier) -> None:
    """Reload, telling systemd (RELOADING=1 ... READY=1) so `systemctl reload` waits for it."""
    await notifier.notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
    result = reload_config(app)
    status = "configuration reloaded" if result is not None else "reload failed, running configuration kept"
    await notifier.notify("READY=1", f"STATUS=serving on {app.http_url} ({status})")


async def _reload_when_ready(app_box: list[App], app_opened: trio.Event, notifier: Notifier) -> None:
    """Reload the config once the daemon is serving (a SIGHUP that came during start-up)."""
    await app_opened.wait()  # start-up is bounded by TimeoutStartSec; a stop cancels this task
    app = app_box[0]
    await app.lifecycle.ready.wait()
    if not app.lifecycle.stopping.is_set():
        await _reload(app, notifier)


async def _watchdog(app: App, notifier: Notifier) -> None:
    """WATCHDOG=1 at half of WATCHDOG_USEC, only while every critical loop is beating."""
    interval = watchdog_interval()
    if interval is None:
        return

    async def loop() -> None:
        while True:
            stale = app.health.stale_loops()
            if stale:
                log.error("event=watchdog_withheld stalled=%s", ",".join(stale))
                await notifier.notify(f"STATUS=stalled: {', '.join(stale)}")
            else:
                await notifier.notify("WATCHDOG=1")
            await trio.sleep(interval)

    await app.lifecycle.run_until_stopping(loop)
