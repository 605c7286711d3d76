"""Node status for admins: `vpnd admin nodes` (a real subprocess) and the bot's "Nodes" screen.

The state comes from where the daemon puts it: rows written by the writers' own `record_node`, or a
running Xray fleet against fake Xray nodes (one over mutual TLS, one that is not there at all).
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import trio

from tests.admin.harness import ADMIN, give_subscription, seed_users, start_admin_vpnd
from tests.admin.test_admin_bot import EVE, forge_callback
from tests.harness import (
    PLANS,
    bot_config,
    config_sections,
    has_button,
    press,
    say,
    sql,
    start_vpnd,
    text_has,
    write_config_file,
)
from tests.keys import PUBLIC_KEY
from tests.nodes.pki import make_pki
from vpnd.compose import Services
from vpnd.config import load_config
from vpnd.db.nodes import NodeObservation, record_node
from vpnd_sandbox.telegram_fake import FakeTelegram
from vpnd_sandbox.xray_fake import FakeXray, start_fake_xray

ADMIN_RU = 2
MB = 1024 * 1024


def node_toml(name: str, location: dict[str, str], api_address: str, **extra: str) -> str:
    keys = {"name": name, "host": f"{name}.example.test", "public_key": PUBLIC_KEY, "api_address": api_address}
    lines = [f"{key} = {json.dumps(value)}" for key, value in {**keys, **extra}.items()]
    place = ", ".join(f"{lang} = {json.dumps(label, ensure_ascii=False)}" for lang, label in location.items())
    return "\n[[nodes]]\n" + "\n".join([*lines, f"location = {{ {place} }}"]) + "\n"


def vpnd_admin(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vpnd", "admin", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )


def json_result(process: subprocess.CompletedProcess[str]) -> Any:
    assert process.returncode == 0, process.stderr
    document = json.loads(process.stdout)
    assert document["ok"] is True, document
    return document["result"]


def record(dsn: str, name: str, *, reachable: bool = True, detail: str = "ok", users: int = 0, online: int = 0,
           traffic: int = 0, in_sync: bool = True) -> None:  # fmt: skip
    with psycopg.connect(dsn) as conn:
        record_node(conn, NodeObservation(name, reachable, detail, users, online, traffic, in_sync))


def closed_port() -> int:
    """A loopback port nobody listens on (a node whose API is not there)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_cli_lists_configured_nodes_with_their_records(tmp_path: Path, db_dsn: str) -> None:
    """Up, down with its detail, never seen, stale and removed; traffic adds up; text and --json; audited."""
    nodes = (
        node_toml("de1", {"en": "🇩🇪 Frankfurt", "ru": "🇩🇪 Франкфурт"}, "127.0.0.1:10001")
        + node_toml("nl1", {"en": "🇳🇱 Amsterdam"}, "127.0.0.1:10002")
        + node_toml("fr1", {"en": "🇫🇷 Paris"}, "127.0.0.1:10003")
        + node_toml("pl1", {"en": "🇵🇱 Warsaw"}, "127.0.0.1:10004")
    )
    config = write_config_file(tmp_path / "config.toml", config_sections(db_dsn), PLANS + nodes)
    empty = write_config_file(tmp_path / "empty.toml", config_sections(db_dsn))

    none = vpnd_admin(empty, "nodes")
    assert none.returncode == 0, none.stderr
    assert none.stdout.strip() == "no Xray nodes: [xray] enabled = false and no [[nodes]] in the configuration"
    assert json_result(vpnd_admin(empty, "nodes", "--json")) == []

    record(db_dsn, "de1", users=12, online=3, traffic=3 * MB)
    record(db_dsn, "de1", users=12, online=2, traffic=2 * MB)  # today's traffic is the sum of the readings
    record(db_dsn, "nl1", reachable=False, detail="api: UNAVAILABLE: connection refused", users=7, in_sync=False)
    record(db_dsn, "pl1", users=4)
    record(db_dsn, "old", users=2)  # no longer in the config: its writer is retiring it
    sql(db_dsn, "UPDATE xray_nodes SET updated_at = now() - interval '5 minutes' WHERE name = 'pl1'")
    sql(db_dsn, "UPDATE xray_nodes SET synced_at = now() - interval '95 seconds' WHERE name = 'de1'")

    text = vpnd_admin(config, "nodes")
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["de1", "nl1", "fr1", "pl1", "old"]  # config order, then removed
    de1, nl1, fr1, pl1, old = lines
    assert "🇩🇪 Frankfurt" in de1 and "reachable: yes  users 12  online 2  traffic today 5.0 MB" in de1
    synced = re.search(r"last sync 1m (\d+)s ago$", de1)  # 95 s ago, and however long the CLI took to start
    assert synced is not None and 35 <= int(synced[1]) < 60, de1
    assert "reachable: no  users 7" in nl1 and "last sync never" in nl1
    assert nl1.endswith("(api: UNAVAILABLE: connection refused)")
    assert "🇫🇷 Paris" in fr1 and fr1.rstrip().endswith("never seen") and "users" not in fr1
    stale = re.search(r"stale: not updated for 5m (\d+)s  users 4", pl1)
    assert stale is not None and int(stale[1]) < 30, pl1
    assert "removed (retiring)  users 2" in old

    listed = json_result(vpnd_admin(config, "nodes", "--json"))
    states = {node["name"]: (node["state"], node["location"]) for node in listed}
    assert states == {
        "de1": ("up", "🇩🇪 Frankfurt"),
        "nl1": ("down", "🇳🇱 Amsterdam"),
        "fr1": ("never", "🇫🇷 Paris"),
        "pl1": ("stale", "🇵🇱 Warsaw"),
        "old": ("removed", ""),
    }
    de1_record = listed[0]["record"]
    assert (de1_record["users"], de1_record["online"], de1_record["traffic_today"]) == (12, 2, 5 * MB)
    assert listed[2]["record"] is None and listed[0]["stale_after"] == 90.0  # 60 s rounds + 30 s margin

    # A day later, today's traffic starts from zero.
    sql(db_dsn, "UPDATE xray_nodes SET traffic_day = current_date - 1 WHERE name = 'de1'")
    assert json_result(vpnd_admin(config, "nodes", "--json"))[0]["record"]["traffic_today"] == 0

    audit = sql(db_dsn, "SELECT admin_id, action, details->>'via' FROM admin_audit ORDER BY id")
    assert audit == [(0, "nodes", "cli")] * 5


