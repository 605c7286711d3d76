"""The Xray writer: the only task that touches Xray's config file and its live user list.

Other code commits to the database, whose triggers wake `app.xray_changed` (`vpnd.db.notify`); this
task re-reads the desired set (active, unexpired subscriptions) and makes Xray match it. One round:

1. **Look at Xray.** `GetSysStats` uptime tells whether Xray restarted since the last look (its live
   users are then the config file's, its counters zero). A restart, the daemon's start, and the API
   coming back after an outage all call for a *resync*.
2. **Live apply.** Stream the desired set in keyset batches (each batch its own short transaction;
   no connection is held across a gRPC call) and compare with `applied`, the in-memory map
   email → UUID of what this task knows to be live: add what is missing, replace (remove, then add)
   a user whose UUID changed (a reissue), then remove what is live and no longer desired. A renewal
   keeps the UUID, so it changes nothing live. "Already exists"/"not found" are success.
3. **Traffic** (every `reconcile_interval`): per-user counters read without reset, folded into
   monotonic totals in the `traffic` table.
4. **File.** When the desired set or the template changed, stream the set again, render the
   operator's template with it and replace the file atomically (at most once per
   `MIN_WRITE_INTERVAL`; live apply is not rate-limited, so a user connects at once and the file
   follows within a second). Unchanged content is never rewritten.

**Resync without a user list.** V2Ray and older Xray cannot list live users, so after a start or an
Xray restart `applied` is rebuilt from the desired set: every desired user is added ("already
exists" is trusted), except users whose row changed after the *sync marker* (the database time of
the last round in which live users and file both matched the database, kept in `daemon_state`) —
their UUID may be stale in Xray, so they are replaced — and every undesired user whose row changed
or expired after the marker is removed. Users unchanged since the marker are exactly as the
database says, whatever crashed when.

**Failures** (API down, template broken, directory read-only, database unreachable) never crash
the daemon and never leave a partial file: each component retries on its own backoff, the round
goes on with the others, and `/readyz` ("xray") and `/metrics` (`vpnd_xray_pending_ops{op=...}`,
`vpnd_xray_seconds_since_sync`) say how far behind Xray is and why. A broken template and a file
that cannot be written are also admin alerts (`vpnd.alerts`: one when it starts, one when it ends).

The file holds every user's UUID, so it is always written with mode 0640 (`CONFIG_FILE_MODE`),
whatever mode an earlier file had.

Removing a user does not cut a connection Xray already accepted; it refuses the next one.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import math
import os
import shlex
import time
from collections.abc import Sequence
from contextlib import ExitStack
from functools import partial
from typing import Literal

import attrs
import psycopg
import trio
from prometheus_client import Gauge

from vpnd import alerts
from vpnd.app import App
from vpnd.config import LOCAL_NODE, NodeConfig
from vpnd.config_checks import EXAMPLE_REALITY_PUBLIC_KEY, KEY_PENDING_HINT, link_settings_gap
from vpnd.db import quota
from vpnd.db.nodes import NodeObservation, forget_node, record_node
from vpnd.db.pool import DatabaseUnavailable
from vpnd.db.xray_state import (
    DesiredBatch,
    desired_batch,
    get_sync_marker,
    set_sync_marker,
    store_traffic,
    undesired_changed_batch,
    user_id_from_email,
)
from vpnd.health import CheckResult
from vpnd.logs import quote
from vpnd.nudge import Nudge
from vpnd.services.limits import quota_rules
from vpnd.telegram.texts import Texts
from vpnd.xray import links
from vpnd.xray.api import ApiTls, XrayApi, XrayApiError, XrayError, XrayUnavailable
from vpnd.xray.render import Client, ConfigRenderer, Template, TemplateError, load_template, write_atomically

log = logging.getLogger("vpnd.xray")

#: Rows per database batch (one short transaction each).
BATCH_SIZE = 2000
#: gRPC calls in flight at once while applying a batch.
APPLY_CONCURRENCY = 16
#: The config file is replaced at most this often; live apply is not limited.
MIN_WRITE_INTERVAL = 1.0
#: Retry delays of a failing component: first, then doubling up to the cap (and `reconcile_interval`).
FIRST_BACKOFF = 0.5
MAX_BACKOFF = 30.0
#: Rows changed this long before the sync marker are still treated as uncertain (transactions that
#: started before the marker's read but committed after it).
SYNC_MARKER_MARGIN = dt.timedelta(minutes=10)
#: The sync marker is refreshed at most this often while in sync.
SYNC_MARKER_INTERVAL = 30.0
#: Xray reports whole seconds of uptime; a start estimate later than this past the known one is a restart.
RESTART_TOLERANCE = 1.5
#: Error answers (not outages) in one round after which the round stops calling Xray.
MAX_API_ERRORS_PER_ROUND = 20
#: Bound on running `[xray] restart_command`.
RESTART_COMMAND_TIMEOUT = 60.0
#: A node's state is recorded for operators (`vpnd.db.nodes`) at most this often (and on a change).
NODE_RECORD_INTERVAL = 10.0
#: Between rounds, each node's API is asked its uptime this often: a restarted Xray (which came back
#: with only its config file's users) or an API back from an outage is resynced within seconds.
PROBE_INTERVAL = 2.0

Component = Literal["config", "links", "template", "file", "api", "database", "restart_command"]

#: Components whose problems are admin alerts (incident name by component).
ALERTED: dict[Component, str] = {"template": alerts.XRAY_TEMPLATE, "file": alerts.XRAY_FILE}


@attrs.define(eq=False)
class XrayStatus:
    """What the writer knows about how far Xray is behind; read by /readyz, /metrics and the admin.

    Times are `time.monotonic()` seconds (readable from any thread, e.g. the metrics exporter).
    """

    enabled: bool
    mode: Literal["api", "restart-command", "disabled"]
    #: The node (`[[nodes]]` name, or "local" for `[xray]`).
    node: str = LOCAL_NODE
    started_at: float = attrs.field(factory=time.monotonic)
    #: False while the node's API does not answer at all.
    reachable: bool = True
    #: Users whose traffic counters moved at the last reading (online in that interval).
    online_users: int = 0
    #: Rounds completed.
    rounds: int = 0
    live_in_sync: bool = False
    file_current: bool = False
    synced_at: float | None = None
    pending_adds: int = 0
    pending_removes: int = 0
    desired_users: int = 0
    live_users: int = 0
    file_writes: int = 0
    api_calls: int = 0
    restarts_detected: int = 0
    last_round_seconds: float = 0.0
    #: Component → what is wrong with it now (empty when everything works).
    problems: dict[str, str] = attrs.field(factory=dict)
    last_error: str = ""

    @property
    def in_sync(self) -> bool:
        return self.live_in_sync and self.file_current

    @property
    def check_name(self) -> str:
        """Its /readyz check: "xray" for the local Xray (required), "node:<name>" for a remote one."""
        return "xray" if self.node == LOCAL_NODE else f"node:{self.node}"

    def seconds_since_sync(self) -> float:
        """0 while in sync; otherwise how long since the last moment it was (or since start)."""
        if self.in_sync:
            return 0.0
        since = self.synced_at if self.synced_at is not None else self.started_at
        return max(0.0, time.monotonic() - since)

    def summary(self) -> str:
        if self.rounds == 0:
            return "starting: first reconcile not done"
        parts = [f"{name}: {text}" for name, text in sorted(self.problems.items())]
        if self.in_sync:
            parts.append(f"in sync, {self.live_users} users live")
        else:
            parts.append(
                f"behind {self.seconds_since_sync():.0f}s: {self.pending_adds} adds, "
                f"{self.pending_removes} removes pending, file {'current' if self.file_current else 'stale'}"
            )
        return "; ".join(parts)

    async def readiness(self) -> CheckResult:
        """Ready when every component works (a round in progress may still be catching up).

        A remote node that is down leaves vpnd degraded, not unready: the bot, payments and the other
        nodes work, and a load balancer in front of two vpnd hosts must keep routing to this one."""
        ok = self.rounds > 0 and not self.problems
        return CheckResult(ok, self.summary()[:500], required=self.node == LOCAL_NODE)


@attrs.frozen
class _Op:
    kind: Literal["add", "add-trust", "replace", "remove"]
    email: str
    uuid: str = ""


@attrs.frozen
class _FileKey:
    """What the config file's content is a function of."""

    set_digest: bytes
    template_stamp: tuple[int, int, int]


