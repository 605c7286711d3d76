"""Audit D — idempotency: the finalize guard comes before any mutation, the webhook answers 200 for every
verified outcome (an internal error included), and retries never apply anything twice.

The seed read `finalize_purchase` and saw an early `if status != "pending"`. Here:

* a BEFORE-row trigger on every table bumps a *sequence* (not rolled back with the transaction), so
  even a write that a later rollback undoes is counted: replaying a finalized payment by every path
  (the webhook's exact bytes, the watcher's call, a second Stars `successful_payment`, a second balance
  payment) must not attempt a single row write;
* the webhook is posted every verified outcome vpnd distinguishes, including a trigger that raises and a
  statement timeout on a row the test holds locked: always 200, and nothing half-done;
* the daemon is stopped and restarted (hard-cancelled, as a second SIGTERM or a crash would) while the
  watcher, webhook retries and the renewal worker are mid-way: each payment and each renewal period is
  applied exactly once, and every balance equals its ledger.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio

from tests.audit.stack import full_config, instance_lock_released, poll
from tests.harness import open_app, scalar, sql, start_vpnd
from vpnd.app import App
from vpnd.cryptopay import SIGNATURE_HEADER, CryptoPayClient, open_cryptopay_client, sign_webhook_body
from vpnd.db import ledger
from vpnd.db.purchases import PurchaseNotPayable
from vpnd.db.users import upsert_user
from vpnd.nurseries.http import build_router, run_http
from vpnd.payments.service import (
    finalize_cryptopay_invoice,
    finalize_stars_payment,
    pay_purchase_with_balance,
    start_cryptopay_purchase,
    start_stars_purchase,
)
from vpnd.payments.webhook import WEBHOOK_PATH, add_payment_routes
from vpnd.workers.renewal import LEDGER_REASON
from vpnd_sandbox.cryptopay_fake import FakeCryptoPay
from vpnd_sandbox.telegram_fake import FakeTelegram

IO_TIMEOUT = 30


@attrs.define(eq=False)
class Payments:
    """vpnd's App with its HTTP server and payment routes — no background services, so every row write
    the database sees comes from what the test does."""

    app: App
    client: CryptoPayClient
    fake: FakeCryptoPay
    dsn: str
    url: str

    async def user(self, user_id: int, balance_minor: int = 0) -> int:
        def create(conn: Any) -> None:
            upsert_user(conn, user_id, None, f"User {user_id}", "en")
            if balance_minor:
                ledger.record(conn, user_id, balance_minor, ledger.ADMIN, f"audit-seed:{user_id}")

        await self.app.db.run(create)
        return user_id

    async def post(self, body: bytes, signature: str | None = None) -> httpx.Response:
        signature = signature if signature is not None else sign_webhook_body(self.fake.token, body)
        async with httpx.AsyncClient(timeout=15) as http:
            return await http.post(self.url + WEBHOOK_PATH, content=body, headers={SIGNATURE_HEADER: signature})


@pytest.fixture
async def payments(
    fake_cryptopay: tuple[FakeCryptoPay, str], db_dsn: str, write_config: Callable[..., Path], tmp_path: Path,
    fake_telegram: tuple[FakeTelegram, str],
) -> AsyncIterator[Payments]:  # fmt: skip
    fake, api_url = fake_cryptopay
    fake.webhooks_enabled = False  # the test posts the updates itself
    config = full_config(
        write_config, db_dsn, tmp_path, fake_telegram, cryptopay=fake_cryptopay,
        database={"statement_timeout_ms": 1500}, telegram={"admin_ids": [1]},
    )  # fmt: skip
    async with (
        open_app(config, single_instance=False) as app,
        open_cryptopay_client(fake.token, api_url, timeout=5) as client,
        trio.open_nursery() as nursery,
    ):
        router = build_router(app)
        add_payment_routes(router, app, config.cryptopay.token)
        with trio.fail_after(IO_TIMEOUT):
            url = await nursery.start(run_http, app, router)
        yield Payments(app, client, fake, db_dsn, url.rstrip("/"))
        nursery.cancel_scope.cancel()


# --- the guard comes before any mutation ----------------------------------------------------------

COUNT_WRITES = """
CREATE SEQUENCE audit_write_attempts;
CREATE FUNCTION audit_count_write() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM nextval('audit_write_attempts');
    IF TG_OP = 'DELETE' THEN RETURN OLD; END IF;
    RETURN NEW;
