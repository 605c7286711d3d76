"""User flows end to end: the fake Bot API over HTTP, the whole daemon tree, a real PostgreSQL."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path

import httpx
import psycopg
import trio

from tests.harness import bot_config, start_vpnd
from vpnd.xray.links import parse_vless_link
from vpnd_sandbox.telegram_fake import ChatMessage, FakeTelegram

ALICE = 1001


def has_button(data: str) -> Callable[[ChatMessage], bool]:
    return lambda m: data in m.callback_data


async def press(fake: FakeTelegram, user_id: int, message: ChatMessage, data: str, **wait: object) -> ChatMessage:
    fake.user_presses_button(user_id, message.message_id, data)
    return await fake.wait_for_bot_message(user_id, **wait)  # type: ignore[arg-type]


def forge_callback(fake: FakeTelegram, user_id: int, message: ChatMessage, data: str) -> None:
    """A callback query with data no button carries (a modified client can send anything)."""
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


async def test_start_language_trial_subscription_and_trial_refused(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    config = bot_config(write_config, db_dsn, fake, base_url)
    vpnd = await start_vpnd(nursery, config)
    fake.add_user(ALICE, "Alice", username="alice", language_code="ru-RU")
    with trio.fail_after(30):
        fake.user_sends(ALICE, "/start")
        menu = await fake.wait_for_bot_message(ALICE)
        assert "Здравствуйте, Alice" in (menu.text or "")  # language from Telegram's language_code
        assert {"sub", "buy", "trial", "promo", "invite", "lang", "help"} <= set(menu.callback_data)

        chooser = await press(fake, ALICE, menu, "lang")
        menu = await press(fake, ALICE, chooser, "lang:en")
        assert "Language set: English" in (menu.text or "")

        granted = await press(fake, ALICE, menu, "trial")
        assert "free trial is active for 3 days" in (granted.caption or "")  # the key photo (test_connect.py)

        details = await press(fake, ALICE, granted, "sub")
        text = details.text or ""
        assert "Active" in text and "trial" in text
        link = next(line for line in text.splitlines() if line.startswith("vless://"))
        parsed = parse_vless_link(link)
        assert parsed.host == "vpn.example.test" and parsed.params["security"] == "reality"
        assert "https://vpn.example.test/sub/" in text

        fake.user_presses_button(ALICE, details.message_id, "qr")
        photo = await fake.wait_for_bot_message(ALICE, lambda m: m.photo is not None)
        assert photo.photo is not None and photo.photo.data.startswith(b"\x89PNG")

        # The menu no longer offers the trial, and a forged "trial" press is refused.
        fake.user_sends(ALICE, "/start")
        menu = await fake.wait_for_bot_message(ALICE)
        assert "trial" not in menu.callback_data
        forge_callback(fake, ALICE, details, "trial")
        refused = await fake.wait_for_bot_message(ALICE, lambda m: "once per account" in (m.text or ""))
        assert "once per account" in (refused.text or "")
        # Every callback query was answered.
        await fake.wait_until(lambda: all(q.answered for q in fake.callback_queries.values()))

    with psycopg.connect(db_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM trials WHERE user_id = %s", (ALICE,)).fetchone() == (1,)
        assert conn.execute("SELECT language FROM users WHERE id = %s", (ALICE,)).fetchone() == ("en",)
    await vpnd.stop()


async def test_referral_invite_and_help(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    vpnd = await start_vpnd(nursery, bot_config(write_config, db_dsn, fake, base_url))
    fake.add_user(ALICE, "Alice")
    fake.add_user(2002, "Bob")
    with trio.fail_after(30):
        fake.user_sends(ALICE, "/start")
        menu = await fake.wait_for_bot_message(ALICE)
        invite = await press(fake, ALICE, menu, "invite")
        link = next(w for w in (invite.text or "").split() if w.startswith("https://t.me/"))
        assert link.startswith(f"https://t.me/{fake.bot_username}?start=ref_")
        code = link.split("start=")[1]
        fake.user_sends(2002, f"/start {code}")
        welcome = await fake.wait_for_bot_message(2002)
        assert "invitation" in (welcome.text or "")
        fake.user_sends(ALICE, f"/start {code}")  # self-referral: ignored
        menu = await fake.wait_for_bot_message(ALICE)
        assert "invitation" not in (menu.text or "")
        invite = await press(fake, ALICE, menu, "invite")
        assert "Invited: 1" in (invite.text or "")
        menu = await press(fake, ALICE, invite, "menu")
        help_message = await press(fake, ALICE, menu, "help")
        assert "@support" in (help_message.text or "")
        fake.user_sends(ALICE, "what is this?")
        unknown = await fake.wait_for_bot_message(ALICE)
        assert "didn't understand" in (unknown.text or "") and "sub" in unknown.callback_data
    await vpnd.stop()


async def test_subscription_url_matches_the_link(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    """The QR code, the copyable key and the subscription body all carry the same key."""
    fake, base_url = fake_telegram
    vpnd = await start_vpnd(nursery, bot_config(write_config, db_dsn, fake, base_url))
    fake.add_user(ALICE, "Alice")
    with trio.fail_after(30):
        fake.user_sends(ALICE, "/trial")
        await fake.wait_for_bot_message(ALICE, has_button("sub"))
        fake.user_sends(ALICE, "/subscription")
        details = await fake.wait_for_bot_message(ALICE, lambda m: "vless://" in (m.text or ""))
    link = next(line for line in (details.text or "").splitlines() if line.startswith("vless://"))
    with psycopg.connect(db_dsn) as conn:
        row = conn.execute("SELECT uuid::text, sub_token FROM subscriptions WHERE user_id = %s", (ALICE,)).fetchone()
    assert row is not None and parse_vless_link(link).uuid == row[0]
    async with httpx.AsyncClient(base_url=vpnd.http_url, timeout=5) as client:
        response = await client.get(f"/sub/{row[1]}")
    assert response.status_code == 200
    assert base64.b64decode(response.content).decode().splitlines() == [link]
    await vpnd.stop()


async def test_reissue_replaces_the_key_and_is_rate_limited(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    vpnd = await start_vpnd(nursery, bot_config(write_config, db_dsn, fake, base_url))
    fake.add_user(ALICE, "Alice")

    def current_uuid() -> str:
        with psycopg.connect(db_dsn) as conn:
            row = conn.execute("SELECT uuid::text FROM subscriptions WHERE user_id = %s", (ALICE,)).fetchone()
        assert row is not None
        return str(row[0])

    with trio.fail_after(40):
        fake.user_sends(ALICE, "/trial")
        await fake.wait_for_bot_message(ALICE, has_button("sub"))
        fake.user_sends(ALICE, "/subscription")
        details = await fake.wait_for_bot_message(ALICE, has_button("reissue"))
        seen = {current_uuid()}
        for _ in range(3):
            details = await press(fake, ALICE, details, "reissue")
            assert "key was replaced" in (details.text or "")
            uuid_now = current_uuid()
            assert uuid_now not in seen and uuid_now in (details.text or "")
            seen.add(uuid_now)
        query = fake.user_presses_button(ALICE, details.message_id, "reissue")
        await fake.wait_until(lambda: fake.callback_queries[query.id].answered)
        assert any("at most 3 times in 5 minutes" in n.text for n in fake.notices_for(ALICE))
        assert current_uuid() in seen and len(seen) == 4  # the 4th reissue changed nothing
    await vpnd.stop()
