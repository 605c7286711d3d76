"""The `App` bundle: the resources every service shares, handed down as an argument.

`vpnd.compose.open_vpnd` builds it (instance lock, schema check or migration, database pool, health
and metrics registries, texts) before any service runs, and it is frozen from then on: only `config`
is replaced, by a SIGHUP reload. There are no module-level clients or singletons. What services
report once they run (the HTTP address, the Xray writer's state) is in `vpnd.compose.Started`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import attrs
import psycopg
import trio

from vpnd.config import Config
from vpnd.db import Database
from vpnd.db.migrations import Schema, check_version, migrate
from vpnd.health import CheckResult, Health
from vpnd.instance_lock import InstanceLock
from vpnd.lifecycle import Lifecycle
from vpnd.metrics import Metrics
from vpnd.nudge import Changed, Nudge
from vpnd.texts import Texts

log = logging.getLogger("vpnd.app")


@attrs.define(eq=False, on_setattr=attrs.setters.frozen)
class App:
    #: The running configuration: the one field that changes. SIGHUP replaces it (`vpnd.reload`) with
    #: one whose live keys come from the re-read file: read `app.config...` when the value is used.
    config: Config = attrs.field(on_setattr=attrs.setters.NO_OP)
    db: Database
    schema: Schema
    lifecycle: Lifecycle
    health: Health
    metrics: Metrics
    instance_lock: InstanceLock | None = None
    #: Nudged by the notify listener (`vpnd.nurseries.listener`) when a commit changed a subscription
    #: (the triggers of migration 0005 `pg_notify` at commit, from any process); the Xray writer re-reads.
    xray_changed: Nudge = attrs.field(factory=Nudge)
    #: Nudged by the listener when a commit queued outbox messages; the outbox sender wakes up.
    outbox_changed: Nudge = attrs.field(factory=Nudge)
    #: Nudged by the listener when a commit created, paused, resumed or cancelled a broadcast.
    broadcasts_changed: Nudge = attrs.field(factory=Nudge)
    #: Fired after a configuration reload replaced `config` (periodic workers re-read their period).
    config_reloaded: Changed = attrs.field(factory=Changed)
    #: Called with the new config after a reload, for state built from it at start (rate limiters).
    reload_hooks: tuple[Callable[[Config], None], ...] = ()
    #: The user-facing texts, loaded once by the composition root and handed down (flows, workers, payments, alerts).
    texts: Texts = attrs.field(factory=Texts.load)
    #: The bot's @username (getMe at start, where this process polls Telegram; "" otherwise): gift links.
    bot_username: str = attrs.field(default="", on_setattr=attrs.setters.NO_OP)


async def prepare_schema(
    dsn: str, schema: Schema, *, apply: bool, timeout: float = 10.0, lock_timeout: float = 60.0
) -> None:
    """Migrate (when `apply`) or just check that the database is at `schema.version`.

    Cancellable while it waits for the migration lock (SIGTERM during start-up).
    """

    def work() -> None:
        with psycopg.connect(
            dsn, autocommit=True, connect_timeout=max(1, int(timeout)), application_name="vpnd-migrate"
        ) as conn:
            if apply:
                migrate(conn, schema, lock_timeout=lock_timeout, check_cancelled=trio.from_thread.check_cancelled)
            else:
                version = check_version(conn, schema)
                if version != schema.version:
                    from vpnd.db.migrations import SchemaError

                    raise SchemaError(
                        f"the database schema is at version {version or 'none'}, this vpnd needs "
                        f"{schema.version}; run `vpnd migrate` (or set [database].migrate_on_start = true)"
                    )

    await trio.to_thread.run_sync(work)


async def database_ready(app: App) -> CheckResult:
    """The database answers and its schema is the one this code needs."""

    def version(conn: psycopg.Connection[Any]) -> int | None:
        return check_version(conn, app.schema)

    found = await app.db.run(version)
    if found != app.schema.version:
        return CheckResult(False, f"schema version {found}, need {app.schema.version}")
    return CheckResult(True, f"schema version {found}")