@attrs.define
class _Backoff:
    delay: float = 0.0
    retry_at: float = 0.0

    def failed(self, now: float, cap: float) -> None:
        self.delay = min(cap, max(FIRST_BACKOFF, self.delay * 2))
        self.retry_at = now + self.delay

    def succeeded(self) -> None:
        self.delay = 0.0
        self.retry_at = 0.0

    def due(self, now: float) -> bool:
        return now >= self.retry_at


@attrs.define(eq=False)
class XrayWriter:
    """The writer's state between rounds. Bounded by the number of active users."""

    app: App
    status: XrayStatus
    api: XrayApi | None
    #: This node's settings, refreshed from `app.config` at every round (kept when it left the config).
    node: NodeConfig = attrs.field(factory=lambda: NodeConfig(LOCAL_NODE, {}, ""))
    texts: Texts | None = None
    #: This writer's wake-up (the fleet fans `app.xray_changed` out to every writer).
    wake: Nudge = attrs.field(factory=Nudge)
    #: The node was removed from the config: take every user off it, then stop.
    retiring: bool = False
    retired: bool = False
    applied: dict[str, str] = attrs.field(factory=dict)
    #: Incident name → the state last recorded in the database (True = failing).
    reported: dict[str, bool] = attrs.field(factory=dict)
    resync_needed: bool = True
    boot_estimate: float | None = None
    uptime_reported: bool = False
    boots_seen: int = 0
    traffic_boots_seen: int = 0
    traffic_due: float = 0.0
    api_backoff: _Backoff = attrs.field(factory=_Backoff)
    file_backoff: _Backoff = attrs.field(factory=_Backoff)
    db_backoff: _Backoff = attrs.field(factory=_Backoff)
    restart_pending: bool = False
    last_write_at: float = -math.inf
    file_key: _FileKey | None = None
    file_stat: tuple[int, int, int] | None = None
    template: Template | None = None
    template_stamp: tuple[int, int, int] | None = None
    next_round_at: float = 0.0
    expiry_wake_at: float = math.inf
    api_outage: bool = False
    marker_written_at: float = -math.inf
    next_probe_at: float = 0.0
    #: Traffic bytes read since the node's state was last recorded.
    traffic_bytes: int = 0
    recorded_at: float = -math.inf
    recorded_reachable: bool | None = None
    _round_api_up: bool = False
    _round_api_errors: int = 0

    @property
    def interval(self) -> float:
        return self.app.config.xray.reconcile_interval

    @property
    def incident(self) -> str:
        """The admin alert of this node being unreachable."""
        return f"xray_node:{self.node.name}"

    # --- the loop ------------------------------------------------------------------------------

    async def run_forever(self) -> None:
        """Rounds on a nudge, at `next_round_at`, or when a probe finds Xray restarted; returns
        once a retiring node has no user left."""
        while not self.retired:
            wake_at = min(self.next_round_at, self.next_probe_at) if self.api is not None else self.next_round_at
            nudged = await self.wake.wait(timeout=max(0.0, wake_at - time.monotonic()))
            if nudged or self.retiring or time.monotonic() >= self.next_round_at or await self._probe():
                await self.reconcile()

    async def _probe(self) -> bool:
        """Between rounds: ask the API its uptime, and add one user known to be live again ("already
        exists" is the expected answer; a success means Xray lost its live users — restarted, even
        too soon after its last start for the uptime to show). True when a round is due (Xray
        restarted, or its API is back)."""
        self.next_probe_at = time.monotonic() + PROBE_INTERVAL
        was_reachable = self.status.reachable
        self._round_api_up = True
        await self._observe_xray()
        if self._round_api_up and not self.resync_needed and self.applied:
            await self._check_canary()
        self._round_api_up = False
        if self.status.reachable and not was_reachable:
            self.api_backoff.succeeded()
        if self.status.reachable != was_reachable:
            self._publish_metrics()
            try:
                await self._report_incidents()
                await self._record_node()
            except (DatabaseUnavailable, psycopg.OperationalError) as exc:  # the next round records it
                log.warning("event=xray_node_state_not_recorded node=%s error=%s", self.node.name, type(exc).__name__)
        return self.resync_needed and self.status.reachable

    async def _check_canary(self) -> None:
        assert self.api is not None
        email, uuid = next(iter(self.applied.items()))
        try:
            added = await self.api.add_vless_user(self.node.inbound_tag, email, uuid, self.node.flow)
        except XrayError as exc:
            self._api_failed(exc)
            return
        finally:
            self.status.api_calls += 1
        if added:
            self.boots_seen += 1
            self.status.restarts_detected += 1
            self.resync_needed = True
            log.warning("event=xray_restart_detected node=%s by=live_users_lost", self.node.name)

    async def reconcile(self) -> None:
        """One round; never raises for an outside failure (they are recorded in `status`)."""
        started = time.monotonic()
        if not self.db_backoff.due(started):
            self.next_round_at = self.db_backoff.retry_at
            return
        self._refresh_node()
        try:
            await self._round(started)
            await self._report_incidents()
            await self._record_node()
        except (DatabaseUnavailable, psycopg.OperationalError) as exc:
            self._problem("database", f"{type(exc).__name__}: {exc}".strip())
            self.db_backoff.failed(time.monotonic(), self._backoff_cap())
            self.status.live_in_sync = False
        else:
            self._solved("database")
            self.db_backoff.succeeded()
        finished = time.monotonic()
        self.status.rounds += 1
        self.status.last_round_seconds = finished - started
        if self.status.in_sync:
            self.status.synced_at = finished
        self._publish_metrics()
        self.next_round_at = self._next_round(started, finished)

    def _refresh_node(self) -> None:
        for node in self.app.config.managed_nodes:
            if node.name == self.node.name:
                self.node = node

    def _next_round(self, started: float, now: float) -> float:
        at = min(started + self.interval, self.expiry_wake_at, max(self.traffic_due, started + 1.0))
        if self.db_backoff.retry_at:
            at = min(at, self.db_backoff.retry_at)
        if self.api is not None and self.api_backoff.retry_at:
            at = min(at, self.api_backoff.retry_at)
        if not self.status.file_current and self.template is not None:
            at = min(at, max(self.file_backoff.retry_at, self.last_write_at + MIN_WRITE_INTERVAL))
        if self.restart_pending:
            at = min(at, self.file_backoff.retry_at)
        return at

    def _backoff_cap(self) -> float:
        return min(MAX_BACKOFF, self.interval)

    # --- one round -------------------------------------------------------------------------------

    async def _round(self, now: float) -> None:
        self._round_api_up = self.api is not None and self.api_backoff.due(now)
        self._round_api_errors = 0
        if self._round_api_up:
            await self._observe_xray()
        if self.retiring:
            await self._retire()
            return
        resync = self.resync_needed and self._round_api_up
        since: dt.datetime | None = None
        if resync:
            marker = await self.app.db.run(get_sync_marker, self.node.name)
            since = None if marker is None else marker - SYNC_MARKER_MARGIN
            self.applied = {}

        db_now, next_expiry, set_digest, pending_adds, seen = await self._apply_desired(resync, since)
        pending_removes = await self._apply_removals(seen, resync, since)
        if resync and self._round_api_up and not pending_adds and not pending_removes:
            self.resync_needed = False
            log.info("event=xray_resynced live_users=%d", len(self.applied))

        if self._round_api_up and self.api is not None:
            await self._collect_traffic(time.monotonic())
        if self._round_api_up and self._round_api_errors == 0:
            self.api_backoff.succeeded()
            self._solved("api")
        elif self._round_api_up:
            # Xray answered, but refused some changes: retry them later, not in a tight loop.
            self.api_backoff.failed(time.monotonic(), self._backoff_cap())

        await self._maintain_file(set_digest, time.monotonic())

        status = self.status
        status.desired_users = len(seen)
        status.live_users = len(self.applied)
        if self.api is None:
            status.pending_adds = status.pending_removes = 0
            status.live_in_sync = status.file_current and not self.restart_pending
        else:
            status.pending_adds, status.pending_removes = pending_adds, pending_removes
            status.live_in_sync = not pending_adds and not pending_removes and not self.resync_needed
        self.expiry_wake_at = math.inf
        if next_expiry is not None:
            # Wake when the next subscription runs out, so it is removed at once, not at the next period.
            self.expiry_wake_at = time.monotonic() + max(0.0, (next_expiry - db_now).total_seconds()) + 0.05
        if status.in_sync and self.api is not None:
            await self._refresh_sync_marker(db_now)

    async def _observe_xray(self) -> None:
        """Detect an Xray restart (uptime went back) or an API that came back after an outage."""
        assert self.api is not None
        try:
            uptime = await self.api.uptime()
        except XrayError as exc:
            self._api_failed(exc)
            return
        finally:
            self.status.api_calls += 1
        self.status.reachable = True
        now = time.monotonic()
        # 0 is what a fresh Xray says, and also what one says that does not report uptime at all.
        self.uptime_reported = self.uptime_reported or uptime > 0
        if self.uptime_reported:
            boot = now - uptime
            if self.boot_estimate is not None and boot > self.boot_estimate + RESTART_TOLERANCE:
                self.boots_seen += 1
                self.status.restarts_detected += 1
                self.resync_needed = True
                self.boot_estimate = boot
                log.warning("event=xray_restart_detected node=%s uptime_seconds=%d", self.node.name, uptime)
            elif self.boot_estimate is None or boot < self.boot_estimate:
                self.boot_estimate = boot
        if self.api_outage:
            # Xray may have restarted while its API was unreachable: check every user.
            self.api_outage = False
            self.resync_needed = True
            log.info("event=xray_api_back node=%s action=resync", self.node.name)

    async def _apply_desired(
        self, resync: bool, since: dt.datetime | None
    ) -> tuple[dt.datetime, dt.datetime | None, bytes, int, set[str]]:
        digest = hashlib.sha256(self.node.flow.encode() + b"\n")
        seen: set[str] = set()
        pending = 0
        after = ""
        first: DesiredBatch | None = None
        excluded = self.app.config.plans_not_on(self.node.name)
        while True:
            batch = await self.app.db.run(desired_batch, after, BATCH_SIZE, since if resync else None, excluded)
            first = first or batch
            ops: list[_Op] = []
            for client in batch.clients:
                seen.add(client.email)
                have = self.applied.get(client.email)
                if have == client.uuid:
                    continue
                if resync:
                    # Without a marker (a new node, a first start) most users are not there yet: "add"
                    # costs one call for those and replaces only a user Xray already has.
                    uncertain: Literal["add", "replace"] = "add" if since is None else "replace"
                    ops.append(_Op(uncertain if client.changed else "add-trust", client.email, client.uuid))
                else:
                    ops.append(_Op("add" if have is None else "replace", client.email, client.uuid))
            digest.update("".join(f"{c.email} {c.uuid}\n" for c in batch.clients).encode())
            pending += await self._apply(ops)
            if len(batch.clients) < BATCH_SIZE:
                return first.db_now, first.next_expiry, digest.digest(), pending, seen
            after = batch.clients[-1].email

    async def _retire(self) -> None:
        """Take every user vpnd may have put on this node off it (the node left the config)."""
        if not self._round_api_up:
            return
        pending = 0
        after = ""
        while True:
            batch = await self.app.db.run(desired_batch, after, BATCH_SIZE)
            pending += await self._apply([_Op("remove", client.email) for client in batch.clients])
            if len(batch.clients) < BATCH_SIZE:
                break
            after = batch.clients[-1].email
        pending += await self._apply([_Op("remove", email) for email in list(self.applied)])
        self.status.live_users = len(self.applied)
        if pending == 0 and self._round_api_up:
            self.retired = True
            await self.app.db.run(forget_node, self.node.name)
            log.info("event=xray_node_retired node=%s", self.node.name)

    async def _apply_removals(self, seen: set[str], resync: bool, since: dt.datetime | None) -> int:
        pending = await self._apply([_Op("remove", email) for email in self.applied if email not in seen])
        if not resync:
            return pending
        # Users who lost access after the marker may still be live (a crash or restart in between).
        after = 0
        excluded = self.app.config.plans_not_on(self.node.name)
        while True:
            rows = await self.app.db.run(undesired_changed_batch, after, BATCH_SIZE, since, excluded)
            pending += await self._apply([_Op("remove", email) for _user_id, email in rows])
            if len(rows) < BATCH_SIZE:
                return pending
            after = rows[-1][0]

    async def _apply(self, ops: Sequence[_Op]) -> int:
        """Carry out `ops` with bounded concurrency; return how many are still to do."""
        if not ops:
            return 0
        if self.api is None:
            return 0
        remaining = iter(ops)
        failed = 0

        async def worker() -> None:
            nonlocal failed
            for op in remaining:
                if not self._round_api_up:
                    failed += 1
                    continue
                try:
                    await self._do(op)
                except XrayUnavailable as exc:
                    self._api_failed(exc)
                    failed += 1
                except XrayApiError as exc:
                    failed += 1
                    self._round_api_errors += 1
                    self._problem("api", str(exc))
                    if self._round_api_errors >= MAX_API_ERRORS_PER_ROUND:
                        self._api_failed(exc)

        async with trio.open_nursery() as nursery:
            for _ in range(min(APPLY_CONCURRENCY, len(ops))):
                nursery.start_soon(worker)
        return failed

    async def _do(self, op: _Op) -> None:
        assert self.api is not None
        api, tag, flow = self.api, self.node.inbound_tag, self.node.flow
        calls = 0
        try:
            if op.kind in ("remove", "replace"):
                calls += 1
                await api.remove_user(tag, op.email)
                self.applied.pop(op.email, None)
                if op.kind == "remove":
                    return
            calls += 1
            added = await api.add_vless_user(tag, op.email, op.uuid, flow)
            if not added and op.kind != "add-trust":
                # Live with a UUID we cannot see: make it the desired one.
                calls += 2
                await api.remove_user(tag, op.email)
                await api.add_vless_user(tag, op.email, op.uuid, flow)
            self.applied[op.email] = op.uuid
        finally:
            self.status.api_calls += calls

    def _api_failed(self, exc: XrayError) -> None:
        """Stop calling Xray for the rest of this round and retry after a backoff."""
        if not self._round_api_up:
            return
        self._round_api_up = False
        self.api_backoff.failed(time.monotonic(), self._backoff_cap())
        if isinstance(exc, XrayUnavailable):
            self.api_outage = True
            self.resync_needed = True
            self.status.reachable = False
            self._problem("api", f"Xray API at {self.node.api_address} unreachable: {exc}")
        else:
            self._problem("api", str(exc))

    # --- traffic -----------------------------------------------------------------------------------

    async def _collect_traffic(self, now: float) -> None:
        assert self.api is not None
        if now < self.traffic_due or not self._round_api_up:
            return
        boots_seen = self.boots_seen
        try:
            counters = await self.api.query_user_traffic(reset=False)
        except XrayError as exc:
            self._api_failed(exc)
            return
        finally:
            self.status.api_calls += 1
        samples = []
        for email, traffic in counters.items():
            user_id = user_id_from_email(email)
            if user_id is not None:
                samples.append((user_id, traffic.uplink, traffic.downlink))
        reset = boots_seen != self.traffic_boots_seen
        online = moved = 0
        rules = quota_rules(self.app)
        for start in range(0, len(samples), BATCH_SIZE):
            stored = await self.app.db.run(
                partial(store_traffic, counters_reset=reset, node=self.node.name, quota=rules),
                samples[start : start + BATCH_SIZE],
            )
            online, moved = online + stored.active_users, moved + stored.bytes
            if stored.over_quota:
                blocked = await self.app.db.run(quota.block_over_quota, stored.over_quota, rules)
                if blocked:
                    log.info("event=traffic_quota_reached node=%s users=%d", self.node.name, len(blocked))
        self.status.online_users = online
        self.traffic_bytes += moved
        self.traffic_boots_seen = boots_seen
        self.traffic_due = now + self.app.config.xray.traffic_interval

    # --- the file ----------------------------------------------------------------------------------

    async def _maintain_file(self, set_digest: bytes, now: float) -> None:
        if not self.node.template_path:  # a remote node: its file is its own (users come live from vpnd)
            self.status.file_current = True
            return
        template = await self._current_template()
        if template is None or self.template_stamp is None:
            self.status.file_current = False
            return
        key = _FileKey(set_digest, self.template_stamp)
        path = self.node.config_path
        stat = await trio.to_thread.run_sync(_stat_stamp, path)
        if key == self.file_key and stat == self.file_stat and stat is not None:
            self.status.file_current = True
        elif now < self.last_write_at + MIN_WRITE_INTERVAL or not self.file_backoff.due(now):
            self.status.file_current = False
        else:
            await self._write_file(template, path)
        if self.restart_pending and self.file_backoff.due(time.monotonic()):
            await self._run_restart_command()

    async def _current_template(self) -> Template | None:
        path = self.node.template_path
        stamp = await trio.to_thread.run_sync(_stat_stamp, path)
        if stamp is not None and stamp == self.template_stamp and self.template is not None:
            return self.template
        tag = self.node.inbound_tag
        try:
            template = await trio.to_thread.run_sync(lambda: load_template(path, inbound_tag=tag))
        except TemplateError as exc:
            self.template, self.template_stamp = None, None
            self._problem("template", f"{exc} (the config file is left as it is until the template is fixed)")
            return None
        self.template, self.template_stamp = template, stamp or (0, 0, 0)
        self._solved("template")
        return template

    async def _write_file(self, template: Template, path: str) -> None:
        """Render the current desired set (a second streaming read) and replace the file if it changed."""
        renderer = ConfigRenderer(template)
        parts = [renderer.begin()]
        digest = hashlib.sha256(self.node.flow.encode() + b"\n")
        after = ""
        flow = self.node.flow
        while True:
            batch = await self.app.db.run(desired_batch, after, BATCH_SIZE)
            rows = [(c.email, c.uuid) for c in batch.clients]
            digest.update("".join(f"{email} {uuid}\n" for email, uuid in rows).encode())
            parts.append(await trio.to_thread.run_sync(_render_batch, renderer, rows, flow))
            if len(rows) < BATCH_SIZE:
                break
            after = rows[-1][0]
        parts.append(renderer.end())
        assert self.template_stamp is not None
        key = _FileKey(digest.digest(), self.template_stamp)
        try:
            changed, stat = await trio.to_thread.run_sync(_write_parts, path, parts)
        except OSError as exc:
            self.file_backoff.failed(time.monotonic(), self._backoff_cap())
            self.status.file_current = False
            self._problem("file", f"cannot write {path}: {exc.strerror or exc}")
            return
        self.file_backoff.succeeded()
        self._solved("file")
        self.file_key, self.file_stat = key, stat
        self.status.file_current = True
        if changed:
            self.last_write_at = time.monotonic()
            self.status.file_writes += 1
            log.info("event=xray_config_written path=%s clients=%d", quote(path), renderer.count)
            if self.api is None and self.node.restart_command:
                self.restart_pending = True

    async def _run_restart_command(self) -> None:
        """Only for a config without an API: Xray reloads the file by restarting."""
        command = shlex.split(self.node.restart_command)
        try:
            with trio.fail_after(RESTART_COMMAND_TIMEOUT):
                result = await trio.run_process(command, capture_stdout=True, capture_stderr=True, check=False)
        except (OSError, trio.TooSlowError) as exc:
            message = f"{exc}" if isinstance(exc, OSError) else f"no exit within {RESTART_COMMAND_TIMEOUT:g}s"
            self._problem("restart_command", message)
            self.file_backoff.failed(time.monotonic(), self._backoff_cap())
            return
        if result.returncode != 0:
            output = (result.stderr or result.stdout or b"").decode(errors="replace").strip()[-300:]
            self._problem("restart_command", f"exit status {result.returncode}: {output}")
            self.file_backoff.failed(time.monotonic(), self._backoff_cap())
            return
        self.restart_pending = False
        self._solved("restart_command")
        log.info("event=xray_restarted command=%s", quote(self.node.restart_command))

    # --- bookkeeping -------------------------------------------------------------------------------

    async def _record_node(self) -> None:
        """Record the node's state for operators: on a change of reachability, else every few seconds."""
        now = time.monotonic()
        status = self.status
        if self.retired or (
            status.reachable == self.recorded_reachable and now - self.recorded_at < NODE_RECORD_INTERVAL
        ):
            return
        seen = NodeObservation(
            name=self.node.name,
            reachable=status.reachable,
            detail=status.summary(),
            users=status.live_users,
            online=status.online_users,
            traffic_bytes=self.traffic_bytes,
            in_sync=status.in_sync,
        )
        await self.app.db.run(record_node, seen)
        self.traffic_bytes = 0
        self.recorded_at, self.recorded_reachable = now, status.reachable

    async def _refresh_sync_marker(self, db_now: dt.datetime) -> None:
        now = time.monotonic()
        if now - self.marker_written_at >= SYNC_MARKER_INTERVAL:
            await self.app.db.run(set_sync_marker, db_now, self.node.name)
            self.marker_written_at = now

    async def _report_incidents(self) -> None:
        """Record each alerted component's state when it changed (a failed record is retried next round)."""
        if self.texts is None:
            return
        states = [
            (name, self.status.problems.get(component), f"{component} works again")
            for component, name in ALERTED.items()
        ]
        if self.node.name != LOCAL_NODE:  # (the local Xray's API is the health worker's probe "xray")
            unreachable = None if self.status.reachable else self.status.problems.get("api", "unreachable")
            states.append((self.incident, unreachable, f"node {self.node.name} reachable again"))
        for name, problem, recovered in states:
            failing = problem is not None
            if self.reported.get(name, False) == failing:
                continue  # (a node never seen down has nothing to recover from)
            detail = f"node {self.node.name}: {problem}" if problem is not None else recovered
            await alerts.report_incident(self.app, self.texts, name, not failing, detail)
            self.reported[name] = failing

    def _problem(self, component: Component, message: str) -> None:
        previous = self.status.problems.get(component)
        self.status.problems[component] = message
        self.status.last_error = f"{component}: {message}"
        if previous != message:
            log.error("event=xray_problem component=%s node=%s detail=%s", component, self.node.name, quote(message))

    def _solved(self, component: Component) -> None:
        if self.status.problems.pop(component, None) is not None:
            log.info("event=xray_recovered component=%s node=%s", component, self.node.name)

    def _publish_metrics(self) -> None:
        metrics, status, node = self.app.metrics, self.status, self.node.name
        metrics.xray_node_up.labels(node=node).set(1 if status.reachable and self.api is not None else 0)
        metrics.xray_node_pending.labels(node=node, op="add").set(status.pending_adds)
        metrics.xray_node_pending.labels(node=node, op="remove").set(status.pending_removes)
        metrics.xray_node_users.labels(node=node).set(status.live_users)


