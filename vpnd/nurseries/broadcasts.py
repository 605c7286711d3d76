"""The broadcasts nursery: one child task per running broadcast, progress persisted per recipient.

    broadcasts (run_broadcasts) ── supervisor loop: which broadcasts are running?
    └── one task per running broadcast
        ├── feeder: pending recipients in user id order (keyset batches) → a zero-size channel
        ├── MAX_IN_FLIGHT workers: shared limiter (BULK) → re-check the segment + record the attempt → send → mark
        └── progress: edits the admin's message every [broadcast].progress_interval

The database says what runs. The supervisor re-reads it when nudged (`Broadcasts.changed`, after
an admin flow committed a change) and at least every `poll_interval` seconds (so `vpnd broadcast
pause|resume|cancel` from the command line is noticed without a nudge). At start-up the running
broadcasts are resumed from their pending recipients.

Stopping, and what the restart guarantee rests on:

* **pause** and **shutdown** (SIGTERM: `app.lifecycle.stopping`) stop the feeder; the workers finish
  the sends they started and persist them, then the task ends. Every recipient is either marked or
  still pending, so a resume (or restart) sends each one exactly once.
* **cancel** cancels the task at once (within a second of the press); a send in flight at that
  moment may be delivered without being marked — the broadcast is over, nobody resends it.
* **SIGKILL** (or a lost database connection) loses only the marks of the sends on the wire or just
  finished — a finished send is marked by the next send's transaction (`BroadcastTask.unmarked`) —
  at most one per worker (`max_in_flight`, more for a fast paid broadcast: see `in_flight_for`). Each send's
  attempt is recorded before the Bot API call, so the next run knows exactly who those recipients are
  ("in doubt": Telegram has no idempotency key to ask whether they got it) and, per `[broadcast]
  resend_in_doubt`, sends them again (default: nobody skipped, those few may get it twice) or skips
  them (nobody gets it twice). Logged as `event=broadcast_in_doubt`, counted in
  `vpnd_broadcast_messages{result="in_doubt_resent"|"in_doubt_skipped"}`.

Sending shares the daemon's `Sender` (its `OutboundLimiter`) with BULK priority, so replies to users
keep priority, a 429 pauses everything, and 403 marks the user unreachable.

Paid broadcasts (`[broadcast] paid = true`): every message carries `allow_paid_broadcast` and goes
through the limiter's paid lane at `[broadcast] paid_rate_per_second`. When Telegram refuses a paid
send (not enough Stars), the broadcast task drops to the free pace for the rest of its run — the
refused recipient is sent again without the flag, so nobody is skipped — and says so in the log and
in `vpnd_broadcast_messages{result="paid_refused"}`.
"""

from __future__ import annotations

import collections
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import telegram
import trio
from telegram.error import BadRequest, TelegramError

from vpnd.app import App
from vpnd.db import CONNECTION_ERRORS
from vpnd.db import broadcasts as bdb
from vpnd.db.broadcasts import Broadcast, Counts
from vpnd.db.users import get_user
from vpnd.nudge import Nudge
from vpnd.telegram.admin import views
from vpnd.telegram.broadcast_message import markup_of, send_content
from vpnd.telegram.client import (
    ChatNotFound,
    ChatUnreachable,
    Sender,
    SendFailed,
    SentMessage,
    describe_telegram_error,
)
from vpnd.telegram.ratelimit import Priority
from vpnd.telegram.texts import Texts

log = logging.getLogger("vpnd.broadcasts")

#: Sends in flight per broadcast: enough to keep the limiter busy at ~100 ms Bot API latency, and the
#: bound on duplicates after a SIGKILL.
MAX_IN_FLIGHT = 8
#: Sends in flight for a fast (paid, or a high `rate_per_second`) broadcast at most: a send takes two
#: short transactions and a Bot API call (15-30 ms on a busy machine), so 8 in flight cap a broadcast
#: at a few hundred per second.
MAX_IN_FLIGHT_FAST = 32
#: Pending recipients read per query.
BATCH_SIZE = 200
#: How long the final edit/summary after a broadcast ends may take.
FINAL_MESSAGE_TIMEOUT = 5.0


class NotSending(Exception):
    """The recipient, re-checked just before the send, is no longer pending or in the segment."""

    def __init__(self, eligibility: str) -> None:
        super().__init__(eligibility)
        self.eligibility = eligibility


