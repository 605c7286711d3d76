"""Terms of service / privacy policy: shown first, accepted once per version, and nothing lost on the way
(a referral's /start argument, a payment that arrives while the terms are due)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from tests.harness import bot_config, press, say, scalar, sql, start_vpnd
from vpnd_sandbox.telegram_fake import ChatMessage, FakeTelegram

ALICE, BOB, CAROL = 1001, 1002, 1003
PRIVACY_URL = "https://shop.example.test/privacy"


def terms_section(version: str) -> dict[str, Any]:
    return {
        "enabled": True,
        "version": version,
        "terms_text": {"en": "Be nice to the network <b>always</b>.", "ru": "Берегите сеть."},
        "privacy_url": PRIVACY_URL,
    }


def forge_callback(fake: FakeTelegram, user_id: int, message: ChatMessage, data: str) -> None:
    fake.inject_update(
        {
            "callback_query": {
                "id": f"forged-{message.message_id}-{data}",
                "from": fake.users[user_id].to_api(),
                "message": message.to_api(),
                "chat_instance": "1",
                "data": data,
            }
        }
    )


def is_terms(version: str) -> Callable[[ChatMessage], bool]:
    return lambda m: f"tos:{version}" in m.callback_data


def acceptances(dsn: str, user_id: int) -> list[str]:
    return [row[0] for row in sql(dsn, "SELECT version FROM terms_acceptances WHERE user_id = %s ORDER BY 1", user_id)]


async def test_terms_first_then_accepted_once_referral_kept_and_asked_again_after_a_new_version(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    vpnd = await start_vpnd(
        nursery, bot_config(write_config, db_dsn, fake, base_url, terms=terms_section("2026-12-01"))
    )
    fake.add_user(ALICE, "Alice")
    fake.add_user(BOB, "Bob")
    fake.add_user(CAROL, "Carol", language_code="ru")
    with trio.fail_after(60):
        # First contact: the terms, with the operator's text (escaped), the privacy link and "I accept".
        terms = await say(fake, ALICE, "/start")
        assert is_terms("2026-12-01")(terms)
        assert "Before we start" in (terms.text or "") and "Be nice to the network <b>always</b>." in (terms.text or "")
        assert {"text": "🔒 Privacy policy", "url": PRIVACY_URL} in terms.buttons
        # Nothing else happens before the acceptance: buttons, commands and plain text get the terms.
        forge_callback(fake, ALICE, terms, "trial")
        assert is_terms("2026-12-01")(await say(fake, ALICE, "/trial"))
        assert is_terms("2026-12-01")(await say(fake, ALICE, "/buy"))
        assert scalar(db_dsn, "SELECT count(*) FROM trials") == 0
        assert scalar(db_dsn, "SELECT count(*) FROM purchases") == 0
        # Any first update (not only /start) gets them, in the user's language, with their text.
        carol = await say(fake, CAROL, "hello?")
        assert is_terms("2026-12-01")(carol) and "Берегите сеть." in (carol.text or "")

        menu = await press(fake, ALICE, terms, "tos:2026-12-01")
        assert "Hello, Alice" in (menu.text or "") and "trial" in menu.callback_data
        assert acceptances(db_dsn, ALICE) == ["2026-12-01"]
        assert scalar(db_dsn, "SELECT accepted_at > now() - interval '1 minute' FROM terms_acceptances") is True
        # Not asked again.
        menu = await say(fake, ALICE, "/start")
        assert "tos:2026-12-01" not in menu.callback_data and "sub" in menu.callback_data
        granted = await press(fake, ALICE, menu, "trial")
        assert "free trial is active" in (granted.caption or "")  # the key message: a QR photo

        # A referral's /start argument survives the detour, even with another command in between.
        code = scalar(db_dsn, "SELECT referral_code FROM users WHERE id = %s", ALICE)
        bob_terms = await say(fake, BOB, f"/start ref_{code}")
        assert is_terms("2026-12-01")(bob_terms)
        assert is_terms("2026-12-01")(await say(fake, BOB, "/help"))
        welcome = await press(fake, BOB, bob_terms, "tos:2026-12-01")
        assert "invitation" in (welcome.text or "")
        assert scalar(db_dsn, "SELECT referrer_id FROM referrals WHERE referred_id = %s", BOB) == ALICE
        assert scalar(db_dsn, "SELECT count(*) FROM terms_pending_starts") == 0  # processed once
        await vpnd.stop()

    # A new version: everyone is asked again, once.
    vpnd = await start_vpnd(nursery, bot_config(write_config, db_dsn, fake, base_url, terms=terms_section("2027-01")))
    with trio.fail_after(60):
        updated = await say(fake, ALICE, "/start")
        assert is_terms("2027-01")(updated) and "Our terms have changed" in (updated.text or "")
        # The old version's button (Carol never accepted it) records nothing: she is told, in her language,
        # and gets the current terms in its place.
        again = await press(fake, CAROL, carol, "tos:2026-12-01")
        assert is_terms("2027-01")(again) and "устарели" in (again.text or "")
        assert any(n.show_alert and "устарели" in n.text for n in fake.notices_for(CAROL))
        assert acceptances(db_dsn, CAROL) == []
        # Forged data for any other version neither (each update of a chat is handled in order).
        for stale in ("tos:2026-12-01", "tos:2027-01:x", "tos:2027-1", "tos:", "tos"):
            forge_callback(fake, ALICE, updated, stale)
        fake.user_sends(ALICE, "/subscription")
        reply = await fake.wait_for_bot_message(ALICE, lambda m: m.message_id > updated.message_id)
        assert is_terms("2027-01")(reply)
        assert acceptances(db_dsn, ALICE) == ["2026-12-01"]

        menu = await press(fake, ALICE, updated, "tos:2027-01")
        assert "sub" in menu.callback_data
        assert acceptances(db_dsn, ALICE) == ["2026-12-01", "2027-01"]  # history kept
        menu = await say(fake, ALICE, "/start")
        assert "tos:2027-01" not in menu.callback_data
        # Another "I accept" of the same version (a second terms message) changes nothing.
        menu = await press(fake, ALICE, reply, "tos:2027-01")
        assert "sub" in menu.callback_data
        assert acceptances(db_dsn, ALICE) == ["2026-12-01", "2027-01"]
        await fake.wait_until(lambda: all(q.answered for q in fake.callback_queries.values()))
    await vpnd.stop()


async def test_a_payment_arriving_while_the_terms_are_due_is_still_granted(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    """A Stars invoice issued under the old terms, paid after the version changed: the pre-checkout
    query is answered and the successful payment granted — money is never held back by the terms."""
    fake, base_url = fake_telegram
    vpnd = await start_vpnd(nursery, bot_config(write_config, db_dsn, fake, base_url, terms=terms_section("v1")))
    fake.add_user(ALICE, "Alice")
    with trio.fail_after(60):
        terms = await say(fake, ALICE, "/start")
        await press(fake, ALICE, terms, "tos:v1")
        plans = await say(fake, ALICE, "/buy")
        methods = await press(fake, ALICE, plans, "plan:m1")
        fake.user_presses_button(ALICE, methods.message_id, "pay:m1:s")
        invoice = await fake.wait_for_bot_message(ALICE, lambda m: m.invoice is not None)
        await vpnd.stop()

    vpnd = await start_vpnd(nursery, bot_config(write_config, db_dsn, fake, base_url, terms=terms_section("v2")))
    with trio.fail_after(60):
        fake.user_pays_invoice(ALICE, invoice.message_id)
        while scalar(db_dsn, "SELECT count(*) FROM payments WHERE provider = 'stars'") != 1:
            await trio.sleep(0.05)
        assert scalar(db_dsn, "SELECT kind FROM subscriptions WHERE user_id = %s", ALICE) == "paid"
        assert acceptances(db_dsn, ALICE) == ["v1"]  # still due: the next action shows the new terms
        # The grant's own messages (the key photo, sent by the outbox) come whenever they come; the reply
        # to the next action is the new terms, whatever arrives around it.
        key = await fake.wait_for_bot_message(ALICE, lambda m: m.photo is not None)
        fake.user_sends(ALICE, "/subscription")
        reply = await fake.wait_for_bot_message(ALICE, lambda m: m.message_id > key.message_id and m.photo is None)
        assert is_terms("v2")(reply)
    await vpnd.stop()
