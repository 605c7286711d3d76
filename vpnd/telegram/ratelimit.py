"""One outbound limiter for everything vpnd sends to Telegram: replies, edits, the outbox and broadcasts.

Telegram allows about 30 messages per second overall — counted in *any* one second, not per calendar
second — and per chat a short burst, then about one per second; past that it answers 429 with
`retry_after`, and bots that keep doing it get longer and longer ones. The limits here are built so
that they hold in every window, not just on average:

* **Global: a sliding-window log.** Every send's time is kept for `window + margin` seconds; a send may
  go when fewer than `limit` (= floor(rate_per_second)) are in that span. Hence no interval of length
  `window + margin` ever holds more than `limit` sends — whatever happened before, idle moments
  included (a token bucket with burst = rate allowed twice the rate in a sliding second after an idle
  moment; that was issue 21). The `margin` absorbs jitter in the time a request takes to reach
  Telegram: with sends ≤ limit in every `window + margin`, arrivals are ≤ limit in every `window` as long
  as their delays differ by at most `margin`.
* **Priority.** Bulk sends (the outbox, broadcasts) are spaced evenly — one every
  `(window + margin) / limit` seconds — instead of leaving in bursts, so a window full of bulk sends
  frees a slot every interval. While replies are active (one went out in the last window, or one is
  waiting), bulk may only take a slot while more than `reserve` are free: those are left to replies,
  and a waiting reply takes the next slot that frees before any bulk send. So the first reply after a
  quiet moment waits at most one bulk interval (40 ms at 25/s), the following ones only for other
  replies — and a broadcast runs at the full rate while nobody talks to the bot. `reserve` is at most
  a fifth of the limit (at least 1), so a small limit still leaves bulk most of it.
* **Smooth, so that jitter does not bunch sends up at Telegram.** Bulk is spaced evenly (above);
  replies may leave `reply_burst` at once, then one per interval too. So the sends of any short span
  `j` are at most about `reply_burst + 1 + 2 * limit * j`, and a window at Telegram's end, which sees
  the sends of `window + jitter`, gets at most `limit` plus that: the headroom between
  `rate_per_second` (25) and Telegram's 30 covers `reply_burst` plus tens of milliseconds of jitter.
  A sliding window alone lets a full window leave in one burst, and a burst that left late plus one
  that left early can land in the same second at Telegram.
* **Per chat: a small-burst bucket** (`chat_burst` then `per_chat_per_second`): any interval of length
  `w` holds at most `chat_burst + per_chat_per_second * w` messages to one chat. Every call that shows
  something in a chat counts — replies, edits (a broadcast's progress message in the admin's chat
  too), bulk sends; callback answers do not (they show nothing in the chat).
* **Paid broadcasts** (`allow_paid_broadcast`, up to 1,000 messages/s for Stars) use a second
  window of `paid_rate_per_second`: their sends count there and not against the free limit, while
  every other send counts in both, so everything together stays under the paid limit and the unpaid
  sends under the free one. The paid lane is off while `paid_rate_per_second` is 0.
* **429.** `pause(retry_after)` stops *all* sending until then (Telegram's flood control is per bot).

Nothing here awaits while it changes its state (Trio switches tasks only at an await), so no lock
is needed; waiters re-check after each sleep.
"""

from __future__ import annotations

import collections
import enum
import math

import attrs
import trio

from vpnd.config import Config

#: Sleeps are at least this long, so a float clock always moves on (no busy loop).
MIN_SLEEP = 0.0005
#: How late a bulk send may be and still keep the schedule (see `_take`).
BULK_SLACK = 0.005
#: A stamp this close to expiring counts as expired (float rounding on Trio's clock).
EPSILON = 1e-9


class Priority(enum.Enum):
    REPLY = "reply"
    BULK = "bulk"


@attrs.define(eq=False)
class SlidingWindow:
    """At most `limit` events in any interval of `span` seconds (a log of the recent events' times)."""

    limit: int
    span: float
    stamps: collections.deque[float] = attrs.field(factory=collections.deque)

    def _expire(self, now: float) -> None:
        stamps, horizon = self.stamps, now - self.span + EPSILON
        while stamps and stamps[0] <= horizon:
            stamps.popleft()

    def wait_for(self, now: float, keep: int = 0) -> float:
        """Seconds until one more event fits while leaving `keep` places free (0 = now)."""
        self._expire(now)
        allowed = self.limit - keep
        if allowed <= 0:
            return self.span  # nothing may go this way at all: look again later
        excess = len(self.stamps) - allowed  # this many must expire first, plus one
        if excess < 0:
            return 0.0
        return max(self.stamps[excess] + self.span - now, MIN_SLEEP)

    def add(self, now: float) -> None:
        self.stamps.append(now)

    def count(self, now: float) -> int:
        self._expire(now)
        return len(self.stamps)


