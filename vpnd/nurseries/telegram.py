"""The Telegram nursery: getUpdates long polling feeding the update handler nursery.

No update is lost or handled twice across a crash or SIGTERM: each batch is written to the inbox
(with the next offset) *before* the offset is confirmed to Telegram by the next poll; handlers record
their outcome; rows left unhandled are dispatched again at start-up, before polling resumes.

Telegram errors: network errors and 5xx → exponential backoff with jitter (cap 30 s); 429 → sleep
`retry_after`; 401 → the daemon exits with a clear "bad token" message; 409 (another poller or a
webhook) → logged clearly, backed off, retried. `/readyz` reports the time since the last successful
poll, and the watchdog stops pinging when polling has been dead longer than
`[telegram].poll_dead_after_seconds`. SIGTERM cancels the pending long poll at once; running handlers
finish within the grace period.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio
from telegram.error import Conflict, InvalidToken, NetworkError, RetryAfter, TimedOut

from vpnd.app import App
from vpnd.config import Config
from vpnd.db import CONNECTION_ERRORS, inbox
from vpnd.health import CheckResult
from vpnd.logs import quote
from vpnd.telegram.client import TrioBot, backoff, retry_after_seconds
from vpnd.telegram.dispatch import (
    COALESCED,
    INT64,
    MAX_UPDATE_DEPTH,
    QUARANTINED,
    Apology,
    Dispatcher,
    DropNotice,
    Handler,
    chat_key,
    nesting_depth,
    open_dispatcher,
    quarantine_record,
    storable,
)

log = logging.getLogger("vpnd.telegram")

ALLOWED_UPDATES = ["message", "callback_query", "pre_checkout_query", "my_chat_member"]
RECOVERY_BATCH = 500
#: Tries to record a handler's outcome while the database is away (0.5 + 1 + 2 + 4 + 8 + 8 s of waits).
OUTCOME_ATTEMPTS = 7
#: How long one write of outcomes may take once started; shutdown does not cut it short.
OUTCOME_WRITE_SECONDS = 5.0


class BadToken(Exception):
    """Telegram rejected the bot token: nothing will work until the operator fixes it."""


@attrs.define(eq=False)
class PollState:
    last_ok: float
    offset: int | None = None
    polls: int = 0
    errors: int = 0
    last_error: str = ""


async def identify_bot(app: App, bot: TrioBot) -> str:
    """The bot's @username (getMe), retried like every start-up call; a bad token ends the start."""
    me = await _call_with_retries(app, "getMe", bot.get_me)
    log.info("event=telegram_bot username=%s id=%s", me.username, me.id)
    return me.username or ""


def retune(dispatcher: Dispatcher, config: Config) -> None:
    """Apply the reloaded `[telegram]` limits to the running dispatcher."""
    dispatcher.limiter.total_tokens = config.telegram.max_concurrent_updates
    dispatcher.handler_timeout = config.telegram.handler_timeout_seconds
    dispatcher.max_per_chat = config.telegram.max_pending_per_chat
    dispatcher.flood_window = config.telegram.flood_notice_interval_seconds