@attrs.define(eq=False)
class Progress:
    """Live counts of one broadcast task (seeded from the database when it starts)."""

    counts: Counts
    started_at: float
    processed_at_start: int
    #: (trio time, processed) samples for the recent rate.
    samples: collections.deque[tuple[float, int]] = attrs.field(factory=lambda: collections.deque(maxlen=20))

    def record(self, outcome: str) -> None:
        c = self.counts
        self.counts = Counts(
            total=c.total,
            pending=max(0, c.pending - 1),
            sent=c.sent + (outcome == "sent"),
            failed=c.failed + (outcome == "failed"),
            skipped=c.skipped + (outcome == "skipped"),
        )

    def rate(self, now: float) -> float | None:
        """Recipients per second over the recent samples (or since the start)."""
        self.samples.append((now, self.counts.processed))
        first_at, first_done = self.samples[0]
        if now - first_at < 0.5:
            first_at, first_done = self.started_at, self.processed_at_start
        elapsed = now - first_at
        return (self.counts.processed - first_done) / elapsed if elapsed > 0.5 else None


@attrs.define(eq=False)
class BroadcastTask:
    broadcast_id: int
    cancel_scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    stop: trio.Event = attrs.field(factory=trio.Event)
    progress: Progress | None = None
    finished: trio.Event = attrs.field(factory=trio.Event)
    #: Telegram refused a paid send: the rest of this run goes at the free pace.
    paid_refused: bool = False
    #: Sends that finished and are not yet marked in the database, `(user_id, message_id)`: the next
    #: send's transaction marks them (`bdb.record_and_check`), so a send costs one transaction, not two.
    unmarked: list[tuple[int, int]] = attrs.field(factory=list)

    def take_unmarked(self) -> list[tuple[int, int]]:
        taken, self.unmarked = self.unmarked, []
        return taken