def _stat_stamp(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _render_batch(renderer: ConfigRenderer, rows: list[tuple[str, str]], flow: str) -> bytes:
    return renderer.clients(Client(uuid=uuid, email=email, flow=flow) for email, uuid in rows)


def _write_parts(path: str, parts: list[bytes]) -> tuple[bool, tuple[int, int, int] | None]:
    changed = write_atomically(path, b"".join(parts))
    return changed, _stat_stamp(path)


def check_link_settings(node: NodeConfig) -> str | None:
    """What is wrong with a node's settings that go into share links, or None."""
    try:
        links.build_vless_reality_link(
            uuid="00000000-0000-4000-8000-000000000000",
            host=node.host,
            port=node.port,
            public_key=node.public_key,
            short_id=node.short_id,
            sni=node.sni,
            fingerprint=node.fingerprint,
            flow=node.flow,
            name=node.label("en"),
        )
    except ValueError as exc:
        where = "[xray]" if node.name == LOCAL_NODE else f"node {node.name}"
        return f"{where} link settings: {exc}"
    return None


async def report_link_settings(app: App, texts: Texts) -> None:
    """Start-up: a gap in the settings users' keys are built from is logged naming the key and
    alerted to the admins (`vpnd.alerts.XRAY_LINKS`); without one, an earlier alert is closed."""
    gap = link_settings_gap(app.config)
    if gap is not None:
        log.error("event=config_gap key=%s detail=%s", gap.key, quote(f"{gap.detail}; {KEY_PENDING_HINT}"))
    if app.config.xray.public_key == EXAMPLE_REALITY_PUBLIC_KEY:
        log.warning(
            "event=example_reality_key key=[xray].public_key detail=%s",
            quote("the public example key pair is configured: generate your own with `xray x25519`"),
        )
    detail = f"{gap.key}: {gap.detail}; {KEY_PENDING_HINT}" if gap is not None else "users' keys can be built"
    try:
        await alerts.report_incident(app, texts, alerts.XRAY_LINKS, gap is None, detail)
    except (DatabaseUnavailable, psycopg.OperationalError) as exc:  # users asking for keys report it again
        log.warning("event=incident_not_recorded incident=%s error=%s", alerts.XRAY_LINKS, type(exc).__name__)


def api_tls(node: NodeConfig) -> ApiTls | None:
    """The node's mutual-TLS material, read from its files (a reload re-reads them)."""
    if node.tls is None:
        return None
    tls = node.tls
    with open(tls.ca_file, "rb") as ca, open(tls.cert_file, "rb") as cert, open(tls.key_file, "rb") as key:
        return ApiTls(ca.read(), cert.read(), key.read(), tls.server_name)


@attrs.define(eq=False)
class _Running:
    writer: XrayWriter
    scope: trio.CancelScope
    connection: tuple[object, ...]


@attrs.define(eq=False)
class XrayFleet:
    """The writers of every node vpnd drives: one task each, children of the Xray nursery, so a node
    that is down or slow delays no other. A reload (SIGHUP) that adds a node starts its writer (a
    full reconcile); one that removes a node retires it (its users are taken off it, then it stops);
    one that changes how a node is reached restarts its writer."""

    app: App
    texts: Texts
    #: Node name → its writer's status (what /readyz, /metrics and the admin read).
    statuses: dict[str, XrayStatus] = attrs.field(factory=dict)
    _running: dict[str, _Running] = attrs.field(factory=dict)
    _nursery: trio.Nursery | None = None

    def status(self, node: str = LOCAL_NODE) -> XrayStatus:
        return self.statuses[node]

    def seconds_since_sync(self) -> float:
        """The furthest-behind node's lag (0 when every node is in sync)."""
        return max((status.seconds_since_sync() for status in self.statuses.values()), default=0.0)

    async def serve(self, *, task_status: trio.TaskStatus[XrayFleet] = trio.TASK_STATUS_IGNORED) -> None:
        """Start a writer per node (concurrently; each reports after its first round), then follow
        nudges and reloads until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            async with trio.open_nursery() as starting:
                for node in self.app.config.managed_nodes:
                    starting.start_soon(self._start, node)
            task_status.started(self)
            nursery.start_soon(self._fan_out)
            nursery.start_soon(self._follow_config)

    async def _start(self, node: NodeConfig) -> None:
        assert self._nursery is not None
        await self._nursery.start(self._run_writer, node)

    async def _run_writer(self, node: NodeConfig, *, task_status: trio.TaskStatus[XrayStatus]) -> None:
        app = self.app
        status = XrayStatus(enabled=True, mode="api" if node.api_address else "restart-command", node=node.name)
        with trio.CancelScope() as scope, ExitStack() as stack:
            api = None
            if node.api_address:
                tls = await trio.to_thread.run_sync(api_tls, node)
                api = stack.enter_context(XrayApi(node.api_address, prefix=node.api_prefix, tls=tls))
            writer = XrayWriter(app, status, api, node, self.texts)
            self._running[node.name] = _Running(writer, scope, node.connection)
            self.statuses[node.name] = status
            app.health.add_check(status.check_name, status.readiness)
            try:
                link_problem = check_link_settings(node)
                if link_problem:
                    writer._problem("links", link_problem)
                try:
                    links.validate_flow(node.flow)
                except ValueError as exc:
                    writer._problem("config", f"flow: {exc}")
                    task_status.started(status)
                    await trio.sleep_forever()
                log.info(
                    "event=xray_writer_starting node=%s mode=%s api=%s tls=%s config=%s",
                    node.name,
                    status.mode,
                    node.api_address or "-",
                    "mutual" if node.tls else "none",
                    quote(node.config_path or "-"),
                )
                await writer.reconcile()
                task_status.started(status)
                await writer.run_forever()
            finally:
                if self._running.get(node.name, None) is not None and self._running[node.name].writer is writer:
                    del self._running[node.name]
                    if self.statuses.get(node.name) is status:
                        del self.statuses[node.name]
                        app.health.remove_check(status.check_name)
                        _forget_metrics(app, node.name)
        if scope.cancelled_caught:
            log.info("event=xray_writer_stopped node=%s", node.name)

    async def _fan_out(self) -> None:
        """Every writer wakes on a commit that changed a subscription (`app.xray_changed`)."""
        while True:
            await self.app.xray_changed.wait()
            for running in list(self._running.values()):
                running.writer.wake.nudge()

    async def _follow_config(self) -> None:
        applied = self.app.config
        while True:
            if self.app.config is applied:  # (a reload during the last apply is not missed)
                await self.app.config_reloaded.wait()
            applied = self.app.config
            await self.apply_config()

    async def apply_config(self) -> None:
        """Make the running writers match `app.config`'s nodes."""
        wanted = {node.name: node for node in self.app.config.managed_nodes}
        for name, running in list(self._running.items()):
            node = wanted.get(name)
            if node is None and not running.writer.retiring:
                log.info("event=xray_node_removed node=%s action=retire", name)
                running.writer.retiring = True
                running.writer.wake.nudge()
            elif node is not None and (running.writer.retiring or running.connection != node.connection):
                log.info("event=xray_node_changed node=%s action=restart_writer", name)
                running.scope.cancel()
                del self._running[name]
        for name, node in wanted.items():
            if name not in self._running:
                log.info("event=xray_node_added node=%s", name)
                await self._start(node)


def _forget_metrics(app: App, node: str) -> None:
    """A node that left the fleet is no longer a series in /metrics."""
    metrics = app.metrics
    series: list[tuple[Gauge, tuple[str, ...]]] = [(metrics.xray_node_up, (node,)), (metrics.xray_node_users, (node,))]
    series += [(metrics.xray_node_pending, (node, op)) for op in ("add", "remove")]
    for gauge, labels in series:
        try:
            gauge.remove(*labels)
        except KeyError:
            pass


async def run_xray(
    app: App, *, texts: Texts | None = None, task_status: trio.TaskStatus[XrayFleet] = trio.TASK_STATUS_IGNORED
) -> None:
    """The Xray nursery. `task_status.started(fleet)` after each node's first round, whatever its outcome.

    `texts` render admin alerts (loaded here when not given).

    Every node vpnd drives (`[xray]` with `enabled = true`, and each of `[[nodes]]`) gets a writer
    and a readiness check; the writers run until shutdown begins (nothing to drain: a round cut short
    is redone by the next start). With no node at all the fleet is empty.
    """
    texts = texts if texts is not None else app.texts
    await report_link_settings(app, texts)
    fleet = XrayFleet(app, texts)
    app.metrics.xray_lag.set_function(fleet.seconds_since_sync)
    app.metrics.xray_pending.labels(op="add").set_function(
        lambda: sum(status.pending_adds for status in fleet.statuses.values())
    )
    app.metrics.xray_pending.labels(op="remove").set_function(
        lambda: sum(status.pending_removes for status in fleet.statuses.values())
    )
    await app.lifecycle.run_until_stopping(partial(_serve_until_stopping, fleet, task_status))


async def _serve_until_stopping(fleet: XrayFleet, task_status: trio.TaskStatus[XrayFleet]) -> None:
    async with trio.open_nursery() as nursery:
        task_status.started(await nursery.start(fleet.serve))
