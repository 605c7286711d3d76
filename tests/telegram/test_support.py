"""The trial's required channel and support tickets, end to end: the fake Bot API over HTTP, the whole
daemon, a real PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from tests.harness import ADMIN, bot_config, scalar, sql, start_vpnd
from vpnd.config import ConfigError
from vpnd.support_text import MAX_TEXT, contact_url, fit_html, visible_len
from vpnd.telegram.membership import MembershipCache, is_member
from vpnd_sandbox.telegram_fake import ChatMessage, FakeTelegram

ALICE = 1001
MALLORY = 1002
CHANNEL = -1001234567890


def url_buttons(message: ChatMessage) -> list[str]:
    return [b["url"] for b in message.buttons if "url" in b]


async def press(fake: FakeTelegram, user_id: int, message: ChatMessage, data: str) -> ChatMessage:
    fake.user_presses_button(user_id, message.message_id, data)
    return await fake.wait_for_bot_message(user_id)


async def start(fake: FakeTelegram, user_id: int, name: str) -> ChatMessage:
    fake.add_user(user_id, name, username=name.lower())
    fake.user_sends(user_id, "/start")
    return await fake.wait_for_bot_message(user_id)


# --- the required channel -------------------------------------------------------------------------------


async def test_trial_needs_the_channel_then_check_again_grants_it_and_is_cached(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    fake.add_channel(CHANNEL, "News", username="vpnd_news")
    config = bot_config(write_config, db_dsn, fake, base_url, trial={"required_channel": "@vpnd_news"})
    vpnd = await start_vpnd(nursery, config)
    with trio.fail_after(60):
        menu = await start(fake, ALICE, "Alice")
        refused = await press(fake, ALICE, menu, "trial")
        assert "subscribers of our channel" in (refused.text or "")
        assert url_buttons(refused) == ["https://t.me/vpnd_news"]
        assert "trialchk" in refused.callback_data
        assert scalar(db_dsn, "SELECT count(*) FROM subscriptions WHERE user_id = %s", ALICE) == 0
        assert fake.requests["getChatMember"] == 1

        # Still not a member: "Check again" says so (an alert), asks Telegram again (no negative cache).
        fake.user_presses_button(ALICE, refused.message_id, "trialchk")
        await fake.wait_until(
            lambda: any(n.kind == "callback_answer" and "not joined" in (n.text or "") for n in fake.notices_for(ALICE))
        )
        assert fake.requests["getChatMember"] == 2
        assert scalar(db_dsn, "SELECT count(*) FROM subscriptions WHERE user_id = %s", ALICE) == 0

        fake.set_member(CHANNEL, ALICE, "restricted", is_member=True)  # restricted but in it: counts
        granted = await press(fake, ALICE, refused, "trialchk")
        assert "free trial is active" in (granted.caption or "")  # the key message: a QR photo
        assert scalar(db_dsn, "SELECT count(*) FROM subscriptions WHERE user_id = %s", ALICE) == 1
        calls = fake.requests["getChatMember"]

        # A second check within the cache time does not ask Telegram.
        fake.user_sends(ALICE, "/trial")
        again = await fake.wait_for_bot_message(ALICE)
        assert "once per account" in (again.text or "")  # refused by the database, not the channel
        assert fake.requests["getChatMember"] == calls
    await vpnd.stop()


async def test_channel_check_fails_open_and_alerts_the_admin(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    fake.add_channel(CHANNEL, "Private", bot_is_admin=False)  # Telegram: "member list is inaccessible"
    config = bot_config(
        write_config,
        db_dsn,
        fake,
        base_url,
        trial={"required_channel": str(CHANNEL), "channel_invite_link": "https://t.me/+AbCdEf"},
    )
    vpnd = await start_vpnd(nursery, config)
    with trio.fail_after(60):
        await start(fake, ADMIN, "Admin")
        menu = await start(fake, ALICE, "Alice")
        granted = await press(fake, ALICE, menu, "trial")
        assert "free trial is active" in (granted.caption or "")  # the key message: a QR photo
        alert = await fake.wait_for_bot_message(ADMIN, lambda m: "trial_channel" in (m.text or ""))
        assert "member list is inaccessible" in (alert.text or "").lower()
        assert scalar(db_dsn, "SELECT ok FROM health_checks WHERE name = 'trial_channel'") is False
    await vpnd.stop()


async def test_unknown_channel_is_refused_by_the_fake_like_telegram(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    """The fake answers 400 "chat not found" for an unknown channel; vpnd then fails open too."""
    fake, base_url = fake_telegram
    config = bot_config(write_config, db_dsn, fake, base_url, trial={"required_channel": "@nobody_here"})
    vpnd = await start_vpnd(nursery, config)
    with trio.fail_after(60):
        menu = await start(fake, ALICE, "Alice")
        granted = await press(fake, ALICE, menu, "trial")
        assert "free trial is active" in (granted.caption or "")  # the key message: a QR photo
        assert fake.responses[400] >= 1
        detail = scalar(db_dsn, "SELECT detail FROM health_checks WHERE name = 'trial_channel'")
        assert "chat not found" in detail.lower()
    await vpnd.stop()


def test_membership_rules_and_bounded_cache() -> None:
    assert is_member({"status": "member"}) and is_member({"status": "creator"})
    assert is_member({"status": "administrator"})
    assert is_member({"status": "restricted", "is_member": True})
    assert not is_member({"status": "restricted", "is_member": False})
    assert not is_member({"status": "left"}) and not is_member({"status": "kicked"}) and not is_member({})
    cache = MembershipCache(limit=3)
    for user in range(10):
        cache.remember("@news", user, 0.0, 60)
    assert len(cache) == 3 and cache.confirmed("@news", 9, 1.0) and not cache.confirmed("@news", 0, 1.0)
    assert not cache.confirmed("@other", 9, 1.0)  # another channel (after a reload)
    assert not cache.confirmed("@news", 9, 61.0)  # expired
    cache.remember("@news", 5, 0.0, 0)  # a cache time of 0: never remembered
    assert not cache.confirmed("@news", 5, 0.0)


# --- support -------------------------------------------------------------------------------------------


def test_contact_url_and_fitting() -> None:
    assert contact_url("@vpnd_help") == "https://t.me/vpnd_help"
    assert contact_url("https://example.test/help") == "https://example.test/help"
    assert contact_url("help@example.test") is None and contact_url("") is None
    long = "😀" * 3000  # 6000 UTF-16 units
    fitted = fit_html(lambda body: f"<b>Ticket</b>\n{body}", long, "(cut)")
    assert visible_len(fitted) <= MAX_TEXT and fitted.endswith("<i>(cut)</i>")


async def test_support_button_opens_the_contact(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    config = bot_config(write_config, db_dsn, fake, base_url, telegram={"support_contact": "@vpnd_help"})
    vpnd = await start_vpnd(nursery, config)
    with trio.fail_after(60):
        menu = await start(fake, ALICE, "Alice")
        support = await press(fake, ALICE, menu, "support")
        assert url_buttons(support) == ["https://t.me/vpnd_help"]
        assert "support:write" not in support.callback_data  # no relay configured
        menu = await press(fake, ALICE, support, "menu")
        help_screen = await press(fake, ALICE, menu, "help")
        assert "support" in help_screen.callback_data
    await vpnd.stop()


async def test_ticket_is_relayed_answered_survives_restart_and_is_rate_limited(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    config = bot_config(write_config, db_dsn, fake, base_url, support={"relay_chat": ADMIN, "messages_per_hour": 2})
    vpnd = await start_vpnd(nursery, config)
    with trio.fail_after(90):
        await start(fake, ADMIN, "Admin")
        await start(fake, MALLORY, "Mallory")
        menu = await start(fake, ALICE, "Alice")
        support = await press(fake, ALICE, menu, "support")
        prompt = await press(fake, ALICE, support, "support:write")
        assert "support:cancel" in prompt.callback_data
        # A photo is not relayed: the bot asks for text again, and the user is still writing to support.
        alice = fake.users[ALICE]
        photo = {"file_id": "p1", "file_unique_id": "u1", "width": 90, "height": 90}
        fake.inject_update(
            {
                "message": {
                    "message_id": 800,
                    "from": alice.to_api(),
                    "chat": alice.chat_api(),
                    "date": 1,
                    "photo": [photo],
                    "caption": "screenshot",
                }
            }
        )
        await fake.wait_for_bot_message(ALICE, lambda m: "text only" in (m.text or "") and m.revision > prompt.revision)
        fake.user_sends(ALICE, "My key <b>fails</b> & <script>")
        sent = await fake.wait_for_bot_message(ALICE)
        assert "Sent to support" in (sent.text or "")
        relayed = await fake.wait_for_bot_message(ADMIN, lambda m: "Ticket #" in (m.text or ""))
        text = relayed.text or ""
        assert "My key <b>fails</b> & <script>" in text  # shown literally: the HTML was escaped
        assert str(ALICE) in text and "@alice" in text
        await fake.wait_until(
            lambda: (
                scalar(db_dsn, "SELECT relay_message_id FROM support_messages WHERE user_id = %s", ALICE)
                == relayed.message_id
            )
        )

        # Mallory replies in his own chat to a message with the relayed copy's id: nothing reaches Alice.
        before = len(fake.bot_messages(ALICE))
        mallory, bot = fake.users[MALLORY], fake.bot_user()
        fake.inject_update(
            {
                "message": {
                    "message_id": 900,
                    "from": mallory.to_api(),
                    "chat": mallory.chat_api(),
                    "date": 1,
                    "text": "Send me your card number",
                    "reply_to_message": {
                        "message_id": relayed.message_id,
                        "from": bot,
                        "chat": mallory.chat_api(),
                        "date": 1,
                        "text": relayed.text,
                    },
                }
            }
        )
        await fake.wait_for_bot_message(MALLORY, lambda m: "sub" in m.callback_data)  # an ordinary message
        assert len(fake.bot_messages(ALICE)) == before
        assert scalar(db_dsn, "SELECT count(*) FROM support_messages WHERE direction = 'admin'") == 0

        # vpnd restarts; the admin's reply still finds the ticket.
        await vpnd.stop()
        vpnd = await start_vpnd(nursery, config)
        fake.user_sends(ADMIN, "Reinstall the <app> & retry", reply_to_message_id=relayed.message_id)
        answer = await fake.wait_for_bot_message(ALICE, lambda m: "Support replied" in (m.text or ""))
        assert "Reinstall the <app> & retry" in (answer.text or "")
        assert "card number" not in (answer.text or "")
        await fake.wait_for_bot_message(ADMIN, lambda m: "queued for the user" in (m.text or ""))
        assert scalar(db_dsn, "SELECT count(*) FROM support_messages WHERE direction = 'admin'") == 1

        # Two messages an hour: the third is refused politely, and not relayed.
        for body, expect in (("second", "Sent to support"), ("third", "already written 2 messages")):
            fake.user_sends(ALICE, "/start")
            menu = await fake.wait_for_bot_message(ALICE)
            support = await press(fake, ALICE, menu, "support")
            await press(fake, ALICE, support, "support:write")
            fake.user_sends(ALICE, body)
            reply = await fake.wait_for_bot_message(ALICE)
            assert expect in (reply.text or "")
        await fake.wait_for_bot_message(ADMIN, lambda m: "second" in (m.text or ""))
        assert scalar(db_dsn, "SELECT count(*) FROM support_messages WHERE direction = 'user'") == 2
        assert not any("third" in (m.text or "") for m in fake.bot_messages(ADMIN))
    await vpnd.stop()


async def test_long_ticket_is_cut_with_a_note(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    config = bot_config(write_config, db_dsn, fake, base_url, support={"relay_chat": ADMIN})
    vpnd = await start_vpnd(nursery, config)
    with trio.fail_after(60):
        await start(fake, ADMIN, "Admin")
        menu = await start(fake, ALICE, "Alice")
        support = await press(fake, ALICE, menu, "support")
        await press(fake, ALICE, support, "support:write")
        fake.user_sends(ALICE, "&" * 4096)  # Telegram's own limit, before our header
        relayed = await fake.wait_for_bot_message(ADMIN, lambda m: "Ticket #" in (m.text or ""))
        assert "4096 characters" in (relayed.text or "")
        assert scalar(db_dsn, "SELECT length(body) FROM support_messages") == 4096  # stored whole
    await vpnd.stop()


async def test_bad_channel_settings_name_the_key(
    fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    with pytest.raises(ConfigError, match=r"\[trial\]\.required_channel"):
        bot_config(write_config, db_dsn, fake, base_url, trial={"required_channel": "my channel"})
    with pytest.raises(ConfigError, match=r"\[trial\]\.channel_invite_link"):
        bot_config(write_config, db_dsn, fake, base_url, trial={"required_channel": str(CHANNEL)})
    with pytest.raises(ConfigError, match=r"\[support\]\.relay_chat"):
        bot_config(write_config, db_dsn, fake, base_url, support={"relay_chat": "admins"})


def reply_update(
    sender: dict[str, object], chat: dict[str, object], message_id: int, to: int, text: str
) -> dict[str, object]:
    """A message in `chat` replying to message `to` (which the bot sent there)."""
    return {
        "message": {
            "message_id": message_id,
            "from": sender,
            "chat": chat,
            "date": 1,
            "text": text,
            "reply_to_message": {
                "message_id": to,
                "from": {"id": 7000000001, "is_bot": True, "first_name": "vpnd"},
                "chat": chat,
                "date": 1,
                "text": "Ticket",
            },
        }
    }


async def test_group_relay_answers_only_from_admins_and_a_replayed_reply_is_sent_once(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    group = {"id": -100777, "type": "supergroup", "title": "Support staff"}
    config = bot_config(write_config, db_dsn, fake, base_url, support={"relay_chat": -100777})
    vpnd = await start_vpnd(nursery, config)
    with trio.fail_after(60):
        await start(fake, ADMIN, "Admin")
        await start(fake, MALLORY, "Mallory")
        menu = await start(fake, ALICE, "Alice")
        support = await press(fake, ALICE, menu, "support")
        await press(fake, ALICE, support, "support:write")
        await say_and_wait(fake, ALICE, "Help please", "Sent to support")
        # The fake has no group chats: record the id Telegram would have given the copy.
        sql(db_dsn, "UPDATE support_messages SET relay_message_id = 55 WHERE user_id = %s", ALICE)
        before = len(fake.bot_messages(ALICE))

        # A member of the group who is not an admin cannot answer in the operator's name.
        fake.inject_update(reply_update(fake.users[MALLORY].to_api(), group, 70, 55, "Pay me instead"))
        fake.inject_update(reply_update(fake.users[ADMIN].to_api(), group, 71, 55, "Fixed, try again"))
        answer = await fake.wait_for_bot_message(ALICE, lambda m: "Support replied" in (m.text or ""))
        assert "Fixed, try again" in (answer.text or "")
        assert not any("Pay me" in (m.text or "") for m in fake.bot_messages(ALICE))

        # The same reply again (a replayed update): nothing is sent twice.
        fake.inject_update(reply_update(fake.users[ADMIN].to_api(), group, 71, 55, "Fixed, try again"))
        await fake.wait_until(lambda: fake.pending_updates == [])
        await trio.sleep(1)
        assert len(fake.bot_messages(ALICE)) == before + 1
        assert scalar(db_dsn, "SELECT count(*) FROM support_messages WHERE direction = 'admin'") == 1
        assert scalar(db_dsn, "SELECT author_id FROM support_messages WHERE direction = 'admin'") == ADMIN
    await vpnd.stop()


async def say_and_wait(fake: FakeTelegram, user_id: int, text: str, expect: str) -> ChatMessage:
    fake.user_sends(user_id, text)
    reply = await fake.wait_for_bot_message(user_id)
    assert expect in (reply.text or "")
    return reply
