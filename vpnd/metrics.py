"""Prometheus metrics, kept in a registry owned by the app (no global default registry)."""

from __future__ import annotations

from collections.abc import Iterator

import attrs
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


@attrs.define(eq=False)
class Metrics:
    registry: CollectorRegistry
    db: Database
    http_requests: Counter = attrs.field(init=False)
    updates: Counter = attrs.field(init=False)
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
    broadcast_sent: Counter = attrs.field(init=False)
    outbox_backlog: Gauge = attrs.field(init=False)
    outbox_oldest_seconds: Gauge = attrs.field(init=False)
    auto_renewals: Counter = attrs.field(init=False)
    health_check_ok: Gauge = attrs.field(init=False)
    disk_free_bytes: Gauge = attrs.field(init=False)
    promo_attempts: Counter = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        r = self.registry
        self.http_requests = Counter(
            "vpnd_http_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.updates = Counter("vpnd_updates", "Telegram updates by outcome", ["outcome"], registry=r)
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
        self.promo_attempts = Counter(
            "vpnd_promo_attempts", "Promo codes typed by users, by result (ok, wrong, limited)", ["result"], registry=r
        )
        r.register(_PoolCollector(self.db))
