"""A coalescing wake-up signal: many `nudge()`s while the owner is busy cause one more round.

Used by owners of derived state (the Xray writer, the outbox sender, broadcasts): the notify
listener (`vpnd.nurseries.listener`) nudges on the commit-time notification a change sends by itself;
the owner re-reads the database. A nudge carries no data, so nothing is lost if the daemon misses
one (down, or between reconnects) — the periodic round catches up.
"""

from __future__ import annotations

import attrs
import trio


@attrs.define(eq=False)
class Nudge:
    _pending: bool = False
    _event: trio.Event = attrs.field(factory=trio.Event)
    count: int = 0

    def nudge(self) -> None:
        self.count += 1
        self._pending = True
        self._event.set()

    async def wait(self, timeout: float | None = None) -> bool:
        """Wait for a nudge (or the timeout); consume it. True when nudged."""
        if not self._pending:
            with trio.move_on_after(float("inf") if timeout is None else timeout):
                await self._event.wait()
        nudged = self._pending
        self._pending = False
        self._event = trio.Event()
        return nudged


@attrs.define(eq=False)
class Changed:
    """A broadcast wake-up: every task waiting in `wait()` returns at the next `changed()`.

    Unlike a Nudge nothing is consumed, and a change before `wait()` is not remembered: waiters
    re-read the current value after they return (e.g. a worker's period after a config reload).
    """

    _event: trio.Event = attrs.field(factory=trio.Event)
    count: int = 0

    def changed(self) -> None:
        self.count += 1
        self._event.set()
        self._event = trio.Event()

    async def wait(self) -> None:
        await self._event.wait()
