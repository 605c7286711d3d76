"""The Xray writer (vpnd.nurseries.xray) against a real PostgreSQL and the fake Xray gRPC server.

Everything goes through the daemon's own paths: subscriptions change in the database, the writer is
nudged, and the test looks at what Xray (the fake, or a real V2Ray at the end) and the config file
hold. Every test has a hard timeout.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from tests.harness import open_app
from tests.keys import PUBLIC_KEY
from tests.v2ray import NO_V2RAY, V2RAY
from vpnd.app import App
from vpnd.config import load_config
from vpnd.db import subscriptions
from vpnd.db.users import upsert_user
from vpnd.db.xray_state import get_sync_marker, set_sync_marker, traffic_totals
from vpnd.nurseries.xray import MIN_WRITE_INTERVAL, XrayStatus, run_xray
from vpnd_sandbox.xray_fake import FakeUser, start_fake_xray

TAG = "vless-in"
PRIVATE_KEY = base64.urlsafe_b64encode(bytes(range(1, 33))).rstrip(b"=").decode()


def reality_template(tag: str = TAG) -> dict[str, Any]:
    return {
        "log": {"loglevel": "warning"},
        "api": {"tag": "api", "services": ["HandlerService", "StatsService"]},
        "stats": {},
        "policy": {"levels": {"0": {"statsUserUplink": True, "statsUserDownlink": True}}},
        "inbounds": [
            {"tag": "api", "listen": "127.0.0.1", "port": 10085, "protocol": "dokodemo-door"},
            {
                "tag": tag,
                "port": 443,
                "protocol": "vless",
                "settings": {"clients": [], "decryption": "none"},
                "streamSettings": {
                    "network": "tcp",
                    "security": "reality",
                    "realitySettings": {
                        "target": "www.microsoft.com:443",
                        "serverNames": ["www.microsoft.com"],
                        "privateKey": PRIVATE_KEY,
                        "shortIds": ["", "6ba85179e30d4fc2"],
                    },
                },
            },
        ],
        "outbounds": [{"protocol": "freedom"}],
    }


@attrs.define
class Setup:
    app: App
    status: XrayStatus
    config_path: Path
    template_path: Path

    def file_clients(self) -> dict[str, str]:
        """email → uuid of the inbound's clients in the config file ({} when there is no file)."""
        try:
            document = json.loads(self.config_path.read_text())
        except FileNotFoundError:
            return {}
        inbound = next(i for i in document["inbounds"] if i.get("tag") == TAG)
        return {c["email"]: c["id"] for c in inbound["settings"]["clients"]}

    async def grant(self, user_id: int, days: int = 30) -> subscriptions.Subscription:
        def work(conn: Any) -> subscriptions.Subscription:
            upsert_user(conn, user_id, None, f"user {user_id}", "en")
            return subscriptions.grant_days(conn, user_id, days, kind="paid")

        sub = await self.app.db.run(work)
        self.app.xray_changed.nudge()
        return sub

    async def sql(self, statement: str, *args: Any) -> None:
        await self.app.db.run(lambda conn: conn.execute(statement, args))

    async def valid(self, user_id: int) -> bool:
        """The user's subscription has not run out yet (the database's clock)."""
        return bool(
            await self.app.db.run(
                lambda conn: conn.execute(
                    "SELECT expires_at > now() FROM subscriptions WHERE user_id = %s", (user_id,)
                ).fetchone()[0]
            )
        )

    async def round_done(self) -> None:
        """Nudge and wait until a whole round started after now has finished."""
        start = self.status.rounds
        for n in (1, 2):  # the second round began after the first ended, so after this call
            self.app.xray_changed.nudge()
            await until(lambda: self.status.rounds >= start + n)  # noqa: B023


async def until(predicate: Callable[[], bool], timeout: float = 30.0, step: float = 0.01) -> float:
    """Poll `predicate` until it holds; return how long that took."""
    started = time.monotonic()
    with trio.fail_after(timeout):
        while True:  # the fake and the file change outside Trio: poll
            if predicate():
                return time.monotonic() - started
            await trio.sleep(step)


@pytest.fixture
def fake():
    with start_fake_xray("xray.", inbound_tags=(TAG,)) as server:
        yield server


