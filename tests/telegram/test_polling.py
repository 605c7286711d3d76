"""The polling nursery and the handler nursery: errors, faults, exactly-once across SIGTERM, limits."""

from __future__ import annotations

import signal
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import psycopg
import pytest
import trio

from tests.harness import bot_config, scalar, sql, start_daemon, start_vpnd, wait_ready
from vpnd_sandbox.postgres import free_port
from vpnd_sandbox.telegram_fake import FakeTelegram

ALICE = 1001


async def test_broken_update_is_answered_politely_and_the_loop_goes_on(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    vpnd = await start_vpnd(nursery, bot_config(write_config, db_dsn, fake, base_url))
    fake.add_user(ALICE, "Alice")
    with trio.fail_after(30):
        fake.user_sends(ALICE, "/start")
        await fake.wait_for_bot_message(ALICE)
        seq = fake.change_seq
        # A callback query whose message lacks required fields: parsing it raises inside the handler.
        broken = fake.inject_update(
            {
                "callback_query": {
                    "id": "broken-1",
                    "from": fake.users[ALICE].to_api(),
                    "message": {"message_id": "not-a-number"},
                    "chat_instance": "1",
                    "data": "sub",
                }
            }
        )
        sorry = await fake.wait_for_bot_message(ALICE, since=seq)
        assert "something went wrong" in (sorry.text or "")
        fake.user_sends(ALICE, "/help")
        help_message = await fake.wait_for_bot_message(ALICE)
        assert "Help" in (help_message.text or "")
    with psycopg.connect(db_dsn) as conn:
        row = conn.execute("SELECT outcome FROM telegram_inbox WHERE update_id = %s", (broken,)).fetchone()
    assert row == ("error",)
    await vpnd.stop()


async def test_telegram_faults_back_off_without_busy_loop_or_loss(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    vpnd = await start_vpnd(nursery, bot_config(write_config, db_dsn, fake, base_url))
    fake.add_user(ALICE, "Alice")
    with trio.fail_after(60):
        fake.user_sends(ALICE, "/start")
        await fake.wait_for_bot_message(ALICE)

        # 5xx and dropped connections on every poll for 3 s: backoff, not a busy loop.
        before = fake.requests["getUpdates"]
        fake.inject_fault("5xx", probability=0.5, duration=3.0, methods=["getUpdates"])
        fake.inject_fault("drop", probability=1.0, duration=3.0, methods=["getUpdates"])
        fake.user_sends(ALICE, "/help")
        await trio.sleep(3.0)
        assert fake.requests["getUpdates"] - before < 15  # a busy loop would make hundreds
        reply = await fake.wait_for_bot_message(ALICE, timeout=20)  # served once the faults end
        assert "Help" in (reply.text or "")

        # 429 with retry_after: no poll before it has passed (both times on the fake's clock: vpnd gets the
        # answer after the fake sent it and sends its next poll before the fake sees it, so this holds on
        # any machine).
        fake.inject_fault("429", count=1, retry_after=2, methods=["getUpdates"])
        await fake.wait_until(lambda: fake.responses[429] >= 1, timeout=30)
        [refused] = [r for r in fake.request_log if r.method == "getUpdates" and r.status == 429]
        assert refused.answered_at is not None

        def polls_after_429() -> list[float]:
            return [r.arrived_at for r in fake.request_log if r.method == "getUpdates" and r is not refused
                    and r.arrived_at >= refused.arrived_at]  # fmt: skip

        await fake.wait_until(lambda: bool(polls_after_429()), timeout=30)
        assert polls_after_429()[0] - refused.answered_at >= 2.0
        fake.user_sends(ALICE, "/help")  # polling works again (and its backoff starts over)
        await fake.wait_for_bot_message(ALICE, timeout=20)

        # 409 (another poller): logged, backed off, recovered.
        fake.inject_fault("409", count=3, methods=["getUpdates"])
        fake.user_sends(ALICE, "/start")
        menu = await fake.wait_for_bot_message(ALICE, timeout=30)
        assert "Main menu" in (menu.text or "")
    ready = await vpnd.app.health.readiness()
    assert ready["telegram"].ok
    await vpnd.stop()


async def test_blocked_handlers_do_not_block_other_work(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    """With every update slot taken by handlers stuck on Telegram, the rest of the daemon still works:
    HTTP answers, the database answers, and polling keeps recording new updates durably."""
    fake, base_url = fake_telegram
    config = bot_config(write_config, db_dsn, fake, base_url, telegram={"max_concurrent_updates": 20})
    vpnd = await start_vpnd(nursery, config)
    users = list(range(5000, 5025))
    for uid in users:
        fake.add_user(uid, f"U{uid}")
    with trio.fail_after(60):
        # Held until the test releases them (or vpnd's own 15-s read timeout gives up on them).
        fake.inject_fault("timeout", count=25, hold_seconds=60.0, methods=["sendMessage"])
        for uid in users:
            fake.user_sends(uid, "/start")
        await fake.wait_until(lambda: fake.requests["sendMessage"] >= 20, timeout=30)
        await trio.sleep(0.5)  # a 21st send (a broken limiter) would show now
        # 20 handlers hold the limiter (waiting on Telegram); 5 updates wait their turn.
        assert fake.requests["sendMessage"] == 20
        async with httpx.AsyncClient(base_url=vpnd.http_url, timeout=5) as client:
            assert (await client.get("/healthz")).status_code == 200
            ready = await client.get("/readyz")
        assert ready.json()["checks"]["database"]["ok"] is True
        fake.add_user(7777, "Late")
        late = fake.user_sends(7777, "/start")
        with psycopg.connect(db_dsn) as conn:
            for _ in range(100):
                if conn.execute(
                    "SELECT 1 FROM telegram_inbox WHERE payload->'message'->>'message_id' = %s AND chat_id = 7777",
                    (str(late.message_id),),
                ).fetchone():
                    break
                await trio.sleep(0.1)
            else:
                raise AssertionError("polling stopped recording updates while handlers were blocked")
        assert not any(fake.bot_messages(uid) for uid in users)  # all of this while every slot was held
        # When Telegram answers again, every update gets its reply.
        fake.clear_faults()
        fake.release_held_requests()
        await fake.wait_until(lambda: all(fake.bot_messages(uid) for uid in [*users, 7777]), timeout=40)
    await vpnd.stop()


@pytest.mark.slow
async def test_sigterm_during_burst_then_restart_handles_every_update_once_in_order(
    fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path], tmp_path: Path
) -> None:
    fake, base_url = fake_telegram
    port = free_port()
    config = write_config(
        telegram={"token": fake.token, "api_base_url": base_url, "poll_timeout": 1, "max_concurrent_updates": 20},
        database={"dsn": db_dsn, "pool_min": 1, "pool_max": 8},
        http={"listen": f"127.0.0.1:{port}"},
        shutdown={"grace_seconds": 5.0},
    )
    users = list(range(3000, 3050))
    for uid in users:
        fake.add_user(uid, f"User{uid}")
    sent: Counter[int] = Counter()
    async with trio.open_nursery() as nursery:
        daemon = await start_daemon(nursery, config, tmp_path)
        await wait_ready(daemon, f"http://127.0.0.1:{port}")
        for round_ in range(10):
            for uid in users:
                fake.user_sends(uid, f"message {round_}")
                sent[uid] += 1
        with trio.fail_after(60):
            await fake.wait_until(lambda: sum(len(fake.bot_messages(u)) for u in users) >= 100, timeout=60)
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait(timeout=5.0 + 20.0) == 0, daemon.log()[-3000:]  # grace + slack for a busy machine
        replied_before = sum(len(fake.bot_messages(u)) for u in users)
        assert replied_before < 500  # the burst really was interrupted

        restarted = await start_daemon(nursery, config, tmp_path)
        await wait_ready(restarted, f"http://127.0.0.1:{port}")
        with trio.fail_after(90):
            await fake.wait_until(lambda: sum(len(fake.bot_messages(u)) for u in users) >= 500, timeout=90)
        restarted.signal(signal.SIGTERM)  # what it sends until it exits is counted below
        assert await restarted.wait() == 0
        nursery.cancel_scope.cancel()

    for uid in users:
        assert len(fake.bot_messages(uid)) == sent[uid] == 10, uid  # exactly one reply per message
    with psycopg.connect(db_dsn) as conn:
        rows = conn.execute(
            "SELECT chat_id, update_id, handled_at, outcome FROM telegram_inbox ORDER BY chat_id, update_id"
        ).fetchall()
    assert len(rows) == 500 and all(r[3] == "ok" for r in rows)
    by_chat: dict[int, list[tuple[int, object]]] = {}
    for chat_id, update_id, handled_at, _ in rows:
        by_chat.setdefault(chat_id, []).append((update_id, handled_at))
    for chat_id, handled in by_chat.items():
        times = [t for _, t in handled]
        assert times == sorted(times), f"chat {chat_id} handled out of order"


SLOW_INBOX = 4_242_002


async def test_an_outcome_write_under_way_when_the_grace_ends_is_kept(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    """An update was answered and its outcome is being written when the grace deadline cancels what is
    left: the write still commits. Rolled back, the update would be handled — and answered — again after
    the restart (seen once under load: a user got 11 replies to 10 messages across a SIGTERM)."""
    fake, base_url = fake_telegram
    config = bot_config(write_config, db_dsn, fake, base_url, shutdown={"grace_seconds": 0.5})
    # A slow database for this one write: marking an update handled waits for the test's advisory lock.
    sql(
        db_dsn,
        "CREATE FUNCTION slow_inbox() RETURNS trigger LANGUAGE plpgsql AS "
        f"$$ BEGIN PERFORM pg_advisory_xact_lock_shared({SLOW_INBOX}); RETURN NEW; END $$",
    )
    sql(db_dsn, "CREATE TRIGGER slow_inbox BEFORE UPDATE ON telegram_inbox FOR EACH ROW EXECUTE FUNCTION slow_inbox()")
    vpnd = await start_vpnd(nursery, config)
    fake.add_user(ALICE, "Alice")
    with psycopg.connect(db_dsn, autocommit=True) as gate:
        gate.execute("SELECT pg_advisory_lock(%s)", (SLOW_INBOX,))
        fake.user_sends(ALICE, "/help")
        await fake.wait_for_bot_message(ALICE, timeout=20)
        waiting = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = %s AND NOT granted"
        with trio.fail_after(20):
            while not scalar(db_dsn, waiting, SLOW_INBOX):
                await trio.sleep(0.05)
        stopped = trio.Event()

        async def stop() -> None:
            await vpnd.stop()
            stopped.set()

        nursery.start_soon(stop)
        await trio.sleep(1.5)  # the grace (0.5 s) is over: what still runs has been cancelled
        gate.execute("SELECT pg_advisory_unlock(%s)", (SLOW_INBOX,))
        with trio.fail_after(15):
            await stopped.wait()
    assert scalar(db_dsn, "SELECT count(*) FROM telegram_inbox WHERE handled_at IS NULL") == 0
    assert scalar(db_dsn, "SELECT outcome FROM telegram_inbox WHERE chat_id = %s", ALICE) == "ok"