@attrs.define(eq=False)
class Broadcasts:
    """The broadcasts this daemon is running (handed out by `run_broadcasts` via task_status)."""

    app: App
    sender: Sender
    texts: Texts
    changed: Nudge
    max_in_flight: int = MAX_IN_FLIGHT
    poll_interval: float = 0.5
    tasks: dict[int, BroadcastTask] = attrs.field(factory=dict)

    # --- supervisor ---------------------------------------------------------------------------

    async def reconcile(self, nursery: trio.Nursery) -> None:
        """Start scheduled broadcasts that are due; start a task for every running broadcast; stop or
        cancel tasks whose broadcast changed."""
        stopping = self.app.lifecycle.stopping.is_set()
        if not stopping:
            for started in await self.app.db.run(bdb.start_due):
                log.info("event=broadcast_schedule_started id=%d total=%d", started.id, started.total)
        current = await self.app.db.run(bdb.statuses, list(self.tasks))
        for broadcast_id, status in current.items():
            task = self.tasks.get(broadcast_id)
            if task is None:
                if status == "running" and not stopping:
                    task = self.tasks[broadcast_id] = BroadcastTask(broadcast_id)
                    nursery.start_soon(self._run_task, task, name=f"broadcast-{broadcast_id}")
            elif status == "cancelled":
                task.cancel_scope.cancel()
            elif status != "running":
                task.stop.set()

    async def _run_task(self, task: BroadcastTask) -> None:
        log.info("event=broadcast_started id=%d", task.broadcast_id)
        try:
            try:
                with task.cancel_scope:
                    try:
                        await self._deliver(task)
                    finally:
                        await self._mark_finished_sends(task)
            except CONNECTION_ERRORS as exc:
                # PostgreSQL went away: progress is durable, so end this task; the next reconcile
                # resumes the broadcast from its pending recipients once the database answers.
                log.warning("event=broadcast_interrupted id=%d error=%s", task.broadcast_id, type(exc).__name__)
                return
            if not self.app.lifecycle.stopping.is_set():
                # Before the task counts as ended, so the final state is the last edit of the progress
                # message (a progress edit already in flight cannot overwrite "paused" afterwards).
                with trio.move_on_after(FINAL_MESSAGE_TIMEOUT):
                    await self._show_final_state(task)
        finally:
            self.tasks.pop(task.broadcast_id, None)
            task.finished.set()

    # --- one broadcast ------------------------------------------------------------------------

    async def _deliver(self, task: BroadcastTask) -> None:
        broadcast = await self.app.db.run(bdb.get_broadcast, task.broadcast_id)
        if broadcast is None or broadcast.status != "running":
            return
        await self._settle_in_doubt(broadcast)
        counts = await self.app.db.run(bdb.counts, broadcast.id)
        task.progress = Progress(counts, trio.current_time(), counts.processed)
        lang = await self._admin_language(broadcast)
        markup = _markup(broadcast)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._report_progress, task, broadcast, lang)
            while not self._stopped(task):
                handed_out = await self._one_pass(task, broadcast, markup)
                if handed_out == 0:
                    break
            nursery.cancel_scope.cancel()
        if self._stopped(task):
            log.info("event=broadcast_stopped id=%d pending=%d", broadcast.id, task.progress.counts.pending)
            return
        done = await self.app.db.run(bdb.finish_if_complete, broadcast.id)
        if done is not None:
            log.info("event=broadcast_done id=%d", broadcast.id)

    async def _mark_finished_sends(self, task: BroadcastTask) -> None:
        """Mark the sends that finished after the last send's transaction — also when the task is being
        cancelled (shielded, briefly), so a cancelled broadcast's report counts what it delivered."""
        if not task.unmarked:
            return
        with trio.CancelScope(shield=True), trio.move_on_after(FINAL_MESSAGE_TIMEOUT):
            sent = task.take_unmarked()
            try:
                await self.app.db.run(bdb.mark_sent_many, task.broadcast_id, sent)
            except BaseException:
                task.unmarked.extend(sent)  # not marked: in doubt at the next run, like a kill -9's
                raise

    async def _settle_in_doubt(self, broadcast: Broadcast) -> None:
        """Recipients in flight at an unclean stop: sent again, or skipped (`[broadcast] resend_in_doubt`)."""
        resend = self.app.config.broadcast.resend_in_doubt
        in_doubt = await self.app.db.run(bdb.settle_in_doubt, broadcast.id, resend=resend)
        if not in_doubt:
            return
        result = "in_doubt_resent" if resend else "in_doubt_skipped"
        self.app.metrics.broadcast_sent.labels(result).inc(len(in_doubt))
        log.warning(
            "event=broadcast_in_doubt id=%d count=%d action=%s user_ids=%s",
            broadcast.id,
            len(in_doubt),
            "resend" if resend else "skip",
            ",".join(map(str, in_doubt[:50])),
        )

    def in_flight_for(self, task: BroadcastTask) -> int:
        """Workers for one pass: `max_in_flight`, or about 100 ms of sends at the broadcast's pace (at
        most MAX_IN_FLIGHT_FAST), so that round trips do not hold a fast broadcast below its rate."""
        paid = self.app.config.broadcast.paid and not task.paid_refused
        return workers_for(self.sender.limiter.bulk_rate(paid=paid), self.max_in_flight)

    def _stopped(self, task: BroadcastTask) -> bool:
        return task.stop.is_set() or self.app.lifecycle.stopping.is_set()

    async def _one_pass(self, task: BroadcastTask, broadcast: Broadcast, markup: Any) -> int:
        """Hand every pending recipient (user id order) to the workers; return how many were handed out."""
        send_channel, receive_channel = trio.open_memory_channel[int](0)
        handed_out = 0
        async with trio.open_nursery() as workers:
            for _ in range(self.in_flight_for(task)):
                workers.start_soon(self._worker, task, broadcast, markup, receive_channel.clone())
            await receive_channel.aclose()
            async with send_channel:
                after = 0
                while not self._stopped(task):
                    batch = await self.app.db.run(bdb.next_pending, broadcast.id, after, BATCH_SIZE)
                    if not batch:
                        break
                    for user_id in batch:
                        if self._stopped(task):
                            break
                        await send_channel.send(user_id)
                        handed_out += 1
                    after = batch[-1]
        await self._mark_finished_sends(task)  # before the next pass reads what is still pending
        return handed_out

    async def _worker(
        self, task: BroadcastTask, broadcast: Broadcast, markup: Any, receive: trio.MemoryReceiveChannel[int]
    ) -> None:
        async with receive:
            async for user_id in receive:
                outcome = await self._deliver_one(task, broadcast, markup, user_id)
                if outcome != "not_pending" and task.progress is not None:
                    task.progress.record(outcome)
                self.app.metrics.broadcast_sent.labels(outcome).inc()

    async def _send(
        self,
        task: BroadcastTask,
        broadcast: Broadcast,
        markup: Any,
        user_id: int,
        before_send: Callable[[], Awaitable[None]],
    ) -> SentMessage:
        paid = self.app.config.broadcast.paid and not task.paid_refused
        text = broadcast.text
        if broadcast.variants:
            language = await self.app.db.run(language_of, user_id)
            text = broadcast.text_for(language or "")
        try:
            return await send_content(
                self.sender,
                user_id,
                text,
                markup,
                priority=Priority.BULK,
                paid=paid,
                before_send=before_send,
                media_kind=broadcast.media_kind,
                media_file_id=broadcast.media_file_id,
            )
        except BadRequest as exc:
            if not (paid and _refuses_paid_broadcast(exc)):
                raise
            if not task.paid_refused:
                task.paid_refused = True
                self.app.metrics.broadcast_sent.labels("paid_refused").inc()
                log.warning(
                    "event=broadcast_paid_refused id=%d error=%r: going on at the free pace",
                    broadcast.id,
                    str(exc)[:200],
                )
        return await send_content(
            self.sender,
            user_id,
            text,
            markup,
            priority=Priority.BULK,
            before_send=before_send,
            media_kind=broadcast.media_kind,
            media_file_id=broadcast.media_file_id,
        )

    async def _deliver_one(self, task: BroadcastTask, broadcast: Broadcast, markup: Any, user_id: int) -> str:
        db = self.app.db

        async def check_and_record_attempt() -> None:
            # After the limiter's go-ahead, just before the Bot API call, one transaction marks the sends
            # that finished since the last one, re-checks the segment and records this attempt. So an
            # unclean stop leaves in doubt only the sends on the wire or just finished (at most one per
            # worker), not the ones still queued at the limiter.
            finished = task.take_unmarked()
            try:
                eligibility = await db.run(bdb.record_and_check, broadcast.id, user_id, broadcast.target, finished)
            except BaseException:
                task.unmarked.extend(finished)  # marking twice is harmless; losing a mark is not
                raise
            if eligibility != "send":
                raise NotSending(eligibility)

        try:
            message = await self._send(task, broadcast, markup, user_id, check_and_record_attempt)
        except NotSending as exc:
            return exc.eligibility
        except ChatUnreachable as exc:
            await db.run(bdb.mark_failed, broadcast.id, user_id, f"unreachable: {exc}", unreachable=True)
            return "failed"
        except ChatNotFound as exc:
            await db.run(bdb.mark_failed, broadcast.id, user_id, f"chat not found: {exc}", unreachable=True)
            return "failed"
        except SendFailed as exc:
            await db.run(bdb.mark_failed, broadcast.id, user_id, str(exc))
            return "failed"
        except TelegramError as exc:  # e.g. a BadRequest for this one chat: record it and go on
            await db.run(bdb.mark_failed, broadcast.id, user_id, describe_telegram_error(exc))
            return "failed"
        task.unmarked.append((user_id, message.message_id))  # marked by the next send's transaction
        return "sent"

    # --- the admin's progress message ---------------------------------------------------------

    async def _admin_language(self, broadcast: Broadcast) -> str:
        user = await self.app.db.run(get_user, broadcast.created_by)
        return user.language if user is not None else self.app.config.telegram.default_language

    async def _report_progress(self, task: BroadcastTask, broadcast: Broadcast, lang: str) -> None:
        interval = self.app.config.broadcast.progress_interval
        next_at = trio.current_time()
        while True:
            next_at += interval
            await trio.sleep_until(next_at)
            if next_at < trio.current_time():
                next_at = trio.current_time()
            progress = task.progress
            if progress is None or broadcast.progress_chat_id is None or broadcast.progress_message_id is None:
                continue
            if self._stopped(task) or await self.app.db.run(bdb.status_of, broadcast.id) != "running":
                continue  # paused or cancelled meanwhile: the final edit shows that, not a stale "running"
            t = self._t(lang)
            rate = progress.rate(trio.current_time())
            text = views.progress_text(t, broadcast, "running", progress.counts, rate)
            keyboard = views.progress_keyboard(t, broadcast.id, "running")
            await self._edit_progress(broadcast, text, keyboard, priority=Priority.BULK)

    async def _show_final_state(self, task: BroadcastTask) -> None:
        """After the task ends (paused, cancelled, done): the progress message shows the final state."""
        broadcast = await self.app.db.run(bdb.get_broadcast, task.broadcast_id)
        if broadcast is None or broadcast.progress_chat_id is None:
            return
        counts = await self.app.db.run(bdb.counts, broadcast.id)
        lang = await self._admin_language(broadcast)
        t = self._t(lang)
        text = views.progress_text(t, broadcast, broadcast.status, counts, None)
        await self._edit_progress(broadcast, text, views.progress_keyboard(t, broadcast.id, broadcast.status))
        if broadcast.status in ("done", "cancelled"):
            seconds = None
            if broadcast.finished_at is not None:
                seconds = (broadcast.finished_at - broadcast.created_at).total_seconds()
            summary = views.summary_text(t, broadcast, broadcast.status, counts, seconds)
            try:
                await self.sender.send_message(
                    broadcast.progress_chat_id, summary, reply_markup=views.report_keyboard(t, broadcast.id)
                )
            except (TelegramError, ChatUnreachable, ChatNotFound, SendFailed) as exc:
                log.warning("event=broadcast_summary_failed id=%d error=%s", broadcast.id, type(exc).__name__)

    async def _edit_progress(
        self, broadcast: Broadcast, text: str, keyboard: Any, *, priority: Priority = Priority.REPLY
    ) -> None:
        """Edit the admin's progress message. The edit counts against the admin's chat limit (the
        shared limiter); the periodic ones go at bulk priority, like the broadcast they report on."""
        if broadcast.progress_chat_id is None or broadcast.progress_message_id is None:
            return
        markup = telegram.InlineKeyboardMarkup.de_json(keyboard, None) if keyboard else None
        try:
            await self.sender.edit_text(
                broadcast.progress_chat_id, broadcast.progress_message_id, text, priority=priority, reply_markup=markup
            )
        except (TelegramError, ChatUnreachable, ChatNotFound, SendFailed) as exc:
            log.info("event=broadcast_progress_edit_failed id=%d error=%s", broadcast.id, type(exc).__name__)

    def _t(self, lang: str) -> views.T:
        def t(key: str, **values: object) -> str:
            return self.texts.get(lang, key, **values)

        return t