@pytest.fixture
def make_config(write_config: Callable[..., Path], db_dsn: str, tmp_path: Path) -> Callable[..., Path]:
    def make(api_address: str, **xray: Any) -> Path:
        template = tmp_path / "template.json"
        if not template.exists():
            template.write_text(json.dumps(reality_template()))
        (tmp_path / "xray").mkdir(exist_ok=True)
        settings: dict[str, Any] = {
            "enabled": True,
            "template_path": str(template),
            "config_path": str(tmp_path / "xray" / "config.json"),
            "inbound_tag": TAG,
            "api_address": api_address,
            "api_prefix": "xray.",
            "reconcile_interval": 30.0,
            "host": "vpn.example.com",
            "port": 443,
            "public_key": PUBLIC_KEY,
            "short_id": "6ba85179e30d4fc2",
            "sni": "www.microsoft.com",
        }
        settings.update(xray)
        return write_config(database={"dsn": db_dsn, "pool_min": 1, "pool_max": 6}, xray=settings)

    return make


@asynccontextmanager
async def running_writer(config_file: Path) -> AsyncIterator[Setup]:
    config = load_config(config_file)
    async with open_app(config, single_instance=False) as app:
        async with trio.open_nursery() as nursery:
            with trio.fail_after(30):
                fleet = await nursery.start(run_xray, app)
                status = fleet.statuses.get("local", XrayStatus(enabled=False, mode="disabled"))
            yield Setup(app, status, Path(config.xray.config_path), Path(config.xray.template_path))
            app.lifecycle.request_stop("test")


async def test_grant_renew_reissue_revoke_expire(fake, make_config):
    async with running_writer(make_config(fake.address)) as s:
        assert s.status.in_sync and s.file_clients() == {}
        assert (await s.status.readiness()).ok

        # a grant is live at once (the nudge, not the 30 s reconcile round) and in the file right after
        sub = await s.grant(1)
        await until(lambda: "u1" in fake.users(TAG), timeout=15)
        live = fake.users(TAG)["u1"]
        assert (live.uuid, live.flow) == (str(sub.uuid), "xtls-rprx-vision")
        await until(lambda: s.file_clients() == {"u1": str(sub.uuid)}, timeout=5)
        await until(lambda: s.status.in_sync)

        # renewal keeps the UUID: nothing changes live (no remove/add flap)
        before = fake.operations()
        renewed = await s.grant(1, days=30)
        assert renewed.uuid == sub.uuid and renewed.expires_at > sub.expires_at
        await s.round_done()
        assert fake.operations() == before
        assert s.file_clients() == {"u1": str(sub.uuid)}

        # reissue: the old UUID is removed live, the new one added
        reissued = await s.app.db.run(subscriptions.reissue_key, 1)
        s.app.xray_changed.nudge()
        # (between the remove and the add "u1" is briefly absent)
        await until(lambda: getattr(fake.users(TAG).get("u1"), "uuid", None) == str(reissued.uuid), timeout=15)
        assert fake.operations()[len(before) :] == [("remove", "u1", ""), ("add", "u1", str(reissued.uuid))]
        await until(lambda: s.file_clients() == {"u1": str(reissued.uuid)}, timeout=5)

        # revoke: removed live and from the file
        await s.grant(2)
        await s.app.db.run(subscriptions.revoke, 1)
        s.app.xray_changed.nudge()
        await until(lambda: set(fake.users(TAG)) == {"u2"}, timeout=5)
        await until(lambda: set(s.file_clients()) == {"u2"}, timeout=5)

        # expiry by time needs no nudge: the writer wakes when the next subscription runs out
        await s.sql("UPDATE subscriptions SET expires_at = now() + interval '4 seconds' WHERE user_id = 2")
        await s.round_done()
        # Still live while not expired (checked in that order: valid after the look means valid during it).
        live_then = "u2" in fake.users(TAG)
        assert live_then or not await s.valid(2)
        # Removed once it runs out, well before the next reconcile round (30 s) would find it.
        await until(lambda: "u2" not in fake.users(TAG), timeout=15)
        await until(lambda: s.file_clients() == {} and s.status.in_sync, timeout=5)
        assert s.status.pending_adds == s.status.pending_removes == 0


