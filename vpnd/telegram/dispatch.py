"""The update handler nursery: per-chat queues served fairly, the update limit, the error boundary.

    poller ── admit(batch) ─ record in the inbox (with the drops) ─ enqueue / dropped
    dispatcher nursery ── one task per chat with waiting updates
                          └── async with limiter:          (the only update limiter)
                                  error boundary:          (log once, polite reply, go on)
                                      with fail_after(handler timeout):
                                          handler(update)
                                  record the outcome in the inbox

**The `CapacityLimiter` is created here and used nowhere else**: background workers, the outbox and
broadcasts never wait on it (tests/audit checks this by reading the source). Updates of one chat are
handled one after another in update order; different chats run concurrently and take turns (the
limiter is FIFO and each chat's task queues for it once per update). A chat's queue is bounded
(`max_per_chat`): past it the chat's updates are dropped on purpose, recorded and counted, and never
another chat's. Memory is bounded overall too: the poller waits while `max_pending` updates are queued
(they wait at Telegram meanwhile, the offset unmoved). On shutdown, running handlers finish (within the
root's grace deadline) and queued ones stay in the inbox for the next start.
"""

from __future__ import annotations

import collections
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
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
#: Tells a user their update was dropped (outcome, payload, whether the "slow down" message is due).
DropNotice = Callable[[str, Payload, bool], Awaitable[None]]


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


def _queue_key(update_id: int, payload: Payload) -> int:
    """The queue an update waits in: its chat's, so a chat's updates are handled in order. A
    pre-checkout query has its own (Telegram wants the answer within 10 s, whatever else the chat sent),
    and so has an update without a chat."""
    if "pre_checkout_query" not in payload:
        key = chat_key(payload)
        if key is not None:
            return key
    return -update_id - (1 << 62)


#: Telegram's own updates nest a dozen levels at most; deeper is broken or hostile and is quarantined.
MAX_UPDATE_DEPTH = 64
QUARANTINED = "quarantined"


