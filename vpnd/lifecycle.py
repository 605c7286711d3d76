"""Shutdown as a shared fact: `stopping` is set once, on the first SIGTERM/SIGINT.

Services watch it to stop taking new work (stop polling, stop accepting connections) and let what
is in flight finish; the root nursery's deadline then bounds how long that may take.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVarTuple, Unpack

import attrs
import trio

Ts = TypeVarTuple("Ts")


@attrs.define(eq=False)
class Lifecycle:
    stopping: trio.Event = attrs.field(factory=trio.Event)
    #: Set when every service started and READY=1 went out: a signal before it cancels the start.
    ready: trio.Event = attrs.field(factory=trio.Event)
    reason: str = ""

    def request_stop(self, reason: str) -> None:
        if not self.stopping.is_set():
            self.reason = reason
            self.stopping.set()

    async def run_until_stopping(self, async_fn: Callable[[Unpack[Ts]], Awaitable[object]], *args: *Ts) -> None:
        """Run `async_fn(*args)`; cancel it when shutdown begins (for work with nothing to drain)."""
        async with trio.open_nursery() as nursery:

            async def cancel_on_stop() -> None:
                await self.stopping.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(cancel_on_stop)
            await async_fn(*args)
            nursery.cancel_scope.cancel()
