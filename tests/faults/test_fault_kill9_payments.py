"""kill -9 during payments: 1,000 Crypto Pay purchases paid while the daemon is SIGKILLed again and again.

The invoices are paid in the fake Crypto Pay while `python -m vpnd run` is killed at random moments
(seeded; at least 5 times, some during start-up) and restarted at once, as systemd would. Paid
invoices reach vpnd through the signed webhook (which fails while the daemon is down and gives up
after a few retries) and through the watcher (every second) — both at once, racing. At the end:

* every paid invoice is granted exactly once (one payment row, 30 days for a plan, one ledger
  entry for a top-up, one referral reward per referred plan);
* every balance equals the sum of its ledger, and the amount it should be;
* Xray's config file and the fake Xray's live users equal the desired set from the database;
* every user got the "payment received" message (at most the messages in flight at a kill twice).
"""

from __future__ import annotations

import collections
import datetime as dt
import os
import random
from pathlib import Path

import psycopg
import pytest
import trio

from tests.faults.support import (
    TAG,
    Supervisor,
    daemon_sections,
    desired_xray_set,
    file_clients,
    until,
    write_xray_template,
)
from tests.harness import config_text, open_app, scalar, sql
from vpnd.config import load_config
from vpnd.cryptopay import open_cryptopay_client
from vpnd.db import ledger
from vpnd.db.users import upsert_user
from vpnd.nurseries.outbox import OutboxSettings
from vpnd.payments.service import start_cryptopay_purchase
from vpnd.pricing import referral_reward
from vpnd_sandbox.cryptopay_fake import FakeCryptoPay, serve_fake_cryptopay
from vpnd_sandbox.postgres import free_port
from vpnd_sandbox.telegram_fake import FakeTelegram
from vpnd_sandbox.xray_fake import start_fake_xray

PURCHASES = 1000
FIRST_USER = 500_001
KILLS = 6
PAY_SECONDS = 20.0
PLAN_MINOR = 499
TOPUP_MINOR = 1000
REFERRAL_PERCENT = 10
SEED = int(os.environ.get("VPND_FAULT_SEED", "20240806"))


def user_ids() -> list[int]:
    return list(range(FIRST_USER, FIRST_USER + PURCHASES))


def is_topup(uid: int) -> bool:
    return uid % 4 == 0


def referrer_of(uid: int) -> int | None:
    """Every 10th user was invited by the user before them."""
    return uid - 1 if uid % 10 == 3 else None


