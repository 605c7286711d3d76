"""The device limit and the traffic numbers of `GET /sub/<token>`, over real HTTP and a real PostgreSQL."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path

import httpx
import trio

from tests.devices.harness import announce_of, happ, links_of, serving, title_of
from tests.harness import sql
from vpnd.config import GIB
from vpnd.db.devices import MAX_RECORDED
from vpnd.xray.links import parse_vless_link


async def test_a_sixth_device_on_a_five_device_plan_gets_no_links(config_file: Callable[..., Path], db_dsn: str):
    async with serving(config_file()) as s:
        sub = await s.subscribe(10, "five")
        for n in range(1, 6):
            response = await s.fetch(sub, happ(f"device-{n}", model=f"Phone {n}"))
            [link] = links_of(response)
            assert parse_vless_link(link).uuid == str(sub.uuid)
            assert title_of(response) == "Fast VPN #1" and announce_of(response) is None
            assert response.headers.get("x-hwid-limit") is None

        sixth = await s.fetch(sub, happ("device-6", model="Tablet"))
        assert links_of(sixth) == []  # a valid, empty subscription: the app shows the title, not an error
        assert title_of(sixth) == "⚠️ Device limit reached (5 of 5)"
        assert "My subscription → 📱 Devices" in (announce_of(sixth) or "")
        assert sixth.headers.get("x-hwid-limit") == "true"  # v2RayTun's own marker of the device limit
        assert sql(db_dsn, "SELECT count(*) FROM devices WHERE user_id = 10") == [(5,)]

        # the five keep working at the limit, the sixth is refused again
        for n in range(1, 6):
            assert len(links_of(await s.fetch(sub, happ(f"device-{n}")))) == 1
        assert links_of(await s.fetch(sub, happ("device-6"))) == []

        # an admin-granted slot (subscriptions.extra_devices) lets the sixth in
        sql(db_dsn, "UPDATE subscriptions SET extra_devices = 1 WHERE user_id = 10")
        assert len(links_of(await s.fetch(sub, happ("device-6")))) == 1
        assert links_of(await s.fetch(sub, happ("device-7"))) == []


async def test_device_rows_record_what_the_app_says_and_last_seen_moves(config_file, db_dsn):
    async with serving(config_file()) as s:
        sub = await s.subscribe(11, "five")
        await s.fetch(sub, happ("abc-123", os="iOS", version="17.4", model="iPhone 15"))
        rows = sql(db_dsn, "SELECT hwid, os, os_version, model, user_agent, first_seen, last_seen FROM devices")
        assert [r[:5] for r in rows] == [("abc-123", "iOS", "17.4", "iPhone 15", "Happ/3.1.0")]
        seen = rows[0][6]
        await s.fetch(sub, happ("abc-123", os="iOS", version="17.4", model="iPhone 15"))
        assert sql(db_dsn, "SELECT last_seen FROM devices") == [(seen,)]  # at most once a minute
        sql(
            db_dsn,
            "UPDATE devices SET last_seen = last_seen - interval '2 minutes', "
            "first_seen = first_seen - interval '2 minutes'",
        )
        await s.fetch(sub, happ("abc-123", os="iOS", version="17.5", model="iPhone 15"))
        [(last_seen, version)] = sql(db_dsn, "SELECT last_seen, os_version FROM devices")
        assert last_seen > seen - dt.timedelta(seconds=1) and version == "17.5"


async def test_no_hwid_allowed_by_default(config_file, db_dsn):
    async with serving(config_file()) as s:
        sub = await s.subscribe(12, "five")
        for n in range(5):
            await s.fetch(sub, happ(f"d{n}"))
        # v2rayN, Hiddify without a device id: served (not counted), even with every slot taken
        response = await s.fetch(sub, {"user-agent": "v2rayN/6.45"})
        assert len(links_of(response)) == 1 and title_of(response) == "Fast VPN #1"
        assert sql(db_dsn, "SELECT count(*) FROM devices") == [(5,)]


async def test_no_hwid_denied_by_config(config_file, db_dsn):
    async with serving(config_file(devices={"missing_hwid": "deny"})) as s:
        sub = await s.subscribe(13, "five", language="ru")
        response = await s.fetch(sub, {"user-agent": "v2rayN/6.45"})
        assert links_of(response) == []
        assert title_of(response) == "⚠️ Приложение не поддерживается"  # in the user's language
        assert "Happ" in (announce_of(response) or "")
        assert len(links_of(await s.fetch(sub, happ("with-id")))) == 1


async def test_two_new_devices_racing_for_the_last_slot(config_file, db_dsn):
    async with serving(config_file()) as s:
        sub = await s.subscribe(14, "five")
        for n in range(4):
            assert len(links_of(await s.fetch(sub, happ(f"old-{n}")))) == 1
        results: dict[str, httpx.Response] = {}

        async def fetch(hwid: str) -> None:
            results[hwid] = await s.fetch(sub, happ(hwid))

        for round_ in range(3):  # several rounds: a race lost once by luck must not pass
            async with trio.open_nursery() as nursery:
                for n in range(6):
                    nursery.start_soon(fetch, f"new-{round_}-{n}")
            served = [hwid for hwid, r in results.items() if links_of(r)]
            assert len(served) == 1, served
            assert sql(db_dsn, "SELECT count(*) FROM devices WHERE user_id = 14") == [(5,)]
            sql(db_dsn, "DELETE FROM devices WHERE hwid = %s", served[0])
            results.clear()


async def test_garbage_headers(config_file, db_dsn):
    async with serving(config_file()) as s:
        sub = await s.subscribe(15, "five")
        for bad in ("x" * 10_000, "tab\there", b"\xff\xfe-not-ascii", "a" * 129, "has space"):
            response = await s.fetch(sub, {"x-hwid": bad})
            assert response.status_code == 400, bad
            assert "x-hwid" in response.text
        assert len(links_of(await s.fetch(sub, {"x-hwid": ""}))) == 1  # empty: as if none was sent
        assert len(links_of(await s.fetch(sub, {"x-hwid": "a" * 128}))) == 1
        huge = {
            "x-hwid": "ok-1",
            "x-device-os": "A" * 10_000,
            "x-ver-os": "1\t2",
            "x-device-model": ("Смартфон " * 500).strip().encode(),
            "user-agent": "U" * 10_000,
        }
        assert len(links_of(await s.fetch(sub, huge))) == 1
        [(os, version, model, agent)] = sql(
            db_dsn, "SELECT os, os_version, model, user_agent FROM devices WHERE hwid = 'ok-1'"
        )
        assert os == "A" * 32 and version == "12" and agent == "U" * 200
        assert model.startswith("Смартфон Смартфон") and len(model) <= 64
        assert sql(db_dsn, "SELECT count(*) FROM devices") == [(2,)]


async def test_device_rows_are_bounded_on_an_unlimited_plan(config_file, db_dsn):
    async with serving(config_file()) as s:
        sub = await s.subscribe(16, "free")
        sql(
            db_dsn,
            "INSERT INTO devices (user_id, hwid) SELECT 16, 'seed-' || g FROM generate_series(1, %s) g",
            MAX_RECORDED - 1,
        )
        assert len(links_of(await s.fetch(sub, happ("last-recorded")))) == 1
        assert len(links_of(await s.fetch(sub, happ("not-recorded")))) == 1  # served, not recorded
        assert sql(db_dsn, "SELECT count(*) FROM devices") == [(MAX_RECORDED,)]
        assert sql(db_dsn, "SELECT count(*) FROM devices WHERE hwid = 'not-recorded'") == [(0,)]


async def test_userinfo_carries_the_period_and_a_blocked_subscription_gets_no_links(config_file, db_dsn):
    async with serving(config_file()) as s:
        sub = await s.subscribe(17, "five")
        expire = int(sub.expires_at.timestamp())
        used = 3 * GIB + 12345
        sql(
            db_dsn,
            "INSERT INTO traffic_periods (user_id, started_at, ends_at, used_bytes, extra_bytes) "
            "VALUES (17, now() - interval '1 day', now() + interval '29 days', %s, %s)",
            used,
            2 * GIB,
        )
        response = await s.fetch(sub, happ("p1"))
        assert response.headers["subscription-userinfo"] == (
            f"upload=0; download={used}; total={12 * GIB}; expire={expire}"
        )
        assert len(links_of(response)) == 1

        sql(db_dsn, "UPDATE subscriptions SET traffic_blocked = true WHERE user_id = 17")
        blocked = await s.fetch(sub, happ("p1"))
        assert links_of(blocked) == [] and title_of(blocked) == "⚠️ Traffic used up"
        assert "traffic pack" in (announce_of(blocked) or "")
        assert blocked.headers["subscription-userinfo"].startswith(f"upload=0; download={used}; total={12 * GIB}")
        # a blocked subscription takes no slot either
        assert links_of(await s.fetch(sub, happ("p2"))) == []
        assert sql(db_dsn, "SELECT hwid FROM devices") == [("p1",)]

        # a plan without a quota: total 0 (unlimited)
        free = await s.subscribe(18, "free")
        response = await s.fetch(free, happ("f1"))
        assert response.headers["subscription-userinfo"] == (
            f"upload=0; download=0; total=0; expire={int(free.expires_at.timestamp())}"
        )
