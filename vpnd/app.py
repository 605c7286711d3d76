"""`open_app(config)` builds the resources every service shares: the `App` bundle.

That is the instance lock, the schema check or migration, the database pool, the health and metrics
registries and the texts; they are handed down as arguments and closed here in reverse order — the
database pool last. There are no module-level clients or singletons. The Telegram and Crypto Pay
clients and the service tasks are built on top of it by `vpnd.nurseries.root.serve_app`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import attrs
import psycopg
import trio
from prometheus_client import CollectorRegistry

from vpnd.config import Config
from vpnd.db import Database, open_database
from vpnd.db.migrations import Schema, check_version, migrate, packaged_schema
from vpnd.health import CheckResult, Health
from vpnd.instance_lock import InstanceLock, hold_instance_lock
from vpnd.lifecycle import Lifecycle
from vpnd.metrics import Metrics
from vpnd.nudge import Changed, Nudge
from vpnd.texts import Texts

if TYPE_CHECKING:
    from vpnd.nurseries.xray import XrayStatus

log = logging.getLogger("vpnd.app")


@attrs.define(eq=False)
class App:
    #: The running configuration. SIGHUP replaces it (`vpnd.reload`) with one whose live keys come
    #: from the re-read file: read `app.config...` when the value is used, don't keep a copy.
    config: Config
    db: Database
    schema: Schema
    lifecycle: Lifecycle
    health: Health
    metrics: Metrics
    instance_lock: InstanceLock | None = None
    #: The bot's @username, known after getMe (links such as t.me/<bot>?start=ref_...).
    bot_username: str = ""
    #: The Xray writer's state (sync lag, pending operations), once it started.
    xray_status: XrayStatus | None = None
    #: Where the HTTP server listens, once it does (e.g. "http://127.0.0.1:8080").
    http_url: str = ""
    #: Nudged after a commit that changes who may connect; the Xray writer re-reads the database.
    xray_changed: Nudge = attrs.field(factory=Nudge)
    #: Nudged after a commit that queues outbox messages; the outbox sender wakes up.
    outbox_changed: Nudge = attrs.field(factory=Nudge)
    #: Nudged after a commit that creates, pauses, resumes or cancels a broadcast.
    broadcasts_changed: Nudge = attrs.field(factory=Nudge)
    #: Fired after a configuration reload replaced `config` (periodic workers re-read their period).
    config_reloaded: Changed = attrs.field(factory=Changed)
    #: Called with the new config after a reload, for state built from it at start (rate limiters).
    reload_hooks: list[Callable[[Config], None]] = attrs.field(factory=list)
    #: The user-facing texts, loaded once here and handed down (flows, workers, payments, alerts).
    texts: Texts = attrs.field(factory=Texts.load)


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


@asynccontextmanager
async def open_app(config: Config, *, single_instance: bool = True) -> AsyncIterator[App]:
    db_config = config.database
    schema = packaged_schema()
    async with _maybe_instance_lock(config, single_instance) as lock:
        await prepare_schema(
            db_config.dsn,
            schema,
            apply=db_config.migrate_on_start,
            timeout=db_config.connect_timeout_seconds,
            lock_timeout=db_config.migration_lock_timeout_seconds,
        )
        async with open_database(
            db_config.dsn,
            min_size=db_config.pool_min,
            max_size=db_config.pool_max,
            statement_timeout_ms=db_config.statement_timeout_ms,
            connect_timeout=db_config.connect_timeout_seconds,
        ) as db:
            health = Health()
            metrics = Metrics(CollectorRegistry(), db)
            app = App(config, db, schema, Lifecycle(), health, metrics, lock)
            health.add_check("database", lambda: database_ready(app))
            yield app


@asynccontextmanager
async def _maybe_instance_lock(config: Config, wanted: bool) -> AsyncIterator[InstanceLock | None]:
    if not wanted:
        yield None
        return
    async with hold_instance_lock(config.database.dsn, timeout=config.database.connect_timeout_seconds) as lock:
        yield lock


async def database_ready(app: App) -> CheckResult:
    """The database answers and its schema is the one this code needs."""

    def version(conn: psycopg.Connection[Any]) -> int | None:
        return check_version(conn, app.schema)

    found = await app.db.run(version)
    if found != app.schema.version:
        return CheckResult(False, f"schema version {found}, need {app.schema.version}")
    return CheckResult(True, f"schema version {found}")