async def wait_for_record(dsn: str, name: str, condition: str, timeout: float = 20) -> None:
    """Until the writer's row of node `name` satisfies the SQL `condition`."""
    with trio.fail_after(timeout):
        while not sql(dsn, f"SELECT 1 FROM xray_nodes WHERE name = %s AND {condition}", name):
            await trio.sleep(0.1)


async def test_bot_nodes_screen_from_a_running_fleet(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, tmp_path: Path
) -> None:
    """vpnd drives de1 (a fake Xray over mutual TLS) and nl1 (no API there); the admin sees both, in
    their language, Refresh shows de1 going down, the CLI says the same, and a non-admin sees nothing."""
    fake, base_url = fake_telegram
    pki = make_pki(tmp_path / "pki", ["de1"])
    de1: FakeXray = start_fake_xray("xray.", inbound_tags=("vless-reality",), tls=pki.fake_server_tls("de1"))
    nodes = node_toml("de1", {"en": "🇩🇪 Frankfurt", "ru": "🇩🇪 Франкфурт"}, de1.address, **pki.node_keys()) + node_toml(
        "nl1", {"en": "🇳🇱 Amsterdam"}, f"127.0.0.1:{closed_port()}"
    )
    sections = config_sections(
        db_dsn, (fake, base_url), telegram={"admin_ids": [ADMIN, ADMIN_RU]}, xray={"reconcile_interval": 1, "traffic_interval": 1}
    )
    path = write_config_file(tmp_path / "config.toml", sections, PLANS + nodes)
    users = seed_users(db_dsn, None, 5000, 2)
    give_subscription(db_dsn, users, kind="paid")
    fake.add_user(ADMIN, "Admin")
    fake.add_user(ADMIN_RU, "Админ", language_code="ru")
    fake.add_user(EVE, "Eve")
    try:
        vpnd = await start_vpnd(
            nursery, load_config(path, environ={}), Services.only("listener", "poller", "http", "xray")
        )
        await wait_for_record(db_dsn, "de1", "reachable AND users = 2 AND synced_at IS NOT NULL")
        await wait_for_record(db_dsn, "nl1", "NOT reachable")
        de1.bump_traffic("u5000", uplink=MB, downlink=2 * MB)
        await wait_for_record(db_dsn, "de1", f"traffic_today = {3 * MB}")  # at its next record (10 s apart)

        with trio.fail_after(40):
            menu = await say(fake, ADMIN, "/admin", predicate=has_button("adm:nd"))
            screen = await press(fake, ADMIN, menu, "adm:nd", predicate=text_has("Nodes"))
            text = screen.text or ""
            assert "✅ de1 🇩🇪 Frankfurt · reachable" in text
            assert "users 2 · online now " in text and " · traffic today 3.0 MB · last sync " in text
            assert "❌ nl1 🇳🇱 Amsterdam · unreachable: " in text
            assert screen.callback_data == ["adm:nd", "adm"]

            menu_ru = await say(fake, ADMIN_RU, "/admin", predicate=has_button("adm:nd"))
            screen_ru = await press(fake, ADMIN_RU, menu_ru, "adm:nd", predicate=text_has("Серверы"))
            assert "✅ de1 🇩🇪 Франкфурт · доступен" in (screen_ru.text or "")
            assert "пользователей 2 · онлайн " in (screen_ru.text or "") and "трафик сегодня 3.0 MB" in (
                screen_ru.text or ""
            )

            cli = json_result(vpnd_admin(path, "nodes", "--json"))
            assert [(node["name"], node["state"], (node["record"] or {}).get("users")) for node in cli] == [
                ("de1", "up", 2),
                ("nl1", "down", 0),
            ]

            de1.stop()
            await wait_for_record(db_dsn, "de1", "NOT reachable")
            refreshed = await press(fake, ADMIN, screen, "adm:nd", predicate=text_has("❌ de1"))
            assert "❌ de1 🇩🇪 Frankfurt · unreachable: " in (refreshed.text or "")
            assert refreshed.message_id == screen.message_id  # Refresh edits the screen in place

            # A non-admin pressing a forged "Nodes" button gets what any unknown button gets.
            start = await say(fake, EVE, "/start")
            mark = fake.change_seq
            forge_callback(fake, EVE, start, "zzz")
            unknown = await fake.wait_for_bot_message(EVE, since=mark)
            start = await say(fake, EVE, "/start")
            mark = fake.change_seq
            forge_callback(fake, EVE, start, "adm:nd")
            refused = await fake.wait_for_bot_message(EVE, since=mark)
            assert (refused.text, refused.callback_data) == (unknown.text, unknown.callback_data)
            assert "de1" not in (refused.text or "")
        await vpnd.stop()
    finally:
        de1.stop()
    assert ("callback", "adm:nd") in sql(db_dsn, "SELECT action, target FROM admin_audit WHERE result = 'denied'")
    assert sql(db_dsn, "SELECT count(*) FROM admin_audit WHERE action = 'nodes' AND details->>'via' = 'bot'") == [(3,)]


