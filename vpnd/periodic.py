"""Periodic work without drift and without pile-ups.

Each round starts at `start + k * period` (`trio.sleep_until`); a round that overruns its period
makes the next one start at once instead of stacking, and skips the deadlines it missed. A round
is bounded by `round_timeout`. An exception in a round is logged with the worker's name and the
next round runs — but `trio.Cancelled` passes through, and so do `BrokenInvariant` errors, which
must bring the daemon down.

The period may be a function (e.g. reading `app.config.workers...`, which a config reload
changes); `retimed` is then awaited between rounds too, and when it returns the next deadline is
worked out again from the new period: a shorter period takes effect at once, not after the old one.
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
#: Seconds, or a function giving the current value (read before every wait).
Period = float | Callable[[], float]


async def run_periodic(
    name: str,
    period: Period,
    round_fn: RoundFn,
    *,
    metrics: Metrics | None = None,
    round_timeout: float | None = None,
    on_round: Callable[[], None] | None = None,
    wake: Callable[[], Awaitable[object]] | None = None,
    retimed: Callable[[], Awaitable[object]] | None = None,
) -> None:
    """Call `round_fn` every `period` seconds forever. `round_fn` returns the rows it handled.

    `wake`, if given, is awaited between rounds alongside the deadline: returning early starts the
    next round at once (e.g. a Nudge's wait). `retimed`, if given, returns when `period` may have
    changed (e.g. `app.config_reloaded.wait`).
    """
    current_period = period if callable(period) else lambda: period
    next_deadline = trio.current_time()
    while True:
        timeout = round_timeout if round_timeout is not None else max(current_period() * 5, 30.0)
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
        due = next_deadline  # when this round was due: the grid's anchor
        while True:
            next_deadline = due + current_period()
            if trio.current_time() >= next_deadline:
                # Overran: start the next round at once and re-anchor, instead of stacking missed rounds.
                next_deadline = trio.current_time()
                break
            woken = await _wait_until(next_deadline, wake, retimed)
            if woken == "deadline":
                break
            if woken == "wake":
                next_deadline = trio.current_time()
                break
            # "retimed": work the deadline out again from the (possibly) new period.


async def _wait_until(
    deadline: float,
    wake: Callable[[], Awaitable[object]] | None,
    retimed: Callable[[], Awaitable[object]] | None,
) -> str:
    """Wait for `deadline`, `wake()` or `retimed()`, whichever comes first; say which."""
    if wake is None and retimed is None:
        await trio.sleep_until(deadline)
        return "deadline"
    outcome = "deadline"
    async with trio.open_nursery() as nursery:
        nursery.cancel_scope.deadline = deadline

        async def first(label: str, waiter: Callable[[], Awaitable[object]]) -> None:
            nonlocal outcome
            await waiter()
            outcome = label
            nursery.cancel_scope.cancel()

        if wake is not None:
            nursery.start_soon(first, "wake", wake)
        if retimed is not None:
            nursery.start_soon(first, "retimed", retimed)
    return outcome
