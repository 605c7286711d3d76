"""Housekeeping: delete expired conversation states, inbox/outbox rows and wrong promo attempts past
`[workers].retention_days`, and admin audit rows and closed traffic periods (history) past
`[workers].audit_retention_days`.

Every delete is a batch of at most `batch_size` rows in its own short transaction; a round does at
most `max_batches` of each kind, so a large backlog is worked off over several rounds instead of
one long one. Pending outbox rows and unhandled inbox rows are never deleted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import psycopg
import trio

from vpnd.app import App
from vpnd.db import admin, conversation, inbox, outbox, promo, quota

log = logging.getLogger("vpnd.workers.housekeeping")

WORKER_NAME = "housekeeping"
MAX_BATCHES = 100


async def _delete_in_batches(
    app: App, what: str, fn: Callable[[psycopg.Connection[Any], int], int], batch_size: int, max_batches: int
) -> int:
    total = 0
    for _ in range(max_batches):
        deleted = await app.db.run(fn, batch_size)
        total += deleted
        if deleted < batch_size:
            break
        await trio.lowlevel.checkpoint()
    if total:
        log.info("event=housekeeping_deleted what=%s rows=%d", what, total)
    return total


async def housekeeping_round(app: App, *, batch_size: int, max_batches: int = MAX_BATCHES) -> int:
    days = app.config.workers.retention_days
    total = await _delete_in_batches(app, "conversation_states", conversation.evict_expired, batch_size, max_batches)
    total += await _delete_in_batches(
        app, "telegram_inbox", lambda conn, n: inbox.delete_handled_before(conn, days, n), batch_size, max_batches
    )
    total += await _delete_in_batches(
        app, "outbox", lambda conn, n: outbox.delete_finished_before(conn, days, n), batch_size, max_batches
    )
    total += await _delete_in_batches(
        app, "promo_attempts", lambda conn, n: promo.delete_attempts_before(conn, days, n), batch_size, max_batches
    )
    audit_days = app.config.workers.audit_retention_days
    total += await _delete_in_batches(
        app, "admin_audit", lambda conn, n: admin.prune_audit(conn, audit_days, n), batch_size, max_batches
    )
    total += await _delete_in_batches(
        app,
        "traffic_periods",
        lambda conn, n: quota.prune_closed_periods(conn, audit_days, n),
        batch_size,
        max_batches,
    )
    return total