async def test_api_down_for_a_while_then_converges(fake, make_config):
    async with running_writer(make_config(fake.address)) as s:
        await s.grant(1)
        await until(lambda: "u1" in fake.users(TAG))
        fake.stop()
        for user_id in (2, 3, 4):
            await s.grant(user_id)
        await s.sql("UPDATE subscriptions SET status = 'expired' WHERE user_id = 1")
        s.app.xray_changed.nudge()
        await until(lambda: s.status.pending_adds == 3 and s.status.pending_removes == 1)

        check = await s.status.readiness()
        assert not check.ok and "unreachable" in check.detail and "3 adds, 1 removes pending" in check.detail
        registry = s.app.metrics.registry
        assert registry.get_sample_value("vpnd_xray_pending_ops", {"op": "add"}) == 3
        assert registry.get_sample_value("vpnd_xray_pending_ops", {"op": "remove"}) == 1
        await until(lambda: registry.get_sample_value("vpnd_xray_seconds_since_sync") >= 1.0)
        # the file does not wait for the API: a restarting Xray loads the right users
        await until(lambda: set(s.file_clients()) == {"u2", "u3", "u4"})

        fake.start()  # the API comes back (Xray itself kept running with u1)
        took = await until(lambda: set(fake.users(TAG)) == {"u2", "u3", "u4"})
        print(f"converged {took:.2f}s after the API came back")
        await until(lambda: s.status.in_sync)
        assert (await s.status.readiness()).ok
        assert registry.get_sample_value("vpnd_xray_pending_ops", {"op": "add"}) == 0
        assert registry.get_sample_value("vpnd_xray_seconds_since_sync") == 0


async def test_xray_restart_is_detected_and_live_users_rebuilt(fake, make_config, tmp_path):
    async with running_writer(make_config(fake.address)) as s:
        await s.grant(1)
        await until(lambda: "u1" in fake.users(TAG) and "u1" in s.file_clients())
        stale = tmp_path / "stale.json"
        shutil.copy(s.config_path, stale)
        await s.grant(2)
        await until(lambda: "u2" in fake.users(TAG) and "u2" in s.file_clients())
        await trio.sleep(2.6)  # Xray reports whole seconds of uptime
        # Xray restarts between two rounds from an older file: u2 is gone from its live list
        fake.stop()
        fake.start(reset=True, config_path=stale)
        assert set(fake.users(TAG)) == {"u1"}
        s.app.xray_changed.nudge()
        await until(lambda: set(fake.users(TAG)) == {"u1", "u2"}, timeout=10)
        assert s.status.restarts_detected == 1


async def test_start_resyncs_from_the_sync_marker(fake, make_config, db_dsn):
    """After a crash, users changed since the last in-sync moment are fixed; the others are untouched."""
    config = load_config(make_config(fake.address))
    async with open_app(config, single_instance=False) as app:

        def seed(conn):
            for user_id in (1, 2, 3):
                upsert_user(conn, user_id, None, "x", "en")
                subscriptions.grant_days(conn, user_id, 30, kind="paid")
            conn.execute("UPDATE subscriptions SET updated_at = now() - interval '2 days'")
            set_sync_marker(conn, dt.datetime.now(dt.UTC) - dt.timedelta(days=1))
            return {sub.user_id: sub for sub in (subscriptions.get_subscription(conn, i) for i in (1, 2, 3))}

        subs = await app.db.run(seed)
        # Live as the crashed daemon left it: u1 with its old UUID (reissued since), u2 still live
        # (revoked since), u3 exactly right.
        fake.set_users(TAG, [FakeUser(f"u{i}", str(subs[i].uuid), "xtls-rprx-vision", 0) for i in (1, 2, 3)])
        reissued = await app.db.run(subscriptions.reissue_key, 1)
        await app.db.run(subscriptions.revoke, 2)
        async with trio.open_nursery() as nursery:
            with trio.fail_after(30):
                fleet = await nursery.start(run_xray, app)
                status = fleet.statuses.get("local", XrayStatus(enabled=False, mode="disabled"))
            live = fake.users(TAG)
            assert set(live) == {"u1", "u3"}
            assert live["u1"].uuid == str(reissued.uuid) and live["u3"].uuid == str(subs[3].uuid)
            changes = fake.operations()
            assert ("remove", "u2", "") in changes and ("add", "u1", str(reissued.uuid)) in changes
            assert not [op for op in changes if op[1] == "u3"]
            assert status.in_sync
            marker = await app.db.run(get_sync_marker)
            assert marker > dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
            app.lifecycle.request_stop("test")


