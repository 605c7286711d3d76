"""Prometheus metrics, kept in a registry owned by the app (no global default registry)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

import attrs
import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from vpnd.db import Database


@attrs.define(eq=False)
class _PoolCollector(Collector):
    db: Database

    def collect(self) -> Iterator[GaugeMetricFamily]:
        stats = self.db.stats()
        for key in ("size", "available", "waiting", "in_flight"):
            yield GaugeMetricFamily(f"vpnd_db_pool_{key}", f"Database pool {key.replace('_', ' ')}", value=stats[key])


class BacklogView(Protocol):
    """The dispatcher's backlog snapshot (vpnd.telegram.dispatch.Backlog)."""

    @property
    def queued(self) -> int: ...
    @property
    def running(self) -> int: ...
    @property
    def chats(self) -> int: ...
    @property
    def oldest_normal_seconds(self) -> float: ...
    @property
    def oldest_seconds(self) -> float: ...
    @property
    def flooding_chats(self) -> int: ...


def _on_event_loop() -> bool:
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return False
    return True


@attrs.define(eq=False)
class _UpdatesCollector(Collector):
    snapshot: Callable[[], BacklogView]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        # /metrics renders in a worker thread; the dispatcher lives on the event loop.
        backlog = self.snapshot() if _on_event_loop() else trio.from_thread.run_sync(self.snapshot)
        pending = GaugeMetricFamily(
            "vpnd_updates_pending", "Telegram updates waiting or being handled", labels=["state"]
        )
        pending.add_metric(["queued"], backlog.queued)
        pending.add_metric(["running"], backlog.running)
        yield pending
        oldest = GaugeMetricFamily(
            "vpnd_updates_oldest_pending_seconds",
            "Age of the oldest waiting update (chats=normal leaves out chats that are flooding)",
            labels=["chats"],
        )
        oldest.add_metric(["normal"], backlog.oldest_normal_seconds)
        oldest.add_metric(["all"], backlog.oldest_seconds)
        yield oldest
        yield GaugeMetricFamily("vpnd_updates_chats_waiting", "Chats with updates waiting", value=backlog.chats)
        yield GaugeMetricFamily(
            "vpnd_updates_flooding_chats",
            "Chats that had updates dropped in the last minute",
            value=backlog.flooding_chats,
        )


