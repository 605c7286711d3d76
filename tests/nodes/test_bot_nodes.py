"""What a user sees with several servers: the bot and the subscription URL, through the whole daemon
(fake Bot API, fake Xray nodes on loopback, a real PostgreSQL)."""

from __future__ import annotations

import base64
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import httpx
import psycopg
import trio

from tests.harness import bot_config, start_vpnd, toml_value
from tests.keys import PUBLIC_KEY
from vpnd.xray.links import parse_vless_link
from vpnd_sandbox.telegram_fake import FakeTelegram
from vpnd_sandbox.xray_fake import start_fake_xray

ALICE = 1001
TAG = "vless-in"


def nodes_toml(addresses: dict[str, str]) -> str:
    locations = {
        "de1": {"en": "🇩🇪 Frankfurt", "ru": "🇩🇪 Франкфурт"},
        "nl1": {"en": "🇳🇱 Amsterdam", "ru": "🇳🇱 Амстердам"},
    }
    text = ""
    for name, address in addresses.items():
        keys = {
            "name": name,
            "location": locations[name],
            "host": f"{name}.vpn.example.test",
            "public_key": PUBLIC_KEY,
            "inbound_tag": TAG,
            "api_address": address,  # loopback: allowed in the clear (a tunnel's end, or a test)
        }
        text += "\n[[nodes]]\n" + "".join(f"{key} = {toml_value(value)}\n" for key, value in keys.items())
    return text


async def test_my_subscription_lists_each_location_and_the_url_serves_a_link_per_node(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    with ExitStack() as stack:
        nodes = {name: stack.enter_context(start_fake_xray(inbound_tags=(TAG,))) for name in ("de1", "nl1")}
        config = bot_config(
            write_config, db_dsn, fake, base_url, plans=nodes_toml({n: x.address for n, x in nodes.items()})
        )
        vpnd = await start_vpnd(nursery, config)
        fake.add_user(ALICE, "Alice", language_code="ru")
        with trio.fail_after(30):
            fake.user_sends(ALICE, "/trial")
            await fake.wait_for_bot_message(ALICE, lambda m: "sub" in m.callback_data)
            fake.user_sends(ALICE, "/subscription")
            details = await fake.wait_for_bot_message(ALICE, lambda m: "vless://" in (m.text or ""))
            await fake.wait_until(lambda: all(f"u{ALICE}" in node.users(TAG) for node in nodes.values()))
        lines = (details.text or "").splitlines()
        links = [parse_vless_link(line) for line in lines if line.startswith("vless://")]
        assert [(link.host, link.name) for link in links] == [
            ("de1.vpn.example.test", "🇩🇪 Франкфурт"),
            ("nl1.vpn.example.test", "🇳🇱 Амстердам"),
        ]
        for link in links:  # each key under its location's name
            assert lines[lines.index(next(x for x in lines if link.host in x)) - 1] == link.name

        with psycopg.connect(db_dsn) as conn:
            row = conn.execute("SELECT sub_token FROM subscriptions WHERE user_id = %s", (ALICE,)).fetchone()
        assert row is not None
        async with httpx.AsyncClient(base_url=vpnd.http_url, timeout=5) as client:
            response = await client.get(f"/sub/{row[0]}")
        served = [parse_vless_link(line) for line in base64.b64decode(response.content).decode().splitlines()]
        assert [link.host for link in served] == ["de1.vpn.example.test", "nl1.vpn.example.test"]
        await vpnd.stop()