def workers_for(pace: float, max_in_flight: int = MAX_IN_FLIGHT) -> int:
    """Sends in flight for a broadcast at `pace` messages per second (see `Broadcasts.in_flight_for`):
    also the most recipients an unclean stop can leave in doubt."""
    return max(max_in_flight, min(MAX_IN_FLIGHT_FAST, math.ceil(pace / 10)))


def _refuses_paid_broadcast(exc: BadRequest) -> bool:
    """A 400 that refuses `allow_paid_broadcast` itself (the bot's Stars balance), not this message."""
    text = str(exc).lower()
    return any(word in text for word in ("star", "balance", "paid", "payment"))


def _markup(broadcast: Broadcast) -> dict[str, Any] | None:
    """The broadcast's keyboard as Bot API JSON, built once per run rather than per recipient."""
    markup = markup_of(broadcast.button_text, broadcast.button_url, broadcast.buttons)
    return markup.to_dict() if markup is not None else None


def language_of(conn: Any, user_id: int) -> str | None:
    user = get_user(conn, user_id)
    return user.language if user is not None else None


async def run_broadcasts(
    app: App,
    sender: Sender,
    *,
    texts: Texts | None = None,
    max_in_flight: int = MAX_IN_FLIGHT,
    poll_interval: float = 0.5,
    task_status: trio.TaskStatus[Broadcasts] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run every running broadcast until shutdown; `task_status.started(broadcasts)` once resumed.

    On `app.lifecycle.stopping` no new broadcast starts and the running ones stop feeding, finish
    the sends in flight and return (their status stays "running": the next start resumes them).
    """
    broadcasts = Broadcasts(
        app,
        sender,
        texts or app.texts,
        app.broadcasts_changed,
        max_in_flight=max_in_flight,
        poll_interval=poll_interval,
    )
    async with trio.open_nursery() as nursery:
        await broadcasts.reconcile(nursery)
        if broadcasts.tasks:
            log.info("event=broadcasts_resumed ids=%s", ",".join(map(str, sorted(broadcasts.tasks))))
        task_status.started(broadcasts)

        async def supervise() -> None:
            while True:
                await broadcasts.changed.wait(poll_interval)
                try:
                    await broadcasts.reconcile(nursery)
                except CONNECTION_ERRORS as exc:
                    log.warning("event=broadcasts_reconcile_failed error=%s", type(exc).__name__)
                    await trio.sleep(1.0)

        # Cancelled the moment shutdown begins, not up to poll_interval later.
        await app.lifecycle.run_until_stopping(supervise)
        for task in list(broadcasts.tasks.values()):
            task.stop.set()
    log.info("event=broadcasts_stopped")
