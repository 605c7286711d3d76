"""The workers nursery: every periodic job of vpnd, each an independent child with its own period.

    workers ── reminders, trials, quota, expiry, renewal, housekeeping, health, backup, key_rotation, (+ extra jobs)

Each job runs under `run_periodic` (no drift, no pile-up, each round bounded by a timeout, an
exception logged with the job's name and survived, `trio.Cancelled` and `BrokenInvariant` passed
through). A job is any `async fn(*, task_status)` started with `nursery.start`, so other layers add
theirs without this module knowing them — e.g. the Crypto Pay watcher:

    await root.start(partial(run_workers, app, sender, extra=[partial(run_payment_watcher, app, client)]))

Nothing here waits on the update limiter, and workers have nothing to drain: on shutdown they are
cancelled (a cancelled round rolls back its open transaction; every round is safe to redo).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

import trio

from vpnd.app import App
from vpnd.payments.checkout import HostedCheckout
from vpnd.periodic import Period, RoundFn, run_periodic
from vpnd.telegram.client import Sender
from vpnd.telegram.texts import Texts
from vpnd.workers import backup, expiry, health, housekeeping, key_rotation, quota, reminders, renewal, trials

log = logging.getLogger("vpnd.workers")

#: A job: `await nursery.start(job)`; it calls `task_status.started()` and runs until cancelled.
Job = Callable[..., Awaitable[Any]]


async def run_worker(
    app: App,
    name: str,
    period: Period,
    round_fn: RoundFn,
    *,
    round_timeout: float | None = None,
    wake: Callable[[], Awaitable[object]] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """One periodic job; started at once, its first round runs right after.

    A `period` function is read again after every config reload (`app.config_reloaded`); `wake`
    returning starts a round before its period is up (`run_periodic`).
    """
    task_status.started()
    log.info("event=worker_started worker=%s period=%g", name, period() if callable(period) else period)
    await run_periodic(
        name,
        period,
        round_fn,
        metrics=app.metrics,
        round_timeout=round_timeout,
        wake=wake,
        retimed=app.config_reloaded.wait,
    )


def default_jobs(app: App, sender: Sender, texts: Texts, checkout: HostedCheckout | None = None) -> dict[str, Job]:
    """The built-in jobs by name, configured from `[workers]` (intervals read live: see `vpnd.reload`).

    `checkout`: the hosted checkout whose saved cards auto-renewal charges (None: balances only).
    """
    batch = app.config.workers.batch_size
    quota_worker = quota.QuotaWorker(app, batch)

    def job(name: str, interval_key: str, round_fn: RoundFn) -> Job:
        def period() -> float:
            return float(getattr(app.config.workers, interval_key))

        return partial(run_worker, app, name, period, round_fn)

    return {
        reminders.WORKER_NAME: job(
            reminders.WORKER_NAME,
            "reminders_interval",
            partial(reminders.reminders_round, app, texts, batch_size=batch),
        ),
        trials.WORKER_NAME: job(
            trials.WORKER_NAME, "trial_interval", partial(trials.trials_round, app, texts, batch_size=batch)
        ),
        expiry.WORKER_NAME: job(
            expiry.WORKER_NAME, "expiry_interval", partial(expiry.expiry_round, app, texts, batch_size=batch)
        ),
        renewal.WORKER_NAME: job(
            renewal.WORKER_NAME,
            "renewal_interval",
            partial(renewal.renewal_round, app, texts, batch_size=batch, checkout=checkout),
        ),
        quota.WORKER_NAME: partial(
            run_worker,
            app,
            quota.WORKER_NAME,
            lambda: app.config.workers.quota_interval,
            quota_worker.round,
            wake=quota_worker.wake,
        ),
        housekeeping.WORKER_NAME: job(
            housekeeping.WORKER_NAME,
            "housekeeping_interval",
            partial(housekeeping.housekeeping_round, app, batch_size=batch),
        ),
        health.WORKER_NAME: partial(health.run_health, app, sender.bot, texts),
        backup.WORKER_NAME: partial(
            run_worker, app, backup.WORKER_NAME, partial(backup.period, app), partial(backup.backup_round, app)
        ),
        key_rotation.WORKER_NAME: partial(
            run_worker,
            app,
            key_rotation.WORKER_NAME,
            lambda: app.config.xray.rotate_interval_seconds,
            partial(key_rotation.rotation_round, app),
        ),
    }


async def run_workers(
    app: App,
    sender: Sender,
    *,
    extra: Sequence[Job] = (),
    only: Sequence[str] | None = None,
    checkout: HostedCheckout | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Start every job (the built-in ones, or those named in `only`, then `extra`); run until shutdown.

    `started()` once every job has reported started (the health check after its first round, so
    its readiness checks exist before READY=1).
    """
    texts = app.texts
    builtin = default_jobs(app, sender, texts, checkout)
    if only is not None:
        unknown = set(only) - set(builtin)
        if unknown:
            raise ValueError(f"unknown workers: {', '.join(sorted(unknown))}")
        builtin = {name: job for name, job in builtin.items() if name in only}
    async with trio.open_nursery() as nursery:
        for job in [*builtin.values(), *extra]:
            await nursery.start(job)
        task_status.started()
        await app.lifecycle.stopping.wait()
        nursery.cancel_scope.cancel()
