"""The outbound limiter on Trio's autojump clock: no sliding window ever holds more than the limits.

Every test records the (virtual) time of each granted send and checks *every* window that starts at a
send — the only places a maximum can begin — rather than calendar seconds.
"""

from __future__ import annotations

import collections
import itertools
import random

import trio
import trio.testing

from vpnd.telegram.ratelimit import OutboundLimiter, Priority


def max_in_any_window(times: list[float], window: float = 1.0) -> int:
    """The most events in any half-open interval [t, t + window)."""
    times = sorted(times)
    best, start = 0, 0
    for end, at in enumerate(times):
        while at - times[start] >= window:
            start += 1
        best = max(best, end - start + 1)
    return best


def assert_chat_bursts_bounded(times: list[float], burst: float, rate: float) -> None:
    """Per chat: any interval of length w holds at most burst + rate * w sends."""
    times = sorted(times)
    for i, first in enumerate(times):
        for j in range(i, len(times)):
            assert j - i + 1 <= burst + rate * (times[j] - first) + 1e-6, (times[i : j + 1], burst, rate)


async def test_no_sliding_second_holds_more_than_the_limit_under_mixed_load_and_after_idle(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Bulk senders saturate, replies arrive in bursts, everything goes idle, then a burst again:
    no one-second window (anywhere, also straddling the idle moment) exceeds the global limit, and
    no chat exceeds its burst + rate."""
    limiter = OutboundLimiter(rate_per_second=25, per_chat_per_second=1, chat_burst=3, reserve=5)
    rng = random.Random(21)
    sent: list[float] = []
    by_chat: dict[int, list[float]] = collections.defaultdict(list)

    async def send(chat_id: int, priority: Priority) -> None:
        await limiter.acquire(chat_id, priority)
        sent.append(trio.current_time())
        by_chat[chat_id].append(trio.current_time())

    async def bulk(first: int, count: int) -> None:
        for chat_id in range(first, first + count):
            await send(chat_id, Priority.BULK)

    async def replies(rounds: int) -> None:
        for _ in range(rounds):
            async with trio.open_nursery() as burst:
                for _ in range(rng.randint(1, 12)):
                    burst.start_soon(send, rng.randint(1, 20), Priority.REPLY)
            await trio.sleep(rng.uniform(0.0, 0.7))

    # Phase 1: a broadcast (8 workers) and talkative users.
    async with trio.open_nursery() as nursery:
        for worker in range(8):
            nursery.start_soon(bulk, 1000 + worker * 1000, 40)
        nursery.start_soon(replies, 30)
    # An idle moment shorter than a window, then everything at once: the old bucket (burst = rate)
    # allowed ~2x the rate here.
    await trio.sleep(0.6)
    async with trio.open_nursery() as nursery:
        for chat_id in range(100, 160):
            nursery.start_soon(send, chat_id, Priority.REPLY)
        for worker in range(4):
            nursery.start_soon(bulk, 20_000 + worker * 1000, 10)

    assert len(sent) == 8 * 40 + 60 + 40 + sum(len(v) for k, v in by_chat.items() if 1 <= k <= 20)
    assert max_in_any_window(sent) <= 25
    # The margin (20 ms) holds too: no 1.02-second span has more than the limit.
    assert max_in_any_window(sent, 1.0 + limiter.margin - 1e-6) <= 25
    for times in by_chat.values():
        assert_chat_bursts_bounded(times, 3, 1)


async def test_bulk_runs_at_the_full_rate_when_nobody_talks_and_stands_back_for_replies(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limiter = OutboundLimiter(rate_per_second=25, per_chat_per_second=1, chat_burst=3, reserve=5)
    bulk_times: list[float] = []
    reply_waits: list[float] = []
    talk = trio.Event()

    async def bulk(first: int) -> None:
        for chat_id in range(first, first + 60):
            await limiter.acquire(chat_id, Priority.BULK)
            bulk_times.append(trio.current_time())

    async def replies() -> None:
        await trio.sleep(10.0)
        talk.set()
        # 4 replies a second (under the reserve of 5), each to a fresh chat.
        for i in range(40):
            asked = trio.current_time()
            await limiter.acquire(1_000_000 + i, Priority.REPLY)
            reply_waits.append(trio.current_time() - asked)
            await trio.sleep(0.25)

    async with trio.open_nursery() as nursery:
        for worker in range(8):
            nursery.start_soon(bulk, 10_000 * (worker + 1))
        nursery.start_soon(replies)

    # Nobody talking (the first 10 s): bulk at >= 0.95 of the configured rate, evenly spaced.
    quiet = sorted(t for t in bulk_times if t < 10.0)
    pace = (len(quiet) - 1) / (quiet[-1] - quiet[0])
    assert 0.95 * 25 <= pace <= 25 * 1.001
    gaps = [b - a for a, b in itertools.pairwise(quiet)]
    assert sum(1 for g in gaps if g < 0.01) <= 1  # at most the one early send a schedule allows
    # Talking: the first reply waits at most one bulk interval, the others not at all, and bulk
    # leaves the reserve to them.
    assert reply_waits[0] <= limiter.span / 25 + 1e-6
    assert reply_waits[1:] == [0.0] * 39
    talking = [t for t in bulk_times if 11.5 <= t < 19.0]
    assert max_in_any_window(talking) <= 20
    assert max_in_any_window(bulk_times) <= 25


async def test_429_pauses_every_lane_and_every_chat(autojump_clock: trio.testing.MockClock) -> None:
    limiter = OutboundLimiter(rate_per_second=25, paid_rate_per_second=1000)
    limiter.pause(3.0)
    start = trio.current_time()
    granted: list[float] = []

    async def one(chat_id: int, priority: Priority, paid: bool) -> None:
        await limiter.acquire(chat_id, priority, paid=paid)
        granted.append(trio.current_time() - start)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one, 1, Priority.REPLY, False)
        nursery.start_soon(one, 2, Priority.BULK, False)
        nursery.start_soon(one, 3, Priority.BULK, True)
    assert min(granted) >= 3.0 and limiter.pauses == 1


async def test_paid_lane_goes_past_the_free_limit_but_never_past_its_own(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limiter = OutboundLimiter(rate_per_second=25, per_chat_per_second=1, paid_rate_per_second=1000, reserve=5)
    paid: list[float] = []
    replies: list[float] = []

    async def bulk(first: int) -> None:
        for chat_id in range(first, first + 400):
            await limiter.acquire(chat_id, Priority.BULK, paid=True)
            paid.append(trio.current_time())

    async def talk() -> None:
        for i in range(200):
            await limiter.acquire(5_000_000 + i, Priority.REPLY)
            replies.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        for worker in range(10):
            nursery.start_soon(bulk, 100_000 * (worker + 1))
        nursery.start_soon(talk)

    assert max_in_any_window(paid + replies) <= 1000
    assert max_in_any_window(replies) <= 25  # the unpaid sends keep the free limit
    assert max_in_any_window(paid) > 25  # the paid lane really is faster
    pace = (len(paid) - 1) / (max(paid) - min(paid))
    assert pace >= 0.95 * limiter.bulk_rate(paid=True)


async def test_retune_applies_new_limits_to_windows_already_running(autojump_clock: trio.testing.MockClock) -> None:
    limiter = OutboundLimiter(rate_per_second=25, per_chat_per_second=100, chat_burst=100, reserve=0)
    sent: list[float] = []

    async def burst(n: int, first: int) -> None:
        for chat_id in range(first, first + n):
            await limiter.acquire(chat_id)
            sent.append(trio.current_time())

    await burst(25, 0)
    limiter.retune(10, 100)
    await burst(30, 100)
    assert max_in_any_window(sent[25:]) <= 10
    assert max_in_any_window(sent) <= 25


async def test_memory_follows_the_recent_chats_not_every_chat_ever_sent_to(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A broadcast touches each recipient once: their buckets are forgotten once full again, so a
    20,000-recipient run at 1,000/s tracks a few seconds' worth of chats, not 20,000."""
    limiter = OutboundLimiter(rate_per_second=25, per_chat_per_second=1, chat_burst=3, paid_rate_per_second=1000)
    peak = 0

    async def bulk(first: int) -> None:
        nonlocal peak
        for chat_id in range(first, first + 2000):
            await limiter.acquire(chat_id, Priority.BULK, paid=True)
            peak = max(peak, limiter.tracked_chats)

    async with trio.open_nursery() as nursery:
        for worker in range(10):
            nursery.start_soon(bulk, 100_000 * (worker + 1))
    # Full again after burst / rate = 3 s, swept every second: about 4 s of sends at ~1,000/s.
    assert peak <= 4.5 * 1000


async def test_a_burst_of_replies_leaves_smoothly_not_as_one_block(autojump_clock: trio.testing.MockClock) -> None:
    """60 replies at once: `reply_burst` go at once, the rest one per interval — so jitter on the way to
    Telegram cannot bunch two blocks of a full window into one second there."""
    limiter = OutboundLimiter(rate_per_second=25, per_chat_per_second=1, chat_burst=3, reply_burst=5)
    sent: list[float] = []

    async def reply(chat_id: int) -> None:
        await limiter.acquire(chat_id)
        sent.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        for chat_id in range(60):
            nursery.start_soon(reply, chat_id)
    interval = limiter.span / 25
    assert sorted(sent)[:5] == [0.0] * 5
    for span in (0.1, 0.2, 0.5):  # any short span: the burst plus the rate, never a whole window
        assert max_in_any_window(sent, span) <= 5 + span / interval + 1e-6
    assert max_in_any_window(sent) <= 25


async def test_waiting_replies_go_in_arrival_order(autojump_clock: trio.testing.MockClock) -> None:
    """Replies that wait are served first come, first served (no unlucky user waiting round after
    round), except that one whose own chat must wait does not hold up the others."""
    limiter = OutboundLimiter(rate_per_second=10, per_chat_per_second=1, chat_burst=1, reply_burst=2)
    granted: list[int] = []
    await limiter.acquire(7)  # chat 7 has spent its burst: its next message waits a second

    async def reply(n: int, chat_id: int) -> None:
        await trio.sleep(0.001 * n)
        await limiter.acquire(chat_id)
        granted.append(n)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reply, 0, 7)
        for n in range(1, 30):
            nursery.start_soon(reply, n, 100 + n)
    assert granted.index(0) > 0  # chat 7 waited for its own bucket, the others did not wait for it
    assert [n for n in granted if n != 0] == list(range(1, 30))
