"""The outbox sender: the one task that delivers queued messages to Telegram.

Rows are written by whatever changed state, in the same transaction (`vpnd.db.outbox.enqueue`);
this task drains the due ones in order `(not_before, id)`, in keyset batches with a LIMIT. No
connection is held while Telegram is called: a batch is read in one short transaction, each message
goes out through the shared `Sender` (the outbound limiter at bulk priority, so replies to users
go first; a 429 pauses all sending for `retry_after`), and its outcome is recorded in its own short
transaction right after Telegram answered. A crash can therefore repeat only the messages that were
in flight (at most `concurrency`), never a batch.

A key message (`outbox.KEY_METHOD`, queued by a payment that granted days) becomes a photo: the QR
code of the subscription URL, drawn now from the subscription's current token, with the confirmation and
the URL as its caption and the connect buttons; when the key cannot be built it goes out as its text.

Outcomes: sent → `sent`; 403 (blocked, deactivated) → the user is marked unreachable and the row
`dropped`; 400 "chat not found" → `dropped` with a log line; other 400s (the message itself is
bad) → `failed` at once; network errors, timeouts and 5xx past the Sender's own retries → the row
is retried later with backoff and, after `max_attempts`, `failed` with an error log — visible in the
table (`last_error`), the log and `vpnd_outbox_sends{result="failed"}`. A transient failure also
ends the current drain (Telegram is in trouble; the next round tries again).

Messages to one chat keep the order they were queued in, retries included (a row waiting for its
retry holds back the chat's newer rows); different chats are served concurrently (bounded). The task
wakes on `app.outbox_changed` and also polls every `poll_interval` (rows whose `not_before` has come,
nudges lost to a crash). On shutdown it stops starting sends, lets the ones in flight finish and
record their outcome, then returns.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import attrs
import psycopg
import telegram
import trio
from telegram.error import BadRequest, TelegramError

from vpnd.app import App
from vpnd.db import outbox, subscriptions, support
from vpnd.db.outbox import START_KEY, OutboxRow
from vpnd.key_message import key_caption, key_keyboard, subscription_url
from vpnd.periodic import run_periodic
from vpnd.qr import qr_png
from vpnd.subscription_url import user_links
from vpnd.telegram.client import ChatNotFound, ChatUnreachable, Sender, SendFailed
from vpnd.telegram.ratelimit import Priority

log = logging.getLogger("vpnd.outbox")

WORKER_NAME = "outbox"


@attrs.frozen
class OutboxSettings:
    #: Poll for due rows this often even without a nudge (seconds).
    poll_interval: float = 5.0
    #: Rows read per transaction.
    batch_size: int = 100
    #: Chats served at once (messages in flight at most; each chat's messages go one by one).
    concurrency: int = 8
    #: A drain stops starting sends after this long and lets the next round continue (seconds).
    drain_budget: float = 30.0
    #: Deliveries of one row that end in a transient failure before it is given up as `failed`.
    max_attempts: int = 5
    #: Backoff between those attempts: retry_base * 2**(attempt-1), at most retry_cap (seconds).
    retry_base: float = 30.0
    retry_cap: float = 3600.0
    #: Bound of one drain, sends in flight included (a 429 may pause them for a while).
    round_timeout: float = 600.0


def retry_delay(attempts: int, settings: OutboxSettings) -> float:
    """Seconds before the next try of a row that has failed `attempts` times."""
    return float(min(settings.retry_cap, settings.retry_base * 2 ** max(0, attempts - 1)))


@attrs.define(eq=False)
class OutboxSender:
    app: App
    sender: Sender
    settings: OutboxSettings
    #: Held while a drain runs; shutdown takes it to let the drain in progress finish.
    _drain_lock: trio.Lock = attrs.field(factory=trio.Lock)
    #: Set when a send failed transiently: this drain stops starting new sends.
    _halted: bool = False
    drains: int = 0
    in_flight: int = 0

    async def run(self, task_status: trio.TaskStatus[OutboxSender] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._stop_after_drain, nursery.cancel_scope)
            task_status.started(self)
            await run_periodic(
                WORKER_NAME,
                self.settings.poll_interval,
                self.drain,
                metrics=self.app.metrics,
                round_timeout=self.settings.round_timeout,
                wake=self.app.outbox_changed.wait,
            )

    async def _stop_after_drain(self, scope: trio.CancelScope) -> None:
        await self.app.lifecycle.stopping.wait()
        async with self._drain_lock:  # the drain in progress sees `stopping` and winds down
            scope.cancel()

    def _should_stop(self, deadline: float) -> bool:
        return self._halted or self.app.lifecycle.stopping.is_set() or trio.current_time() >= deadline

    async def drain(self) -> int:
        """Deliver due rows until none is left, the budget is spent, Telegram fails or shutdown begins."""
        async with self._drain_lock:
            self.drains += 1
            self._halted = False
            deadline = trio.current_time() + self.settings.drain_budget
            after = START_KEY
            handled = 0
            while not self._should_stop(deadline):
                batch = await self.app.db.run(outbox.due_batch, after, self.settings.batch_size)
                if not batch:
                    break
                after = batch[-1].key
                handled += await self._deliver_batch(batch, deadline)
                if len(batch) < self.settings.batch_size:
                    break
            return handled

    async def _deliver_batch(self, batch: list[OutboxRow], deadline: float) -> int:
        by_chat: dict[int, list[OutboxRow]] = {}
        for row in batch:
            by_chat.setdefault(row.chat_id, []).append(row)
        for rows in by_chat.values():
            rows.sort(key=lambda r: r.id)  # one chat's messages in the order they were queued
        slots = trio.CapacityLimiter(self.settings.concurrency)
        done = 0

        async def deliver_chat(rows: list[OutboxRow]) -> None:
            nonlocal done
            async with slots:
                for row in rows:
                    if self._should_stop(deadline):
                        return
                    await self._deliver(row)
                    done += 1

        async with trio.open_nursery() as nursery:
            for rows in by_chat.values():  # chats in order of their first due row (the limiter is FIFO)
                nursery.start_soon(deliver_chat, rows)
        return done

    async def _deliver(self, row: OutboxRow) -> None:
        if row.method not in ("sendMessage", outbox.KEY_METHOD):
            await self._record(row, "failed", f"unsupported method {row.method!r}")
            return
        self.in_flight += 1
        try:
            key = await self._key_photo(row) if row.method == outbox.KEY_METHOD else None
            if key is not None:
                photo, caption, markup = key
                send = partial(self._send_photo, row, photo, caption, markup)
            else:
                send = partial(self._send_message, row)
            sent = await self.sender.call(row.chat_id, send, priority=Priority.BULK)
        except ChatUnreachable as exc:
            await self.app.db.run(outbox.drop_unreachable, row.id, row.chat_id, str(exc))
            self._count("unreachable")
            log.info("event=outbox_unreachable outbox_id=%s chat_id=%s", row.id, row.chat_id)
        except ChatNotFound as exc:
            await self._record(row, "dropped", str(exc))
            self._count("chat_not_found")
            log.warning("event=outbox_chat_not_found outbox_id=%s chat_id=%s", row.id, row.chat_id)
        except BadRequest as exc:  # the message itself is refused: retrying cannot help
            await self._record(row, "failed", f"{type(exc).__name__}: {exc}")
            log.error("event=outbox_refused outbox_id=%s chat_id=%s error=%r", row.id, row.chat_id, str(exc)[:200])
        except (SendFailed, TelegramError) as exc:
            self._halted = True
            await self._retry_or_fail(row, f"{type(exc).__name__}: {exc}")
        else:
            await self.app.db.run(_mark_sent, row.id, sent.message_id)
            self._count("sent")
        finally:
            self.in_flight -= 1

    async def _key_photo(self, row: OutboxRow) -> tuple[bytes, str, dict[str, Any]] | None:
        """A key message's photo, caption and keyboard, built now from the subscription's current token;
        None when the key cannot be built (no subscription, a configuration gap, a caption too long):
        then the confirmation goes out as plain text, as before."""
        config = self.app.config
        sub = await self.app.db.run(subscriptions.get_subscription, row.chat_id)
        if sub is None:
            return None
        try:
            user_links(config, sub)
        except ValueError as exc:
            log.warning("event=key_message_as_text outbox_id=%s reason=%r", row.id, str(exc)[:200])
            return None
        texts = self.app.texts
        lang = str(row.payload.get("lang") or config.telegram.default_language)
        url = subscription_url(config.http.public_base_url, sub.sub_token)
        caption = key_caption(texts, lang, str(row.payload.get("text", "")), url)
        if caption is None:
            return None
        photo = await trio.to_thread.run_sync(qr_png, url)
        return photo, caption, key_keyboard(texts, lang)

    async def _send_photo(self, row: OutboxRow, photo: bytes, caption: str, markup: dict[str, Any]) -> telegram.Message:
        return await self.sender.bot.send_photo(
            row.chat_id,
            photo,
            caption=caption,
            parse_mode="HTML",
            reply_markup=telegram.InlineKeyboardMarkup.de_json(markup, None),
        )

    async def _send_message(self, row: OutboxRow) -> telegram.Message:
        payload: dict[str, Any] = dict(row.payload)
        payload.pop("lang", None)  # a key message sent as text
        text = str(payload.pop("text", ""))
        parse_mode = payload.pop("parse_mode", None)
        return await self.sender.bot.send_message(row.chat_id, text, parse_mode=parse_mode, api_kwargs=payload or None)

    async def _retry_or_fail(self, row: OutboxRow, error: str) -> None:
        attempts = row.attempts + 1
        if attempts >= self.settings.max_attempts:
            await self._record(row, "failed", error)
            log.error(
                "event=outbox_gave_up outbox_id=%s chat_id=%s attempts=%d error=%r",
                row.id,
                row.chat_id,
                attempts,
                error[:200],
            )
            return
        delay = retry_delay(attempts, self.settings)
        await self.app.db.run(outbox.reschedule, row.id, delay, error)
        self._count("retry")
        log.warning(
            "event=outbox_retry_later outbox_id=%s chat_id=%s attempts=%d delay=%g error=%r",
            row.id,
            row.chat_id,
            attempts,
            delay,
            error[:200],
        )

    async def _record(self, row: OutboxRow, status: str, error: str) -> None:
        if status == "failed":
            await self.app.db.run(outbox.mark_failed, row.id, error)
        else:
            await self.app.db.run(outbox.mark_dropped, row.id, error)
        if status == "failed":
            self._count("failed")

    def _count(self, result: str) -> None:
        self.app.metrics.outbox_sends.labels(result).inc()


def _mark_sent(conn: psycopg.Connection[Any], row_id: int, message_id: int) -> None:
    """The row was delivered as `message_id`; a relayed support message learns that id (replies find it)."""
    if outbox.mark_sent(conn, row_id):
        support.note_relayed(conn, row_id, message_id)


async def run_outbox(
    app: App,
    sender: Sender,
    *,
    settings: OutboxSettings | None = None,
    task_status: trio.TaskStatus[OutboxSender] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The outbox nursery: deliver queued messages until shutdown (then finish what is in flight)."""
    await OutboxSender(app, sender, settings or OutboxSettings()).run(task_status=task_status)
