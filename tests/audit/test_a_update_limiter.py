"""Audit A — the update concurrency limit: one limiter, owned by the handler nursery, wrapping only handlers.

The seed bot registered a semaphore middleware on `dp.update` and checked by reading that it did not
wrap background tasks. Here the structure is checked from the source, and the behaviour by running
the whole daemon with every update slot taken by a handler that cannot finish — stuck on Telegram
(the fake holds its sendMessage) or on a row lock the test holds — while the outbox sender, the Xray
writer, a broadcast, the reminders worker and the Crypto Pay watcher must all still get their work
done (tests/telegram/test_polling.py covers HTTP and polling under the same conditions).
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
import trio

from tests.audit.source import calls_named, daemon_modules, function
from tests.audit.stack import full_config, live_emails, poll, start_full
from tests.harness import scalar, sql
from vpnd.app import App
from vpnd.cryptopay import open_cryptopay_client
from vpnd.db import broadcasts as bdb
from vpnd.db import outbox
from vpnd.db.pool import BACKGROUND_RESERVE
from vpnd.db.subscriptions import grant_days
from vpnd.payments.service import start_cryptopay_purchase
from vpnd_sandbox.cryptopay_fake import FakeCryptoPay
from vpnd_sandbox.telegram_fake import FakeTelegram
from vpnd_sandbox.xray_fake import FakeXray

UPDATE_LIMITER_MODULE = "vpnd/telegram/dispatch.py"
#: The database bridge has its own limiter: worker threads = pool size (not an update semaphore).
THREAD_LIMITER_MODULE = "vpnd/db/pool.py"


#: Every CapacityLimiter in the daemon and what it limits. A new one must be added here, on purpose.
KNOWN_LIMITERS = {
    UPDATE_LIMITER_MODULE: "updates being handled ([telegram].max_concurrent_updates)",
    THREAD_LIMITER_MODULE: "database worker threads (= pool size)",
    "vpnd/nurseries/outbox.py": "outbox sends in flight",
}


def test_capacity_limiters_are_created_in_known_places_only() -> None:
    creators = {path for path, tree in daemon_modules() for _ in calls_named(tree, "CapacityLimiter")}
    assert creators <= set(KNOWN_LIMITERS), creators - set(KNOWN_LIMITERS)
    assert UPDATE_LIMITER_MODULE in creators


def test_the_update_limiter_is_acquired_only_in_the_dispatcher() -> None:
    """`async with ....limiter` on an update path happens in dispatch.py only, and the update limit's
    setting reaches no other module: background work cannot wait on it."""
    acquirers = {path for path, tree in daemon_modules() if _limiter_blocks(tree)}
    assert acquirers <= {UPDATE_LIMITER_MODULE, THREAD_LIMITER_MODULE}, acquirers
    max_updates = {
        path
        for path, tree in daemon_modules()
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute | ast.Name | ast.keyword)
        and getattr(node, "attr", getattr(node, "id", getattr(node, "arg", None))) == "max_concurrent_updates"
    }
    assert max_updates <= {UPDATE_LIMITER_MODULE, "vpnd/nurseries/telegram.py", "vpnd/config.py"}, max_updates


def _limiter_blocks(tree: ast.Module) -> list[ast.AsyncWith]:
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.AsyncWith)
        and any(
            isinstance(item.context_expr, ast.Attribute) and item.context_expr.attr == "limiter" for item in node.items
        )
    ]


def test_one_acquire_and_only_the_handler_inside_it() -> None:
    tree = dict(daemon_modules())[UPDATE_LIMITER_MODULE]
    blocks = _limiter_blocks(tree)
    assert len(blocks) == 1, "exactly one place acquires the update limiter"
    (block,) = blocks
    awaited = [n for n in ast.walk(block) if isinstance(n, ast.Await)]
    assert len(awaited) == 1, "inside the limiter: one await, the handler under its error boundary"
    call = awaited[0].value
    assert isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr == "_handle_one"
    # No nested acquire: the handler path does not reach the limiter again.
    handle_one = function(tree, "Dispatcher._handle_one")
    assert not _limiter_blocks(ast.Module(body=[handle_one], type_ignores=[]))


# --- behaviour: background work goes on while every update slot is blocked -----------------------

SLOTS = 3
BLOCKED = [8001, 8002, 8003]  # their handlers take every slot
WAITING = 8004  # queued behind them: proves the slots stay taken while the checks run
OUTBOX_TO, GRANTED, REMINDED, PAYER = 8101, 8102, 8103, 8104
RECIPIENTS = list(range(8201, 8221))


def _seed(dsn: str, fake: FakeTelegram) -> None:
    """Users in the database and the fake."""
    everyone = [*BLOCKED, WAITING, OUTBOX_TO, GRANTED, REMINDED, PAYER, *RECIPIENTS]
    sql(dsn, "INSERT INTO users (id, first_name, referral_code) SELECT id, 'U' || id, 'ref' || id "
             "FROM unnest(%s::bigint[]) id", everyone)  # fmt: skip
    for uid in everyone:
        fake.add_user(uid, f"U{uid}").started = True


def _not_news(fake: FakeTelegram, uid: int) -> list[object]:
    """The bot's messages to `uid` other than the broadcast (the broadcast goes to everyone)."""
    return [m for m in fake.bot_messages(uid) if "News while stuck" not in (m.text or "")]


