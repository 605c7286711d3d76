"""The quota worker: traffic periods that ended start again, and blocks that no longer apply are lifted.

A round rolls every period whose `ends_at` passed (usage back to zero; a user blocked at their quota is
put back on Xray — the commit wakes the writers — and told), then walks the blocked subscriptions and
lifts the block of those whose quota now covers their usage (a reload raised or removed it, or an
admin moved them to another plan). Between rounds it sleeps until the earliest period end, so a reset
takes effect at its time, not up to `quota_interval` later.
"""

from __future__ import annotations

import datetime as dt
import logging

import attrs
import trio

from vpnd.app import App
from vpnd.db import quota
from vpnd.services.limits import quota_rules

log = logging.getLogger("vpnd.workers.quota")

WORKER_NAME = "quota"


@attrs.define
class QuotaWorker:
    app: App
    batch_size: int
    #: Seconds from the end of the last round to the earliest period end (None: none is due).
    next_reset_in: float | None = None

    async def round(self) -> int:
        rules = quota_rules(self.app)
        handled = 0
        while True:
            result = await self.app.db.run(quota.roll_due_periods, rules, self.batch_size)
            handled += result.rolled
            if result.unblocked:
                log.info("event=traffic_period_restarted users=%d unblocked=%d", result.rolled, result.unblocked)
            if not result.more:
                break
        after: int | None = 0
        while after is not None:
            unblocked, after = await self.app.db.run(quota.unblock_within_quota, rules, after, self.batch_size)
            if unblocked:
                log.info("event=traffic_block_lifted users=%d", unblocked)
            handled += unblocked
        next_end, db_now = await self.app.db.run(quota.next_reset)
        self.next_reset_in = None if next_end is None else max(0.0, (next_end - db_now) / dt.timedelta(seconds=1))
        return handled

    async def wake(self) -> None:
        """Returns at the earliest period end (a round is then due at once); never, when none is."""
        if self.next_reset_in is None:
            await trio.sleep_forever()
        await trio.sleep(self.next_reset_in + 0.05)
