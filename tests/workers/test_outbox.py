"""The outbox sender against the fake Bot API with Telegram's limits: rate, 429 pauses, 403, 400, 5xx."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tests.harness import sql
from tests.workers.conftest import poll_until, running, seed_users, start_users
from vpnd.config import Config
from vpnd.db import outbox
from vpnd.nurseries.outbox import OutboxSettings
from vpnd_sandbox.telegram_fake import FakeTelegram

FAST = OutboxSettings(poll_interval=0.2, retry_base=0.3, retry_cap=1.0)


async def enqueue_each(app: Any, user_ids: list[int], text: str = "hello {uid}") -> None:
    def work(conn: Any) -> None:
        for uid in user_ids:
            outbox.enqueue(conn, uid, text.format(uid=uid), dedupe_key=f"test:{uid}:{text}")

    await app.db.run(work)
    app.outbox_changed.nudge()


async def wait_until_settled(dsn: str, timeout: float) -> None:
    await poll_until(lambda: not sql(dsn, "SELECT count(*) FROM outbox WHERE status = 'pending'")[0][0], timeout)


def bucket_conforms(times: list[float], rate: float, burst: float) -> bool:
    """Would a token bucket (rate/s, burst) have allowed requests at these times?"""
    tokens, last = burst, times[0] if times else 0.0
    for at in times:
        tokens = min(burst, tokens + (at - last) * rate)
        last = at
        if tokens < 1 - 1e-6:
            return False
        tokens -= 1
    return True


async def test_rate_limit_429_pause_and_unreachable_users(
    fake_telegram: tuple[FakeTelegram, str], db_dsn: str, make_config: Callable[..., Config]
) -> None:
    fake, _ = fake_telegram
    # Telegram's real limit, enforced with 429s; the burst allows for the sends in flight at once
    # (`concurrency`) arriving together on a busy machine.
    fake.global_rate, fake.global_burst = 25.0, 25.0 + FAST.concurrency
    reachable = list(range(10_001, 10_151))
    blocked = [10_201, 10_202, 10_203]
    never_started = [10_301, 10_302]
    start_users(fake, reachable + blocked)
    for uid in blocked:
        fake.user_blocks_bot(uid)
    seed_users(db_dsn, reachable + blocked + never_started)
    config = make_config(telegram={"rate_per_second": 25.0})

    def inject_429() -> bool:
        """Once 50 sendMessage requests have arrived, the next one gets a 429 (retry_after 2 s)."""
        if fake.requests["sendMessage"] >= 50:
            fake.inject_fault("429", count=1, retry_after=2, methods=["sendMessage"])
            return True
        return False

    async with running(config, outbox_settings=FAST) as services:
        await enqueue_each(services.app, reachable + blocked + never_started)
        await fake.wait_until(inject_429, timeout=60)
        await wait_until_settled(db_dsn, timeout=60)
        sent = services.app.metrics.outbox_sends.labels("sent")
        await poll_until(lambda: sent._value.get() == len(reachable), 30)

    # Everyone reachable got their message exactly once.
    assert all(len(fake.bot_messages(uid)) == 1 for uid in reachable)
    # The one 429 was injected; the fake's own flood limits never had to refuse anything.
    assert fake.too_many_requests_sent == 1 and fake.rate_limited == 0
    # Times on the fake's clock: when each sendMessage arrived, and when the 429 was answered.
    log = [r for r in fake.request_log if r.method == "sendMessage"]
    sends = [r.arrived_at for r in log]
    (t429,) = [r.answered_at for r in log if r.status == 429]
    assert t429 is not None
    # After the 429, nothing new was sent for retry_after (2 s). Up to `concurrency - 1` sends may have been
    # on their way already (sent before vpnd read the 429) and arrive late on a busy machine; ignoring
    # retry_after (25/s, or the sender's own 1 s backoff cap) would put dozens of sends in the window.
    early = [t - t429 for t in sends if t429 < t < t429 + 2.0 - 0.05]
    assert len(early) <= FAST.concurrency - 1, early
    assert any(t >= t429 + 2.0 - 0.05 for t in sends)
    # The arrival rate never exceeded 25/s: a bucket of 25/s with our 20-message bulk burst, plus the sends
    # in flight at once (`concurrency`), which a busy machine may deliver to the fake together. Twice the
    # rate, or no limit, overflows it within a second or two.
    assert bucket_conforms(sends, 25.0, 20.0 + 1.0 + FAST.concurrency)
    # Sustained rate: all sends but the two bulk bursts (at the start and after the pause), per second sending.
    sending = sends[-1] - sends[0] - 2.0
    print(f"outbox: {len(sends)} sendMessage, sustained {(len(sends) - 40) / sending:.1f}/s (limit 25/s)")

    rows = dict(sql(db_dsn, "SELECT chat_id, status FROM outbox"))
    assert {rows[uid] for uid in reachable} == {"sent"}
    assert {rows[uid] for uid in blocked + never_started} == {"dropped"}
    unreachable = {r[0] for r in sql(db_dsn, "SELECT id FROM users WHERE NOT reachable")}
    assert unreachable == set(blocked)


async def test_transient_failures_retry_then_give_up_visibly(
    fake_telegram: tuple[FakeTelegram, str], db_dsn: str, make_config: Callable[..., Config]
) -> None:
    fake, _ = fake_telegram
    start_users(fake, [1, 2])
    seed_users(db_dsn, [1, 2])
    settings = OutboxSettings(poll_interval=0.2, retry_base=0.3, retry_cap=1.0, max_attempts=3)
    async with running(make_config(), outbox_settings=settings, max_attempts=2) as services:
        # Two 502s: the Sender's two tries fail, the row is retried later and then delivered.
        fake.inject_fault("5xx", count=2, methods=["sendMessage"])
        await enqueue_each(services.app, [1])
        await poll_until(lambda: sql(db_dsn, "SELECT attempts FROM outbox WHERE chat_id = 1") == [(1,)], 10)
        # A newer message to the same chat waits for the one being retried: the order holds.
        await enqueue_each(services.app, [1], text="second {uid}")
        await wait_until_settled(db_dsn, timeout=10)
        assert sql(db_dsn, "SELECT status, attempts FROM outbox WHERE chat_id = 1 ORDER BY id") == [
            ("sent", 2),
            ("sent", 1),
        ]
        assert [m.text for m in fake.bot_messages(1)] == ["hello 1", "second 1"]

        # Telegram keeps failing: after max_attempts deliveries the row is `failed`, with its error.
        rule = fake.inject_fault("5xx", probability=1.0, methods=["sendMessage"])
        await enqueue_each(services.app, [2])
        await wait_until_settled(db_dsn, timeout=30)
        status, attempts, error = sql(db_dsn, "SELECT status, attempts, last_error FROM outbox WHERE chat_id = 2")[0]
        assert (status, attempts) == ("failed", 3)
        assert "SendFailed" in error and "Bad Gateway" in error
        assert rule.fired == 3 * 2  # three deliveries, two tries each
        failed = services.app.metrics.outbox_sends.labels("failed")
        await poll_until(lambda: failed._value.get() == 1, 5)  # counted right after the row is recorded
    assert fake.bot_messages(2) == []


async def test_per_chat_order_and_graceful_stop_leaves_nothing_half_done(
    fake_telegram: tuple[FakeTelegram, str], db_dsn: str, make_config: Callable[..., Config]
) -> None:
    """On shutdown the sender stops starting sends and records what was in flight: every message
    Telegram accepted is marked sent, so a restart delivers the rest exactly once."""
    fake, _ = fake_telegram
    users = list(range(500, 540))
    start_users(fake, users)
    seed_users(db_dsn, users)
    config = make_config(telegram={"rate_per_second": 20.0})
    async with running(config, outbox_settings=FAST) as services:
        for n in range(3):  # three messages per chat, to be delivered in order
            await enqueue_each(services.app, users, text=f"message {n} to {{uid}}")
        await fake.wait_until(lambda: fake.requests["sendMessage"] >= 40, timeout=20)
    delivered = sum(len(fake.bot_messages(u)) for u in users)
    assert 40 <= delivered < 120
    assert sql(db_dsn, "SELECT count(*) FROM outbox WHERE status = 'sent'")[0][0] == delivered

    async with running(config, outbox_settings=FAST):
        await wait_until_settled(db_dsn, timeout=30)
    for uid in users:
        texts = [m.text for m in fake.bot_messages(uid)]
        assert texts == [f"message {n} to {uid}" for n in range(3)]