def seed_users(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        for uid in user_ids():
            upsert_user(conn, uid, f"user{uid}", f"User {uid}", "en")
        for uid in user_ids():
            referrer = referrer_of(uid)
            if referrer is not None:
                conn.execute("INSERT INTO referrals (referred_id, referrer_id) VALUES (%s, %s)", (uid, referrer))
                conn.execute("UPDATE users SET referred_by = %s WHERE id = %s", (referrer, uid))


async def create_purchases(config_path: Path, cryptopay: FakeCryptoPay) -> dict[int, tuple[int, int]]:
    """Through vpnd's own service, in-process: purchase committed, invoice created, attached.

    Returns invoice_id → (purchase_id, user_id).
    """
    config = load_config(config_path, environ={})
    out: dict[int, tuple[int, int]] = {}
    todo = iter(user_ids())
    async with (
        open_app(config, single_instance=False) as app,
        open_cryptopay_client(cryptopay.token, f"{cryptopay.base_url}/api", timeout=10) as client,
    ):

        async def worker() -> None:
            for uid in todo:
                if is_topup(uid):
                    purchase, _ = await start_cryptopay_purchase(app, client, uid, topup_minor=TOPUP_MINOR)
                else:
                    purchase, _ = await start_cryptopay_purchase(app, client, uid, plan_code="m1")
                assert purchase.invoice_id is not None
                out[purchase.invoice_id] = (purchase.id, uid)

        async with trio.open_nursery() as nursery:
            for _ in range(16):
                nursery.start_soon(worker)
    return out


def check_granted_exactly_once(dsn: str, invoices: dict[int, tuple[int, int]]) -> None:
    purchases = {
        row[0]: row[1:] for row in sql(dsn, "SELECT id, status, kind, user_id, invoice_id FROM purchases ORDER BY id")
    }
    assert len(purchases) == PURCHASES
    assert collections.Counter(p[0] for p in purchases.values()) == {"paid": PURCHASES}

    payments = sql(dsn, "SELECT purchase_id, provider, provider_payment_id, outcome, amount_minor FROM payments")
    assert len(payments) == PURCHASES
    by_purchase = {p[0]: p for p in payments}
    assert len(by_purchase) == PURCHASES
    for invoice_id, (purchase_id, _uid) in invoices.items():
        _, provider, provider_payment_id, outcome, _amount = by_purchase[purchase_id]
        assert (provider, provider_payment_id, outcome) == ("cryptopay", str(invoice_id), "granted")

    # A plan granted twice would show 60 days (both grants extend one subscription).
    spans = sql(dsn, "SELECT user_id, expires_at - starts_at, kind, status FROM subscriptions")
    plan_users = {uid for uid in user_ids() if not is_topup(uid)}
    assert {row[0] for row in spans} == plan_users
    for uid, span, kind, status in spans:
        assert (span, kind, status) == (dt.timedelta(days=30), "paid", "active"), uid

    # Balances: the sum of their ledger, and what the purchases say they must be.
    expected = collections.Counter[int]()
    for uid in user_ids():
        if is_topup(uid):
            expected[uid] += TOPUP_MINOR
        referrer = referrer_of(uid)
        if referrer is not None and not is_topup(uid):
            expected[referrer] += referral_reward(PLAN_MINOR, REFERRAL_PERCENT)
    balances = dict(sql(dsn, "SELECT id, balance_minor FROM users"))  # type: ignore[arg-type]
    sums = dict(sql(dsn, "SELECT user_id, sum(delta_minor)::bigint FROM balance_ledger GROUP BY user_id"))  # type: ignore[arg-type]
    for uid in user_ids():
        assert balances[uid] == sums.get(uid, 0) == expected[uid], uid
    reasons = collections.Counter(r[0] for r in sql(dsn, "SELECT reason FROM balance_ledger"))
    topups = sum(1 for uid in user_ids() if is_topup(uid))
    rewards = sum(1 for uid in user_ids() if referrer_of(uid) and not is_topup(uid))
    assert reasons == {ledger.TOPUP: topups, ledger.REFERRAL_REWARD: rewards}


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_sigkill_during_1000_payments_grants_each_exactly_once(
    fake_telegram: tuple[FakeTelegram, str], db_dsn: str, tmp_path: Path
) -> None:
    rng = random.Random(SEED)
    telegram, telegram_url = fake_telegram
    telegram.global_rate = telegram.global_burst = 2000.0
    for uid in user_ids():
        telegram.add_user(uid, f"User {uid}").started = True
    seed_users(db_dsn)

    port = free_port()
    cryptopay = FakeCryptoPay(webhook_retry_delay=0.2, webhook_max_attempts=3)
    template = write_xray_template(tmp_path / "xray-template.json")
    xray_file = tmp_path / "xray" / "config.json"
    xray_file.parent.mkdir()
    timings: dict[str, float] = {}
    kills: list[str] = []

    with start_fake_xray("xray.", inbound_tags=(TAG,)) as xray:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_fake_cryptopay, cryptopay)
            cryptopay.webhook_url = f"http://127.0.0.1:{port}/webhooks/cryptopay"
            sections = daemon_sections(
                token=telegram.token,
                telegram_url=telegram_url,
                dsn=db_dsn,
                port=port,
                cryptopay={
                    "enabled": True,
                    "token": cryptopay.token,
                    "api_base_url": f"{cryptopay.base_url}/api",
                    "poll_interval": 1.0,
                },
                xray={
                    "enabled": True,
                    "template_path": str(template),
                    "config_path": str(xray_file),
                    "api_address": xray.address,
                    "reconcile_interval": 5.0,
                },
                referral={"percent": REFERRAL_PERCENT},
                payments={"currency": "USD", "purchase_ttl_minutes": 120},
                database={"pool_max": 10},
            )
            config_path = tmp_path / "config.toml"
            config_path.write_text(config_text(sections))

            with trio.fail_after(60):
                started = trio.current_time()
                invoices = await create_purchases(config_path, cryptopay)
                timings["create purchases+invoices"] = trio.current_time() - started
            assert len(invoices) == PURCHASES

            supervisor = Supervisor(nursery, config_path, tmp_path, port)
            await supervisor.start()
            order = list(invoices)
            rng.shuffle(order)
            paid_at_kill: list[int] = []

            async def pay_all() -> None:
                interval = PAY_SECONDS / len(order)
                for index, invoice_id in enumerate(order):
                    cryptopay.pay(invoice_id)
                    if index % 10 == 9:
                        await trio.sleep(interval * 10)

            with trio.fail_after(120):
                async with trio.open_nursery() as payers:
                    payers.start_soon(pay_all)
                    for _ in range(KILLS):
                        await trio.sleep(rng.uniform(1.0, 5.0))
                        phase = "serving" if supervisor.current.notify.lines().count("READY=1") else "starting"
                        paid = scalar(db_dsn, "SELECT count(*) FROM purchases WHERE status = 'paid'")
                        await supervisor.kill()
                        kills.append(f"{phase} ({paid} granted)")
                        paid_at_kill.append(paid)
                        await supervisor.start(ready=False)
                await supervisor.wait_ready(supervisor.current)
            assert sum(1 for inv in cryptopay.invoices.values() if inv.status == "paid") == PURCHASES

            # Convergence: everything paid is granted, messages out, Xray matches the database.
            started = trio.current_time()

            def converged() -> bool:
                if scalar(db_dsn, "SELECT count(*) FROM purchases WHERE status = 'paid'") != PURCHASES:
                    return False
                if scalar(db_dsn, "SELECT count(*) FROM outbox WHERE status = 'pending'") != 0:
                    return False
                desired = desired_xray_set(db_dsn)
                live = {email: user.uuid for email, user in xray.users(TAG).items()}
                return desired == live == file_clients(xray_file)

            try:
                await until(converged, timeout=60, step=0.25)
            except trio.TooSlowError:
                raise AssertionError(f"no convergence within 60 s; daemon log:\n{supervisor.tail()}") from None
            timings["convergence after the last restart"] = trio.current_time() - started
            assert supervisor.alive(), supervisor.tail()
            assert await supervisor.stop() == 0, supervisor.tail()
            nursery.cancel_scope.cancel()

    check_granted_exactly_once(db_dsn, invoices)
    desired = desired_xray_set(db_dsn)
    assert len(desired) == sum(1 for uid in user_ids() if not is_topup(uid))
    assert file_clients(xray_file) == desired

    # Messages: every payer told once; a kill may repeat only the sends in flight at that moment.
    received = [
        sum(1 for m in telegram.bot_messages(uid) if "Payment received" in (m.text or m.caption or ""))
        for uid in user_ids()
    ]
    assert min(received) >= 1
    outbox_rows = scalar(db_dsn, "SELECT count(*) FROM outbox WHERE dedupe_key LIKE 'payment:%%'")
    assert outbox_rows == PURCHASES
    sent_total = sum(len(telegram.bot_messages(uid)) for uid in user_ids())
    duplicates = sent_total - scalar(db_dsn, "SELECT count(*) FROM outbox WHERE chat_id >= %s", FIRST_USER)
    assert 0 <= duplicates <= KILLS * OutboxSettings().concurrency

    webhook_ok = len({d.invoice_id for d in cryptopay.deliveries if d.status_code == 200})
    failed_attempts = sum(1 for d in cryptopay.deliveries if d.status_code != 200)
    crashes = [run.log().count("event=crashed") for run in supervisor.runs]
    assert sum(crashes) == 0, supervisor.tail()
    print(
        f"\nkill -9 during payments (seed {SEED}): {PURCHASES} purchases "
        f"({sum(1 for u in user_ids() if is_topup(u))} top-ups), {len(kills)} SIGKILLs at: {', '.join(kills)}; "
        f"{webhook_ok} invoices acknowledged by a webhook (200), {failed_attempts} webhook attempts failed "
        f"(daemon down), the watcher finalized the rest; duplicates sent to Telegram: {duplicates}; "
        f"'Payment received' messages: {sum(received)}; timings: "
        + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items())
    )
