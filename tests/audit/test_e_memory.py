"""Audit E (measured half) — conversation states expire; 20,000 updates and a 10,000-recipient broadcast
leave the daemon's memory where it was.

The seed reasoned that its dicts were bounded and its promo sessions had a TTL. vpnd keeps no
conversation in memory (states are rows with `expires_at`, ignored once stale and deleted by the
housekeeping worker), and the rest is measured: `vpnd run` as a subprocess (so the fakes' memory is
not counted) gets 20,000 updates from 2,000 users — commands, free text, button presses — and then a
broadcast to 10,000 recipients, and its resident set size (VmRSS from /proc) is sampled between rounds.

The bounds, measured first (2-core machine; the numbers are printed by the test):

* after a 2,000-update warm-up RSS was 86 MB; it grew 5.5 MB during the first round of button presses
  (answerCallbackQuery + editMessageText: more HTTP connections and PTB types in use), 1 MB during the
  second, and not at all after that — 8.0 MB in all, and 1.0 MB over the last 10,000 updates and the
  end of the broadcast;
* **bounds: at most 24 MB of growth after the warm-up (3x the measured total), at most 8 MB over the
  last 10,000 updates.** Retaining one update payload (≈1.5 KB as Python objects) per update would add
  ≈30 MB over 20,000 and ≈15 MB over the last 10,000, so either bound catches such a leak; the second
  catches anything above ≈0.8 KB per update that the first round's one-time growth could hide.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
import trio

from tests.audit.stack import full_config, poll, start_full
from tests.harness import Daemon, press, say, scalar, sql, start_daemon, text_has, wait_ready
from vpnd.db import broadcasts as bdb
from vpnd.workers.housekeeping import housekeeping_round
from vpnd_sandbox.postgres import free_port
from vpnd_sandbox.telegram_fake import FakeTelegram

# --- conversation states expire ----------------------------------------------------------------


async def test_conversation_states_expire_and_are_evicted(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path],
    tmp_path: Path,
) -> None:  # fmt: skip
    """A user left waiting for a promo code: once the state's time is up, the same text is no longer read
    as a promo code, and the housekeeping worker deletes the row (states are rows, not memory)."""
    fake, _ = fake_telegram
    sql(db_dsn, "INSERT INTO promo_codes (code, percent, max_uses) VALUES ('SPRING20', 20, 10)")
    config = full_config(write_config, db_dsn, tmp_path, fake_telegram, workers={"housekeeping_interval": 3600.0})
    vpnd = await start_full(nursery, config)
    alice, bob = 1001, 1002
    for uid in (alice, bob):
        fake.add_user(uid, f"U{uid}")
    with trio.fail_after(30):
        for uid in (alice, bob):
            menu = await say(fake, uid, "/start")
            await press(fake, uid, menu, "promo", predicate=text_has("promo code"))
        assert scalar(db_dsn, "SELECT count(*) FROM conversation_states") == 2
        ttl = scalar(db_dsn, "SELECT min(expires_at - now()) FROM conversation_states")
        assert ttl.total_seconds() > 0, "states carry an expiry"
        # Alice's state runs out (its expiry is moved into the past, as time passing would do).
        sql(db_dsn, "UPDATE conversation_states SET expires_at = now() - interval '1 second' WHERE user_id = %s",
            alice)  # fmt: skip
        reply = await say(fake, alice, "SPRING20")
        assert "20%" not in (reply.text or ""), "an expired state was still honoured"
        assert scalar(db_dsn, "SELECT pending_promo_code FROM users WHERE id = %s", alice) is None
        reply = await say(fake, bob, "spring20")  # Bob's state is still valid
        assert "SPRING20" in (reply.text or "") and "20%" in (reply.text or "")
        await housekeeping_round(vpnd.app, batch_size=100)
    # Bob's state ended when he answered; Alice's expired one was evicted by housekeeping.
    assert scalar(db_dsn, "SELECT count(*) FROM conversation_states") == 0
    await vpnd.stop()


# --- memory under 20,000 updates and a 10,000-recipient broadcast ---------------------------------

TALKERS = 2_000
UPDATES = 20_000
WARMUP = TALKERS  # one update from each talker
RECIPIENTS = 10_000  # the talkers and 8,000 more users: the broadcast goes to all of them
GROWTH_BOUND_MB = 24.0
LATE_GROWTH_BOUND_MB = 8.0


def rss_mb(daemon: Daemon) -> float:
    with open(f"/proc/{daemon.process.pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def handled(dsn: str) -> int:
    return int(scalar(dsn, "SELECT count(*) FROM telegram_inbox WHERE handled_at IS NOT NULL"))


async def send_round(fake: FakeTelegram, users: list[int], round_no: int) -> int:
    """One update per user, cycling through a command, free text, another command and a button press."""
    kind = round_no % 4
    sent = 0
    for uid in users:
        if kind == 3:
            menu = next((m for m in reversed(fake.bot_messages(uid)) if "help" in m.callback_data), None)
            if menu is None:
                fake.user_sends(uid, "/start")
            else:
                fake.user_presses_button(uid, menu.message_id, "help")
        else:
            fake.user_sends(uid, ("/start", f"hello {round_no}", "/help")[kind])
        sent += 1
        if sent % 500 == 0:
            await trio.lowlevel.checkpoint()  # let the fake serve the polls meanwhile
    return sent


@pytest.mark.slow
@pytest.mark.timeout(400)
async def test_20000_updates_and_a_10000_recipient_broadcast_leave_memory_bounded(
    fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path], tmp_path: Path
) -> None:
    fake, _ = fake_telegram
    fake.global_rate = fake.global_burst = 5000.0
    fake.chat_rate = fake.chat_burst = 50.0
    port = free_port()
    config = full_config(
        write_config, db_dsn, tmp_path, fake_telegram,
        telegram={"rate_per_second": 1000.0, "per_chat_per_second": 20.0, "max_concurrent_updates": 50,
                  "poll_timeout": 1},
        database={"pool_max": 10}, http={"listen": f"127.0.0.1:{port}"}, log={"level": "warning"},
        broadcast={"progress_interval": 5.0},
    )  # fmt: skip
    talkers = list(range(200_000, 200_000 + TALKERS))
    for uid in talkers:
        fake.add_user(uid, f"T{uid}")
    recipients = list(range(300_000, 300_000 + RECIPIENTS - TALKERS))
    sql(db_dsn, "INSERT INTO users (id, first_name, referral_code) SELECT g, 'R' || g, 'r' || g "
                "FROM unnest(%s::bigint[]) g", recipients)  # fmt: skip
    for uid in recipients:
        fake.add_user(uid, f"R{uid}").started = True

    samples: list[tuple[int, float]] = []  # (updates after the warm-up, RSS in MB)
    async with trio.open_nursery() as nursery:
        daemon = await start_daemon(nursery, Path(config.path), tmp_path)
        with trio.fail_after(60):
            await wait_ready(daemon, f"http://127.0.0.1:{port}")
        with trio.fail_after(360):
            total = await send_round(fake, talkers, 0)
            await poll(lambda: handled(db_dsn) >= WARMUP, 120, 0.2, what="the warm-up handled")
            samples.append((0, rss_mb(daemon)))
            # The broadcast runs while the updates come in (bulk sends yield to replies).
            with psycopg.connect(db_dsn) as conn:
                bdb.create_broadcast(conn, created_by=1, text="Memory audit news", segment=bdb.Segment.parse("all"))
            round_no = 1
            while total < WARMUP + UPDATES:
                total += await send_round(fake, talkers, round_no)
                round_no += 1
                await poll(lambda t=total: handled(db_dsn) >= t, 120, 0.2, what=f"{total} updates handled")  # type: ignore[misc]
                samples.append((total - WARMUP, rss_mb(daemon)))
            await poll(lambda: scalar(db_dsn, "SELECT status FROM broadcasts") == "done", 120, 0.5,
                       what="the broadcast finished")  # fmt: skip
            samples.append((total - WARMUP, rss_mb(daemon)))
            daemon.signal(signal.SIGTERM)
            assert await daemon.wait(timeout=15) == 0, daemon.log()[-2000:]
        nursery.cancel_scope.cancel()

    errors = scalar(db_dsn, "SELECT count(*) FROM telegram_inbox WHERE outcome <> 'ok'")
    sent = scalar(db_dsn, "SELECT count(*) FROM broadcast_recipients WHERE status = 'sent'")
    baseline = samples[0][1]
    half = next(mb for done, mb in samples if done >= UPDATES // 2)
    growth, late_growth = max(mb for _, mb in samples) - baseline, samples[-1][1] - half
    print(
        "\nRSS of `vpnd run` after the warm-up, by updates handled since: "
        + ", ".join(f"{done}: {mb:.1f} MB" for done, mb in samples)
        + " (last: broadcast done too)"
    )
    print(
        f"growth {growth:.1f} MB (bound {GROWTH_BOUND_MB:g}), over the last {UPDATES // 2} updates and the end "
        f"of the broadcast {late_growth:.1f} MB (bound {LATE_GROWTH_BOUND_MB:g}); broadcast sent {sent}/{RECIPIENTS}"
    )
    assert errors == 0
    assert sent == RECIPIENTS
    assert growth <= GROWTH_BOUND_MB
    assert late_growth <= LATE_GROWTH_BOUND_MB
