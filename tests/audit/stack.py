"""The whole daemon for the audit's behaviour tests: vpnd in the test's Trio run against every fake.

`full_config` points vpnd at the fake Bot API, the fake Crypto Pay (webhooks signed and posted to
vpnd's HTTP server), the fake Xray API (gRPC on loopback) and a fresh PostgreSQL database, with the
workers' periods short enough for a test. Nothing of vpnd is mocked: the tests observe what a user,
Crypto Pay, Xray or an operator would see, plus the database.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from tests.harness import Running, bot_config, sql, start_vpnd
from vpnd.config import Config
from vpnd_sandbox.cryptopay_fake import FakeCryptoPay
from vpnd_sandbox.demo import DEMO_PUBLIC_KEY, xray_template
from vpnd_sandbox.telegram_fake import FakeTelegram
from vpnd_sandbox.xray_fake import FakeXray

TAG = "vless-reality"
ADMIN = 1


def xray_section(tmp_path: Path, xray: FakeXray) -> dict[str, Any]:
    template = tmp_path / "xray-template.json"
    template.write_text(json.dumps(xray_template(TAG)))
    (tmp_path / "xray").mkdir(exist_ok=True)
    return {
        "enabled": True,
        "template_path": str(template),
        "config_path": str(tmp_path / "xray" / "config.json"),
        "inbound_tag": TAG,
        "api_address": xray.address,
        "api_prefix": "xray.",
        "reconcile_interval": 5.0,
        "host": "vpn.example.test",
        "public_key": DEMO_PUBLIC_KEY,
        "short_id": "0123abcd",
    }


def full_config(
    write_config: Callable[..., Path],
    db_dsn: str,
    tmp_path: Path,
    bot_api: tuple[FakeTelegram, str],
    *,
    cryptopay: tuple[FakeCryptoPay, str] | None = None,
    xray: FakeXray | None = None,
    **sections: dict[str, Any],
) -> Config:
    """vpnd against the fakes given (Crypto Pay and Xray are off without theirs); `sections` override."""
    fake, base_url = bot_api
    base: dict[str, dict[str, Any]] = {
        "telegram": {},
        "shutdown": {"grace_seconds": 3.0},
        "workers": {
            "reminders_interval": 0.5,
            "trial_interval": 0.5,
            "expiry_interval": 0.5,
            "renewal_interval": 0.5,
            "health_interval": 1.0,
            "housekeeping_interval": 1.0,
        },
    }
    if cryptopay is not None:
        pay, pay_url = cryptopay
        base["cryptopay"] = {"enabled": True, "token": pay.token, "api_base_url": pay_url, "poll_interval": 0.5}
    if xray is not None:
        base["xray"] = xray_section(tmp_path, xray)
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return bot_config(write_config, db_dsn, fake, base_url, **base)


async def start_full(nursery: trio.Nursery, config: Config, cryptopay: FakeCryptoPay | None = None) -> Running:
    """Start vpnd; point the fake Crypto Pay's webhooks at its HTTP server."""
    with trio.fail_after(40):
        vpnd = await start_vpnd(nursery, config)
    if cryptopay is not None:
        cryptopay.webhook_url = f"{vpnd.http_url}/webhooks/cryptopay"
    return vpnd


async def instance_lock_released(dsn: str, timeout: float = 30.0) -> None:
    """Wait until no session holds vpnd's instance lock. PostgreSQL frees a session's advisory locks when
    its backend exits, which happens *after* the client closed the connection: a restart at once can
    find the lock still taken (vpnd then exits with "another vpnd is already running" and systemd starts
    it again after RestartSec). Tests that restart at once wait here, as RestartSec would."""
    held = "SELECT 1 FROM pg_locks l JOIN pg_database d ON d.oid = l.database WHERE l.locktype = 'advisory' " \
           "AND d.datname = current_database()"  # fmt: skip
    await poll(lambda: not sql(dsn, held), timeout, what="the instance lock is free")


# --- reading the outcome -------------------------------------------------------------------------


async def poll(condition: Callable[[], bool], timeout: float, step: float = 0.05, what: str = "") -> None:
    """Poll `condition` (the database, a fake, a file) until it holds, at most `timeout` seconds."""
    try:
        with trio.fail_after(timeout):
            while not condition():
                await trio.sleep(step)
    except trio.TooSlowError:
        raise AssertionError(f"not within {timeout:g}s: {what or condition}") from None


def live_emails(xray: FakeXray) -> set[str]:
    return set(xray.users(TAG))


def file_emails(config: Config) -> set[str]:
    try:
        document = json.loads(Path(config.xray.config_path).read_text())
    except FileNotFoundError:
        return set()
    inbound = next(i for i in document["inbounds"] if i.get("tag") == TAG)
    return {c["email"] for c in inbound["settings"]["clients"]}


def desired_emails(dsn: str) -> set[str]:
    """What Xray must hold: the email ("u<user id>") of every active, unexpired subscription."""
    rows = sql(dsn, "SELECT user_id FROM subscriptions WHERE status = 'active' AND expires_at > now()")
    return {f"u{user_id}" for (user_id,) in rows}
