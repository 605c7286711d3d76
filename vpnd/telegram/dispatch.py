"""The update handler nursery: the update concurrency limit, per-chat order, the error boundary.

    dispatcher nursery ── one task per chat with queued updates
                          └── async with limiter:          (the only update limiter)
                                  error boundary:          (log once, polite reply, go on)
                                      with fail_after(handler timeout):
                                          handler(update)
                                  record the outcome in the inbox

**The `CapacityLimiter` is created here and used nowhere else**: background workers, the outbox and
broadcasts never wait on it (tests/audit checks this by reading the source). Updates of one chat are
handled one after another in update order; different chats run concurrently. Memory is bounded:
`submit` waits while `max_pending` updates are queued (they are durable in the inbox meanwhile).
On shutdown, running handlers finish (within the root's grace deadline) and queued ones stay in the
inbox for the next start.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

from vpnd.db.pool import update_lane
from vpnd.logs import quote

log = logging.getLogger("vpnd.updates")

Payload = dict[str, Any]
#: Handles one update (raw Bot API JSON). Raising means "failed": the boundary apologizes.
Handler = Callable[[int, Payload], Awaitable[None]]
#: Tells the user something went wrong (best effort; its own failures are only logged).
Apology = Callable[[Payload], Awaitable[None]]
#: Records the outcome of an update durably ("ok", "error").
Recorder = Callable[[int, str], Awaitable[None]]


INT64 = 1 << 63


def _id(value: object) -> int | None:
    """An id as PostgreSQL's bigint can hold it, else None (a hostile or broken update)."""
    if isinstance(value, int) and not isinstance(value, bool) and -INT64 <= value < INT64:
        return value
    return None


def chat_key(payload: Payload) -> int | None:
    """The chat whose order an update belongs to (None: no chat, handle on its own)."""
    for kind in ("message", "edited_message", "my_chat_member", "chat_member"):
        body = payload.get(kind)
        if isinstance(body, dict):
            chat = body.get("chat")
            if isinstance(chat, dict) and _id(chat.get("id")) is not None:
                return _id(chat["id"])
    for kind in ("callback_query", "pre_checkout_query", "shipping_query", "inline_query"):
        body = payload.get(kind)
        if isinstance(body, dict):
            sender = body.get("from")
            if isinstance(sender, dict) and _id(sender.get("id")) is not None:
                return _id(sender["id"])
    return None


def storable(payload: object) -> object:
    """The update with what PostgreSQL cannot store made harmless: NUL characters (text and jsonb
    refuse them) become U+FFFD, integers beyond 64 bits become strings. Everything else is kept."""
    if isinstance(payload, str):
        return payload.replace("\x00", "\ufffd") if "\x00" in payload else payload
    if isinstance(payload, bool):
        return payload
    if isinstance(payload, int):
        return payload if -INT64 <= payload < INT64 else str(payload)
    if isinstance(payload, dict):
        return {storable(key): storable(value) for key, value in payload.items()}
    if isinstance(payload, list):
        return [storable(item) for item in payload]
    return payload


@attrs.define(eq=False)
class Dispatcher:
    handler: Handler
    apology: Apology
    recorder: Recorder
    limiter: trio.CapacityLimiter
    nursery: trio.Nursery
    handler_timeout: float
    max_pending: int
    on_done: Callable[[str, float], None] | None = None
    queues: dict[int | None, collections.deque[tuple[int, Payload]]] = attrs.field(factory=dict)
    pending: int = 0
    #: Update ids queued or being handled (at most max_pending + max_concurrent_updates of them).
    known: set[int] = attrs.field(factory=set)
    accepting: bool = True
    _room: trio.Event = attrs.field(factory=trio.Event)
    in_handler: int = 0

    async def submit(self, update_id: int, payload: Payload) -> None:
        """Queue an update behind the earlier ones of its chat; waits while too many are queued.

        An update already queued or being handled (Telegram sent it again) is ignored."""
        if update_id in self.known:
            return
        while self.pending >= self.max_pending:
            await self._room.wait()
        if update_id in self.known:
            return
        self.known.add(update_id)
        key = chat_key(payload)
        if key is None:
            key = -update_id - (1 << 62)  # unique: an update without a chat is its own queue
        queue = self.queues.get(key)
        self.pending += 1
        if queue is None:
            queue = self.queues[key] = collections.deque()
            queue.append((update_id, payload))
            self.nursery.start_soon(self._drain, key, queue, name=f"chat:{key}")
        else:
            queue.append((update_id, payload))

    def stop_accepting(self) -> None:
        """Shutdown: finish the updates being handled, leave queued ones in the inbox."""
        self.accepting = False
        for queue in self.queues.values():
            self.pending -= len(queue)
            for update_id, _ in queue:
                self.known.discard(update_id)
            queue.clear()
        self._wake()

    async def _drain(self, key: int | None, queue: collections.deque[tuple[int, Payload]]) -> None:
        try:
            while queue and self.accepting:
                update_id, payload = queue[0]
                async with self.limiter:
                    if not self.accepting:
                        break
                    await self._handle_one(update_id, payload)
                if queue and queue[0][0] == update_id:
                    queue.popleft()
                    self.pending -= 1
                self.known.discard(update_id)
                self._wake()
        finally:
            if self.queues.get(key) is queue:
                del self.queues[key]

    async def _handle_one(self, update_id: int, payload: Payload) -> None:
        started = trio.current_time()
        outcome = "ok"
        self.in_handler += 1
        try:
            with trio.fail_after(self.handler_timeout), update_lane():
                await self.handler(update_id, payload)
        except Exception as exc:  # the error boundary; trio.Cancelled is not an Exception and passes
            outcome = "error"
            log.error(
                "event=update_failed update_id=%d error=%s",
                update_id,
                quote(f"{type(exc).__name__}: {exc}"[:300]),
                exc_info=not isinstance(exc, trio.TooSlowError),
            )
            await self._apologize(update_id, payload)
        finally:
            self.in_handler -= 1
        try:
            await self.recorder(update_id, outcome)
        except Exception as exc:  # e.g. PostgreSQL restarting: the update stays unhandled in the inbox
            log.warning(
                "event=update_outcome_not_recorded update_id=%d error=%s (handled again after a restart)",
                update_id,
                type(exc).__name__,
            )
        if self.on_done is not None:
            self.on_done(outcome, trio.current_time() - started)

    async def _apologize(self, update_id: int, payload: Payload) -> None:
        try:
            with trio.move_on_after(10):
                await self.apology(payload)
        except Exception as exc:
            log.warning("event=apology_failed update_id=%d error=%s", update_id, type(exc).__name__)

    def _wake(self) -> None:
        self._room.set()
        self._room = trio.Event()


@asynccontextmanager
async def open_dispatcher(
    handler: Handler,
    apology: Apology,
    recorder: Recorder,
    *,
    max_concurrent_updates: int,
    handler_timeout: float,
    max_pending: int = 1000,
    on_done: Callable[[str, float], None] | None = None,
) -> AsyncIterator[Dispatcher]:
    """The handler nursery. Exiting the block waits for every started handler."""
    async with trio.open_nursery() as nursery:
        dispatcher = Dispatcher(
            handler=handler,
            apology=apology,
            recorder=recorder,
            limiter=trio.CapacityLimiter(max_concurrent_updates),
            nursery=nursery,
            handler_timeout=handler_timeout,
            max_pending=max_pending,
            on_done=on_done,
        )
        yield dispatcher
