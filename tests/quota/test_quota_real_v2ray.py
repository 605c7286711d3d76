"""The traffic quota with real traffic: a real V2Ray driven by the real daemon, a VLESS client on loopback.

Nothing fakes the counters: every byte counted is a byte V2Ray carried for the user, read through its
StatsService by the daemon's writer. The quota unit is whole GB, so the test gives the user a 1 GB plan
and fills the period's `used_bytes` in SQL to just under a level; the page fetched through the tunnel
(256 KiB) then crosses it for real. The fake Bot API counts what the user was told.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.harness import PLANS, config_sections, scalar, sql, start_vpnd, write_config_file
from tests.v2ray import NO_V2RAY, PAGE, TAG, V2RAY, Processes, server_template, v2ray_commands, vless_client
from tests.v2ray import free_port as free_tcp_port
from vpnd.compose import Services
from vpnd.config import load_config
from vpnd.db.subscriptions import grant_days
from vpnd.db.users import upsert_user
from vpnd.quota import limits_of
from vpnd.services import admin_actions as actions
from vpnd.workers.quota import WORKER_NAME as QUOTA_WORKER
from vpnd_sandbox.telegram_fake import FakeTelegram

pytestmark = [pytest.mark.slow, pytest.mark.skipif(V2RAY is None, reason=NO_V2RAY)]

GIB = 2**30
USER = 77
TRAFFIC_INTERVAL = 1.0
#: What one fetch moves: enough to cross a level from MARGIN below it, small enough to be quick.
BODY = PAGE + b"." * (256 * 1024)
MARGIN = 64 * 1024

QUOTA_PLAN = (
    '\n[[plans]]\ncode = "q1"\ntitle = { en = "1 GB", ru = "1 ГБ" }\ndays = 30\nprice = "1.99"\n'
    'currency = "USD"\nstars = 100\ntraffic_gb = 1\ntraffic_reset = "per_period"\n'
)


def quota_config(tmp_path: Path, db_dsn: str, telegram: tuple[FakeTelegram, str], api_port: int, vless_port: int):
    template = tmp_path / "template.json"
    template.write_text(json.dumps(server_template(api_port, vless_port)))
    (tmp_path / "xray").mkdir()
    sections = config_sections(
        db_dsn,
        telegram,
        xray={
            "enabled": True,
            "template_path": str(template),
            "config_path": str(tmp_path / "xray" / "config.json"),
            "inbound_tag": TAG,
            "api_address": f"127.0.0.1:{api_port}",
            "api_prefix": "v2ray.core.",
            "flow": "",
            "reconcile_interval": 60.0,
            "traffic_interval": TRAFFIC_INTERVAL,
        },
        workers={"quota_interval": 1.0},
    )
    return load_config(write_config_file(tmp_path / "config.toml", sections, PLANS + QUOTA_PLAN), environ={})


def fill_to(dsn: str, used: int) -> None:
    sql(dsn, "UPDATE traffic_periods SET used_bytes = %s WHERE user_id = %s AND current", used, USER)


def used_bytes(dsn: str) -> int:
    return int(scalar(dsn, "SELECT used_bytes FROM traffic_periods WHERE user_id = %s AND current", USER) or 0)


def blocked(dsn: str) -> bool:
    return bool(scalar(dsn, "SELECT traffic_blocked FROM subscriptions WHERE user_id = %s", USER))


def told(telegram: FakeTelegram, fragment: str) -> int:
    return sum(1 for m in telegram.bot_messages(USER) if fragment in (m.text or ""))


async def until(predicate: Callable[[], bool], timeout: float, step: float = 0.05) -> float:
    started = time.monotonic()
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(step)
    return time.monotonic() - started


@pytest.mark.timeout(180)
async def test_quota_with_real_v2ray_traffic(
    fake_telegram: tuple[FakeTelegram, str], db_dsn: str, tmp_path: Path
) -> None:
    telegram, _ = fake_telegram
    telegram.add_user(USER, "Quota").started = True
    api_port, vless_port = free_tcp_port(), free_tcp_port()
    config = quota_config(tmp_path, db_dsn, fake_telegram, api_port, vless_port)
    key = str(uuid.uuid4())
    processes = Processes(tmp_path)
    timings: dict[str, float] = {}

    async with trio.open_nursery() as nursery:
        services = Services.only("listener", "xray", "outbox", QUOTA_WORKER)
        vpnd = await start_vpnd(nursery, config, services)
        app = vpnd.app
        try:
            # the writer wrote V2Ray's file; V2Ray runs from it, the writer drives it live
            await until(lambda: Path(config.xray.config_path).exists(), timeout=10)
            processes.start("server", v2ray_commands(Path(config.xray.config_path))[0])

            def subscribe(conn: Any) -> None:
                upsert_user(conn, USER, None, "Quota", "en")
                grant_days(conn, USER, 30, kind="paid", plan_code="q1")
                conn.execute("UPDATE subscriptions SET uuid = %s WHERE user_id = %s", (key, USER))

            await app.db.run(subscribe)
            (tmp_path / "client").mkdir()
            async with vless_client(tmp_path / "client", {"u": (vless_port, key)}, page=BODY) as fetch:

                async def gets_through() -> bool:
                    return BODY in await fetch("u")

                with trio.fail_after(30):
                    while not await gets_through():
                        await trio.sleep(0.1)
                # the first reading opens the period, with the bytes V2Ray counted
                await until(lambda: used_bytes(db_dsn) > len(BODY), timeout=10)
                assert told(telegram, "%") == 0

                # 80 %: just under it, then a real page through the tunnel
                for level in (80, 95):
                    fill_to(db_dsn, GIB * level // 100 - MARGIN)
                    assert await gets_through()
                    await until(lambda: told(telegram, f"{level}%") == 1, timeout=10)  # noqa: B023

                # 100 %: taken off V2Ray within the traffic interval — a new connection fails
                fill_to(db_dsn, GIB - MARGIN)
                assert await gets_through()
                crossed = time.monotonic()
                while await gets_through():
                    assert time.monotonic() - crossed < TRAFFIC_INTERVAL + 3.0, "still on V2Ray over quota"
                    await trio.sleep(0.05)
                timings["quota reached → refused"] = time.monotonic() - crossed
                assert blocked(db_dsn)
                await until(lambda: told(telegram, "used up") == 1, timeout=10)
                for _ in range(3):  # stays off
                    assert not await gets_through()

                # an admin's traffic grant (the pack's path, add_extra): back within 1 s of its commit
                limits_for = partial(limits_of, config)
                granted = await app.db.run(actions.grant_traffic, actions.Actor.cli("test"), USER, 1, limits_for)
                committed = time.monotonic()
                assert isinstance(granted, actions.TrafficGranted) and not granted.blocked
                assert granted.total_bytes == 2 * GIB
                while not await gets_through():
                    await trio.sleep(0.01)
                timings["grant committed → through"] = time.monotonic() - committed
                assert timings["grant committed → through"] < 1.0, timings

                # over again, then the next period (the quota worker) puts them back
                fill_to(db_dsn, 2 * GIB - MARGIN)
                assert await gets_through()
                await until(lambda: told(telegram, "used up") == 2, timeout=TRAFFIC_INTERVAL + 10)
                await until(lambda: blocked(db_dsn), timeout=5)
                with trio.fail_after(5):
                    while await gets_through():
                        await trio.sleep(0.05)
                sql(
                    db_dsn,
                    "UPDATE subscriptions SET starts_at = now() - interval '30 days' + interval '1 second' "
                    "WHERE user_id = %s",
                    USER,
                )
                sql(
                    db_dsn,
                    "UPDATE traffic_periods p SET started_at = s.starts_at, ends_at = s.starts_at + interval '30 days' "
                    "FROM subscriptions s WHERE s.user_id = p.user_id AND p.user_id = %s AND p.current",
                    USER,
                )
                ends = time.monotonic() + 1.0
                with trio.fail_after(10):
                    while not await gets_through():
                        await trio.sleep(0.05)
                timings["period end → through"] = time.monotonic() - ends
                await until(lambda: told(telegram, "started again") == 1, timeout=10)
                assert used_bytes(db_dsn) < 10 * len(BODY)

            # every notice exactly once
            assert (told(telegram, "80%"), told(telegram, "95%"), told(telegram, "used up")) == (1, 1, 2)
            assert told(telegram, "started again") == 1
            audit = sql(db_dsn, "SELECT action, target, result FROM admin_audit WHERE action = 'grant_traffic'")
            assert audit == [("grant_traffic", str(USER), "ok")]
            print("\nquota with real V2Ray traffic: " + ", ".join(f"{k} {v:.2f}s" for k, v in timings.items()))
        except BaseException:
            print(processes.logs())
            raise
        finally:
            processes.stop_all()
            await vpnd.stop()
            nursery.cancel_scope.cancel()
