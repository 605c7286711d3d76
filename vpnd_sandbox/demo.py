"""`vpnd sandbox` (`make demo`): the whole bot on one machine, no Telegram token needed.

One process tree: a throwaway PostgreSQL cluster, the fake Bot API with its web chat, the fake Crypto
Pay, the fake YooKassa (card and SBP, for the plan priced in RUB), the fake Xray API, and vpnd
itself — all on 127.0.0.1. It prints the URL to open; Ctrl-C stops
vpnd gracefully, then the fakes, then PostgreSQL.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import tempfile
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
import trio

from vpnd.config import Config, config_from_dict
from vpnd.config_checks import EXAMPLE_REALITY_PRIVATE_KEY, EXAMPLE_REALITY_PUBLIC_KEY
from vpnd.db.migrations import migrate, packaged_schema
from vpnd.nurseries.root import run_daemon
from vpnd_sandbox.cryptopay_fake import FakeCryptoPay, serve_fake_cryptopay
from vpnd_sandbox.postgres import Cluster, free_port, throwaway_cluster
from vpnd_sandbox.telegram_fake import FakeTelegram, serve_fake_telegram
from vpnd_sandbox.xray_fake import start_fake_xray
from vpnd_sandbox.yookassa import FakeYooKassa, serve_fake_yookassa

log = logging.getLogger("vpnd_sandbox")

#: The example REALITY key pair of the shipped config.toml (a real pair: the template's private key
#: matches the public key in users' links). Public, so for demos only.
DEMO_PUBLIC_KEY = EXAMPLE_REALITY_PUBLIC_KEY
DEMO_PRIVATE_KEY = EXAMPLE_REALITY_PRIVATE_KEY
DEMO_ADMIN_ID = 1


def xray_template(tag: str) -> dict[str, Any]:
    """A normal Xray config with a VLESS + REALITY inbound whose clients vpnd fills in."""
    return {
        "log": {"loglevel": "warning"},
        "api": {"tag": "api", "services": ["HandlerService", "StatsService"]},
        "stats": {},
        "policy": {"levels": {"0": {"statsUserUplink": True, "statsUserDownlink": True}}},
        "inbounds": [
            {
                "tag": tag,
                "port": 443,
                "protocol": "vless",
                "settings": {"clients": [], "decryption": "none"},
                "streamSettings": {
                    "network": "tcp",
                    "security": "reality",
                    "realitySettings": {
                        "dest": "www.microsoft.com:443",
                        "serverNames": ["www.microsoft.com"],
                        "privateKey": DEMO_PRIVATE_KEY,
                        "shortIds": ["0123abcd"],
                    },
                },
            },
            {
                "tag": "api",
                "listen": "127.0.0.1",
                "port": 10085,
                "protocol": "dokodemo-door",
                "settings": {"address": "127.0.0.1"},
            },
        ],
        "outbounds": [{"protocol": "freedom", "tag": "direct"}],
        "routing": {"rules": [{"type": "field", "inboundTag": ["api"], "outboundTag": "api"}]},
    }


def demo_config(
    workdir: Path, dsn: str, telegram_url: str, fake: FakeTelegram, http_port: int, extra: dict[str, Any]
) -> Config:
    raw: dict[str, Any] = {
        "telegram": {
            "token": fake.token,
            "api_base_url": telegram_url,
            "admin_ids": [DEMO_ADMIN_ID],
            "poll_timeout": 10,
            "support_contact": "@vpnd_support",
        },
        "database": {"dsn": dsn, "pool_min": 1, "pool_max": 8},
        "http": {"listen": f"127.0.0.1:{http_port}", "public_base_url": f"http://127.0.0.1:{http_port}"},
        "shutdown": {"grace_seconds": 3.0},
        "xray": {
            "public_key": DEMO_PUBLIC_KEY,
            "short_id": "0123abcd",
            "host": "vpn.demo.invalid",
            "template_path": str(workdir / "xray-template.json"),
            "config_path": str(workdir / "xray-config.json"),
        },
        "plans": [
            {
                "code": "m1",
                "title": {"en": "1 month", "ru": "1 месяц"},
                "days": 30,
                "price": "4.99",
                "currency": "USD",
                "stars": 250,
                "prices": {"RUB": "299"},
            },
            {
                "code": "m3",
                "title": {"en": "3 months", "ru": "3 месяца"},
                "days": 90,
                "price": "12.99",
                "currency": "USD",
                "stars": 650,
                "prices": {"RUB": "799"},
            },
            {
                "code": "r1",
                "title": {"en": "1 month (RUB)", "ru": "1 месяц (₽)"},
                "days": 30,
                "price": "299.00",
                "currency": "RUB",
            },
        ],
    }
    for section, values in extra.items():
        raw[section] = {**raw.get(section, {}), **values}
    return config_from_dict(raw, str(workdir / "sandbox-config.toml"), {})


@contextlib.contextmanager
def demo_database() -> Iterator[tuple[Cluster, str]]:
    with throwaway_cluster(prefix="vpnd-demo-pg-") as cluster:
        dsn = cluster.create_database("vpnd")
        with psycopg.connect(dsn, autocommit=True) as conn:
            migrate(conn, packaged_schema())
        yield cluster, dsn


async def run_sandbox(web_port: int) -> None:
    tag = "vless-reality"
    with (
        tempfile.TemporaryDirectory(prefix="vpnd-demo-") as tmp,
        demo_database() as (_, dsn),
        start_fake_xray("xray.", inbound_tags=(tag,)) as xray,
    ):
        workdir = Path(tmp)
        async with trio.open_nursery() as fakes:
            fake = FakeTelegram()
            fake.add_user(DEMO_ADMIN_ID, "Admin", username="admin", language_code="en")
            fake.add_user(1001, "Alice", username="alice", language_code="en")
            fake.add_user(1002, "Борис", username="boris", language_code="ru")
            telegram_url = await fakes.start(partial(serve_fake_telegram, fake, port=_port_or_free(web_port)))
            cryptopay = FakeCryptoPay()
            cryptopay_url = await fakes.start(serve_fake_cryptopay, cryptopay)
            yookassa = FakeYooKassa()
            yookassa_url = await fakes.start(serve_fake_yookassa, yookassa)
            http_port = free_port()
            cryptopay.webhook_url = f"http://127.0.0.1:{http_port}/webhooks/cryptopay"
            yookassa.notification_url = f"http://127.0.0.1:{http_port}/webhooks/yookassa"
            (workdir / "xray-template.json").write_text(json.dumps(xray_template(tag), indent=2))
            extra: dict[str, Any] = {
                "cryptopay": {"enabled": True, "token": cryptopay.token, "api_base_url": f"{cryptopay_url}/api"},
                "yookassa": {
                    "enabled": True,
                    "shop_id": yookassa.shop_id,
                    "secret_key": yookassa.secret_key,
                    "api_base_url": f"{yookassa_url}/v3",
                    "notify_networks": ["127.0.0.1/32"],
                    "return_url": f"{telegram_url}/",
                },
                "telegram_payments": {
                    "enabled": True,
                    "provider_token": fake.payment_provider_token,
                    "currency": "RUB",
                    "receipt": True,
                },
                "xray": {"enabled": True, "inbound_tag": tag, "api_address": xray.address, "reconcile_interval": 30.0},
            }
            config = demo_config(workdir, dsn, telegram_url, fake, http_port, extra)
            print(
                f"\n  vpnd sandbox is running.\n\n"
                f"  Open the web chat:   {telegram_url}/\n"
                f"  vpnd health:         http://127.0.0.1:{http_port}/readyz\n"
                f"  Xray config (vpnd writes it): {workdir / 'xray-config.json'}\n"
                f"  Users: Alice (1001, en), Борис (1002, ru), Admin (1) — pick one and send /start.\n"
                f"  Buy with Crypto Pay (the invoice link opens a fake pay page), Telegram Stars or a card (RUB);\n"
                f"  the RUB plan also by card or SBP on a fake YooKassa page (Pay / Fail buttons).\n"
                f"  Stop with Ctrl-C.\n",
                flush=True,
            )
            await run_daemon(config)
            fakes.cancel_scope.cancel()
    print("vpnd sandbox stopped.", flush=True)


def _port_or_free(port: int) -> int:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return free_port()
    return port


def main(web_port: int = 8090) -> int:
    from vpnd.logs import setup_logging

    setup_logging("info", "kv")
    try:
        trio.run(run_sandbox, web_port)
    except KeyboardInterrupt:
        pass
    except Exception as exc:  # a demo that cannot start says why, without a traceback wall
        print(f"vpnd sandbox: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0
