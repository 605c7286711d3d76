"""One outbound limiter for everything vpnd sends to Telegram: replies, the outbox and broadcasts.

Telegram allows about 30 messages per second overall and about one per second per chat (with short
bursts); past that it answers 429 with `retry_after`. Two token buckets keep us under both, and a
429 pauses *all* sending until `retry_after` has passed.

Replies to a user's own update have priority: bulk senders (outbox, broadcasts) may only take a
global token while more than `reserve` tokens are left, so a running broadcast never makes the bot
feel slow to the person talking to it.
"""

from __future__ import annotations

import enum

import attrs
import trio


class Priority(enum.Enum):
    REPLY = "reply"
    BULK = "bulk"


@attrs.define(eq=False)
class _Bucket:
    rate: float
    burst: float
    tokens: float
    stamp: float

    def refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_for(self, now: float, keep: float = 0.0) -> float:
        """Seconds until one token can be taken while leaving `keep` behind (0 = now)."""
        self.refill(now)
        missing = 1.0 + keep - self.tokens
        # Within a hair of a whole token counts as one: waiting nanoseconds would not advance a
        # float clock, and the loop in `_acquire` would spin.
        return 0.0 if missing <= 1e-6 else max(missing / self.rate, 0.001)


@attrs.define(eq=False)
class OutboundLimiter:
    rate_per_second: float = 25.0
    per_chat_per_second: float = 1.0
    chat_burst: float = 3.0
    #: Tokens of the global bucket that bulk senders leave for replies.
    reserve: float = 5.0
    #: Chats idle this long are forgotten (their bucket would be full anyway): bounded memory.
    forget_after: float = 60.0
    max_chats: int = 100_000

    _global: _Bucket = attrs.field(init=False)
    _chats: dict[int, _Bucket] = attrs.field(factory=dict, init=False)
    _paused_until: float = attrs.field(default=0.0, init=False)
    _lock: trio.Lock = attrs.field(factory=trio.Lock, init=False)
    _reserve_wanted: float = attrs.field(default=0.0, init=False)
    pauses: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        burst = max(1.0, self.rate_per_second)
        self._reserve_wanted = self.reserve
        self.reserve = min(self.reserve, burst - 1.0)
        self._global = _Bucket(self.rate_per_second, burst, burst, trio.current_time())

    def retune(self, rate_per_second: float, per_chat_per_second: float) -> None:
        """New rates (a configuration reload); tokens already earned are kept, up to the new burst."""
        now = trio.current_time()
        burst = max(1.0, rate_per_second)
        self.rate_per_second, self.per_chat_per_second = rate_per_second, per_chat_per_second
        self.reserve = min(self._reserve_wanted, burst - 1.0)
        self._global.refill(now)
        self._global.rate, self._global.burst = rate_per_second, burst
        self._global.tokens = min(self._global.tokens, burst)
        for bucket in self._chats.values():
            bucket.refill(now)
            bucket.rate = per_chat_per_second

    def pause(self, seconds: float) -> None:
        """A 429 said `retry_after`: nobody sends until then."""
        self.pauses += 1
        self._paused_until = max(self._paused_until, trio.current_time() + seconds)

    @property
    def paused_for(self) -> float:
        return max(0.0, self._paused_until - trio.current_time())

    async def acquire(self, chat_id: int, priority: Priority = Priority.REPLY) -> None:
        """Wait until one message to `chat_id` may be sent now, and account for it."""
        await self._acquire(chat_id, self.reserve if priority is Priority.BULK else 0.0)

    async def _acquire(self, chat_id: int, keep: float) -> None:
        while True:
            async with self._lock:
                now = trio.current_time()
                chat = self._chat(chat_id, now)
                wait = max(self._paused_until - now, self._global.wait_for(now, keep), chat.wait_for(now))
                if wait <= 0:
                    self._global.tokens -= 1
                    chat.tokens -= 1
                    return
            await trio.sleep(wait)

    def _chat(self, chat_id: int, now: float) -> _Bucket:
        bucket = self._chats.get(chat_id)
        if bucket is None:
            if len(self._chats) >= self.max_chats:
                self._forget_idle(now)
            bucket = self._chats[chat_id] = _Bucket(self.per_chat_per_second, self.chat_burst, self.chat_burst, now)
        return bucket

    def _forget_idle(self, now: float) -> None:
        for chat_id, bucket in list(self._chats.items()):
            if now - bucket.stamp > self.forget_after:
                del self._chats[chat_id]
        if len(self._chats) >= self.max_chats:  # still full: drop the oldest half
            for chat_id, _ in sorted(self._chats.items(), key=lambda kv: kv[1].stamp)[: self.max_chats // 2]:
                del self._chats[chat_id]

    @property
    def tracked_chats(self) -> int:
        return len(self._chats)
