"""Withdrawing referral earnings (issue 20), end to end: the user through the fake Bot API, the admins
through the buttons on the notice the outbox delivers them and through `vpnd admin` as a real process.

Approved twice (two presses at once, the CLI at the same moment, then again) pays once; a rejection gives
the hold back; a top-up is never withdrawable; a request below `[referral] withdraw_min` is refused; a
forged approve from someone who is not an admin changes nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import trio

from tests.harness import bot_config, has_button, press, say, sql, start_vpnd, text_has
from tests.telegram.test_flows import forge_callback
from vpnd.compose import Services
from vpnd.db import ledger, referrals
from vpnd.services import withdrawals
from vpnd.services.admin_actions import Actor
from vpnd.telegram.admin.verbs import Verb
from vpnd.texts import Texts
from vpnd_sandbox.telegram_fake import ChatMessage, FakeTelegram

ADMIN = 1  # bot_config's [telegram].admin_ids
USER = 5301
SERVICES = Services.only("listener", "poller", "outbox", "http")


def seed(dsn: str, user_id: int, *, earned: int, topped_up: int) -> None:
    """Referral earnings and a top-up on the user's balance, through the ledger as every change goes."""
    with psycopg.connect(dsn) as conn:
        if earned:
            ledger.record(conn, user_id, earned, ledger.REFERRAL_REWARD, f"purchase:seed-{user_id}")
        if topped_up:
            ledger.record(conn, user_id, topped_up, ledger.TOPUP, f"topup:seed-{user_id}")


def money(dsn: str, user_id: int) -> tuple[int, int]:
    """(balance, withdrawable), checking that the balance is its ledger's sum."""
    balance = sql(dsn, "SELECT balance_minor FROM users WHERE id = %s", user_id)[0][0]
    total = sql(dsn, "SELECT coalesce(sum(delta_minor), 0) FROM balance_ledger WHERE user_id = %s", user_id)[0][0]
    assert balance == total
    rows = sql(dsn, "SELECT withdrawable_minor FROM referral_earnings WHERE user_id = %s", user_id)
    return int(balance), int(rows[0][0]) if rows else 0


async def open_invite(fake: FakeTelegram, user_id: int) -> ChatMessage:
    menu = await say(fake, user_id, "/start")
    return await press(fake, user_id, menu, "invite")


async def request_withdrawal(fake: FakeTelegram, dsn: str, user_id: int, details: str) -> int:
    """Invite → Withdraw → the payout details: the request's id."""
    invite = await open_invite(fake, user_id)
    asked = await press(fake, user_id, invite, "wd", predicate=text_has("payout details"))
    assert asked.callback_data == ["wd_cancel"]
    done = await say(fake, user_id, details, predicate=text_has("sent"))
    assert "held until an admin decides" in (done.text or "")
    query = "SELECT id FROM withdrawals WHERE user_id = %s AND status = 'pending'"
    [(withdrawal_id,)] = sql(dsn, query, user_id)
    return int(withdrawal_id)