async def test_burst_of_1000_grants_bounded_file_writes(fake, make_config):
    async with running_writer(make_config(fake.address)) as s:
        writes_before = s.status.file_writes
        started = time.monotonic()

        async def grant_range(first: int) -> None:
            for user_id in range(first, first + 50):
                await s.grant(user_id)

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for first in range(1, 1001, 50):
                    nursery.start_soon(grant_range, first)
        burst = time.monotonic() - started
        live_after = await until(lambda: len(fake.users(TAG)) == 1000, timeout=60)
        await until(lambda: len(s.file_clients()) == 1000 and s.status.in_sync, timeout=60)
        writes = s.status.file_writes - writes_before
        # Every write so far happened within this span (the catch-up after the burst included, which a busy
        # machine makes longer): at most one per MIN_WRITE_INTERVAL of it.
        writing = time.monotonic() - started
        rounds = s.status.rounds
        print(
            f"1000 grants in {burst:.2f}s, all live {live_after:.2f}s after the last one; "
            f"{rounds} rounds, {writes} file writes, {s.status.api_calls} API calls"
        )
        assert writes <= writing / MIN_WRITE_INTERVAL + 3
        assert rounds < 1000  # nudges coalesce
        assert len([op for op in fake.operations() if op[0] == "add"]) == 1000  # each user added once


@contextmanager
def read_only(directory: Path):
    """Make a directory refuse new entries (chattr +i as root, whom mode bits don't stop)."""
    if os.geteuid() == 0:
        if shutil.which("chattr") is None:
            pytest.skip("running as root without chattr: cannot make a directory read-only")
        result = subprocess.run(["chattr", "+i", str(directory)], capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"chattr +i not possible here: {result.stderr.strip()}")
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(directory)], check=True)
    else:
        mode = directory.stat().st_mode
        directory.chmod(0o555)
        try:
            yield
        finally:
            directory.chmod(mode)


async def test_read_only_directory_is_reported_and_recovers(fake, make_config):
    async with running_writer(make_config(fake.address)) as s:
        await s.grant(1)
        await until(lambda: "u1" in s.file_clients())
        with read_only(s.config_path.parent):
            await s.grant(2)
            # live apply goes on: the user can connect
            await until(lambda: "u2" in fake.users(TAG), timeout=2)
            await until(lambda: "file" in s.status.problems, timeout=5)
            check = await s.status.readiness()
            assert not check.ok and f"cannot write {s.config_path}" in check.detail
            assert s.file_clients() == {"u1": s.file_clients()["u1"]}  # old file intact
            assert not s.app.lifecycle.stopping.is_set()
            assert sorted(p.name for p in s.config_path.parent.iterdir()) == ["config.json"]
        took = await until(lambda: set(s.file_clients()) == {"u1", "u2"}, timeout=15)
        print(f"file caught up {took:.2f}s after the directory became writable")
        await until(lambda: s.status.in_sync)
        assert (await s.status.readiness()).ok


async def test_template_error_is_clear_and_the_daemon_keeps_running(fake, make_config, tmp_path, caplog):
    template = tmp_path / "template.json"
    template.write_text('{"inbounds": [\n  {"tag": "vless-in",\n}')
    config_file = make_config(fake.address)
    (tmp_path / "xray" / "config.json").write_text("operator's file\n")
    async with running_writer(config_file) as s:
        check = await s.status.readiness()
        assert not check.ok
        assert f"template: Xray config template {template}: not valid JSON" in check.detail
        assert "line 3" in check.detail
        assert any("event=xray_problem component=template" in r.getMessage() for r in caplog.records)
        # users still get access live, and the file is left alone
        await s.grant(1)
        await until(lambda: "u1" in fake.users(TAG), timeout=2)
        assert s.config_path.read_text() == "operator's file\n"

        document = reality_template()
        document["inbounds"][1]["tag"] = "other"
        template.write_text(json.dumps(document))
        await s.round_done()
        assert "no inbound with tag 'vless-in' (tags present: ['api', 'other'])" in s.status.problems["template"]

        template.write_text(json.dumps(reality_template()))
        s.app.xray_changed.nudge()
        await until(lambda: s.config_path.read_text() != "operator's file\n", timeout=5)
        assert "u1" in s.file_clients()
        await until(lambda: s.status.in_sync)
        assert (await s.status.readiness()).ok