@attrs.define(eq=False)
class _Bucket:
    """A token bucket: at most `burst + rate * w` takes in any interval of `w` seconds."""

    rate: float
    burst: float
    tokens: float
    stamp: float

    def refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_for(self, now: float) -> float:
        self.refill(now)
        missing = 1.0 - self.tokens
        return 0.0 if missing <= 1e-6 else max(missing / self.rate, MIN_SLEEP)


def _window_limit(rate: float) -> int:
    return max(1, math.floor(rate + 1e-9))


@attrs.define(eq=False)
class OutboundLimiter:
    rate_per_second: float = 25.0
    per_chat_per_second: float = 1.0
    chat_burst: float = 3.0
    #: Places of every window that bulk senders leave for replies.
    reserve: int = 5
    #: Up to this many messages per second for paid broadcasts (0: no paid lane).
    paid_rate_per_second: float = 0.0
    #: Replies may leave this many at once, then one per `(window + margin) / limit` (see the docstring).
    reply_burst: int = 5
    #: The window Telegram counts in, and the safety margin added to it (see the module docstring).
    window: float = 1.0
    margin: float = 0.02
    #: Chats whose bucket is full again are forgotten (a full bucket is what a new chat gets), swept
    #: at most once per `sweep_interval`: memory stays proportional to the chats of the last seconds,
    #: not to every chat a 100,000-recipient broadcast has touched. `max_chats` is the hard bound.
    sweep_interval: float = 1.0
    max_chats: int = 100_000

    _free: SlidingWindow = attrs.field(init=False)
    _paid: SlidingWindow | None = attrs.field(default=None, init=False)
    _chats: dict[int, _Bucket] = attrs.field(factory=dict, init=False)
    _paused_until: float = attrs.field(default=0.0, init=False)
    #: The bulk schedule per lane (free, paid): its next send is due then (even spacing).
    _next_bulk: dict[bool, float] = attrs.field(factory=lambda: {False: 0.0, True: 0.0}, init=False)
    _reserve_wanted: int = attrs.field(default=0, init=False)
    _next_sweep: float = attrs.field(default=0.0, init=False)
    #: Replies are active while one went out in the last span or one is waiting.
    _last_reply: float = attrs.field(default=-math.inf, init=False)
    #: The replies' schedule (GCRA): the next reply is due then; up to reply_burst - 1 may go early.
    _reply_due: float = attrs.field(default=-math.inf, init=False)
    #: Replies waiting, in arrival order (ticket → chat): the first whose chat may send goes first.
    _reply_queue: dict[int, int] = attrs.field(factory=dict, init=False)
    _tickets: int = attrs.field(default=0, init=False)
    pauses: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        self._reserve_wanted = self.reserve
        self._free = SlidingWindow(1, self.span)
        self.retune(self.rate_per_second, self.per_chat_per_second, self.paid_rate_per_second)

    @classmethod
    def from_config(cls, config: Config) -> OutboundLimiter:
        limiter = cls(config.telegram.rate_per_second, config.telegram.per_chat_per_second)
        limiter.apply(config)
        return limiter

    def apply(self, config: Config) -> None:
        """The rates of `config` (at start and on SIGHUP); the paid lane exists while `[broadcast] paid`."""
        paid = config.broadcast.paid_rate_per_second if config.broadcast.paid else 0.0
        self.retune(config.telegram.rate_per_second, config.telegram.per_chat_per_second, paid)

    @property
    def span(self) -> float:
        return self.window + self.margin

    def retune(
        self, rate_per_second: float, per_chat_per_second: float, paid_rate_per_second: float | None = None
    ) -> None:
        """New rates (a configuration reload); sends already made keep counting in their windows."""
        now = trio.current_time()
        self.rate_per_second, self.per_chat_per_second = rate_per_second, per_chat_per_second
        self._free.limit = _window_limit(rate_per_second)
        self.reserve = max(0, min(self._reserve_wanted, max(1, self._free.limit // 5), self._free.limit - 1))
        if paid_rate_per_second is not None:
            self.paid_rate_per_second = paid_rate_per_second
        if self.paid_rate_per_second > 0:
            limit = max(_window_limit(self.paid_rate_per_second), self._free.limit)
            if self._paid is None:
                self._paid = SlidingWindow(limit, self.span)
            self._paid.limit = limit
        else:
            self._paid = None
        for bucket in self._chats.values():
            bucket.refill(now)
            bucket.rate = per_chat_per_second

    def bulk_rate(self, *, paid: bool = False, replies_active: bool = False) -> float:
        """The steady pace of bulk sends, messages per second: the whole limit while nobody talks to
        the bot, the limit less the reserve while replies are active."""
        lane = self._paid if paid and self._paid is not None else self._free
        return max(1, lane.limit - (self.reserve if replies_active else 0)) / self.span

    def _interval(self) -> float:
        return self.span / self._free.limit

    def _replies_active(self, now: float) -> bool:
        return bool(self._reply_queue) or now - self._last_reply < self.span

    def pause(self, seconds: float) -> None:
        """A 429 said `retry_after`: nobody sends until then."""
        self.pauses += 1
        self._paused_until = max(self._paused_until, trio.current_time() + seconds)

    @property
    def paused_for(self) -> float:
        return max(0.0, self._paused_until - trio.current_time())

    async def acquire(self, chat_id: int, priority: Priority = Priority.REPLY, *, paid: bool = False) -> None:
        """Wait until one message to `chat_id` may be sent now, and account for it.

        `paid`: a bulk send with `allow_paid_broadcast` (uses the paid lane when there is one)."""
        bulk = priority is Priority.BULK
        paid = paid and bulk and self._paid is not None
        ticket = None
        try:
            while True:
                now = trio.current_time()
                wait = self._wait_for(chat_id, now, bulk=bulk, paid=paid)
                if wait <= 0 and not bulk and self._earlier_reply_ready(ticket or self._tickets + 1, now):
                    wait = MIN_SLEEP  # it goes first; look again right after
                if wait <= 0:
                    self._take(chat_id, now, bulk=bulk, paid=paid)
                    return
                if not bulk and ticket is None:
                    ticket = self._tickets = self._tickets + 1
                    self._reply_queue[ticket] = chat_id
                await trio.sleep(wait)
        finally:
            if ticket is not None:
                del self._reply_queue[ticket]

    def _earlier_reply_ready(self, ticket: int, now: float) -> bool:
        """Is a reply that came before `ticket` waiting and free to go (its chat allows it)?"""
        for earlier, chat_id in self._reply_queue.items():
            if earlier >= ticket:
                return False
            bucket = self._chats.get(chat_id)  # forgotten: full, so free to go
            if bucket is None or bucket.wait_for(now) <= 0:
                return True
        return False

    def _wait_for(self, chat_id: int, now: float, *, bulk: bool, paid: bool) -> float:
        keep = self.reserve if bulk and self._replies_active(now) else 0
        waits = [self._paused_until - now, self._chat(chat_id, now).wait_for(now)]
        if bulk:
            waits.append(self._next_bulk[paid] - now)
        else:
            waits.append(self._reply_due - (self.reply_burst - 1) * self._interval() - now)
        if self._paid is not None:
            waits.append(self._paid.wait_for(now, keep))
        if not paid:
            waits.append(self._free.wait_for(now, keep))
        wait = max(waits)
        if keep and wait > 0:
            wait = min(wait, self.span / 4)  # standing back for replies: look again when they are gone
        return wait if wait <= 0 else max(wait, MIN_SLEEP)

    def _take(self, chat_id: int, now: float, *, bulk: bool, paid: bool) -> None:
        self._chat(chat_id, now).tokens -= 1
        if self._paid is not None:
            self._paid.add(now)
        if not paid:
            self._free.add(now)
        if not bulk:
            self._last_reply = now
            self._reply_due = max(self._reply_due, now) + self._interval()
        if bulk:
            # Even spacing: the schedule advances one interval per send. A send up to half an interval
            # (at least 5 ms: timer wake-ups are late by about a millisecond, a paid interval is 1 ms)
            # late keeps the schedule, so scheduling delays do not slow the average pace; a later one
            # (after an idle moment) restarts it from now, so no burst is saved up.
            interval = 1.0 / self.bulk_rate(paid=paid)
            slack = max(interval / 2, BULK_SLACK)
            self._next_bulk[paid] = max(self._next_bulk[paid], now - slack) + interval

    def _chat(self, chat_id: int, now: float) -> _Bucket:
        bucket = self._chats.get(chat_id)
        if bucket is None:
            if now >= self._next_sweep or len(self._chats) >= self.max_chats:
                self._forget_full(now)
            bucket = self._chats[chat_id] = _Bucket(self.per_chat_per_second, self.chat_burst, self.chat_burst, now)
        return bucket

    def _forget_full(self, now: float) -> None:
        self._next_sweep = now + self.sweep_interval
        for chat_id, bucket in list(self._chats.items()):
            if bucket.tokens + (now - bucket.stamp) * bucket.rate >= bucket.burst:
                del self._chats[chat_id]
        if len(self._chats) >= self.max_chats:  # still full: drop the oldest half
            for chat_id, _ in sorted(self._chats.items(), key=lambda kv: kv[1].stamp)[: self.max_chats // 2]:
                del self._chats[chat_id]

    @property
    def tracked_chats(self) -> int:
        return len(self._chats)

    def sends_in_window(self) -> int:
        """Sends counted against the free limit in the current window (for tests and /metrics)."""
        return self._free.count(trio.current_time())