async def _pending_purchase(app: App, pay: FakeCryptoPay, pay_url: str) -> tuple[int, int]:
    """A Crypto Pay purchase with its invoice (made before the handlers are blocked): (purchase, invoice)."""
    async with open_cryptopay_client(pay.token, pay_url) as client:
        purchase, _ = await start_cryptopay_purchase(app, client, PAYER, plan_code="m1")
    assert purchase.invoice_id is not None
    return purchase.id, purchase.invoice_id


async def _background_work_progresses(
    app: App, fake: FakeTelegram, fake_xray: FakeXray, pay: FakeCryptoPay, purchase: tuple[int, int], dsn: str,
    timeout: float,
) -> float:  # fmt: skip
    """Give each background service one piece of work (written on the test's own connection, as any
    other process would) and wait until every one is done; the seconds taken. Fails naming the services
    that did not get it done within `timeout`."""
    started = trio.current_time()
    purchase_id, invoice_id = purchase
    pay.webhooks_enabled = False  # only the watcher can find this payment
    pay.pay(invoice_id)

    def queue() -> None:
        with psycopg.connect(dsn) as conn:
            outbox.enqueue(conn, OUTBOX_TO, "queued while the handlers are stuck", dedupe_key="audit-a")
            grant_days(conn, GRANTED, 30, kind="paid")
            conn.execute(
                "INSERT INTO subscriptions (user_id, kind, status, uuid, sub_token, plan_code, expires_at) "
                "VALUES (%s, 'paid', 'active', gen_random_uuid(), 'tok-r', 'm1', now() + interval '20 hours')",
                (REMINDED,),
            )  # a reminder is due from now on
            bdb.create_broadcast(conn, created_by=1, text="News while stuck", segment=bdb.Segment.parse("all"))

    await trio.to_thread.run_sync(queue)
    app.outbox_changed.nudge()
    app.xray_changed.nudge()

    def got(uid: int, fragment: str) -> bool:
        return any(fragment in (m.text or "") for m in fake.bot_messages(uid))

    checks: dict[str, Callable[[], bool]] = {
        "outbox sender": lambda: got(OUTBOX_TO, "queued while the handlers are stuck"),
        "xray writer": lambda: f"u{GRANTED}" in live_emails(fake_xray),
        "broadcast": lambda: all(got(uid, "News while stuck") for uid in RECIPIENTS),
        "reminders worker": lambda: bool(_not_news(fake, REMINDED)),
        "payment watcher": lambda: scalar(dsn, "SELECT status FROM purchases WHERE id = %s", purchase_id) == "paid",
    }
    done: dict[str, float] = {}
    with trio.move_on_after(timeout):
        while len(done) < len(checks):
            for name, check in checks.items():
                if name not in done and check():
                    done[name] = trio.current_time() - started
            await trio.sleep(0.05)
    missing = sorted(set(checks) - set(done))
    assert not missing, f"no progress within {timeout:g}s: {missing} (done: {done})"
    return max(done.values())


