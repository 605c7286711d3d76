"""A 5,000-recipient broadcast against the fake Bot API's flood limits: rate, no 429, progress, cancel,
and the bot stays responsive meanwhile. Latencies and the cancel delay are printed as figures; their
measurement under load belongs to `bench broadcast`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from tests.admin.harness import ADMIN, seed_users, start_admin_vpnd, start_broadcast
from tests.harness import bot_config, button, sql
from vpnd_sandbox.telegram_fake import FakeTelegram

pytestmark = [pytest.mark.slow, pytest.mark.alone]  # alone: it measures the send rate

RECIPIENTS = 5000
#: vpnd's configured overall rate, and the fake's flood limit above it (Telegram: ~30/s; scaled up so
#: the test takes tens of seconds instead of minutes — the ratio is what matters).
RATE = 100.0
FAKE_LIMIT = 120.0


def max_in_window(times: list[float], window: float = 1.0) -> int:
    """The most events in any `window`-second interval."""
    best, start = 0, 0
    for end, at in enumerate(times):
        while at - times[start] >= window:
            start += 1
        best = max(best, end - start + 1)
    return best


@pytest.mark.timeout(300)
async def test_5000_recipients_under_the_limit_with_progress_then_cancel(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    fake.global_rate = fake.global_burst = FAKE_LIMIT
    config = bot_config(
        write_config,
        db_dsn,
        fake,
        base_url,
        telegram={"rate_per_second": RATE},
        broadcast={"progress_interval": 1.0},
        database={"pool_max": 10},
    )
    users = seed_users(db_dsn, fake, 100_000, RECIPIENTS)
    talker = 7
    fake.add_user(talker, "Talker")
    vpnd = await start_admin_vpnd(nursery, config)
    fake.add_user(ADMIN, "Admin")
    with trio.fail_after(240):
        progress = await start_broadcast(fake, "Big <i>news</i>", "all")
        started = trio.current_time()

        def delivered() -> int:
            return sum(1 for uid in users if fake.messages.get(uid))

        # While it runs, a user's /start is answered — not queued behind the broadcast: the reply comes
        # while most recipients are still waiting (at RATE the broadcast takes ≥ 50 s, whatever the machine).
        await fake.wait_until(lambda: delivered() >= 100, timeout=60)
        latencies = []
        for _ in range(3):
            fake.user_sends(talker, "/start")
            asked = trio.current_time()
            await fake.wait_for_bot_message(talker, timeout=30)
            latencies.append(trio.current_time() - asked)
            assert delivered() < RECIPIENTS * 0.6, "the reply waited for the broadcast"
            await trio.sleep(0.5)

        # The progress message is edited with counts and a rate.
        edited = await fake.wait_for_bot_message(
            ADMIN,
            lambda m: (
                m.message_id == progress.message_id and "Rate: " in (m.text or "") and "—/s" not in (m.text or "")
            ),
            timeout=10,
        )
        assert "Sent " in (edited.text or "") and {"adm:bp:1", "adm:bx:1"} <= set(edited.callback_data)

        # Let it run to about 60 %, then cancel from the progress message.
        await fake.wait_until(lambda: delivered() >= RECIPIENTS * 0.6, timeout=120)
        elapsed = trio.current_time() - started
        fake.user_presses_button(ADMIN, progress.message_id, button(edited, "adm:bx:"))
        pressed_at = trio.current_time()
        # The cancel ends the broadcast's task (its sends in flight are cut); once it has ended nothing
        # sends any more, so the count is final. How long that took is printed below.
        with trio.fail_after(30):
            while vpnd.broadcasts.tasks:
                await trio.sleep(0.02)
        stopped_after = trio.current_time() - pressed_at
        last_count = delivered()
        assert last_count < RECIPIENTS
        assert sql(db_dsn, "SELECT status FROM broadcasts") == [("cancelled",)]
        cancelled_at_fraction = last_count / RECIPIENTS

    # Measured where the limit applies: when each message reached the fake Bot API (its own clock), not
    # when its outcome was committed (group commits bunch those timestamps on a busy machine).
    sent_times = [r.arrived_at for r in fake.request_log if r.method == "sendMessage" and r.status == 200]
    span = sent_times[-1] - sent_times[0]
    rate = (len(sent_times) - 1) / span
    # The steady rate, after the limiter's initial burst (a full bucket) is spent.
    steady = [t for t in sent_times if t - sent_times[0] >= 2.0]
    steady_rate = (len(steady) - 1) / (steady[-1] - steady[0])
    peak = max_in_window(sent_times)
    print(
        f"\nbroadcast: {len(sent_times)} sent in {span:.1f}s → {rate:.1f}/s (limit {RATE:g}/s, fake {FAKE_LIMIT:g}/s), "
        f"peak {peak} in 1s; 429s={fake.too_many_requests_sent}; /start latency max {max(latencies) * 1000:.0f} ms; "
        f"steady {steady_rate:.1f}/s; 60% after {elapsed:.1f}s; cancelled at {cancelled_at_fraction:.0%}, "
        f"broadcast task ended {stopped_after * 1000:.0f} ms after Cancel"
    )
    assert fake.too_many_requests_sent == 0
    # A token bucket of RATE tokens at RATE/s lets through at most RATE + RATE·T in any T seconds: what a
    # bucket still held when the window began (vpnd may have lagged behind its limit on a busy machine),
    # plus the refill. Arrivals at the fake jitter by the time a request takes to get there: 0.25 s allowed.
    steady_span = steady[-1] - steady[0]
    assert steady_rate <= RATE * (1 + 1 / steady_span) * 1.01
    assert peak <= 2 * RATE + 0.25 * RATE  # a full bucket plus one second of refill, plus the jitter
    counts = {uid: len(fake.bot_messages(uid)) for uid in users}
    assert max(counts.values()) == 1
    by_status = dict(
        sql(db_dsn, "SELECT status, count(*) FROM broadcast_recipients WHERE user_id >= %s GROUP BY status", users[0])
    )
    # Sends in flight at the cancel may be delivered but not marked (at most MAX_IN_FLIGHT).
    assert sum(counts.values()) - 8 <= by_status["sent"] <= sum(counts.values())
    await vpnd.stop()