async def test_traffic_totals_survive_counter_resets(fake, make_config):
    async with running_writer(make_config(fake.address, reconcile_interval=0.5, traffic_interval=1.0)) as s:
        await s.grant(1)
        await s.grant(2)

        async def totals(user_id):
            found = await s.app.db.run(traffic_totals, user_id)
            return (found.uplink, found.downlink)

        async def wait_totals(user_id, expected):
            with trio.fail_after(10):
                while True:
                    if await totals(user_id) == expected:
                        return
                    await trio.sleep(0.05)

        fake.bump_traffic("u1", uplink=100, downlink=1000)
        fake.bump_traffic("u2", uplink=10, downlink=10)
        fake.bump_traffic("someone-else", uplink=5)  # not ours: ignored
        await wait_totals(1, (100, 1000))
        await wait_totals(2, (10, 10))
        fake.bump_traffic("u1", uplink=50, downlink=500)
        await wait_totals(1, (150, 1500))

        await trio.sleep(2.6)  # so that the restart shows in Xray's whole-second uptime
        fake.stop()
        fake.start(reset=True, config_path=s.config_path)
        # u1: one counter went backwards; u2: both grew past their old values (only the uptime shows it)
        fake.bump_traffic("u1", uplink=500, downlink=10)
        fake.bump_traffic("u2", uplink=20, downlink=20)
        await wait_totals(1, (650, 1510))
        await wait_totals(2, (30, 30))
        await s.round_done()
        await s.round_done()
        assert await totals(1) == (650, 1510) and await totals(2) == (30, 30)  # read again: no double count


async def test_disabled_runs_nothing(make_config, fake):
    async with running_writer(make_config(fake.address, enabled=False)) as s:
        assert not s.status.enabled and s.status.mode == "disabled"
        assert "xray" not in s.app.health.checks
        await s.grant(1)
        await trio.sleep(0.2)
        assert fake.calls() == []
        assert not s.config_path.exists()


async def test_stops_promptly_even_with_a_slow_xray(fake, make_config):
    config = load_config(make_config(fake.address))
    async with open_app(config, single_instance=False) as app:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                await nursery.start(run_xray, app)
                fake.set_delay(60)  # beyond the fail_after: a stop that waited for the call in flight would fail
                s = Setup(app, XrayStatus(True, "api"), Path(), Path())
                calls_before = len(fake.calls())
                await s.grant(1)
                await until(lambda: len(fake.calls()) > calls_before)  # the round waits on Xray now
                app.lifecycle.request_stop("test")
        fake.set_delay(0)


async def test_wrong_inbound_tag_is_an_error_with_backoff(make_config):
    with start_fake_xray("xray.", inbound_tags=("other",)) as fake:
        async with running_writer(make_config(fake.address)) as s:
            await s.grant(1)
            await until(lambda: "api" in s.status.problems, timeout=5)
            assert "handler not found" in s.status.problems["api"]
            assert not (await s.status.readiness()).ok
            calls = len(fake.calls())
            await trio.sleep(0.4)
            assert len(fake.calls()) - calls < 10  # retried with backoff, not in a tight loop
            fake.add_inbound(TAG)  # the operator fixes Xray's config
            await until(lambda: "u1" in fake.users(TAG), timeout=10)
            await until(lambda: not s.status.problems, timeout=5)


