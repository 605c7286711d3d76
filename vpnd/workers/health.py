"""The health check: database, Telegram, Xray, the outbox and free disk, every `health_interval`.

Each check's state lives in `health_checks`. A change of state alerts the admins through the outbox
(so an alert is queued in the same transaction that records the change): ok → failing sends
"failing", and the end of a failure that was alerted sends one "recovered". A failure is alerted at
most once per `alert_every` (an hour) per check: a check that flaps gets one alert and one recovery,
and a failure that began within the hour after the last alert is alerted once the hour is over, if
it still holds. The same facts feed `/readyz` (`health.<check>`) and `/metrics`.

While the database is down nothing can be recorded or queued; the failure is remembered in memory
and, when the database answers again, recorded as failing and then recovered, so the admins learn
about it after the fact.

The outbox check measures how long the oldest due message has waited *while this daemon was running*
(a restart after downtime is not a stuck sender); it fails past `outbox_max_lag`.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
from collections.abc import Awaitable, Callable, Sequence
from contextlib import ExitStack
from typing import Any, Literal

import attrs
import psycopg
import trio

from vpnd.app import App
from vpnd.db import incidents, outbox, users
from vpnd.db.rows import round_trip
from vpnd.health import CheckResult, run_checks
from vpnd.periodic import Period, run_periodic
from vpnd.services import backup
from vpnd.telegram.client import TrioBot
from vpnd.texts import Texts
from vpnd.workers.common import instant_key
from vpnd.xray.api import XrayApi

log = logging.getLogger("vpnd.workers.health")

WORKER_NAME = "health"

Alert = Literal["failing", "recovered"]


@attrs.frozen
class HealthSettings:
    interval: float = 60.0
    #: Each probe's bound.
    probe_timeout: float = 10.0
    #: At most one "failing" alert per check per this long.
    alert_every: dt.timedelta = dt.timedelta(hours=1)
    #: The outbox check fails when a due message waited longer than this (seconds).
    outbox_max_lag: float = 600.0
    #: The disk check fails with less free space than this in the Xray config directory.
    min_free_bytes: int = 100 * 1024 * 1024


# --- pure: when to alert ----------------------------------------------------------------------


@attrs.frozen
class Recorded:
    """A check's stored state."""

    ok: bool
    since: dt.datetime
    last_alert_at: dt.datetime | None


def alert_decision(
    prev: Recorded | None, ok: bool, now: dt.datetime, every: dt.timedelta
) -> tuple[dt.datetime, Alert | None]:
    """The check's new `since` and the alert owed for observing `ok` at `now`, given its stored state."""
    if prev is None:
        return now, (None if ok else "failing")
    since = prev.since if prev.ok == ok else now
    if ok:
        # A recovery is owed when the failure that just ended was alerted.
        failure_alerted = not prev.ok and prev.last_alert_at is not None and prev.last_alert_at >= prev.since
        return since, ("recovered" if failure_alerted else None)
    alerted = prev.last_alert_at is not None and prev.last_alert_at >= since
    allowed = prev.last_alert_at is None or now - prev.last_alert_at >= every
    return since, ("failing" if not alerted and allowed else None)


# --- the table --------------------------------------------------------------------------------


def record_observation(
    conn: psycopg.Connection[Any],
    texts: Texts,
    name: str,
    ok: bool,
    detail: str,
    *,
    admin_ids: Sequence[int],
    default_language: str,
    every: dt.timedelta,
) -> Alert | None:
    """Store one observation; queue the alert it calls for (same transaction); return that alert."""
    first = incidents.record_first(conn, name, ok, detail[:500])
    if first is not None:
        prev = None
        now: dt.datetime = first
    else:
        was_ok, was_since, last_alert_at, now = incidents.lock_state(conn, name)
        prev = Recorded(was_ok, was_since, last_alert_at)
    since, alert = alert_decision(prev, ok, now, every)
    incidents.update_state(conn, name, ok, detail[:500], since, alerted=alert is not None)
    if alert is not None and admin_ids:
        languages = users.languages_of(conn, list(admin_ids))
        for admin_id in admin_ids:
            lang = languages.get(admin_id, default_language)
            text = texts.get(lang, f"health.{alert}", check=name, detail=detail[:300])
            outbox.enqueue(conn, admin_id, text, dedupe_key=f"health:{name}:{alert}:{instant_key(now)}:{admin_id}")
        log.warning("event=health_alert check=%s alert=%s detail=%s", name, alert, detail[:200].replace(" ", "_"))
    return alert


