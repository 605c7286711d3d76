"""What /healthz, /readyz and the systemd watchdog look at.

Components report in two ways: a *readiness check* (a named function returning a `CheckResult`,
called when /readyz is asked) and a *heartbeat* (a critical loop calls `beat(name)` each round; if
no beat came within its `max_age`, the watchdog stops pinging systemd so that it restarts us).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

import attrs
import trio


@attrs.frozen
class CheckResult:
    ok: bool
    detail: str = ""
    #: False: failing leaves vpnd *degraded* (/readyz still 200) rather than unready (a remote Xray node).
    required: bool = True


ReadinessCheck = Callable[[], Awaitable[CheckResult]]


@attrs.define(eq=False)
class Heartbeat:
    max_age: float
    last: float


@attrs.define(eq=False)
class Health:
    checks: dict[str, ReadinessCheck] = attrs.field(factory=dict)
    heartbeats: dict[str, Heartbeat] = attrs.field(factory=dict)

    def add_check(self, name: str, check: ReadinessCheck) -> None:
        self.checks[name] = check

    def remove_check(self, name: str) -> None:
        self.checks.pop(name, None)

    def watch(self, name: str, max_age: float) -> None:
        """Register a critical loop that must `beat(name)` at least every `max_age` seconds."""
        self.heartbeats[name] = Heartbeat(max_age, trio.current_time())

    def beat(self, name: str) -> None:
        heartbeat = self.heartbeats.get(name)
        if heartbeat is not None:
            heartbeat.last = trio.current_time()

    def unwatch(self, name: str) -> None:
        self.heartbeats.pop(name, None)

    def stale_loops(self) -> list[str]:
        now = trio.current_time()
        return [name for name, hb in self.heartbeats.items() if now - hb.last > hb.max_age]

    async def readiness(self, timeout: float = 3.0) -> dict[str, CheckResult]:
        """Run every check concurrently, each bounded by `timeout`; add stalled critical loops."""
        results = await run_checks(self.checks, timeout)
        for name in self.stale_loops():
            results[f"loop:{name}"] = CheckResult(False, "loop stalled")
        return results


async def run_checks(checks: Mapping[str, ReadinessCheck], timeout: float) -> dict[str, CheckResult]:
    """Run `checks` concurrently, each bounded by `timeout`; an exception is a failed check."""
    results: dict[str, CheckResult] = {}

    async def run_one(name: str, check: ReadinessCheck) -> None:
        with trio.move_on_after(timeout) as scope:
            try:
                results[name] = await check()
            except Exception as exc:  # trio.Cancelled is not an Exception: it passes
                results[name] = CheckResult(False, f"{type(exc).__name__}: {exc}"[:300])
        if scope.cancelled_caught:
            results[name] = CheckResult(False, f"no answer within {timeout:g}s")

    async with trio.open_nursery() as nursery:
        for name, check in checks.items():
            nursery.start_soon(run_one, name, check)
    return results
