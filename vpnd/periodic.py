"""Periodic work without drift and without pile-ups.

Each round starts at `start + k * period` (`trio.sleep_until`); a round that overruns its period
makes the next one start at once instead of stacking, and skips the deadlines it missed. A round
is bounded by `round_timeout`. An exception in a round is logged with the worker's name and the
next round runs — but `trio.Cancelled` passes through, and so do `BrokenInvariant` errors, which
must bring the daemon down.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from vpnd.metrics import Metrics

log = logging.getLogger("vpnd.workers")


class BrokenInvariant(Exception):
    """Something that must never happen did: crash the daemon so systemd restarts it."""


RoundFn = Callable[[], Awaitable[int | None]]


async def run_periodic(
    name: str,
    period: float,
    round_fn: RoundFn,
    *,
    metrics: Metrics | None = None,
    round_timeout: float | None = None,
    on_round: Callable[[], None] | None = None,
    wake: Callable[[], Awaitable[object]] | None = None,
) -> None:
    """Call `round_fn` every `period` seconds forever. `round_fn` returns the rows it handled.

    `wake`, if given, is awaited between rounds alongside the deadline: returning early starts the
    next round at once (e.g. a Nudge's wait).
    """
    timeout = round_timeout if round_timeout is not None else max(period * 5, 30.0)
    next_deadline = trio.current_time()
    while True:
        started = trio.current_time()
        rows: int | None = None
        failed = False
        with trio.move_on_after(timeout) as scope:
            try:
                rows = await round_fn()
            except (trio.Cancelled, BrokenInvariant):
                raise
            except Exception as exc:
                failed = True
                log.exception("event=worker_round_failed worker=%s error=%s", name, type(exc).__name__)
        if scope.cancelled_caught:
            failed = True
            log.error("event=worker_round_timeout worker=%s timeout_seconds=%g", name, timeout)
        elapsed = trio.current_time() - started
        if metrics is not None:
            metrics.worker_rounds.labels(name).inc()
            metrics.worker_duration.labels(name).observe(elapsed)
            if failed:
                metrics.worker_errors.labels(name).inc()
            if rows:
                metrics.worker_rows.labels(name).inc(rows)
        if on_round is not None:
            on_round()
        next_deadline += period
        if trio.current_time() >= next_deadline:
            # Overran: start the next round at once and re-anchor, instead of stacking missed rounds.
            next_deadline = trio.current_time()
        if wake is None:
            await trio.sleep_until(next_deadline)
        else:
            with trio.move_on_at(next_deadline):
                await wake()
            if trio.current_time() < next_deadline:
                next_deadline = trio.current_time()