END $$;
"""


def count_every_write(dsn: str) -> None:
    """Every row about to be inserted, updated or deleted in any table bumps a sequence (which no
    rollback undoes)."""
    sql(dsn, COUNT_WRITES)
    tables = [t for (t,) in sql(dsn, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
    for table in tables:
        sql(dsn, f"CREATE TRIGGER audit_count BEFORE INSERT OR UPDATE OR DELETE ON {table} "
                 "FOR EACH ROW EXECUTE FUNCTION audit_count_write()")  # fmt: skip


def write_attempts(dsn: str) -> int:
    return int(scalar(dsn, "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM audit_write_attempts"))


async def test_replaying_a_finalized_payment_attempts_no_write_at_all(payments: Payments) -> None:
    """Crypto Pay (webhook bytes again, the watcher's path), Stars (successful_payment again) and balance
    (pay again): after the first, each replay attempts zero row writes — the guard comes first."""
    env = payments
    with trio.fail_after(IO_TIMEOUT):
        alice, bob, carol = await env.user(2001), await env.user(2002), await env.user(2003, balance_minor=2000)
        purchase, _ = await start_cryptopay_purchase(env.app, env.client, alice, plan_code="m1")
        assert purchase.invoice_id is not None
        env.fake.pay(purchase.invoice_id)
        (update,) = env.fake.suppressed_updates
        invoice = await env.client.get_invoice(purchase.invoice_id)
        stars = await start_stars_purchase(env.app, bob, plan_code="m1")
        balance_purchase = await _pending_balance_purchase(env, carol)

        count_every_write(env.dsn)
        first = await env.post(update.body, update.signature)
        assert first.json()["result"] == "granted"
        stars_first = await finalize_stars_payment(
            env.app, stars.purchase.id, telegram_payment_charge_id="charge-1", total_amount=250, currency="XTR"
        )
        assert stars_first.status == "granted"
        balance_first = await pay_purchase_with_balance(env.app, carol, balance_purchase)
        assert balance_first.status == "granted"
        applied = write_attempts(env.dsn)
        assert applied > 0

        replays = [
            ("webhook, same bytes", lambda: env.post(update.body, update.signature)),
            ("watcher / late webhook", lambda: finalize_cryptopay_invoice(env.app, invoice)),
            ("stars successful_payment again", lambda: finalize_stars_payment(
                env.app, stars.purchase.id, telegram_payment_charge_id="charge-1", total_amount=250, currency="XTR")),
            ("balance pay again", lambda: _refused(pay_purchase_with_balance(env.app, carol, balance_purchase))),
        ]  # fmt: skip
        for name, replay in replays:
            for _ in range(3):
                result = await replay()
                status = result.json()["result"] if isinstance(result, httpx.Response) else result
                status = getattr(status, "status", status)
                assert status in ("already_paid", "payments.already_paid"), (name, status)
                assert write_attempts(env.dsn) == applied, f"{name}: a replay attempted a write"
    assert sql(env.dsn, "SELECT provider, count(*) FROM payments GROUP BY 1 ORDER BY 1") == [
        ("balance", 1), ("cryptopay", 1), ("stars", 1)
    ]  # fmt: skip


async def _refused(call: Awaitable[Any]) -> str:
    """A balance payment of a paid purchase raises PurchaseNotPayable (its way of saying "already paid")."""
    try:
        outcome = await call
    except PurchaseNotPayable as exc:
        return exc.reason_key
    return str(outcome.status)


async def _pending_balance_purchase(env: Payments, user_id: int) -> int:
    from vpnd.db import purchases
    from vpnd.pricing import min_price_minor, plan_offer

    plan = env.app.config.plan("m1")
    assert plan is not None
    purchase = await env.app.db.run(
        purchases.create_purchase, user_id, plan_offer(plan), method="balance", ttl_minutes=30,
        min_price_minor=min_price_minor(env.app.config.payments, "USD"),
    )  # fmt: skip
    return purchase.id


# --- the webhook answers 200 for every verified outcome -------------------------------------------


def _resigned(body: bytes, change: Callable[[dict[str, Any]], None]) -> bytes:
    update = json.loads(body)
    change(update)
    return json.dumps(update).encode()


def _snapshot(dsn: str) -> list[Any]:
    return [
        sql(dsn, "SELECT id, status, paid_at FROM purchases ORDER BY id"),
        sql(dsn, "SELECT purchase_id, provider_payment_id, outcome FROM payments ORDER BY id"),
        sql(dsn, "SELECT user_id, expires_at FROM subscriptions ORDER BY user_id"),
        sql(dsn, "SELECT user_id, delta_minor, reason FROM balance_ledger ORDER BY id"),
    ]


async def test_webhook_answers_200_for_every_verified_outcome_including_internal_errors(payments: Payments) -> None:
    env = payments
    with trio.fail_after(IO_TIMEOUT):
        users = [await env.user(uid) for uid in (3001, 3002, 3003, 3004, 3005)]
        updates = []
        for user in users:
            purchase, _ = await start_cryptopay_purchase(env.app, env.client, user, plan_code="m1")
            assert purchase.invoice_id is not None
            env.fake.pay(purchase.invoice_id)
            updates.append((purchase.id, env.fake.suppressed_updates[-1]))
        (granted_id, genuine), (mismatch_id, mismatch), (error_id, failing), (locked_id, locked), _ = updates

        def amount(update: dict[str, Any]) -> None:
            update["payload"]["amount"] = "0.01"

        def unknown(update: dict[str, Any]) -> None:
            update["payload"]["payload"] = "987654321"
            update["payload"]["invoice_id"] = 99999

        def other_invoice_same_purchase(update: dict[str, Any]) -> None:
            update["payload"]["invoice_id"] = update["payload"]["invoice_id"] + 1000

        def refunded(update: dict[str, Any]) -> None:
            update["update_type"] = "invoice_refunded"

        def unpaid(update: dict[str, Any]) -> None:
            update["payload"]["status"] = "active"

        cases: list[tuple[str, bytes, str]] = [
            ("granted", genuine.body, "granted"),
            ("replayed", genuine.body, "already_paid"),
            ("a second invoice paying the same purchase", _resigned(genuine.body, other_invoice_same_purchase),
             "duplicate_payment"),
            ("amount mismatch", _resigned(mismatch.body, amount), "amount_mismatch"),
            ("unknown purchase", _resigned(genuine.body, unknown), "unknown_purchase"),
            ("another update type", _resigned(genuine.body, refunded), "ignored"),
            ("an invoice that is not paid", _resigned(genuine.body, unpaid), "ignored"),
        ]  # fmt: skip
        for name, body, expected in cases:
            response = await env.post(body)
            assert (response.status_code, response.json()["result"]) == (200, expected), name

        # An internal error: a trigger makes the payment insert fail. 200, nothing half-done.
        sql(env.dsn, "CREATE FUNCTION audit_fail() RETURNS trigger LANGUAGE plpgsql AS "
                     "$$ BEGIN RAISE EXCEPTION 'disk on fire'; END $$")  # fmt: skip
        sql(env.dsn, "CREATE TRIGGER audit_fail BEFORE INSERT ON payments FOR EACH ROW EXECUTE FUNCTION audit_fail()")
        before = _snapshot(env.dsn)
        response = await env.post(failing.body, failing.signature)
        assert (response.status_code, response.json()["result"]) == (200, "error")
        assert _snapshot(env.dsn) == before
        sql(env.dsn, "DROP TRIGGER audit_fail ON payments")

        # A database timeout: the test holds the purchase's row lock past the statement timeout.
        import psycopg

        with psycopg.connect(env.dsn) as blocker:
            blocker.execute("SELECT 1 FROM purchases WHERE id = %s FOR UPDATE", (locked_id,))
            response = await env.post(locked.body, locked.signature)
            assert (response.status_code, response.json()["result"]) == (200, "error")
            assert _snapshot(env.dsn) == before
            blocker.rollback()

        # The ones that failed are applied when retried (the watcher's job), once.
        for _, update in ((error_id, failing), (locked_id, locked)):
            assert (await env.post(update.body, update.signature)).json()["result"] == "granted"
    statuses = dict(sql(env.dsn, "SELECT id, status FROM purchases"))
    assert statuses[granted_id] == statuses[error_id] == statuses[locked_id] == "paid"
    assert scalar(env.dsn, "SELECT outcome FROM payments WHERE purchase_id = %s", mismatch_id) == "amount_mismatch"
    assert scalar(env.dsn, "SELECT count(*) FROM payments WHERE outcome = 'granted'") == 3


# --- retries never double-apply -------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_restarts_mid_watcher_webhook_and_renewal_apply_everything_exactly_once(
    fake_telegram: tuple[FakeTelegram, str],
    fake_cryptopay: tuple[FakeCryptoPay, str],
    db_dsn: str,
    write_config: Callable[..., Path],
    tmp_path: Path,
) -> None:
    """40 invoices paid (half with their webhooks lost, the rest delivered twice and retried), 40
    auto-renewals due, every row write slowed so rounds are long — and the daemon hard-cancelled three
    times mid-way (each cut as soon as that run has applied something; the invoices are paid a quarter
    per run), then started again. Each invoice pays once, each renewal period is charged once."""
    fake, _ = fake_telegram
    pay, api_url = fake_cryptopay
    pay.webhook_copies = 2
    config = full_config(
        write_config, db_dsn, tmp_path, fake_telegram, cryptopay=fake_cryptopay, workers={"batch_size": 5}
    )
    buyers = list(range(6001, 6041))
    renewers = list(range(7001, 7041))
    _seed_renewals(db_dsn, renewers)
    for uid in [*buyers, *renewers]:
        fake.add_user(uid, f"U{uid}").started = True
    renew_from = dict(sql(db_dsn, "SELECT user_id, expires_at FROM subscriptions"))

    purchase_ids = []
    with trio.fail_after(240):
        async with open_app(config, single_instance=False) as app, open_cryptopay_client(pay.token, api_url) as client:
            for uid in buyers:
                await app.db.run(lambda conn, uid=uid: upsert_user(conn, uid, None, f"U{uid}", "en"))
                purchase, _ = await start_cryptopay_purchase(app, client, uid, plan_code="m1")
                purchase_ids.append(purchase.id)
        # Every row written now costs 80 ms, so rounds and finalizes are long enough to be cut.
        sql(db_dsn, "CREATE FUNCTION audit_slow() RETURNS trigger LANGUAGE plpgsql AS "
                    "$$ BEGIN PERFORM pg_sleep(0.08); RETURN NEW; END $$")  # fmt: skip
        for table in ("payments", "subscriptions", "balance_ledger", "auto_renewals"):
            sql(db_dsn, f"CREATE TRIGGER audit_slow BEFORE INSERT OR UPDATE ON {table} "
                        "FOR EACH ROW EXECUTE FUNCTION audit_slow()")  # fmt: skip

        total = len(buyers) + len(renewers)
        stages = 4  # the invoices are paid a quarter per run: the last quarter only after the last cut

        def pay_stage(stage: int) -> None:
            size = len(purchase_ids) // stages
            for index in range(stage * size, (stage + 1) * size):
                pay.webhooks_enabled = index % 2 == 0  # odd ones: webhook lost, the watcher must find it
                pay.pay(scalar(db_dsn, "SELECT invoice_id FROM purchases WHERE id = %s", purchase_ids[index]))
            pay.webhooks_enabled = True

        at_cut: list[int] = []
        for restart in range(3):
            async with trio.open_nursery() as doomed:
                vpnd = await start_vpnd(doomed, config)
                pay.webhook_url = f"{vpnd.http_url}{WEBHOOK_PATH}"
                pay_stage(restart)
                # Cut as soon as this run has applied something: renewals (batches of 5, 3 slowed writes
                # each) and this stage's payments are then still under way.
                progress = _progress_since(db_dsn, at_cut[-1] if at_cut else 0)
                await poll(progress, 60, what=f"progress before cut {restart + 1}")
                at_cut.append(_applied(db_dsn))
                doomed.cancel_scope.cancel()  # everything at once: in-flight transactions roll back
            await instance_lock_released(db_dsn)

        async with trio.open_nursery() as nursery:
            vpnd = await start_vpnd(nursery, config)
            pay.webhook_url = f"{vpnd.http_url}{WEBHOOK_PATH}"
            pay_stage(stages - 1)
            await poll(lambda: _applied(db_dsn) == total, 60, what="everything applied")
            # Any second application would come from a later round of the watcher or the renewal worker:
            # let each complete two more rounds after everything was applied.
            await poll(_more_rounds(vpnd.app, "payment_watcher", "renewal", count=2), 60, what="two more rounds")
            await vpnd.stop()

    print(f"\napplied at the three cuts: {at_cut} of {total}")
    # Each cut came after progress (more applied than at the previous one) and before the last stage was paid.
    assert 0 < at_cut[0] < at_cut[1] < at_cut[2] < total, at_cut
    assert sql(db_dsn, "SELECT purchase_id, count(*) FROM payments GROUP BY 1 HAVING count(*) <> 1") == []
    assert scalar(db_dsn, "SELECT count(*) FROM payments WHERE outcome = 'granted' AND provider <> 'balance'") == len(
        buyers
    )
    # Each renewal is a purchase with one payment (its id the period's ledger reference), once.
    renewed = dict(sql(db_dsn, "SELECT user_id, count(*) FROM payments WHERE provider_payment_id LIKE 'auto_renew:%%' "
                               "GROUP BY 1"))  # fmt: skip
    assert renewed == dict.fromkeys(renewers, 1)
    for uid, days in sql(db_dsn, "SELECT user_id, round(extract(epoch FROM expires_at - now()) / 86400) "
                                 "FROM subscriptions WHERE user_id BETWEEN 6001 AND 6040"):  # fmt: skip
        assert days == 30, uid
    charged = dict(sql(db_dsn, "SELECT user_id, count(*) FROM balance_ledger WHERE reason = %s GROUP BY 1",
                       LEDGER_REASON))  # fmt: skip
    assert charged == dict.fromkeys(renewers, 1)
    for uid, expires in sql(db_dsn, "SELECT user_id, expires_at FROM subscriptions WHERE user_id >= 7001"):
        assert expires - renew_from[uid] == dt.timedelta(days=30), uid
    assert sql(db_dsn, "SELECT u.id FROM users u LEFT JOIN balance_ledger l ON l.user_id = u.id GROUP BY u.id "
                       "HAVING u.balance_minor <> coalesce(sum(l.delta_minor), 0)") == []  # fmt: skip


def _seed_renewals(dsn: str, user_ids: list[int]) -> None:
    sql(dsn, "INSERT INTO users (id, first_name, referral_code, balance_minor) "
             "SELECT id, 'U' || id, 'ref' || id, 1000 FROM unnest(%s::bigint[]) id", user_ids)  # fmt: skip
    sql(dsn, "INSERT INTO balance_ledger (user_id, delta_minor, reason, reference) "
             "SELECT id, 1000, 'topup', 'seed:' || id FROM unnest(%s::bigint[]) id", user_ids)  # fmt: skip
    sql(dsn, "INSERT INTO subscriptions (user_id, kind, status, uuid, sub_token, plan_code, expires_at, auto_renew) "
             "SELECT id, 'paid', 'active', gen_random_uuid(), 'tok' || id, 'm1', now() + interval '2 hours', true "
             "FROM unnest(%s::bigint[]) id", user_ids)  # fmt: skip


def _progress_since(dsn: str, applied: int) -> Callable[[], bool]:
    """A condition: more than `applied` payments and renewals have been applied."""
    return lambda: _applied(dsn) > applied


def _more_rounds(app: App, *workers: str, count: int) -> Callable[[], bool]:
    """A condition: each of `workers` has completed `count` more rounds (vpnd_worker_rounds_total) than now."""

    def rounds(worker: str) -> int:
        return int(app.metrics.registry.get_sample_value("vpnd_worker_rounds_total", {"worker": worker}) or 0)

    targets = {worker: rounds(worker) + count for worker in workers}
    return lambda: all(rounds(worker) >= target for worker, target in targets.items())


def _applied(dsn: str) -> int:
    paid = scalar(dsn, "SELECT count(*) FROM payments WHERE provider <> 'balance'")  # renewals: their ledger rows
    renewed = scalar(dsn, "SELECT count(*) FROM balance_ledger WHERE reason = %s", LEDGER_REASON)
    return int(paid) + int(renewed)