async def test_bot_nodes_screen_fits_one_message_however_many_nodes_are_down(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    """40 nodes, all down with long errors: the screen clips the errors and counts the nodes that do not
    fit (the fake Bot API refuses a text over 4096 characters, as Telegram does)."""
    fake, base_url = fake_telegram
    names = [f"n{index:02d}" for index in range(40)]
    nodes = "".join(node_toml(name, {"en": f"City {name}"}, f"127.0.0.1:{20000 + i}") for i, name in enumerate(names))
    vpnd = await start_admin_vpnd(nursery, bot_config(write_config, db_dsn, fake, base_url, plans=nodes))
    detail = "api: UNAVAILABLE: " + "x" * 480
    for name in names:
        record(db_dsn, name, reachable=False, detail=detail, users=100, in_sync=False)
    fake.add_user(ADMIN, "Admin")
    with trio.fail_after(30):
        menu = await say(fake, ADMIN, "/admin", predicate=has_button("adm:nd"))
        screen = await press(fake, ADMIN, menu, "adm:nd", predicate=text_has("Nodes"))
    text = screen.text or ""
    shown = [name for name in names if f"❌ {name} City {name}" in text]
    assert shown == names[: len(shown)] and 10 <= len(shown) < 40
    assert f"… and {40 - len(shown)} more: vpnd admin nodes lists every node." in text
    assert f"unreachable: {detail[:200]}…\n" in text
    await vpnd.stop()
