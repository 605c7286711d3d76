"""Referral cashback by level and the withdrawable earnings bucket (issue 20), through real payments.

Invited users pay as Crypto Pay does it (an invoice, then its signed webhook); the referrer's reward is
computed in the grant transaction at their level then. A top-up, and a plan bought from the balance,
show that only referral earnings are withdrawable and that the balance spends them last.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any

import pytest
import trio

from tests.payments.conftest import IO_TIMEOUT, Env, open_env
from vpnd.db import ledger, referrals
from vpnd.payments.service import pay_with_balance, start_cryptopay_purchase

LEVELS = [{"paying": 0, "percent": 10}, {"paying": 5, "percent": 25}, {"paying": 20, "percent": 45}]
REFERRER = 8000
M1 = 499  # the m1 plan, 4.99 USD


@pytest.fixture
async def leveled(make_config: Callable[..., Any], db_dsn: str) -> AsyncIterator[Env]:
    configure = partial(make_config, referral={"levels": LEVELS, "withdraw_min": "1"})
    async with open_env(configure, db_dsn) as opened:
        yield opened


async def pay(env: Env, user_id: int, **what: Any) -> None:
    with trio.fail_after(IO_TIMEOUT):
        purchase, _ = await start_cryptopay_purchase(env.app, env.client, user_id, **what)
        assert purchase.invoice_id is not None
        delivered = len(env.fake.successful_deliveries())
        env.fake.pay(purchase.invoice_id)
        await env.fake.wait_until(lambda: len(env.fake.successful_deliveries()) == delivered + 1)


def rewards(env: Env) -> list[int]:
    query = "SELECT delta_minor FROM balance_ledger WHERE user_id = %s AND reason = 'referral_reward' ORDER BY id"
    return [delta for (delta,) in env.sql(query, (REFERRER,))]


def withdrawable(env: Env) -> int:
    return int(env.scalar("SELECT coalesce(sum(withdrawable_minor), 0) FROM referral_earnings WHERE user_id = %s",
                          (REFERRER,)))  # fmt: skip


def balance(env: Env) -> int:
    return int(env.scalar("SELECT balance_minor FROM users WHERE id = %s", (REFERRER,)))


async def test_the_fifth_paying_referral_moves_the_referrer_to_25_percent(leveled: Env) -> None:
    env = leveled
    await env.add_user(REFERRER)
    friends = [await env.add_user(8001 + i, referred_by=REFERRER) for i in range(6)]

    # A referred user's top-up is not a paying referral: it buys no level (and earns no reward).
    await pay(env, friends[5], topup_minor=1000)
    assert await env.app.db.run(referrals.paying_referrals, REFERRER) == 0
    for friend in friends[:4]:
        await pay(env, friend, plan_code="m1")
    assert rewards(env) == [M1 * 10 // 100] * 4  # 49 each: level 10 % with 1..4 paying referrals

    await pay(env, friends[4], plan_code="m1")  # the fifth paying referral: this payment is at 25 %
    assert rewards(env)[-1] == M1 * 25 // 100 == 124
    await pay(env, friends[0], plan_code="m1")  # a repeat payment by the first: 25 % as well
    assert rewards(env)[-1] == 124
    assert await env.app.db.run(referrals.paying_referrals, REFERRER) == 5

    earned = 4 * 49 + 2 * 124
    assert withdrawable(env) == balance(env) == earned

    # The referrer's own top-up goes to the balance, not to what may be withdrawn.
    await pay(env, REFERRER, topup_minor=1000)
    assert balance(env) == earned + 1000
    assert withdrawable(env) == earned

    # Earnings pay for plans too, spent last: the 12.00 plan takes the 10.00 top-up, then 2.00 of earnings.
    with trio.fail_after(IO_TIMEOUT):
        await pay_with_balance(env.app, REFERRER, "m3")
    assert balance(env) == earned + 1000 - 1200
    assert withdrawable(env) == earned - 200
    assert env.scalar("SELECT coalesce(sum(delta_minor), 0) FROM balance_ledger WHERE user_id = %s", (REFERRER,)) == (
        balance(env)
    )


async def test_earnings_bucket_follows_every_balance_change(env: Env) -> None:
    """The bucket's rules on a real database: rewards add, other debits spend it last, reversals first."""
    user = await env.add_user(8100)

    def change(conn: Any, delta: int, reason: str, reference: str) -> tuple[int, int]:
        ledger.record(conn, user, delta, reason, reference)
        return ledger.balance_of(conn, user), ledger.withdrawable_of(conn, user)

    run = env.app.db.run
    assert await run(change, 300, ledger.REFERRAL_REWARD, "purchase:1") == (300, 300)
    assert await run(change, 500, ledger.TOPUP, "topup:1") == (800, 300)
    assert await run(change, -600, ledger.ADMIN, "admin:1") == (200, 200)  # 500 of the top-up, then 100 earned
    assert await run(change, 400, ledger.TOPUP, "topup:2") == (600, 200)
    # A reward taken back (its purchase refunded) leaves the earnings first: the top-up stays not withdrawable.
    assert await run(change, -150, ledger.REFERRAL_REVERSAL, "purchase:1") == (450, 50)
    assert await run(change, -100, ledger.REFERRAL_REVERSAL, "purchase:2") == (350, 0)