# --- the probes -------------------------------------------------------------------------------


@attrs.define(eq=False)
class HealthChecker:
    app: App
    bot: TrioBot
    xray: XrayApi | None
    texts: Texts
    settings: HealthSettings
    started_at: dt.datetime = attrs.field(factory=lambda: dt.datetime.now(dt.UTC))
    results: dict[str, CheckResult] = attrs.field(factory=dict)
    #: A database failure not yet recorded (the database was down): its detail.
    unrecorded_db_failure: str | None = None
    rounds: int = 0

    @property
    def disk_path(self) -> str | None:
        xray = self.app.config.xray
        return os.path.dirname(os.path.abspath(xray.config_path)) if xray.enabled else None

    def probes(self) -> dict[str, Callable[[], Awaitable[CheckResult]]]:
        probes: dict[str, Callable[[], Awaitable[CheckResult]]] = {
            "database": self._database,
            "telegram": self._telegram,
            "outbox": self._outbox,
        }
        if self.app.metrics.update_backlog is not None:
            probes["updates"] = self._updates
        if self.xray is not None:
            probes["xray"] = self._xray
        if self.disk_path is not None:
            probes["disk"] = self._disk
        if self.app.config.backup.max_age_seconds > 0:
            probes["backup"] = self._backup
        return probes

    async def _database(self) -> CheckResult:
        started = trio.current_time()
        await self.app.db.run(round_trip)
        return CheckResult(True, f"round trip {1000 * (trio.current_time() - started):.0f} ms")

    async def _telegram(self) -> CheckResult:
        me = await self.bot.get_me()
        return CheckResult(True, f"getMe: @{me.username}")

    async def _updates(self) -> CheckResult:
        """Fails when a chat that is not flooding has waited too long for its update to be handled (a
        flooding chat waiting on its own backlog is its own doing, not a fault)."""
        snapshot = self.app.metrics.update_backlog
        assert snapshot is not None
        backlog = snapshot()
        limit = self.app.config.telegram.pending_alert_seconds
        detail = (
            f"{backlog.queued} waiting, {backlog.running} running, oldest of a normal chat "
            f"{backlog.oldest_normal_seconds:.0f} s, {backlog.flooding_chats} chats flooding"
        )
        return CheckResult(backlog.oldest_normal_seconds <= limit, detail)

    async def _xray(self) -> CheckResult:
        assert self.xray is not None
        await self.xray.ping()
        return CheckResult(True, "API answers")

    async def _outbox(self) -> CheckResult:
        backlog = await self.app.db.run(outbox.backlog)
        metrics = self.app.metrics
        metrics.outbox_backlog.set(backlog.due)
        metrics.outbox_oldest_seconds.set(backlog.oldest_age_seconds)
        lag = 0.0
        if backlog.oldest_due is not None:
            lag = max(0.0, (backlog.now - max(backlog.oldest_due, self.started_at)).total_seconds())
        detail = f"{backlog.due} due, oldest waiting {backlog.oldest_age_seconds:.0f} s"
        if lag > self.settings.outbox_max_lag:
            return CheckResult(False, f"{detail}; the sender is {lag:.0f} s behind")
        return CheckResult(True, detail)

    async def _disk(self) -> CheckResult:
        path = self.disk_path
        assert path is not None
        usage = await trio.to_thread.run_sync(shutil.disk_usage, path)
        self.app.metrics.disk_free_bytes.set(usage.free)
        detail = f"{usage.free / 2**30:.1f} GiB free of {usage.total / 2**30:.1f} GiB in {path}"
        return CheckResult(usage.free >= self.settings.min_free_bytes, detail)

    async def _backup(self) -> CheckResult:
        """Fails when the newest backup in `[backup].directory` is older than `[backup].max_age_hours`."""
        settings = self.app.config.backup
        age, newest = await trio.to_thread.run_sync(
            backup.newest_age_seconds, settings.directory, dt.datetime.now(dt.UTC)
        )
        self.app.metrics.backup_age_seconds.set(-1 if age is None else age)
        limit = settings.max_age_seconds
        if age is None or newest is None:
            return CheckResult(False, f"no backup in {settings.directory} (vpnd backup, or [backup].interval_hours)")
        detail = f"newest backup {newest.path.name} is {age / 3600:.1f} h old (limit {limit / 3600:g} h)"
        return CheckResult(age <= limit, detail)

    async def probe_all(self) -> dict[str, CheckResult]:
        return await run_checks(self.probes(), self.settings.probe_timeout)

    async def round(self) -> int:
        """Probe everything, publish the results, record them (and queue alerts). Returns alerts queued."""
        results = await self.probe_all()
        for name, result in results.items():
            self.results[name] = result
            self.app.metrics.health_check_ok.labels(name).set(1 if result.ok else 0)
        self.rounds += 1
        database = results["database"]
        if not database.ok:
            if self.unrecorded_db_failure is None:
                log.error("event=health_database_down detail=%s", database.detail.replace(" ", "_"))
                self.unrecorded_db_failure = database.detail
            return 0
        observations = list(results.items())
        if self.unrecorded_db_failure is not None:
            observations.insert(0, ("database", CheckResult(False, self.unrecorded_db_failure)))
        alerts = 0
        for name, result in observations:
            alert = await self.app.db.run(
                record_observation,
                self.texts,
                name,
                result.ok,
                result.detail,
                admin_ids=self.app.config.telegram.admin_ids,
                default_language=self.app.config.telegram.default_language,
                every=self.settings.alert_every,
            )
            alerts += alert is not None
        self.unrecorded_db_failure = None
        return alerts

    def readiness(self, name: str) -> Callable[[], Awaitable[CheckResult]]:
        async def check() -> CheckResult:
            return self.results.get(name, CheckResult(False, "not checked yet"))

        return check


