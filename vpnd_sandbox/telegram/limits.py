"""Telegram's limits as the fake enforces them: sizes of texts and files, and the flood limits.

The flood limits answer 429 with ``retry_after`` like Telegram: a global limit over all chats (a token
bucket, or with ``strict_window`` a sliding one-second window), one per chat, and the separate window of
paid broadcasts. Their settings are :class:`~vpnd_sandbox.telegram.state.FakeTelegram` attributes.
"""

from __future__ import annotations

import collections
import math
from typing import TYPE_CHECKING

import attrs

from vpnd_sandbox.telegram.wire import ApiError, bad_request

if TYPE_CHECKING:
    from vpnd_sandbox.telegram.state import FakeTelegram

MAX_TEXT = 4096
MAX_CAPTION = 1024
MAX_PHOTO_BYTES = 10 * 1024 * 1024
MAX_DOCUMENT_BYTES = 50 * 1024 * 1024


@attrs.define
class TokenBucket:
    """Classic token bucket on Trio time: ``rate`` tokens per second, at most ``burst`` stored."""

    rate: float
    burst: float
    tokens: float
    stamp: float

    def _refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_time(self, now: float) -> float:
        """Seconds until one token is available (0 when one is available now)."""
        self._refill(now)
        if self.tokens >= 1:
            return 0.0
        return (1 - self.tokens) / self.rate

    def take(self, now: float) -> None:
        self._refill(now)
        self.tokens -= 1


def bucket(fake: FakeTelegram, existing: TokenBucket | None, rate: float, burst: float) -> TokenBucket:
    """`existing` while its settings still hold; a full one when they changed (or there was none)."""
    if existing is not None and existing.rate == rate and existing.burst == burst:
        return existing
    return TokenBucket(rate=rate, burst=burst, tokens=burst, stamp=fake.flood_clock())


def window_wait(window: collections.deque[float], limit: float, now: float) -> float:
    """Seconds until `window` (send times) has room for one more in the last second (0: now)."""
    while window and window[0] <= now - 1.0:
        window.popleft()
    allowed = max(1, math.floor(limit))
    if len(window) < allowed:
        return 0.0
    return window[len(window) - allowed] + 1.0 - now


def take_send_slot(fake: FakeTelegram, chat_id: int, *, paid: bool = False) -> None:
    """Charge one message to the global and the per-chat limits, or answer 429 with retry_after."""
    now = fake.flood_clock()
    if paid and fake.stars_balance is not None and fake.stars_balance < 0.1 - 1e-9:
        fake.paid_refused += 1
        raise bad_request("not enough Stars on the bot's balance for a paid broadcast")
    chat_bucket = bucket(fake, fake._chat_buckets.get(chat_id), fake.chat_rate, fake.chat_burst)
    fake._chat_buckets[chat_id] = chat_bucket
    if paid:
        global_wait = window_wait(fake._paid_window, fake.paid_rate, now)
    elif fake.strict_window:
        global_wait = window_wait(fake._free_window, fake.global_rate, now)
    else:
        fake._global_bucket = bucket(fake, fake._global_bucket, fake.global_rate, fake.global_burst)
        global_wait = fake._global_bucket.wait_time(now)
    wait = max(global_wait, chat_bucket.wait_time(now))
    if wait > 0:
        fake.rate_limited += 1
        retry_after = max(1, math.ceil(wait))
        raise ApiError(429, f"Too Many Requests: retry after {retry_after}", {"retry_after": retry_after})
    chat_bucket.take(now)
    if paid:
        fake._paid_window.append(now)
        fake.paid_send_times.append(now)
        if fake.stars_balance is not None:
            fake.stars_balance -= 0.1
        return
    if fake.strict_window:
        fake._free_window.append(now)
    elif fake._global_bucket is not None:
        fake._global_bucket.take(now)
    fake.send_times.append(now)