async def test_restart_command_mode_for_a_config_without_an_api(make_config, tmp_path):
    """No API: the file is written and Xray restarted by the operator's command when it changed."""
    restarts = tmp_path / "restarts.log"
    script = tmp_path / "restart-xray.sh"
    script.write_text(
        f'#!/bin/sh\n[ -e "{tmp_path}/broken" ] && {{ echo "unit failed" >&2; exit 3; }}\necho x >> "{restarts}"\n'
    )
    script.chmod(0o755)
    async with running_writer(make_config("127.0.0.1:1", restart_command=str(script))) as s:
        assert s.status.mode == "restart-command"
        await until(lambda: restarts.exists() and restarts.read_text() == "x\n", timeout=5)
        await s.grant(1)
        await until(lambda: "u1" in s.file_clients(), timeout=5)
        await until(lambda: restarts.read_text() == "x\nx\n", timeout=5)
        await s.round_done()
        assert restarts.read_text() == "x\nx\n"  # unchanged file: no restart
        assert s.status.in_sync and (await s.status.readiness()).ok

        (tmp_path / "broken").touch()
        await s.grant(2)
        await until(lambda: "restart_command" in s.status.problems, timeout=5)
        assert "exit status 3: unit failed" in s.status.problems["restart_command"]
        assert not s.status.in_sync
        (tmp_path / "broken").unlink()
        await until(lambda: restarts.read_text() == "x\nx\nx\n", timeout=10)
        await until(lambda: s.status.in_sync and not s.status.problems, timeout=5)


# --- end to end against a real V2Ray ---------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(V2RAY is None, reason=NO_V2RAY)
async def test_real_v2ray_grant_lets_a_vless_client_through_and_expiry_refuses_it(make_config, tmp_path, processes):
    from tests.v2ray import (
        PAGE,
        client_config,
        fetch_via_socks,
        free_port,
        serve_page,
        server_template,
        v2ray_commands,
        wait_for_port,
    )

    api_port, vless_port, http_port, socks_port = free_port(), free_port(), free_port(), free_port()
    (tmp_path / "template.json").write_text(json.dumps(server_template(api_port, vless_port)))
    config_file = make_config(f"127.0.0.1:{api_port}", api_prefix="v2ray.core.", flow="", reconcile_interval=60.0)
    sub_uuid = str(uuid.uuid4())  # the key the client will use, set on the subscription below
    client_path = tmp_path / "client.json"
    client_path.write_text(json.dumps(client_config([(socks_port, vless_port, sub_uuid)])))

    async with running_writer(config_file) as s:
        # the writer made the file (Xray down: the API part waits); V2Ray accepts it and starts from it
        assert s.config_path.exists() and "api" in s.status.problems
        run, test = v2ray_commands(s.config_path)
        with trio.fail_after(30):
            checked = await trio.run_process(test, capture_stdout=True, capture_stderr=True, check=False)
        assert checked.returncode == 0, (checked.stdout + checked.stderr).decode(errors="replace")
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_page, http_port)
            processes.start("server", run)
            processes.start("client", v2ray_commands(client_path)[0])
            try:
                await wait_for_port(socks_port)
                with trio.fail_after(20):
                    while "api" in s.status.problems:
                        s.app.xray_changed.nudge()
                        await trio.sleep(0.2)
                assert PAGE not in await fetch_via_socks(socks_port, http_port)

                await s.grant(7)
                await s.sql("UPDATE subscriptions SET uuid = %s WHERE user_id = 7", sub_uuid)
                s.app.xray_changed.nudge()
                with trio.fail_after(10):
                    while True:
                        if PAGE in await fetch_via_socks(socks_port, http_port):
                            break
                        await trio.sleep(0.1)
                await until(lambda: s.file_clients() == {"u7": sub_uuid} and s.status.in_sync, timeout=10)
                with trio.fail_after(30):
                    checked = await trio.run_process(test, capture_stdout=True, capture_stderr=True, check=False)
                assert checked.returncode == 0, (checked.stdout + checked.stderr).decode(errors="replace")

                await s.sql("UPDATE subscriptions SET expires_at = now() - interval '1 second' WHERE user_id = 7")
                s.app.xray_changed.nudge()
                await until(lambda: s.file_clients() == {} and s.status.in_sync, timeout=10)
                assert PAGE not in await fetch_via_socks(socks_port, http_port)
                traffic = await s.app.db.run(traffic_totals, 7)
                print(f"traffic of u7 as stored: {traffic}")
            except BaseException:
                print(processes.logs())
                raise
            finally:
                nursery.cancel_scope.cancel()


@pytest.fixture
def processes(tmp_path):
    from tests.v2ray import Processes

    procs = Processes(tmp_path)
    yield procs
    procs.stop_all()
