"""Gifts through the bot: the fake Bot API over HTTP, the fake Crypto Pay with signed webhooks, the whole daemon.

Alice buys a plan as a gift and gets a code and a t.me link (her own subscription unchanged); Bob, a new
user, opens the link and gets the plan; Carol and Bob again are refused politely; Alice's "My gifts" shows
it redeemed; Mallory guessing codes is stopped after the promo-code allowance, even for a real code.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from tests.harness import bot_config, scalar, sql, start_shop, start_vpnd
from vpnd_sandbox.cryptopay_fake import FakeCryptoPay
from vpnd_sandbox.telegram_fake import ChatMessage, FakeTelegram

ADMIN, ALICE, BOB, CAROL, MALLORY, TRENT = 1, 1001, 1002, 1003, 1004, 1005  # ADMIN: bot_config's admin_ids


async def press(fake: FakeTelegram, user_id: int, message: ChatMessage, data: str, **wait: Any) -> ChatMessage:
    fake.user_presses_button(user_id, message.message_id, data)
    return await fake.wait_for_bot_message(user_id, **wait)


async def say(fake: FakeTelegram, user_id: int, text: str, **wait: Any) -> ChatMessage:
    fake.user_sends(user_id, text)
    return await fake.wait_for_bot_message(user_id, **wait)


def forge(fake: FakeTelegram, user_id: int, message: ChatMessage, data: str) -> None:
    """A callback query no button carries (a stale confirmation pressed again, or a modified client)."""
    fake.inject_update(
        {
            "callback_query": {
                "id": f"forged-{user_id}-{message.message_id}-{data}",
                "from": fake.users[user_id].to_api(),
                "message": message.to_api(),
                "chat_instance": "1",
                "data": data,
            }
        }
    )


def text_of(message: ChatMessage) -> str:
    return message.text or ""


async def test_gift_bought_with_crypto_pay_redeemed_once_by_link_and_listed(
    nursery: trio.Nursery,
    fake_telegram: tuple[FakeTelegram, str],
    fake_cryptopay: tuple[FakeCryptoPay, str],
    db_dsn: str,
    write_config: Callable[..., Path],
) -> None:
    fake, _ = fake_telegram
    pay, _ = fake_cryptopay
    vpnd = await start_shop(nursery, write_config, db_dsn, fake_telegram, fake_cryptopay)
    pay.webhook_copies = 3  # the same payment seen three times gives one gift
    for user_id, name in ((ALICE, "Alice"), (BOB, "Bob"), (CAROL, "Carol")):
        fake.add_user(user_id, name, language_code="en")
    with trio.fail_after(40):
        plans = await say(fake, ALICE, "/buy", predicate=lambda m: "plan:m1" in m.callback_data)
        methods = await press(fake, ALICE, plans, "plan:m1")
        assert "gift:m1" in methods.callback_data
        gift_methods = await press(fake, ALICE, methods, "gift:m1")
        assert "as a gift" in text_of(gift_methods) and "4.99 USD" in text_of(gift_methods)
        assert {"gp:m1:c", "gp:m1:s"} <= set(gift_methods.callback_data)
        assert "gp:m1:b" not in gift_methods.callback_data  # Alice's balance does not cover it
        await press(fake, ALICE, gift_methods, "gp:m1:c", predicate=lambda m: "Crypto Pay" in text_of(m))
        assert sql(db_dsn, "SELECT kind, plan_code, days FROM purchases WHERE user_id = %s", ALICE) == [
            ("gift", "m1", 30)
        ]
        pay.pay(scalar(db_dsn, "SELECT invoice_id FROM purchases WHERE user_id = %s", ALICE))
        received = await fake.wait_for_bot_message(ALICE, lambda m: "gift_" in text_of(m))
        await pay.wait_until(lambda: len(pay.successful_deliveries()) == 3)

        found = re.search(r"https://t\.me/(\w+)\?start=gift_([A-Z0-9]+)", text_of(received))
        assert found is not None and found.group(1) == fake.bot_username
        code = found.group(2)
        assert f"<code>{code}</code>" not in text_of(received) and code in text_of(received)  # rendered, not raw
        assert scalar(db_dsn, "SELECT count(*) FROM gifts") == 1
        assert scalar(db_dsn, "SELECT count(*) FROM subscriptions WHERE user_id = %s", ALICE) == 0

        # Bob has never talked to the bot: the link makes him a user and gives him the plan.
        redeemed = await say(fake, BOB, f"/start gift_{code}", predicate=lambda m: "Gift redeemed" in text_of(m))
        assert "Bob" in text_of(redeemed) and "30 days" in text_of(redeemed)
        assert "sub" in redeemed.callback_data
        assert sql(db_dsn, "SELECT kind, status, plan_code FROM subscriptions WHERE user_id = %s", BOB) == [
            ("paid", "active", "m1")
        ]
        days = scalar(db_dsn, "SELECT round(extract(epoch FROM expires_at - now()) / 86400) FROM subscriptions")
        assert days == 30
        told = await fake.wait_for_bot_message(ALICE, lambda m: "has been redeemed" in text_of(m))
        assert code in text_of(told)

        # A second redemption — another user, or the same one again — is refused politely, and gives nothing.
        refused = await say(fake, CAROL, f"/start gift_{code}")
        assert "already been redeemed" in text_of(refused)
        refused = await say(fake, BOB, f"/gift {code}")
        assert "already been redeemed" in text_of(refused)
        assert scalar(db_dsn, "SELECT count(*) FROM subscriptions") == 1
        assert scalar(db_dsn, "SELECT round(extract(epoch FROM expires_at - now()) / 86400) FROM subscriptions") == 30

        # Alice's "My gifts": the code, the plan, redeemed on a date.
        menu = await say(fake, ALICE, "/menu")
        assert "gifts" in menu.callback_data
        listing = await press(fake, ALICE, menu, "gifts")
        assert code in text_of(listing) and "1 month" in text_of(listing) and "redeemed on" in text_of(listing)
        assert "gift_redeem" in listing.callback_data
        # Her payment history names the purchase a gift, not a top-up.
        menu = await press(fake, ALICE, listing, "menu")
        payments = await press(fake, ALICE, menu, "pays")
        assert "🎁 1 month" in text_of(payments) and "4.99 USD" in text_of(payments)
        await fake.wait_until(lambda: all(q.answered for q in fake.callback_queries.values()))
    await vpnd.stop()


async def test_guessing_gift_codes_is_rate_limited_per_user(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    vpnd = await start_vpnd(nursery, bot_config(write_config, db_dsn, fake, base_url))
    for user_id, name in ((ALICE, "Alice"), (MALLORY, "Mallory"), (TRENT, "Trent")):
        fake.add_user(user_id, name, language_code="en")
    with trio.fail_after(60):
        for user_id in (ALICE, MALLORY, TRENT):
            await say(fake, user_id, "/start")
        # Alice buys a gift from her balance (the same grant path): its code is real and unredeemed.
        sql(
            db_dsn,
            "INSERT INTO balance_ledger (user_id, delta_minor, reason, reference) VALUES (%s, 499, 'admin', 't')",
            ALICE,
        )
        sql(db_dsn, "UPDATE users SET balance_minor = 499 WHERE id = %s", ALICE)
        methods = await say(fake, ALICE, "/buy", predicate=lambda m: "plan:m1" in m.callback_data)
        methods = await press(fake, ALICE, methods, "plan:m1")
        gift_methods = await press(fake, ALICE, methods, "gift:m1")
        await press(fake, ALICE, gift_methods, "gp:m1:b", predicate=lambda m: "Paid from your balance" in text_of(m))
        await fake.wait_for_bot_message(ALICE, lambda m: "gift_" in text_of(m))
        code = scalar(db_dsn, "SELECT code FROM gifts")
        assert scalar(db_dsn, "SELECT balance_minor FROM users WHERE id = %s", ALICE) == 0

        # Forged buttons: a gift of a plan not on sale, a method gifts do not take — nothing is created.
        menu = await say(fake, MALLORY, "/menu")
        forge(fake, MALLORY, menu, "gift:nosuch")
        await fake.wait_for_bot_message(MALLORY, lambda m: "not on sale" in text_of(m))
        forge(fake, MALLORY, menu, "gp:nosuch:b")
        forge(fake, MALLORY, menu, "gp:m1:y")  # (a chat's updates are handled in order: the one above is done)
        await fake.wait_for_bot_message(MALLORY, lambda m: "plan:m1" in m.callback_data)  # back to the plans
        assert scalar(db_dsn, "SELECT count(*) FROM purchases WHERE user_id = %s", MALLORY) == 0

        # Mallory guesses: by the button and typing, by command, by link; garbage counts too.
        menu = await say(fake, MALLORY, "/menu")
        listing = await press(fake, MALLORY, menu, "gifts")
        assert "not bought any gifts" in text_of(listing)
        ask = await press(fake, MALLORY, listing, "gift_redeem")
        assert "Send the gift code" in text_of(ask)
        answer = await say(fake, MALLORY, "AAAABBBBCCCC")
        assert "no such gift code" in text_of(answer)
        for guess in ("/gift ZZZZZZZZZZZZ", "/start gift_QQQQQQQQQQQQ", "/gift '; DROP TABLE gifts; --", "/gift x"):
            answer = await say(fake, MALLORY, guess)
            assert "no such gift code" in text_of(answer), guess
        # The sixth try is refused whatever it is, even the real code.
        answer = await say(fake, MALLORY, f"/start gift_{code}")
        assert "Too many wrong codes" in text_of(answer) and "10 min" in text_of(answer)
        assert scalar(db_dsn, "SELECT count(*) FROM subscriptions WHERE user_id = %s", MALLORY) == 0
        assert scalar(db_dsn, "SELECT status FROM gifts") == "unredeemed"
        assert scalar(db_dsn, "SELECT count(*) FROM promo_attempts WHERE user_id = %s", MALLORY) == 5
        # Trent is not held back by Mallory's limit: he types the code (lower case) and gets the plan.
        answer = await say(fake, TRENT, f"/gift {code.lower()}")
        assert "Gift redeemed" in text_of(answer)
        assert scalar(db_dsn, "SELECT redeemed_by FROM gifts") == TRENT
    await vpnd.stop()


async def test_admin_refunds_an_unredeemed_gift_from_the_user_card_once(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    vpnd = await start_vpnd(nursery, bot_config(write_config, db_dsn, fake, base_url))
    for user_id, name in ((ADMIN, "Admin"), (ALICE, "Alice"), (BOB, "Bob")):
        fake.add_user(user_id, name, language_code="en")
    with trio.fail_after(60):
        for user_id in (ADMIN, ALICE, BOB):
            await say(fake, user_id, "/start")
        sql(
            db_dsn,
            "INSERT INTO balance_ledger (user_id, delta_minor, reason, reference) VALUES (%s, 998, 'admin', 't')",
            ALICE,
        )
        sql(db_dsn, "UPDATE users SET balance_minor = 998 WHERE id = %s", ALICE)
        for _ in range(2):
            # The first gift's own message (the code, sent by the outbox) may arrive at any point here.
            methods = await say(fake, ALICE, "/buy", predicate=lambda m: "plan:m1" in m.callback_data)
            methods = await press(fake, ALICE, methods, "plan:m1", predicate=lambda m: "gift:m1" in m.callback_data)
            gift_methods = await press(
                fake, ALICE, methods, "gift:m1", predicate=lambda m: "gp:m1:b" in m.callback_data
            )
            await press(
                fake, ALICE, gift_methods, "gp:m1:b", predicate=lambda m: "Paid from your balance" in text_of(m)
            )
        await fake.wait_until(lambda: scalar(db_dsn, "SELECT count(*) FROM gifts") == 2)
        kept, refunded = (row[0] for row in sql(db_dsn, "SELECT code FROM gifts ORDER BY id"))
        assert "Gift redeemed" in text_of(await say(fake, BOB, f"/gift {kept}"))

        panel = await say(fake, ADMIN, "/admin", predicate=lambda m: "adm:fu" in m.callback_data)
        await press(fake, ADMIN, panel, "adm:fu")
        card = await say(fake, ADMIN, str(ALICE), predicate=lambda m: f"adm:gfr:{refunded}" in m.callback_data)
        assert f"adm:gfr:{kept}" not in card.callback_data  # a redeemed gift offers no refund
        confirm = await press(fake, ADMIN, card, f"adm:gfr:{refunded}")
        assert refunded in text_of(confirm) and f"adm:gfrc:{refunded}" in confirm.callback_data
        done = await press(fake, ADMIN, confirm, f"adm:gfrc:{refunded}", predicate=lambda m: "refunded:" in text_of(m))
        assert "4.99 USD credited" in text_of(done) and f"adm:gfr:{refunded}" not in done.callback_data
        told = await fake.wait_for_bot_message(ALICE, lambda m: "was refunded" in text_of(m))
        assert refunded in text_of(told) and "4.99 USD" in text_of(told)
        # The same confirmation pressed again, and a forged refund of the redeemed gift: refused, nothing moves.
        forge(fake, ADMIN, confirm, f"adm:gfrc:{refunded}")
        again = await fake.wait_for_bot_message(ADMIN, lambda m: "cannot be refunded" in text_of(m))
        assert "refunded already" in text_of(again)
        forge(fake, ADMIN, again, f"adm:gfrc:{kept}")
        late = await fake.wait_for_bot_message(ADMIN, lambda m: "redeemed already" in text_of(m))
        assert kept in text_of(late)
        # Not an admin: the button does not exist for Bob.
        forge(fake, BOB, await say(fake, BOB, "/menu"), f"adm:gfrc:{refunded}")
        await fake.wait_for_bot_message(BOB, lambda m: "sub" in m.callback_data)
        # The refunded code is dead.
        assert "refunded to its buyer" in text_of(await say(fake, BOB, f"/gift {refunded}"))

    assert scalar(db_dsn, "SELECT balance_minor FROM users WHERE id = %s", ALICE) == 499
    assert sql(db_dsn, "SELECT status FROM gifts ORDER BY id") == [("redeemed",), ("refunded",)]
    assert sql(db_dsn, "SELECT admin_id, target, result FROM admin_audit WHERE action = 'gift_refund' ORDER BY id") == [
        (ADMIN, refunded, "ok"),
        (ADMIN, refunded, "not_refundable"),
        (ADMIN, kept, "not_refundable"),
    ]
    assert scalar(db_dsn, "SELECT count(*) FROM admin_audit WHERE admin_id = %s AND result = 'denied'", BOB) == 1
    await vpnd.stop()