async def run_cli(config: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    """`vpnd admin ...` as its own process."""
    command = [sys.executable, "-m", "vpnd", "admin", *args, "--config", str(config)]
    return await trio.run_process(command, capture_stdout=True, capture_stderr=True, check=False)


async def test_withdraw_approved_twice_at_once_and_again_pays_once(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    config = bot_config(write_config, db_dsn, fake, base_url, referral={"withdraw_min": "5"})
    cli_config = write_config(name="cli.toml", database={"dsn": db_dsn}, telegram={"admin_ids": [ADMIN]})
    fake.add_user(ADMIN, "Admin").started = True
    fake.add_user(USER, "Rita").started = True
    await start_vpnd(nursery, config, SERVICES)
    with trio.fail_after(30):
        await say(fake, USER, "/start")
        seed(db_dsn, USER, earned=800, topped_up=1000)
        invite = await open_invite(fake, USER)
        assert "Withdrawable: 8.00 USD (minimum 5.00 USD)" in (invite.text or "")
        assert "wd" in invite.callback_data

        # Too long payout details: asked again, nothing held.
        invite = await open_invite(fake, USER)
        await press(fake, USER, invite, "wd", predicate=text_has("payout details"))
        again = await say(fake, USER, "x" * 201, predicate=text_has("too long"))
        assert again.callback_data == ["wd_cancel"]
        assert sql(db_dsn, "SELECT count(*) FROM withdrawals") == [(0,)]

        withdrawal_id = await request_withdrawal(fake, db_dsn, USER, "TRC20 <b>T9yD14Nj9j7xAB4dbGeiX9h8unkKHxuWwb</b>")
        assert money(db_dsn, USER) == (1000, 0)  # the earnings are held: only the top-up remains, not withdrawable
        invite = await open_invite(fake, USER)
        assert "wd" not in invite.callback_data and f"#{withdrawal_id}" in (invite.text or "")
        # One pending request per user: a second "Withdraw" (a stale button) is refused.
        forge_callback(fake, USER, invite, "wd")
        await fake.wait_for_bot_message(USER, text_has("already have a withdrawal request"))

        # The admin's notice arrives with Approve / Reject; the details are shown as text, not markup.
        approve = Verb.WITHDRAWAL_APPROVE.data(withdrawal_id)
        notice = await fake.wait_for_bot_message(ADMIN, has_button(approve), since=0)
        assert "<b>T9yD14" in (notice.text or "")  # escaped: the fake parses HTML, so markup would be gone
        assert "8.00 USD" in (notice.text or "")

        # Two presses at once and the CLI at the same moment.
        results: list[Any] = []

        async def cli_approve() -> None:
            results.append(await run_cli(cli_config, "withdrawal", "approve", str(withdrawal_id), "--json"))

        async with trio.open_nursery() as racing:
            presses = [fake.user_presses_button(ADMIN, notice.message_id, approve) for _ in range(2)]
            racing.start_soon(cli_approve)

        def audited() -> list[tuple[Any, ...]]:
            return sql(db_dsn, "SELECT result FROM admin_audit WHERE action = 'withdrawal_approve' ORDER BY id")

        # The second, identical press may be coalesced with the first while it waits (the dispatcher's
        # flood rule): then only two decisions are audited. Either way exactly one is "ok".
        while len(audited()) < 2 or not all(query.answered for query in presses):
            await trio.sleep(0.05)
        # ... and once more, later, from the CLI.
        late = await run_cli(cli_config, "withdrawal", "approve", str(withdrawal_id))
        assert late.returncode == 1 and b"approved already" in late.stderr + late.stdout
        await fake.wait_for_bot_message(USER, text_has("was approved"), since=0)

    decisions = sorted(r for (r,) in audited())
    assert decisions.count("ok") == 1 and set(decisions) == {"ok", "decided"} and 3 <= len(decisions) <= 4
    assert sum(result.returncode == 0 for result in results) <= 1
    query = "SELECT delta_minor, reason FROM balance_ledger WHERE reference = %s"
    held = sql(db_dsn, query, f"withdrawal:{withdrawal_id}")
    assert held == [(-800, "withdrawal")]  # the payout, once
    assert money(db_dsn, USER) == (1000, 0)
    assert sql(db_dsn, "SELECT status FROM withdrawals WHERE id = %s", withdrawal_id) == [("approved",)]
    told = [m for m in fake.bot_messages(USER) if "was approved" in (m.text or "")]
    assert len(told) == 1


async def test_reject_releases_the_hold_and_a_forged_approve_is_refused(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    config = bot_config(write_config, db_dsn, fake, base_url, referral={"withdraw_min": "5"})
    cli_config = write_config(name="cli.toml", database={"dsn": db_dsn}, telegram={"admin_ids": [ADMIN]})
    fake.add_user(ADMIN, "Admin").started = True
    fake.add_user(USER, "Rita").started = True
    await start_vpnd(nursery, config, SERVICES)
    with trio.fail_after(30):
        await say(fake, USER, "/start")
        seed(db_dsn, USER, earned=600, topped_up=0)
        withdrawal_id = await request_withdrawal(fake, db_dsn, USER, "card 4111 1111 1111 1111")
        assert money(db_dsn, USER) == (0, 0)

        # The user forges the admin's Approve button: nothing reveals it, nothing changes, it is audited.
        menu = await say(fake, USER, "/start")
        forge_callback(fake, USER, menu, Verb.WITHDRAWAL_APPROVE.data(withdrawal_id))
        refused = await fake.wait_for_bot_message(USER)
        assert "approved" not in (refused.text or "")
        while not sql(db_dsn, "SELECT 1 FROM admin_audit WHERE admin_id = %s AND result = 'denied'", USER):
            await trio.sleep(0.05)
        assert sql(db_dsn, "SELECT status FROM withdrawals WHERE id = %s", withdrawal_id) == [("pending",)]
        assert sql(db_dsn, "SELECT count(*) FROM admin_audit WHERE action = 'withdrawal_approve'") == [(0,)]

        listing = await run_cli(cli_config, "withdrawals", "--json")
        listed = json.loads(listing.stdout)["result"]
        assert [(w["id"], w["status"], w["amount_minor"]) for w in listed] == [(withdrawal_id, "pending", 600)]

        rejected = await run_cli(cli_config, "withdrawal", "reject", str(withdrawal_id), "--note", "wrong card")
        assert rejected.returncode == 0, rejected.stderr
        told = await fake.wait_for_bot_message(USER, text_has("was declined"), since=0)
        assert "wrong card" in (told.text or "")
        assert money(db_dsn, USER) == (600, 600)  # back on the balance, and withdrawable again
        # A rejection is final: approving it now pays nothing.
        approve = Verb.WITHDRAWAL_APPROVE.data(withdrawal_id)
        notice = await fake.wait_for_bot_message(ADMIN, has_button(approve), since=0)
        answer = await press(fake, ADMIN, notice, approve)
        assert "decided already (rejected)" in (answer.text or "")
        assert money(db_dsn, USER) == (600, 600)

        # A new request is possible again.
        second = await request_withdrawal(fake, db_dsn, USER, "card 5500 0000 0000 0004")
        assert second != withdrawal_id and money(db_dsn, USER) == (0, 0)
    assert sql(db_dsn, "SELECT reason, delta_minor FROM balance_ledger WHERE user_id = %s ORDER BY id", USER) == [
        ("referral_reward", 600),
        ("withdrawal", -600),
        ("withdrawal_released", 600),
        ("withdrawal", -600),
    ]


async def test_top_ups_are_not_withdrawable_below_the_minimum_is_refused_and_the_level_shown(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    levels = [{"paying": 0, "percent": 10}, {"paying": 5, "percent": 25}, {"paying": 20, "percent": 45}]
    config = bot_config(write_config, db_dsn, fake, base_url, referral={"withdraw_min": "5", "levels": levels})
    fake.add_user(USER, "Rita").started = True
    await start_vpnd(nursery, config, SERVICES)
    with trio.fail_after(30):
        await say(fake, USER, "/start")
        seed(db_dsn, USER, earned=300, topped_up=5000)  # 50.00 on the balance, 3.00 of it earned
        invite = await open_invite(fake, USER)
        assert "Withdrawable: 3.00 USD (minimum 5.00 USD)" in (invite.text or "")
        assert "Your level: 10% · paying friends: 0" in (invite.text or "")
        assert "5 more paying friends → 25%" in (invite.text or "")
        assert "wd" not in invite.callback_data
        forge_callback(fake, USER, invite, "wd")  # a stale or forged "Withdraw"
        refused = await fake.wait_for_bot_message(USER, text_has("Withdrawals start at 5.00 USD"))
        assert "3.00 USD" in (refused.text or "")
    assert sql(db_dsn, "SELECT count(*) FROM withdrawals") == [(0,)]
    assert money(db_dsn, USER) == (5300, 300)


async def test_concurrent_approvals_pay_once(db_dsn: str) -> None:
    """Eight admins approving the same request at the same moment, each on its own connection: one payout."""
    with psycopg.connect(db_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO users (id, first_name, referral_code) VALUES (%s, 'R', 'rc5302')", (5302,))
    seed(db_dsn, 5302, earned=1200, topped_up=0)
    with psycopg.connect(db_dsn) as conn:
        made = referrals.request_withdrawal(conn, 5302, "wallet", min_minor=100, currency="USD")
    assert isinstance(made, referrals.Withdrawal)
    texts = Texts.load()
    outcomes: list[object] = []

    def approve(admin_id: int) -> None:
        with psycopg.connect(db_dsn) as conn:
            outcomes.append(
                withdrawals.decide(conn, Actor.telegram(admin_id), made.id, approve=True, note=None, texts=texts,
                                   default_language="en")
            )  # fmt: skip

    async with trio.open_nursery() as racing:
        for admin_id in range(10, 18):
            racing.start_soon(trio.to_thread.run_sync, approve, admin_id)
    assert sum(isinstance(o, referrals.Withdrawal) for o in outcomes) == 1
    assert sum(isinstance(o, withdrawals.WithdrawalDecided) for o in outcomes) == 7
    assert sql(db_dsn, "SELECT count(*) FROM balance_ledger WHERE reference = %s", f"withdrawal:{made.id}") == [(1,)]
    assert sql(db_dsn, "SELECT count(*) FROM outbox WHERE dedupe_key = %s", f"withdrawal:{made.id}:decided") == [(1,)]
    assert money(db_dsn, 5302) == (0, 0)