@attrs.define(eq=False)
class Metrics:
    registry: CollectorRegistry
    db: Database
    http_requests: Counter = attrs.field(init=False)
    updates: Counter = attrs.field(init=False)
    updates_dropped: Counter = attrs.field(init=False)
    #: The update dispatcher's backlog, once the poller runs (for /metrics and the health check).
    update_backlog: Callable[[], BacklogView] | None = attrs.field(default=None, init=False)
    update_latency: Histogram = attrs.field(init=False)
    telegram_429: Counter = attrs.field(init=False)
    worker_rounds: Counter = attrs.field(init=False)
    worker_errors: Counter = attrs.field(init=False)
    worker_rows: Counter = attrs.field(init=False)
    worker_duration: Histogram = attrs.field(init=False)
    outbox_sends: Counter = attrs.field(init=False)
    payments: Counter = attrs.field(init=False)
    xray_pending: Gauge = attrs.field(init=False)
    xray_lag: Gauge = attrs.field(init=False)
    xray_node_up: Gauge = attrs.field(init=False)
    xray_node_pending: Gauge = attrs.field(init=False)
    xray_node_users: Gauge = attrs.field(init=False)
    broadcast_sent: Counter = attrs.field(init=False)
    outbox_backlog: Gauge = attrs.field(init=False)
    outbox_oldest_seconds: Gauge = attrs.field(init=False)
    auto_renewals: Counter = attrs.field(init=False)
    health_check_ok: Gauge = attrs.field(init=False)
    disk_free_bytes: Gauge = attrs.field(init=False)
    http_connections_open: Gauge = attrs.field(init=False)
    http_connections_closed_oldest: Counter = attrs.field(init=False)
    promo_attempts: Counter = attrs.field(init=False)
    backups: Counter = attrs.field(init=False)
    backup_age_seconds: Gauge = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        r = self.registry
        self.http_requests = Counter(
            "vpnd_http_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.updates = Counter("vpnd_updates", "Telegram updates by outcome", ["outcome"], registry=r)
        self.updates_dropped = Counter(
            "vpnd_updates_dropped",
            "Updates acknowledged without handling: dropped (a flooding chat's backlog was full) or coalesced",
            ["outcome"],
            registry=r,
        )
        self.update_latency = Histogram("vpnd_update_seconds", "Update handling time", registry=r)
        self.telegram_429 = Counter("vpnd_telegram_429", "429 answers from the Bot API", registry=r)
        self.worker_rounds = Counter("vpnd_worker_rounds", "Worker rounds", ["worker"], registry=r)
        self.worker_errors = Counter("vpnd_worker_errors", "Worker rounds that failed", ["worker"], registry=r)
        self.worker_rows = Counter("vpnd_worker_rows", "Rows handled by workers", ["worker"], registry=r)
        self.worker_duration = Histogram("vpnd_worker_round_seconds", "Worker round time", ["worker"], registry=r)
        self.outbox_sends = Counter("vpnd_outbox_sends", "Outbox sends by result", ["result"], registry=r)
        self.payments = Counter(
            "vpnd_payments", "Payments by provider and outcome", ["provider", "outcome"], registry=r
        )
        self.xray_pending = Gauge("vpnd_xray_pending_ops", "Xray operations not yet applied", ["op"], registry=r)
        self.xray_lag = Gauge("vpnd_xray_seconds_since_sync", "Seconds since Xray was last in sync", registry=r)
        self.xray_node_up = Gauge("vpnd_xray_node_up", "1 while the node's Xray API answers", ["node"], registry=r)
        self.xray_node_pending = Gauge(
            "vpnd_xray_node_pending_ops", "Xray operations not yet applied, by node", ["node", "op"], registry=r
        )
        self.xray_node_users = Gauge("vpnd_xray_node_users", "Users live on the node", ["node"], registry=r)
        self.broadcast_sent = Counter("vpnd_broadcast_messages", "Broadcast messages by result", ["result"], registry=r)
        self.outbox_backlog = Gauge("vpnd_outbox_backlog", "Outbox messages due and not yet sent", registry=r)
        self.outbox_oldest_seconds = Gauge(
            "vpnd_outbox_oldest_seconds", "Seconds the oldest due outbox message has waited", registry=r
        )
        self.auto_renewals = Counter("vpnd_auto_renewals", "Auto-renewal decisions by outcome", ["outcome"], registry=r)
        self.health_check_ok = Gauge("vpnd_health_check_ok", "1 when the health check passes", ["check"], registry=r)
        self.disk_free_bytes = Gauge(
            "vpnd_disk_free_bytes", "Free bytes on the filesystem of the Xray config directory", registry=r
        )
        self.http_connections_open = Gauge("vpnd_http_connections_open", "Open HTTP connections", registry=r)
        self.http_connections_closed_oldest = Counter(
            "vpnd_http_connections_closed_oldest",
            "HTTP connections closed to admit a new one (at the cap or out of descriptors)",
            registry=r,
        )
        self.promo_attempts = Counter(
            "vpnd_promo_attempts", "Promo codes typed by users, by result (ok, wrong, limited)", ["result"], registry=r
        )
        self.backups = Counter("vpnd_backups", "Scheduled backups by result (ok, failed)", ["result"], registry=r)
        self.backup_age_seconds = Gauge(
            "vpnd_backup_age_seconds",
            "Age of the newest backup in [backup].directory (-1: none; set by the backup health check)",
            registry=r,
        )
        r.register(_PoolCollector(self.db))

    def watch_updates(self, snapshot: Callable[[], BacklogView]) -> None:
        """Export the dispatcher's backlog (called once, by the Telegram nursery)."""
        if self.update_backlog is None:
            self.registry.register(
                _UpdatesCollector(lambda: self.update_backlog() if self.update_backlog else snapshot())
            )
        self.update_backlog = snapshot
