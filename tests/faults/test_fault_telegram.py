"""Telegram misbehaves for 30 s under user traffic: 5xx, 429, 409, hung requests and dropped connections.

The issue asks for a minute; 30 s keeps the suite within its budget and already sees ~1,000 calls
and every fault kind dozens of times (the figures are printed). The daemon runs as a subprocess
(`python -m vpnd run`) against the fake Bot API, which fails requests at random (seeded) for every
method: getUpdates, sendMessage, answerCallbackQuery... Meanwhile 20 users write steadily.

Properties: the daemon never exits; it does not spin (requests stay proportional to the work and
the time, not to the failures); every message is handled exactly once (one inbox row, handled; one
reply per message, in order), and once Telegram behaves, everything is answered and /readyz is 200.
"""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
import trio

from tests.faults.support import Supervisor, daemon_sections, get_json, until
from tests.harness import config_text, sql
from vpnd_sandbox.postgres import free_port
from vpnd_sandbox.telegram_fake import FakeTelegram

USERS = list(range(42_001, 42_021))
FAULT_SECONDS = 30.0
RATE = 8.0  # user messages per second over all users


@pytest.mark.slow
@pytest.mark.alone  # "no spin" counts requests per second of work, and every reply has a deadline
@pytest.mark.timeout(200)
async def test_random_telegram_faults_for_30s_no_crash_no_spin_no_loss(
    fake_telegram: tuple[FakeTelegram, str], db_dsn: str, tmp_path: Path
) -> None:
    telegram, telegram_url = fake_telegram
    for uid in USERS:
        telegram.add_user(uid, f"User {uid}")
    port = free_port()
    config_path = tmp_path / "config.toml"
    config_path.write_text(
        config_text(
            daemon_sections(
                token=telegram.token,
                telegram_url=telegram_url,
                dsn=db_dsn,
                port=port,
                telegram={"poll_timeout": 2, "handler_timeout_seconds": 60.0},
            )
        )
    )
    sent: collections.Counter[int] = collections.Counter()
    async with trio.open_nursery() as nursery:
        supervisor = Supervisor(nursery, config_path, tmp_path, port)
        await supervisor.start()
        before = collections.Counter(telegram.requests)
        started = trio.current_time()
        rules = [
            telegram.inject_fault("5xx", probability=0.05, duration=FAULT_SECONDS),
            telegram.inject_fault("429", probability=0.02, duration=FAULT_SECONDS, retry_after=1),
            telegram.inject_fault("409", probability=0.10, duration=FAULT_SECONDS, methods=["getUpdates"]),
            telegram.inject_fault("timeout", probability=0.02, duration=FAULT_SECONDS, hold_seconds=3.0),
            telegram.inject_fault("drop", probability=0.04, duration=FAULT_SECONDS),
        ]

        with trio.fail_after(FAULT_SECONDS + 90):
            index = 0
            while trio.current_time() - started < FAULT_SECONDS:
                uid = USERS[index % len(USERS)]
                # Alternate plain text and commands, so different flows answer.
                telegram.user_sends(uid, "/help" if index % 3 == 0 else f"hello {index}")
                sent[uid] += 1
                index += 1
                await trio.sleep(1 / RATE)
                assert supervisor.alive(), supervisor.tail()
            window = trio.current_time() - started
            during = collections.Counter(telegram.requests)
            during.subtract(before)
            fired = {rule.kind: rule.fired for rule in rules}

            try:
                await until(lambda: all(len(telegram.bot_messages(u)) >= sent[u] for u in USERS), timeout=60, step=0.1)
            except trio.TooSlowError:
                missing = {u: sent[u] - len(telegram.bot_messages(u)) for u in USERS}
                raise AssertionError(f"unanswered messages per user {missing}; log:\n{supervisor.tail()}") from None
            status, ready = await get_json(f"{supervisor.url}/readyz")
            assert status == 200, ready
            assert supervisor.alive(), supervisor.tail()
            assert await supervisor.stop() == 0, supervisor.tail()  # duplicates until the exit are counted below
            log = supervisor.logs()
        nursery.cancel_scope.cancel()

    total_sent = sum(sent.values())
    # No loss, no double handling: one inbox row per message, each handled; one reply per message.
    outcomes = dict(sql(db_dsn, "SELECT outcome, count(*) FROM telegram_inbox GROUP BY outcome"))  # type: ignore[arg-type]
    assert sum(outcomes.values()) == total_sent, outcomes
    assert None not in outcomes, outcomes
    for uid in USERS:
        assert len(telegram.bot_messages(uid)) == sent[uid], uid
    apologies = sum(1 for u in USERS for m in telegram.bot_messages(u) if "something went wrong" in (m.text or ""))
    # Sender gives up after 5 failed attempts (~0.12**5 per reply at these rates): the update is then
    # answered with the apology instead — still one answer, recorded as "error", never lost or doubled.
    assert outcomes.get("error", 0) == apologies <= 2, (outcomes, apologies)

    # No busy loop: calls scale with the work (messages) and the time, not with the failures.
    polls = during["getUpdates"]
    sends = during["sendMessage"]
    assert polls <= 2 * (total_sent + window / 0.5), (polls, total_sent)
    assert sends <= 2 * total_sent, (sends, total_sent)
    assert sum(during.values()) <= 4 * (total_sent + window), during
    assert "event=crashed" not in log
    print(
        f"\nTelegram faults for {window:.0f}s: {total_sent} user messages; requests during the window "
        f"{dict(during)}; faults fired {fired}; responses {dict(telegram.responses)}; inbox outcomes {outcomes}; "
        f"apologies {apologies}; log: {log.count('event=poll_failed')} poll failures, "
        f"{log.count('event=poll_conflict')} conflicts, {log.count('event=poll_rate_limited')} poll 429s, "
        f"{log.count('event=telegram_retry')} send retries, {log.count('event=telegram_429')} send 429s"
    )