async def test_background_work_and_a_broadcast_progress_while_every_update_slot_waits_on_telegram(
    nursery: trio.Nursery,
    fake_telegram: tuple[FakeTelegram, str],
    fake_cryptopay: tuple[FakeCryptoPay, str],
    fake_xray: FakeXray,
    db_dsn: str,
    write_config: Callable[..., Path],
    tmp_path: Path,
) -> None:
    fake, _ = fake_telegram
    pay, pay_url = fake_cryptopay
    config = full_config(
        write_config, db_dsn, tmp_path, fake_telegram, cryptopay=fake_cryptopay, xray=fake_xray,
        telegram={"max_concurrent_updates": SLOTS, "handler_timeout_seconds": 60.0},
    )  # fmt: skip
    _seed(db_dsn, fake)
    vpnd = await start_full(nursery, config, pay)
    purchase = await _pending_purchase(vpnd.app, pay, pay_url)
    with trio.fail_after(120):
        # The handlers' sendMessage calls are held until the test releases them (hold_seconds is only a
        # backstop): the slots stay taken for as long as the checks need, however busy the machine is.
        fake.inject_fault("timeout", count=SLOTS, hold_seconds=100.0, methods=["sendMessage"])
        for uid in BLOCKED:
            fake.user_sends(uid, "/start")
        await fake.wait_until(lambda: fake.requests["sendMessage"] >= SLOTS, timeout=30)
        held = [r for r in fake.request_log if r.method == "sendMessage"]
        assert len(held) == SLOTS
        fake.user_sends(WAITING, "/start")

        took = await _background_work_progresses(vpnd.app, fake, fake_xray, pay, purchase, db_dsn, 30.0)

        # All of it happened while the handlers still held every slot: their sends are still held by the
        # fake, and nobody blocked or queued was answered. (vpnd gives up on a send after 15 s: if the
        # checks took that long, a handler was freed and answered its user, and this fails.)
        assert all(r.answered_at is None for r in held), held
        assert not any(_not_news(fake, uid) for uid in [*BLOCKED, WAITING])
        # When Telegram answers again, the stuck and the queued updates are handled.
        fake.release_held_requests()
        await fake.wait_until(lambda: all(_not_news(fake, uid) for uid in [*BLOCKED, WAITING]), timeout=60)
    print(f"\nbackground work done {took:.2f}s into a block of all {SLOTS} update slots")
    await vpnd.stop()


@pytest.mark.parametrize(
    ("slots", "pool"),
    [
        pytest.param(3, 6, id="3-slots-pool-6"),
        pytest.param(
            20,
            10,
            id="defaults-20-slots-pool-10",
        ),
    ],
)
async def test_background_work_progresses_while_every_update_slot_waits_on_a_row_lock(
    slots: int,
    pool: int,
    nursery: trio.Nursery,
    fake_telegram: tuple[FakeTelegram, str],
    fake_cryptopay: tuple[FakeCryptoPay, str],
    fake_xray: FakeXray,
    db_dsn: str,
    write_config: Callable[..., Path],
    tmp_path: Path,
) -> None:
    """The test holds the user rows of as many talkers as there are update slots (FOR NO KEY UPDATE), so
    each of their handlers waits on a row lock inside its slot — and inside a pooled connection."""
    fake, _ = fake_telegram
    pay, pay_url = fake_cryptopay
    talkers = list(range(8301, 8301 + slots))
    config = full_config(
        write_config, db_dsn, tmp_path, fake_telegram, cryptopay=fake_cryptopay, xray=fake_xray,
        telegram={"max_concurrent_updates": slots, "handler_timeout_seconds": 60.0},
        database={"pool_min": 2, "pool_max": pool, "statement_timeout_ms": 30000},
    )  # fmt: skip
    _seed(db_dsn, fake)
    sql(db_dsn, "INSERT INTO users (id, first_name, referral_code) SELECT id, 'U' || id, 'ref' || id "
                "FROM unnest(%s::bigint[]) id", talkers)  # fmt: skip
    for uid in talkers:
        fake.add_user(uid, f"U{uid}").started = True
    vpnd = await start_full(nursery, config, pay)
    purchase = await _pending_purchase(vpnd.app, pay, pay_url)
    with psycopg.connect(db_dsn) as blocker, trio.fail_after(120):
        # NO KEY UPDATE: what the handlers' upsert of the user row needs (and a foreign key check does not).
        blocker.execute("SELECT 1 FROM users WHERE id = ANY(%s) FOR NO KEY UPDATE", (talkers,))
        for uid in talkers:
            fake.user_sends(uid, "/start")
        waiting = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'vpnd' AND wait_event_type = 'Lock'"
        # Handlers may hold at most pool - BACKGROUND_RESERVE connections; the rest stays for background work.
        in_db = min(slots, max(1, pool - BACKGROUND_RESERVE))
        await poll(lambda: scalar(db_dsn, waiting) >= in_db, 30, what="handlers wait on the row locks")
        try:
            await _background_work_progresses(vpnd.app, fake, fake_xray, pay, purchase, db_dsn, 30.0)
        finally:
            blocker.rollback()
        await fake.wait_until(lambda: all(_not_news(fake, uid) for uid in talkers), timeout=40)
    await vpnd.stop()
