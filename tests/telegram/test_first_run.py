"""A newcomer's first run: the shipped config hands out a working key, and a configuration gap (no
REALITY public key) is named by check-config and start-up, alerted to the admins once, and shown to
users as a polite "your key is being prepared" — never "Sorry, something went wrong"."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import psycopg
import trio

from tests.harness import bot_config, start_vpnd
from tests.x25519_reference import public_key_of
from vpnd.xray.links import parse_vless_link
from vpnd_sandbox.telegram_fake import ChatMessage, FakeTelegram

REPO = Path(__file__).resolve().parent.parent.parent
ADMIN, ALICE = 1, 1001


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VPND_") and k != "CREDENTIALS_DIRECTORY"}
    return subprocess.run([sys.executable, "-m", "vpnd", *args], capture_output=True, text=True, timeout=60, env=env)


def test_shipped_config_carries_a_real_example_key_pair_and_says_it_is_an_example() -> None:
    text = (REPO / "config.toml").read_text()
    public = re.search(r'^public_key = "([^"]+)"', text, re.M)
    private = re.search(r"EXAMPLE privateKey[^:]*: (\S+)", text)
    assert public is not None and private is not None
    assert public_key_of(private.group(1)) == public.group(1)  # the pair belongs together
    result = run_cli("check-config", "--config", str(REPO / "config.toml"))
    assert result.returncode == 0, result.stderr
    assert "[xray].public_key: this is the public example key" in result.stderr and "xray x25519" in result.stderr


def test_check_config_names_a_missing_reality_key(write_config: Callable[..., Path]) -> None:
    path = write_config(xray={"enabled": False, "public_key": ""})
    result = run_cli("check-config", "--config", str(path))
    assert result.returncode == 0, result.stderr  # Xray is managed elsewhere: a gap, not an error
    assert f"warning: {path}: [xray].public_key: REALITY public key must be 43 characters" in result.stderr
    assert "your key is being prepared" in result.stderr and "xray x25519" in result.stderr


def texts_with(fake: FakeTelegram, chat_id: int, fragment: str) -> list[str]:
    return [m.text or "" for m in fake.bot_messages(chat_id) if fragment in (m.text or "")]


async def press(fake: FakeTelegram, user_id: int, message: ChatMessage, data: str) -> ChatMessage:
    fake.user_presses_button(user_id, message.message_id, data)
    return await fake.wait_for_bot_message(user_id, timeout=10)


async def test_missing_reality_key_is_a_polite_wait_for_users_and_one_alert_for_admins(
    nursery: trio.Nursery,
    fake_telegram: tuple[FakeTelegram, str],
    db_dsn: str,
    write_config: Callable[..., Path],
    caplog: object,
) -> None:
    fake, base_url = fake_telegram
    fake.add_user(ADMIN, "Admin", language_code="en").started = True  # the admin talked to the bot before
    fake.add_user(ALICE, "Alice", language_code="en")
    config = bot_config(write_config, db_dsn, fake, base_url, xray={"enabled": False, "public_key": ""})
    vpnd = await start_vpnd(nursery, config)
    with trio.fail_after(60):
        # Start-up named the gap and alerted the admins.
        await fake.wait_until(lambda: len(texts_with(fake, ADMIN, "xray_links")) == 1, timeout=10)
        assert "[xray].public_key" in texts_with(fake, ADMIN, "xray_links")[0]

        fake.user_sends(ALICE, "/start")
        menu = await fake.wait_for_bot_message(ALICE, timeout=10)
        granted = await press(fake, ALICE, menu, "trial")
        assert "sub" in granted.callback_data
        shown = await press(fake, ALICE, granted, "sub")
        assert "being prepared" in (shown.text or ""), shown.text
        assert "Sorry" not in (shown.text or "")
        again = await press(fake, ALICE, shown, "menu")
        again = await press(fake, ALICE, again, "sub")
        assert "being prepared" in (again.text or "")

        # The subscription URL says "later", not 500.
        with psycopg.connect(db_dsn) as conn:
            row = conn.execute("SELECT sub_token FROM subscriptions WHERE user_id = %s", (ALICE,)).fetchone()
        assert row is not None
        async with httpx.AsyncClient(base_url=vpnd.http_url, timeout=10) as client:
            answer = await client.get(f"/sub/{row[0]}")
        assert answer.status_code == 503 and answer.headers["retry-after"] == "300"

        fake.user_sends(ADMIN, "/start")  # the outbox had every chance to send more alerts
        await fake.wait_for_bot_message(ADMIN, timeout=10)
    assert len(texts_with(fake, ADMIN, "xray_links")) == 1  # once per incident
    assert not any("Sorry" in (m.text or "") for m in fake.bot_messages(ALICE))
    await vpnd.stop()


async def test_a_key_from_the_example_config_works_end_to_end(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    """The shipped [xray] settings as they are: "My subscription" after the trial shows a key whose
    public key is the example pair's."""
    from vpnd.config import load_config

    shipped = load_config(REPO / "config.toml", environ={}).xray
    fake, base_url = fake_telegram
    fake.add_user(ALICE, "Alice", language_code="en")
    xray = {"enabled": False, "public_key": shipped.public_key, "short_id": shipped.short_id, "host": shipped.host}
    vpnd = await start_vpnd(nursery, bot_config(write_config, db_dsn, fake, base_url, xray=xray))
    with trio.fail_after(60):
        fake.user_sends(ALICE, "/start")
        menu = await fake.wait_for_bot_message(ALICE, timeout=10)
        granted = await press(fake, ALICE, menu, "trial")
        shown = await press(fake, ALICE, granted, "sub")
    link = re.search(r"vless://\S+", shown.text or "")
    assert link is not None, shown.text
    assert parse_vless_link(link.group(0)).public_key == shipped.public_key
    await vpnd.stop()
