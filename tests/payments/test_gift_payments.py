"""Gifts at the payments level: a gift purchase paid through Crypto Pay (webhook and watcher) or the balance
makes exactly one gift; redemption is once even for redeemers at the same instant; an admin's refund
(`vpnd admin gift refund`, a real subprocess) credits the buyer once and voids the code."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import psycopg
import trio

from tests.harness import vpnd_cli
from tests.payments.conftest import IO_TIMEOUT, Env
from vpnd.db.gifts import ALPHABET, CODE_LENGTH, Redemption
from vpnd.db.payments import reverse_refunded_purchase
from vpnd.payments.service import (
    finalize_stars_payment,
    pay_with_balance,
    rules_of,
    start_cryptopay_purchase,
    start_stars_purchase,
)
from vpnd.payments.watcher import watch_once
from vpnd.services.gifts import redeem_gift

BUYER, BOB, CAROL = 3001, 3002, 3003


def code_of(env: Env, purchase_id: int) -> str:
    code = env.scalar("SELECT code FROM gifts WHERE purchase_id = %s", (purchase_id,))
    assert isinstance(code, str)
    return code


async def buy_gift_with_balance(env: Env, buyer: int) -> str:
    outcome = await pay_with_balance(env.app, buyer, "m1", gift=True)
    assert outcome.status == "gifted"
    return code_of(env, outcome.purchase_id)


async def test_gift_paid_by_webhook_and_watcher_makes_one_gift_and_leaves_the_buyer_alone(env: Env) -> None:
    buyer = await env.add_user(BUYER)
    env.fake.webhook_copies = 2
    with trio.fail_after(IO_TIMEOUT):
        purchase, _ = await start_cryptopay_purchase(env.app, env.client, buyer, plan_code="m1", gift=True)
        assert (purchase.kind, purchase.days, purchase.amount_minor) == ("gift", 30, 499)
        assert purchase.invoice_id is not None
        env.fake.webhooks_enabled = False  # the watcher sees the payment first ...
        env.fake.pay(purchase.invoice_id)
        assert await watch_once(env.app, env.client) == 1
        assert await watch_once(env.app, env.client) == 0  # ... twice: nothing more
        env.fake.webhooks_enabled = True
        assert env.fake.deliver_suppressed() == 1  # ... then the webhook arrives, twice
        await env.fake.wait_until(lambda: len(env.fake.successful_deliveries()) == 2)

    assert env.scalar("SELECT count(*) FROM gifts") == 1
    assert env.scalar("SELECT count(*) FROM payments WHERE purchase_id = %s", (purchase.id,)) == 1
    code = code_of(env, purchase.id)
    assert len(code) == CODE_LENGTH and set(code) <= set(ALPHABET)
    assert env.sql("SELECT buyer_id, plan_code, days, value_minor, currency, status FROM gifts") == [
        (buyer, "m1", 30, 499, "USD", "unredeemed")
    ]
    # The buyer's own subscription is untouched; they are told the code once (no bot here: the link is the command).
    assert env.scalar("SELECT count(*) FROM subscriptions WHERE user_id = %s", (buyer,)) == 0
    texts = [row[0] for row in env.sql("SELECT payload ->> 'text' FROM outbox WHERE chat_id = %s", (buyer,))]
    assert len(texts) == 1 and code in texts[0] and f"/start gift_{code}" in texts[0]
    assert env.scalar("SELECT count(*) FROM balance_ledger WHERE reason = 'referral_reward'") == 0


async def test_two_redeemers_at_the_same_instant_exactly_one_wins(env: Env) -> None:
    buyer = await env.add_user(BUYER, balance_minor=2000)
    redeemers = [await env.add_user(4000 + n) for n in range(6)]
    code = await buy_gift_with_balance(env, buyer)
    outcomes: dict[int, Redemption] = {}

    # Hold the gift's row so every redeemer is queued on it, then let them all go at once.
    with psycopg.connect(env.dsn) as holder:
        holder.execute("SELECT id FROM gifts WHERE code = %s FOR UPDATE", (code,))
        async with trio.open_nursery() as nursery:

            async def redeem(user_id: int) -> None:
                outcomes[user_id] = await redeem_gift(env.app, user_id, code)

            for user_id in redeemers:
                nursery.start_soon(redeem, user_id)
            with trio.fail_after(IO_TIMEOUT):
                while env.scalar("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'") < 6:
                    await trio.sleep(0.02)
            holder.commit()

    winners = [user_id for user_id, outcome in outcomes.items() if outcome.ok]
    assert len(winners) == 1
    assert {o.reason for o in outcomes.values() if not o.ok} == {"gifts.already_redeemed"}
    assert env.sql("SELECT user_id, plan_code, kind FROM subscriptions") == [(winners[0], "m1", "paid")]
    assert env.sql("SELECT status, redeemed_by FROM gifts") == [("redeemed", winners[0])]
    # Someone else refused is not a wrong guess: nothing counted against them.
    assert env.scalar("SELECT count(*) FROM promo_attempts") == 0
    # The buyer hears of it once.
    assert (
        env.scalar("SELECT count(*) FROM outbox WHERE chat_id = %s AND dedupe_key LIKE 'gift_redeemed:%%'", (buyer,))
        == 1
    )


async def test_redeeming_extends_a_running_subscription_and_the_buyer_may_redeem_their_own(env: Env) -> None:
    buyer = await env.add_user(BUYER, balance_minor=2000)
    first, second = await buy_gift_with_balance(env, buyer), await buy_gift_with_balance(env, buyer)
    assert env.scalar("SELECT balance_minor FROM users WHERE id = %s", (buyer,)) == 2000 - 2 * 499
    assert (await redeem_gift(env.app, buyer, f"gift_{first.lower()}")).ok  # own gift; case and prefix forgiven
    assert (await redeem_gift(env.app, buyer, f"https://t.me/bot?start=gift_{second}")).ok  # the pasted link
    left = env.scalar("SELECT expires_at - now() FROM subscriptions WHERE user_id = %s", (buyer,))
    assert dt.timedelta(days=59, hours=23) < left <= dt.timedelta(days=60)
    # Their own redemption tells nobody anything (no "your gift was redeemed" to themselves).
    assert env.scalar("SELECT count(*) FROM outbox WHERE dedupe_key LIKE 'gift_redeemed:%%'") == 0


async def test_admin_refund_credits_once_voids_the_code_and_a_redeemed_gift_is_not_refunded(
    env: Env, tmp_path: Path
) -> None:
    buyer = await env.add_user(BUYER, balance_minor=1000)
    await env.add_users(BOB, CAROL)
    unredeemed = await buy_gift_with_balance(env, buyer)
    redeemed = await buy_gift_with_balance(env, buyer)
    assert (await redeem_gift(env.app, CAROL, redeemed)).ok
    assert env.scalar("SELECT balance_minor FROM users WHERE id = %s", (buyer,)) == 2
    cli = vpnd_cli(tmp_path / "config.toml")  # the env's config file

    done = await trio.to_thread.run_sync(cli, "admin", "gift", "refund", unredeemed.lower(), "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)["result"]
    assert (result["code"], result["buyer_id"], result["refunded_minor"], result["balance_minor"]) == (
        unredeemed,
        buyer,
        499,
        501,
    )
    again = await trio.to_thread.run_sync(cli, "admin", "gift", "refund", unredeemed)
    assert again.returncode == 1 and "refunded already" in again.stderr
    late = await trio.to_thread.run_sync(cli, "admin", "gift", "refund", redeemed)
    assert late.returncode == 1 and "redeemed already" in late.stderr
    missing = await trio.to_thread.run_sync(cli, "admin", "gift", "refund", "NOSUCHCODE22")
    assert missing.returncode == 1 and "no gift NOSUCHCODE22" in missing.stderr

    # Credited once, through the ledger; the buyer is told once.
    assert env.scalar("SELECT balance_minor FROM users WHERE id = %s", (buyer,)) == 501
    assert env.sql("SELECT delta_minor, reason FROM balance_ledger WHERE reference LIKE 'gift:%%'") == [(499, "refund")]
    assert env.scalar("SELECT count(*) FROM outbox WHERE dedupe_key LIKE 'gift_refunded:%%'") == 1
    # Every attempt is audited, done or refused.
    assert env.sql("SELECT target, result FROM admin_audit WHERE action = 'gift_refund' ORDER BY id") == [
        (unredeemed, "ok"),
        (unredeemed, "not_refundable"),
        (redeemed, "not_refundable"),
        ("NOSUCHCODE22", "not_found"),
    ]
    # A refunded code cannot be redeemed.
    refused = await redeem_gift(env.app, BOB, unredeemed)
    assert refused.reason == "gifts.refunded"
    assert env.scalar("SELECT count(*) FROM subscriptions WHERE user_id = %s", (BOB,)) == 0


def test_codes_are_random_and_well_formed() -> None:
    from vpnd.db.gifts import new_code, normalize_code

    codes = {new_code() for _ in range(2000)}
    assert len(codes) == 2000
    assert all(re.fullmatch(f"[{ALPHABET}]{{{CODE_LENGTH}}}", c) for c in codes)
    sample = next(iter(codes))
    assert normalize_code(f"  gift_{sample.lower()} ") == sample
    for garbage in ("", "gift_", "x" * 500, sample[:-1], sample + "A", "'; DROP TABLE gifts; --", "ĞİFT0000000"):
        assert normalize_code(garbage) is None


async def test_a_stars_gift_refunded_by_the_provider_voids_its_unredeemed_code(env: Env) -> None:
    buyer = await env.add_user(BUYER)
    await env.add_user(BOB)
    invoice = await start_stars_purchase(env.app, buyer, "m1", gift=True)
    assert (invoice.currency, invoice.amount, invoice.purchase.kind) == ("XTR", 250, "gift")
    outcome = await finalize_stars_payment(
        env.app, invoice.payload, telegram_payment_charge_id="stx-gift", total_amount=250, currency="XTR"
    )
    again = await finalize_stars_payment(
        env.app, invoice.payload, telegram_payment_charge_id="stx-gift", total_amount=250, currency="XTR"
    )
    assert (outcome.status, again.status) == ("gifted", "already_paid")
    code = code_of(env, invoice.purchase.id)
    assert env.sql("SELECT value_minor, currency FROM gifts") == [(499, "USD")]  # the price the Stars stood for

    reversal = await env.app.db.run(reverse_refunded_purchase, invoice.purchase.id, rules=rules_of(env.app))
    assert reversal.recorded and reversal.days_removed == 0
    assert env.scalar("SELECT status FROM gifts") == "refunded"
    assert (await redeem_gift(env.app, BOB, code)).reason == "gifts.refunded"
    assert env.scalar("SELECT count(*) FROM subscriptions") == 0