async def run_telegram(
    app: App,
    bot: TrioBot,
    handler: Handler,
    apology: Apology,
    *,
    drop_notice: DropNotice | None = None,
    task_status: trio.TaskStatus[PollState] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Poll updates into the handler nursery; `task_status.started(state)` once the inbox is recovered.

    The composition root called `identify_bot` (getMe) before: the flows need the bot's username.
    """
    config = app.config.telegram
    await _call_with_retries(app, "deleteWebhook", lambda: bot.delete_webhook(drop_pending_updates=False))

    state = PollState(last_ok=trio.current_time())
    state.offset = await app.db.run(inbox.load_offset)
    app.health.add_check("telegram", lambda: _poll_health(app, state))
    app.health.watch("telegram_poll", config.poll_dead_after_seconds)

    recorder = OutcomeRecorder(app)

    def on_done(outcome: str, seconds: float) -> None:
        app.metrics.updates.labels(outcome).inc()
        app.metrics.update_latency.observe(seconds)

    async with (
        recorder.flushed_at_exit(),
        open_dispatcher(
            handler,
            apology,
            recorder.record,
            max_concurrent_updates=config.max_concurrent_updates,
            handler_timeout=config.handler_timeout_seconds,
            max_per_chat=config.max_pending_per_chat,
            flood_window=config.flood_notice_interval_seconds,
            on_done=on_done,
            drop_notice=drop_notice,
        ) as dispatcher,
    ):
        app.metrics.watch_updates(dispatcher.backlog)

        async def retune_on_reload() -> None:  # SIGHUP
            while True:
                await app.config_reloaded.wait()
                retune(dispatcher, app.config)

        recovered = 0
        after = 0
        while True:
            rows = await app.db.run(inbox.unhandled, after, RECOVERY_BATCH)
            if not rows:
                break
            for update_id, payload in rows:
                await dispatcher.submit(update_id, payload)
            recovered += len(rows)
            after = rows[-1][0]
        if recovered:
            log.info("event=inbox_recovered updates=%d", recovered)
        task_status.started(state)

        async def poll_forever() -> None:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(retune_on_reload)
                await _poll(app, bot, state, dispatcher)

        await app.lifecycle.run_until_stopping(poll_forever)
        log.info("event=polling_stopped handlers_running=%d", dispatcher.in_handler)
        dispatcher.stop_accepting()
    app.health.unwatch("telegram_poll")


async def _poll(app: App, bot: TrioBot, state: PollState, dispatcher: Dispatcher) -> None:
    config = app.config.telegram
    failures = 0
    while True:
        try:
            updates = await bot.get_raw_updates(
                offset=state.offset, timeout=config.poll_timeout, limit=100, allowed_updates=ALLOWED_UPDATES
            )
        except RetryAfter as exc:
            seconds = retry_after_seconds(exc)
            log.warning("event=poll_rate_limited retry_after=%g", seconds)
            _failed(state, exc)
            await trio.sleep(seconds)
            continue
        except InvalidToken as exc:
            raise BadToken(
                "Telegram rejected the bot token (401 Unauthorized): check [telegram].token / VPND_TELEGRAM_TOKEN"
            ) from exc
        except Conflict as exc:
            failures += 1
            _failed(state, exc)
            log.error(
                "event=poll_conflict detail=%s",
                '"another getUpdates poller (a second bot process?) or a webhook is active for this token"',
            )
            await trio.sleep(backoff(failures, 30.0))
            continue
        except (NetworkError, TimedOut) as exc:
            failures += 1
            _failed(state, exc)
            delay = backoff(failures, 30.0)
            log.warning("event=poll_failed error=%s retry_in=%.2f", type(exc).__name__, delay)
            await trio.sleep(delay)
            continue
        failures = 0
        state.polls += 1
        state.last_ok = trio.current_time()
        app.health.beat("telegram_poll")
        log.debug("event=poll_ok updates=%d offset=%s", len(updates), state.offset)
        if not updates:
            continue
        ids = [u["update_id"] for u in updates if isinstance(u.get("update_id"), int) and u["update_id"] >= 0]
        if not ids:
            continue
        next_offset = max(ids) + 1  # past every update of the batch, stored or not
        rows = []
        quarantined: list[tuple[int, str]] = []
        for raw in updates:
            update_id = raw.get("update_id")
            if not isinstance(update_id, int) or isinstance(update_id, bool) or not 0 <= update_id < INT64:
                log.warning("event=update_unusable detail=%s", quote("no usable update_id; skipped"))
                continue
            row, usable = _storable_row(update_id, raw)
            if not usable:
                quarantined.append((update_id, QUARANTINED))
                app.metrics.updates_dropped.labels(QUARANTINED).inc()
            rows.append(row)
        await dispatcher.wait_for_room(len(rows))
        skip = {update_id for update_id, _ in quarantined}
        admission = dispatcher.admit((uid, payload) for uid, _, payload in rows if uid not in skip)
        drops = [(update_id, outcome) for update_id, outcome, _ in admission.dropped] + quarantined
        drops += [(item.update_id, COALESCED) for item in admission.superseded]
        recorded = False
        try:
            unhandled = set(await app.db.run(inbox.record_updates, rows, next_offset, drops))
            recorded = True
        except CONNECTION_ERRORS as exc:
            # Not recorded (or not known to be): keep the offset, so Telegram sends the batch again.
            dispatcher.abandon(admission)
            failures += 1
            _failed(state, exc)
            delay = backoff(failures, 30.0)
            log.warning("event=inbox_write_failed error=%s retry_in=%.2f", type(exc).__name__, delay)
            await trio.sleep(delay)
            continue
        finally:
            if not recorded:  # also when cancelled: never leave a press held
                dispatcher.abandon(admission)
        state.offset = next_offset
        for _, outcome in drops:
            if outcome != QUARANTINED:
                app.metrics.updates_dropped.labels(outcome).inc()
        dispatcher.dropped(admission)
        for update_id, payload in admission.queue:
            if update_id in unhandled:
                dispatcher.enqueue(update_id, payload)


def _storable_row(update_id: int, raw: dict[str, Any]) -> tuple[tuple[int, int | None, dict[str, Any]], bool]:
    """The inbox row for an update: as it came (made storable), or — when it nests deeper than any
    real update or cannot be stored — a quarantine record (its pruned text and the reason) that is
    acknowledged without being handled, so one broken update never stops the loop."""
    reason = ""
    try:
        depth = nesting_depth(raw)
        if depth > MAX_UPDATE_DEPTH:
            reason = f"nested more than {MAX_UPDATE_DEPTH} levels deep"
        else:
            update = storable(raw)
            assert isinstance(update, dict)
            return (update_id, chat_key(update), update), True
    except RecursionError:
        reason = "too deeply nested to store"
    log.warning("event=update_quarantined update_id=%d reason=%s", update_id, quote(reason))
    return (update_id, None, quarantine_record(raw, reason)), False


@attrs.define(eq=False)
class _Write:
    """One transaction of the recorder: set `done` when it ended; `error` when it did not commit."""

    done: trio.Event = attrs.Factory(trio.Event)
    error: BaseException | None = None


@attrs.define(eq=False)
class OutcomeRecorder:
    """Records handler outcomes in the inbox with group commit: a handler that finds no write in
    progress writes every outcome queued so far in one transaction; the others wait for the write
    that carries theirs. Idle, that is one write per update, as before; under load, one per batch.
    `record` returns once its outcome is committed, and raises if the write carrying it failed."""

    app: App
    queued: list[tuple[int, str]] = attrs.Factory(list)
    next_write: _Write = attrs.Factory(_Write)
    writing: bool = False
    write_ended: trio.Event = attrs.Factory(trio.Event)

    async def record(self, update_id: int, outcome: str) -> None:
        """Record one outcome; while PostgreSQL is away (a restart), retry with backoff for up to about
        half a minute: an outcome left unrecorded would have its update handled — and answered — again
        after the next start. Marking is idempotent, so a retry after an unknown commit is harmless."""
        for attempt in range(1, OUTCOME_ATTEMPTS + 1):
            try:
                await self._record_once(update_id, outcome)
                return
            except RuntimeError as exc:
                if attempt == OUTCOME_ATTEMPTS or not isinstance(exc.__cause__, CONNECTION_ERRORS):
                    raise
                await trio.sleep(min(0.25 * 2**attempt, 8.0))

    async def _record_once(self, update_id: int, outcome: str) -> None:
        self.queued.append((update_id, outcome))
        mine = self.next_write
        while not mine.done.is_set():
            if not self.writing:
                await self._write(mine)
                break
            await self.write_ended.wait()
        if mine.error is not None:
            raise RuntimeError("the outcome was not recorded") from mine.error

    @asynccontextmanager
    async def flushed_at_exit(self) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await self.flush()

    async def flush(self) -> None:
        """At shutdown: write the outcomes still queued (their handlers were cancelled while waiting
        for another's write, which the grace deadline may cut). Bounded, and shielded like `_write`."""
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + OUTCOME_WRITE_SECONDS
            while self.writing:
                await self.write_ended.wait()
            if self.queued:
                write = self.next_write
                await self._write(write)
                if write.error is not None:
                    log.warning("event=update_outcomes_not_recorded error=%s", quote(str(write.error)))

    async def _write(self, write: _Write) -> None:
        batch, self.queued = self.queued, []
        self.next_write = _Write()
        self.writing = True
        committed = False
        try:
            # Shielded: the shutdown's grace deadline must not roll back a batch of outcomes whose
            # updates were answered — each would be handled, and answered, again after the restart.
            with trio.CancelScope(shield=True) as shield:
                shield.deadline = trio.current_time() + OUTCOME_WRITE_SECONDS
                await self.app.db.run(inbox.mark_handled_many, batch)
                committed = True
        except Exception as exc:
            write.error = exc
        finally:
            if not committed and write.error is None:  # the write's own deadline: rolled back
                write.error = RuntimeError("the write took too long and was cancelled")
            self.writing = False
            write.done.set()
            ended, self.write_ended = self.write_ended, trio.Event()
            ended.set()


def _failed(state: PollState, exc: BaseException) -> None:
    state.errors += 1
    state.last_error = f"{type(exc).__name__}: {exc}"[:200]


async def _poll_health(app: App, state: PollState) -> CheckResult:
    age = trio.current_time() - state.last_ok
    detail = f"last successful poll {age:.1f}s ago"
    if state.last_error and age > 1:
        detail += f"; last error: {state.last_error}"
    return CheckResult(age <= app.config.telegram.poll_dead_after_seconds, detail)


async def _call_with_retries(app: App, what: str, fn: Any) -> Any:
    """Start-up calls: retry transient failures with backoff until they work (or stop/401)."""
    attempt = 0
    while True:
        attempt += 1
        try:
            return await fn()
        except InvalidToken as exc:
            raise BadToken(
                "Telegram rejected the bot token (401 Unauthorized): check [telegram].token / VPND_TELEGRAM_TOKEN"
            ) from exc
        except RetryAfter as exc:
            await trio.sleep(retry_after_seconds(exc))
        except (NetworkError, TimedOut) as exc:
            delay = backoff(attempt, 30.0)
            log.warning("event=telegram_start_retry call=%s error=%s retry_in=%.2f", what, type(exc).__name__, delay)
            await trio.sleep(delay)