def health_settings(app: App) -> HealthSettings:
    return HealthSettings(interval=app.config.workers.health_interval)


async def run_health(
    app: App,
    bot: TrioBot,
    texts: Texts,
    *,
    settings: HealthSettings | None = None,
    task_status: trio.TaskStatus[HealthChecker] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the health check forever; `started(checker)` after the first round, with the readiness
    checks `health.<name>` registered."""
    from_config = settings is None
    settings = settings or health_settings(app)
    # From the config, the period is read live (a reload may change [workers].health_interval).
    period: Period = (lambda: app.config.workers.health_interval) if from_config else settings.interval
    xray_config = app.config.xray
    with ExitStack() as stack:
        api = None
        if xray_config.enabled and not xray_config.restart_command:
            api = stack.enter_context(
                XrayApi(xray_config.api_address, prefix=xray_config.api_prefix, timeout=settings.probe_timeout)
            )
        checker = HealthChecker(app, bot, api, texts, settings)
        first = True

        def on_round() -> None:
            nonlocal first
            if first:
                first = False
                for name in checker.probes():
                    app.health.add_check(f"health.{name}", checker.readiness(name))
                task_status.started(checker)

        await run_periodic(
            WORKER_NAME,
            period,
            checker.round,
            metrics=app.metrics,
            on_round=on_round,
            round_timeout=max(settings.interval, settings.probe_timeout * 3),
            retimed=app.config_reloaded.wait,
        )
