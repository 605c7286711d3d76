"""The composition root: `open_vpnd(config, services)` builds the whole daemon and runs the chosen services.

    open_vpnd ── instance lock (a standby waits for it), schema, database pool (closed last), health, metrics, texts
                 bot client, outbound limiter, sender, Crypto Pay and YooKassa clients, HTTP router, BotContext
                 └── root nursery ── listener (LISTEN: commits wake their owners), xray, outbox,
                                     workers (+ payment watchers), poller, broadcasts, http,
                                     watchdog                           (those in `services`)

Everything is built here, once, before anything runs; the `App` is frozen (only `config` changes, on
SIGHUP). What is known only once a service runs (the HTTP address, the Xray writer's state, the bot's
username) comes back in `Started`. The daemon (`vpnd.nurseries.root.run_daemon`), the sandbox, the
benchmarks and the tests all start vpnd here; they differ only in the `Services` they ask for.

Leaving the `async with` block is the graceful stop: `app.lifecycle.stopping` is set, services stop
taking new work and drain within `[shutdown].grace_seconds`, then what is left is cancelled and the
pool closes last. An exception in the block (or a crashed service) cancels everything at once.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import partial

import attrs
import trio
from prometheus_client import CollectorRegistry

from vpnd.app import App, database_ready, prepare_schema
from vpnd.config import Config
from vpnd.connect_page import add_connect_routes
from vpnd.cryptopay import CryptoPayClient, open_cryptopay_client
from vpnd.db import open_database
from vpnd.db.migrations import packaged_schema
from vpnd.health import Health
from vpnd.instance_lock import InstanceLock, hold_instance_lock
from vpnd.lifecycle import Lifecycle
from vpnd.logs import quote
from vpnd.metrics import Metrics
from vpnd.nurseries.broadcasts import Broadcasts, run_broadcasts
from vpnd.nurseries.http import build_router, run_http
from vpnd.nurseries.listener import run_listener
from vpnd.nurseries.outbox import OutboxSender, OutboxSettings, run_outbox
from vpnd.nurseries.standby import serving_standby
from vpnd.nurseries.telegram import PollState, identify_bot, run_telegram
from vpnd.nurseries.workers import Job, run_workers
from vpnd.nurseries.xray import XrayFleet, run_xray
from vpnd.payments.checkout import HostedCheckout, YooKassaCheckout, run_checkout_watcher
from vpnd.payments.checkout_webhook import add_checkout_routes
from vpnd.payments.watcher import run_payment_watcher
from vpnd.payments.webhook import add_payment_routes
from vpnd.reload import set_log_level
from vpnd.sdnotify import Notifier, watchdog_interval
from vpnd.subscription_url import add_subscription_routes
from vpnd.telegram.client import Sender, open_bot
from vpnd.telegram.ratelimit import OutboundLimiter
from vpnd.telegram.router import default_routes, make_apology, make_drop_notice, make_update_handler
from vpnd.telegram.turn import BotContext
from vpnd.workers import backup, expiry, health, housekeeping, key_rotation, quota, reminders, renewal, trials
from vpnd.yookassa import open_yookassa_client

log = logging.getLogger("vpnd.root")

WORKERS = (
    reminders.WORKER_NAME,
    trials.WORKER_NAME,
    quota.WORKER_NAME,
    expiry.WORKER_NAME,
    renewal.WORKER_NAME,
    housekeeping.WORKER_NAME,
    health.WORKER_NAME,
    backup.WORKER_NAME,
    key_rotation.WORKER_NAME,
)
#: Every service, in start order: the listener that wakes the owners of derived state at commit, the
#: owners, then the sources of work (updates), HTTP last since it serves everyone's routes; then the
#: watchdog and the READY=1 wait.
SERVICE_NAMES: tuple[str, ...] = (
    *("listener", "xray", "outbox", *WORKERS, "payment_watcher", "poller", "broadcasts", "http"),
    *("watchdog", "readiness"),
)


@attrs.frozen
class Services:
    """Which services `open_vpnd` runs: a set of names from `SERVICE_NAMES`."""

    names: frozenset[str]

    def __attrs_post_init__(self) -> None:
        unknown = self.names - set(SERVICE_NAMES)
        if unknown:
            raise ValueError(f"unknown services: {', '.join(sorted(unknown))}")

    @classmethod
    def all(cls) -> Services:
        return cls(frozenset(SERVICE_NAMES))

    @classmethod
    def only(cls, *names: str) -> Services:
        return cls(frozenset(names))

    def without(self, *names: str) -> Services:
        return Services(self.names - set(names))

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def workers(self) -> tuple[str, ...]:
        return tuple(name for name in WORKERS if name in self.names)


@attrs.frozen
class Tuning:
    """What tests and benchmarks turn about how services run; production uses the defaults."""

    send_attempts: int = 5
    send_max_backoff: float = 30.0
    outbox: OutboxSettings | None = None
    #: Jobs run in the workers nursery besides the built-in ones chosen in `Services`.
    extra_jobs: tuple[Job, ...] = ()


@attrs.frozen
class Started:
    """What the running services reported: known only once they run."""

    http_url: str = ""
    xray: XrayFleet | None = None
    bot_username: str = ""
    polling: PollState | None = None
    outbox: OutboxSender | None = None
    broadcasts: Broadcasts | None = None


@attrs.frozen
class Vpnd:
    """A running vpnd: the app, the bot context its flows use, and what its services reported."""

    app: App
    ctx: BotContext
    started: Started
    services: Services

    @property
    def http_url(self) -> str:
        return self.started.http_url

    @property
    def sender(self) -> Sender:
        return self.ctx.sender


@asynccontextmanager
async def open_vpnd(
    config: Config,
    services: Services | Iterable[str],
    *,
    single_instance: bool = True,
    standby: bool = False,
    notifier: Notifier | None = None,
    tuning: Tuning | None = None,
) -> AsyncIterator[Vpnd]:
    """Build vpnd from `config`, start `services` in dependency order, yield once they run (READY=1).

    `single_instance=False` skips the instance lock (tests that open several apps on one database).
    `standby=True` waits for the lock, serving the standby's health endpoints meanwhile
    (`vpnd.nurseries.standby`), instead of failing when another vpnd holds it.
    """
    services = services if isinstance(services, Services) else Services(frozenset(services))
    notifier = notifier or Notifier(None)
    tuning = tuning or Tuning()
    db_config = config.database
    schema = packaged_schema()
    await notifier.notify("STATUS=starting: database")
    waiting = partial(serving_standby, config, notifier) if standby else None
    async with _maybe_instance_lock(config, single_instance, waiting) as lock:
        await prepare_schema(
            db_config.dsn,
            schema,
            apply=db_config.migrate_on_start,
            timeout=db_config.connect_timeout_seconds,
            lock_timeout=db_config.migration_lock_timeout_seconds,
        )
        async with (
            open_database(
                db_config.dsn,
                min_size=db_config.pool_min,
                max_size=db_config.pool_max,
                statement_timeout_ms=db_config.statement_timeout_ms,
                connect_timeout=db_config.connect_timeout_seconds,
            ) as db,
            open_bot(config.telegram) as bot,
            _open_cryptopay(config) as cryptopay,
            _open_checkout(config) as checkout,
        ):
            limiter = OutboundLimiter.from_config(config)
            health_checks = Health()
            metrics = Metrics(CollectorRegistry(), db)
            app = App(
                config,
                db,
                schema,
                Lifecycle(),
                health_checks,
                metrics,
                lock,
                reload_hooks=(set_log_level, limiter.apply),
            )
            health_checks.add_check("database", partial(database_ready, app))
            sender = Sender(bot, limiter, metrics, tuning.send_attempts, tuning.send_max_backoff)
            username = await identify_bot(app, bot) if "poller" in services else ""
            app.bot_username = username
            ctx = BotContext(app, bot, sender, app.texts, cryptopay, checkout)
            async with trio.open_nursery() as root:
                await notifier.notify("STATUS=starting: services")
                started = await _start_services(root, ctx, services, tuning, notifier)
                if "readiness" in services:
                    await _wait_until_ready(app, notifier)
                await notifier.notify("READY=1", f"STATUS=serving on {started.http_url}")
                log.info("event=ready http=%s", started.http_url)
                app.lifecycle.ready.set()
                try:
                    yield Vpnd(app, ctx, started, services)
                finally:
                    # Reached on a clean exit of the block, and on one by exception (the nursery then
                    # cancels everything at once whatever its deadline).
                    app.lifecycle.request_stop("done")
                    grace = app.config.shutdown.grace_seconds  # a reload may have changed it
                    await notifier.notify("STOPPING=1", f"STATUS=stopping ({app.lifecycle.reason}), grace {grace:g}s")
                    log.info("event=stopping reason=%s grace_seconds=%g", app.lifecycle.reason, grace)
                    root.cancel_scope.deadline = trio.current_time() + grace
            if root.cancel_scope.cancelled_caught:
                log.warning("event=grace_expired detail=%s", "work still running after the grace period was cancelled")
    log.info("event=stopped")


async def _start_services(
    root: trio.Nursery, ctx: BotContext, services: Services, tuning: Tuning, notifier: Notifier
) -> Started:
    """Start the chosen services in `SERVICE_NAMES` order; what they reported."""
    app, sender, cryptopay, checkout = ctx.app, ctx.sender, ctx.cryptopay, ctx.checkout
    xray = outbox = polling = broadcasts = None
    http_url = ""
    if "listener" in services:
        await root.start(run_listener, app)
    if "xray" in services:
        xray = await root.start(partial(run_xray, app, texts=ctx.texts))
    if "outbox" in services:
        outbox = await root.start(partial(run_outbox, app, sender, settings=tuning.outbox))
    jobs = list(tuning.extra_jobs)
    if "payment_watcher" in services and cryptopay is not None:
        jobs.append(partial(run_payment_watcher, app, cryptopay))
    if "payment_watcher" in services and checkout is not None:
        jobs.append(partial(run_checkout_watcher, app, checkout))
    if services.workers() or jobs:
        await root.start(partial(run_workers, app, sender, only=services.workers(), extra=jobs, checkout=checkout))
    if "poller" in services:
        handler = make_update_handler(ctx, default_routes())
        run = partial(run_telegram, drop_notice=make_drop_notice(ctx))
        polling = await root.start(run, app, ctx.bot, handler, make_apology(ctx))
    if "broadcasts" in services:
        broadcasts = await root.start(run_broadcasts, app, sender)
    if "http" in services:
        router = build_router(app)
        add_subscription_routes(router, app, bot_username=ctx.bot_username)
        add_connect_routes(router, app)
        if cryptopay is not None:
            add_payment_routes(router, app, app.config.cryptopay.token)
        if checkout is not None:
            add_checkout_routes(router, app, checkout)
        http_url = await root.start(run_http, app, router)
    if "watchdog" in services:
        root.start_soon(_watchdog, app, notifier)
    return Started(http_url, xray, ctx.bot_username, polling, outbox, broadcasts)


@asynccontextmanager
async def _maybe_instance_lock(
    config: Config, wanted: bool, waiting: Callable[[], AbstractAsyncContextManager[object]] | None
) -> AsyncIterator[InstanceLock | None]:
    if not wanted:
        yield None
        return
    timeout = config.database.connect_timeout_seconds
    async with hold_instance_lock(config.database.dsn, timeout=timeout, waiting=waiting) as lock:
        yield lock


@asynccontextmanager
async def _open_cryptopay(config: Config) -> AsyncIterator[CryptoPayClient | None]:
    if not config.cryptopay.enabled:
        yield None
        return
    async with open_cryptopay_client(config.cryptopay.token, config.cryptopay.api_base_url) as client:
        yield client


@asynccontextmanager
async def _open_checkout(config: Config) -> AsyncIterator[HostedCheckout | None]:
    if not config.yookassa.enabled:
        yield None
        return
    yookassa = config.yookassa
    async with open_yookassa_client(yookassa.shop_id, yookassa.secret_key, yookassa.api_base_url) as client:
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
        failing = {name: r.detail for name, r in results.items() if not r.ok and r.required}
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