def nesting_depth(payload: object, *, stop_at: int = MAX_UPDATE_DEPTH + 1) -> int:
    """How deeply lists and objects nest in `payload` (0 for a scalar), counted without recursion and
    without looking deeper than `stop_at`."""
    deepest = 0
    stack: list[tuple[object, int]] = [(payload, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict | list):
            depth += 1
            deepest = max(deepest, depth)
            if depth < stop_at:
                stack.extend((item, depth) for item in (value.values() if isinstance(value, dict) else value))
    return deepest


def quarantine_record(payload: object, reason: str, *, limit: int = 65536) -> dict[str, Any]:
    """What the inbox keeps of an update that cannot be stored or handled: its text (pruned to a sane
    depth, cut to `limit` characters) and why."""
    pruned = _prune(payload, 16)
    text = json.dumps(pruned, ensure_ascii=False, default=repr)
    return {"quarantined": storable(text[:limit]), "reason": reason}


def _prune(payload: object, depth: int) -> object:
    """A copy of `payload` with anything nested deeper than `depth` replaced by "…" (no recursion)."""
    root: list[object] = [None]
    stack: list[tuple[object, Any, Any, int]] = [(payload, root, 0, 0)]
    while stack:
        value, parent, key, level = stack.pop()
        if isinstance(value, dict | list) and level >= depth:
            parent[key] = "…"
        elif isinstance(value, dict):
            copy: dict[Any, object] = {}
            parent[key] = copy
            stack.extend((item, copy, str(k), level + 1) for k, item in value.items())
        elif isinstance(value, list):
            items: list[object] = [None] * len(value)
            parent[key] = items
            stack.extend((item, items, index, level + 1) for index, item in enumerate(value))
        else:
            parent[key] = value
    return root[0]


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


#: Why an update was acknowledged without running its handler (the inbox's `outcome`).
DROPPED_BACKLOG = "dropped"  # its chat already had `max_per_chat` updates waiting
COALESCED = "coalesced"  # the same message or button press was already waiting in its chat

#: Updates that carry money or membership changes: never dropped or coalesced, whatever the backlog.
_NEVER_DROPPED = ("pre_checkout_query", "my_chat_member", "shipping_query")


def fingerprint(payload: Payload) -> tuple[str, object, object] | None:
    """What makes two updates of one chat interchangeable: the same text message, or the same button on
    the same message. None for anything else (payments, media, membership): such updates are never
    coalesced."""
    message = payload.get("message")
    if isinstance(message, dict):
        text = message.get("text")
        if isinstance(text, str) and set(message) <= _PLAIN_MESSAGE_KEYS:
            return ("text", text, None)
        return None
    query = payload.get("callback_query")
    if isinstance(query, dict) and isinstance(query.get("data"), str):
        on = query.get("message")
        message_id = on.get("message_id") if isinstance(on, dict) else None
        return ("button", query["data"], message_id if isinstance(message_id, int) else None)
    return None


def _press_on(payload: Payload) -> object | None:
    """The message a button press is on (None: not a press, or on no known message)."""
    print_ = fingerprint(payload)
    if print_ is not None and print_[0] == "button":
        return print_[2]
    return None


_PLAIN_MESSAGE_KEYS = frozenset(
    {"message_id", "from", "chat", "date", "text", "entities", "link_preview_options", "message_thread_id"}
)


def droppable(payload: Payload) -> bool:
    """May this update be dropped when its chat floods? Not when it carries a payment."""
    if any(kind in payload for kind in _NEVER_DROPPED):
        return False
    message = payload.get("message")
    return not (isinstance(message, dict) and "successful_payment" in message)


@attrs.define(eq=False)
class _Queued:
    update_id: int
    payload: Payload
    fingerprint: tuple[str, object, object] | None
    since: float
    #: Set while the poller records that a newer press on the same message supersedes this one.
    hold: trio.Event | None = None
    #: Recorded as superseded: skipped, never handled.
    superseded: bool = False


@attrs.define(eq=False)
class _Chat:
    """One chat's waiting updates (the first one is being handled while `running`)."""

    items: collections.deque[_Queued] = attrs.field(factory=collections.deque)
    running: bool = False


@attrs.frozen
class Admission:
    """The dispatcher's verdict on a batch: what to queue, and what to acknowledge without handling."""

    queue: list[tuple[int, Payload]]
    #: (update_id, outcome, payload) for updates dropped on purpose: DROPPED_BACKLOG or COALESCED.
    dropped: list[tuple[int, str, Payload]]
    #: Waiting button presses that a newer press on the same message supersedes (held until recorded).
    superseded: list[_Queued] = attrs.field(factory=list)


@attrs.frozen
class Backlog:
    """A snapshot for /metrics and the health check."""

    queued: int
    running: int
    chats: int
    #: Seconds the oldest waiting update of a chat that is not flooding has waited (0: none waiting).
    oldest_normal_seconds: float
    #: The same over every chat, flooders included.
    oldest_seconds: float
    flooding_chats: int


@attrs.define(eq=False)
class Dispatcher:
    """Per-chat queues served fairly under the one update limiter.

    Fairness comes from the structure: each chat with waiting updates has exactly one task, and that
    task takes the (FIFO) `CapacityLimiter` once per update, so chats take turns — a chat with 1,000
    updates waiting gets the same share of the handler slots as a chat with one. Each chat's queue holds
    at most `max_per_chat` updates; past that its updates are acknowledged and dropped on purpose
    (`admit` decides, the poller records the verdict in the inbox in the same transaction as the
    batch), and an update identical to one already waiting in its chat is coalesced. Payments are never
    dropped. Nothing another chat sends is ever affected.

    There is one producer (the poller, or the start-up recovery before it): `admit` then `enqueue` may
    have an await between them (the inbox write) during which queues can only shrink.
    """

    handler: Handler
    apology: Apology
    recorder: Recorder
    limiter: trio.CapacityLimiter
    nursery: trio.Nursery
    handler_timeout: float
    max_pending: int
    max_per_chat: int = 20
    #: Seconds a chat counts as flooding after its last dropped update.
    flood_window: float = 60.0
    on_done: Callable[[str, float], None] | None = None
    #: Called (without awaiting) for each update dropped on purpose: (outcome, payload, notice_due).
    on_dropped: Callable[[str, Payload, bool], None] | None = None
    chats: dict[int, _Chat] = attrs.field(factory=dict)
    pending: int = 0
    #: Update ids queued or being handled (at most max_pending + max_concurrent_updates of them).
    known: set[int] = attrs.field(factory=set)
    accepting: bool = True
    _room: trio.Event = attrs.field(factory=trio.Event)
    in_handler: int = 0
    #: chat -> when it last had an update dropped (bounded: entries older than flood_window go).
    _flooding: dict[int, float] = attrs.field(factory=dict)
    #: chat -> when it was last told to slow down.
    _noticed: dict[int, float] = attrs.field(factory=dict)
    dropped_total: int = 0

    async def wait_for_room(self, count: int) -> None:
        """Memory bound over all chats: wait while fewer than `count` slots are free. Only many busy
        chats at once can fill it (one chat holds at most `max_per_chat`); the updates wait durably at
        Telegram meanwhile, since the offset has not moved."""
        while self.pending + count > max(self.max_pending, count):
            await self._room.wait()

    def admit(self, updates: Iterable[tuple[int, Payload]]) -> Admission:
        """Decide, for a batch in update order, which updates to queue and which to drop on purpose.

        A button press supersedes the presses on the same message that still wait (their edits would be
        overwritten by its own): those are held, and skipped once the poller has recorded the batch
        (`dropped`), or released if it could not (`abandon`). The same text message as one still
        waiting is coalesced. Past `max_per_chat` waiting updates, a chat's new ones are dropped. Either
        `dropped` or `abandon` must follow, and `enqueue` for the `queue` part once recorded."""
        now = trio.current_time()
        batch = [(uid, payload) for uid, payload in updates if uid not in self.known]
        last_press: dict[tuple[int, object], int] = {}
        for update_id, payload in batch:
            press = _press_on(payload)
            if press is not None:
                last_press[(_queue_key(update_id, payload), press)] = update_id
        extra: dict[int, int] = {}
        texts: dict[int, set[object]] = {}
        admission = Admission([], [])
        for update_id, payload in batch:
            key = _queue_key(update_id, payload)
            chat = self.chats.get(key)
            waiting = [q for q in chat.items if not q.superseded and q.hold is None] if chat else []
            if chat is not None and chat.running and waiting and waiting[0] is chat.items[0]:
                waiting = waiting[1:]  # the one being handled is not waiting
            if droppable(payload):
                press = _press_on(payload)
                print_ = fingerprint(payload)
                if press is not None:
                    if last_press[(key, press)] != update_id:
                        admission.dropped.append((update_id, COALESCED, payload))  # a later press in this batch
                        continue
                    for item in waiting:
                        if _press_on(item.payload) == press:
                            item.hold = trio.Event()
                            admission.superseded.append(item)
                    waiting = [q for q in waiting if q.hold is None]
                elif print_ is not None:
                    seen = texts.setdefault(key, {q.fingerprint for q in waiting})
                    if print_ in seen:
                        admission.dropped.append((update_id, COALESCED, payload))
                        continue
                    seen.add(print_)
                if len(waiting) + extra.get(key, 0) >= self.max_per_chat:
                    admission.dropped.append((update_id, DROPPED_BACKLOG, payload))
                    self._flooding[key] = now
                    continue
            extra[key] = extra.get(key, 0) + 1
            admission.queue.append((update_id, payload))
        return admission

    def abandon(self, admission: Admission) -> None:
        """The batch could not be recorded (Telegram will send it again): release what `admit` held."""
        for item in admission.superseded:
            hold, item.hold = item.hold, None
            if hold is not None:
                hold.set()

    def enqueue(self, update_id: int, payload: Payload) -> None:
        """Queue an admitted update behind the earlier ones of its chat."""
        if update_id in self.known or not self.accepting:
            return
        self.known.add(update_id)
        key = _queue_key(update_id, payload)
        chat = self.chats.get(key)
        self.pending += 1
        item = _Queued(update_id, payload, fingerprint(payload), trio.current_time())
        if chat is None:
            chat = self.chats[key] = _Chat()
            chat.items.append(item)
            self.nursery.start_soon(self._drain, key, chat, name=f"chat:{key}")
        else:
            chat.items.append(item)

    def dropped(self, admission: Admission) -> None:
        """The batch and its drops are recorded: skip the superseded presses, count the drops, and let
        the users know (best effort, not awaited)."""
        now = trio.current_time()
        for item in admission.superseded:
            item.superseded = True
            hold, item.hold = item.hold, None
            if hold is not None:
                hold.set()
        dropped = [*admission.dropped, *((q.update_id, COALESCED, q.payload) for q in admission.superseded)]
        for _, outcome, payload in dropped:
            self.dropped_total += 1
            key = chat_key(payload)
            notice_due = False
            if key is not None and outcome == DROPPED_BACKLOG:
                last = self._noticed.get(key)
                notice_due = last is None or now - last >= self.flood_window
                if notice_due:
                    self._noticed[key] = now
            if self.on_dropped is not None:
                self.on_dropped(outcome, payload, notice_due)
        self._forget_old(now)

    async def submit(self, update_id: int, payload: Payload) -> None:
        """Admit and queue one update already recorded in the inbox (start-up recovery); an update
        the flood rules would drop is queued anyway — it was accepted before the restart."""
        await self.wait_for_room(1)
        self.enqueue(update_id, payload)

    def stop_accepting(self) -> None:
        """Shutdown: finish the updates being handled, leave queued ones in the inbox."""
        self.accepting = False
        for chat in self.chats.values():
            keep = 1 if chat.running and chat.items else 0
            while len(chat.items) > keep:
                item = chat.items.pop()
                self.pending -= 1
                self.known.discard(item.update_id)
        self._wake()

    def backlog(self) -> Backlog:
        now = trio.current_time()
        oldest = oldest_normal = 0.0
        running = 0
        for key, chat in self.chats.items():
            running += chat.running
            if not chat.items:
                continue
            age = now - chat.items[0].since
            oldest = max(oldest, age)
            if not self._is_flooding(key, now):
                oldest_normal = max(oldest_normal, age)
        flooding = sum(1 for key in self._flooding if self._is_flooding(key, now))
        return Backlog(self.pending - running, running, len(self.chats), oldest_normal, oldest, flooding)

    def _is_flooding(self, key: int, now: float) -> bool:
        since = self._flooding.get(key)
        return since is not None and now - since < self.flood_window

    def _forget_old(self, now: float) -> None:
        if len(self._flooding) + len(self._noticed) < 1024:
            return
        for table in (self._flooding, self._noticed):
            for key, at in list(table.items()):
                if now - at >= self.flood_window:
                    del table[key]

    async def _drain(self, key: int, chat: _Chat) -> None:
        try:
            while chat.items and self.accepting:
                item = chat.items[0]
                if item.hold is not None:
                    await item.hold.wait()  # the poller is recording whether a newer press supersedes it
                if item.superseded:
                    chat.items.popleft()
                    self.pending -= 1
                    self.known.discard(item.update_id)
                    self._wake()
                    continue
                async with self.limiter:
                    if not self.accepting:
                        break
                    chat.running = True
                    await self._handle_one(item.update_id, item.payload)
                chat.running = False
                if chat.items and chat.items[0] is item:
                    chat.items.popleft()
                    self.pending -= 1
                self.known.discard(item.update_id)
                self._wake()
        finally:
            chat.running = False
            if self.chats.get(key) is chat:
                del self.chats[key]
                # stop_accepting left the running update counted; it is done (or cancelled) now.
                for item in chat.items:
                    self.pending -= 1
                    self.known.discard(item.update_id)
                chat.items.clear()
                self._wake()

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


#: Drop notices waiting to be sent; past this they are skipped (the drop itself is recorded anyway).
NOTICE_QUEUE = 512
NOTICE_SENDERS = 4


@asynccontextmanager
async def open_dispatcher(
    handler: Handler,
    apology: Apology,
    recorder: Recorder,
    *,
    max_concurrent_updates: int,
    handler_timeout: float,
    max_pending: int = 1000,
    max_per_chat: int = 20,
    flood_window: float = 60.0,
    on_done: Callable[[str, float], None] | None = None,
    drop_notice: DropNotice | None = None,
) -> AsyncIterator[Dispatcher]:
    """The handler nursery. Exiting the block waits for every started handler.

    `drop_notice(outcome, payload, notice_due)` tells a user whose update was dropped (answers the
    button press; the "slow down" message when `notice_due`): a few tasks send them from a bounded
    queue, so a flood never makes the poller wait on Telegram."""
    async with trio.open_nursery() as nursery:
        on_dropped = None
        if drop_notice is not None:
            send, receive = trio.open_memory_channel[tuple[str, Payload, bool]](NOTICE_QUEUE)
            for _ in range(NOTICE_SENDERS):
                nursery.start_soon(_send_notices, receive.clone(), drop_notice)

            def on_dropped(outcome: str, payload: Payload, notice_due: bool) -> None:
                try:
                    send.send_nowait((outcome, payload, notice_due))
                except trio.WouldBlock:
                    log.info("event=drop_notice_skipped detail=%s", quote("notice queue full"))

        dispatcher = Dispatcher(
            handler=handler,
            apology=apology,
            recorder=recorder,
            limiter=trio.CapacityLimiter(max_concurrent_updates),
            nursery=nursery,
            handler_timeout=handler_timeout,
            max_pending=max_pending,
            max_per_chat=max_per_chat,
            flood_window=flood_window,
            on_done=on_done,
            on_dropped=on_dropped,
        )
        try:
            yield dispatcher
        finally:
            if drop_notice is not None:
                send.close()


async def _send_notices(receive: trio.MemoryReceiveChannel[tuple[str, Payload, bool]], notice: DropNotice) -> None:
    async with receive:
        async for outcome, payload, notice_due in receive:
            try:
                with trio.move_on_after(10):
                    await notice(outcome, payload, notice_due)
            except Exception as exc:  # best effort: the drop is recorded whatever happens here
                log.info("event=drop_notice_failed error=%s", type(exc).__name__)
