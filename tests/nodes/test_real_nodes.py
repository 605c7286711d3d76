"""Real V2Ray nodes behind nginx terminating mutual TLS (`tests.nodes.real`: README "Several servers
(nodes)"), driven by vpnd through its daemon path: a Stars purchase commits, the notify listener wakes
the Xray fleet, one writer per node applies it through that node's nginx with vpnd's certificate.

What a node holds is asked of the node itself, through the same channel: adding a user again is
refused ("already exists") when the user is live, removing one is refused ("not found") when not — and
a VLESS client gets through a node or not. (Fleet behaviour against fake nodes — readiness, metrics,
alerts, slow nodes, plans limited to nodes — is in test_fleet.py; the README's setup is checked against
this one in test_nodes_readme.py.)
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from tests.harness import PLANS, Running, start_vpnd
from tests.nodes.pki import make_pki
from tests.nodes.real import NGINX, NO_NGINX, RealNodes, open_real_nodes
from tests.v2ray import (
    NO_V2RAY,
    PAGE,
    TAG,
    V2RAY,
    vless_client,
)
from vpnd.compose import Services
from vpnd.config import load_config
from vpnd.db import subscriptions
from vpnd.db.users import upsert_user
from vpnd.nurseries.xray import XrayFleet, XrayStatus
from vpnd.payments.service import finalize_stars_payment, start_stars_purchase
from vpnd.reload import reload_config
from vpnd.xray.api import ApiTls, XrayApi, XrayError

NAMES = ["n1", "n2", "n3"]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(V2RAY is None, reason=NO_V2RAY),
    pytest.mark.skipif(NGINX is None, reason=NO_NGINX),
    pytest.mark.timeout(300),
]


@attrs.define
class Shop:
    """vpnd (notify listener + Xray fleet) selling to users, with `real` as its `[[nodes]]`."""

    running: Running
    real: RealNodes
    write: Callable[[list[str]], Path]

    @property
    def fleet(self) -> XrayFleet:
        assert self.running.started.xray is not None
        return self.running.started.xray

    def status(self, node: str) -> XrayStatus:
        return self.fleet.status(node)

    async def purchase(self, user_id: int) -> subscriptions.Subscription:
        """A Stars purchase of plan "m1", paid: its commit wakes the fleet (no nudge from here)."""
        app = self.running.app
        await app.db.run(lambda conn: upsert_user(conn, user_id, None, f"user {user_id}", "en"))
        invoice = await start_stars_purchase(app, user_id, "m1")
        outcome = await finalize_stars_payment(
            app,
            invoice.payload,
            telegram_payment_charge_id=f"charge-{user_id}",
            total_amount=invoice.amount,
            currency=invoice.currency,
        )
        assert outcome.applied, outcome
        sub = await app.db.run(subscriptions.get_subscription, user_id)
        assert sub is not None
        return sub

    async def in_sync(self, nodes: list[str], users: int, timeout: float = 15) -> float:
        """Until each node's writer has applied `users` users and is in sync; how long that took."""
        return await until(
            lambda: all(self.status(n).in_sync and self.status(n).live_users == users for n in nodes),
            timeout,
        )


async def until(predicate: Callable[[], bool], timeout: float = 30.0, step: float = 0.01) -> float:
    started = time.monotonic()
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(step)
    return time.monotonic() - started


async def assert_live(real: RealNodes, node: str, emails: Iterable[str]) -> None:
    """The node's V2Ray has each user: adding it again says "already exists" (a missing one would be
    added by the question — so only ask about users that must be there)."""
    with real.api(node) as api:
        added = [email for email in emails if await api.add_vless_user(TAG, email, str(uuid.uuid4()), "")]
    assert not added, f"{node} did not have {added}"


async def assert_gone(real: RealNodes, node: str, emails: Iterable[str]) -> None:
    """The node's V2Ray has none of the users: removing each says "not found"."""
    with real.api(node) as api:
        removed = [email for email in emails if await api.remove_user(TAG, email)]
    assert not removed, f"{node} still had {removed}"


@pytest.fixture
def open_shop(tmp_path: Path, write_config: Callable[..., Path], db_dsn: str) -> Callable[..., Any]:
    @asynccontextmanager
    async def open_(names: list[str] = NAMES) -> AsyncIterator[Shop]:
        async with open_real_nodes(tmp_path / "nodes", names) as real:

            def write(chosen: list[str]) -> Path:
                return write_config(
                    "".join(real.node_toml(name) for name in chosen) + PLANS,
                    database={"dsn": db_dsn, "pool_min": 1, "pool_max": 6},
                    xray={"reconcile_interval": 30.0},
                )

            config = load_config(write(names), environ={})
            async with trio.open_nursery() as nursery:
                running = await start_vpnd(nursery, config, Services.only("listener", "xray"), single_instance=False)
                try:
                    yield Shop(running, real, write)
                finally:
                    await running.stop()

    return open_


async def test_a_purchase_is_live_on_every_node_and_a_vless_client_gets_through_each(
    open_shop: Any, tmp_path: Path
) -> None:
    async with open_shop() as s:
        assert set(s.fleet.statuses) == set(NAMES)  # [xray] is disabled: the three nodes only
        subs = [await s.purchase(user_id) for user_id in (1, 2, 3)]
        took = await s.in_sync(NAMES, 3)
        print(f"3 purchases live on {len(NAMES)} nodes {took:.2f}s after the last commit")
        for node in NAMES:
            await assert_live(s.real, node, ["u1", "u2", "u3"])
            assert (await s.status(node).readiness()).ok

        stranger = str(uuid.uuid4())
        routes = {f"{node} u{sub.user_id}": (s.real.nodes[node].vless_port, str(sub.uuid)) for node in NAMES
                  for sub in subs}  # fmt: skip
        routes |= {f"{node} stranger": (s.real.nodes[node].vless_port, stranger) for node in NAMES}
        async with vless_client(tmp_path, routes) as fetch:
            for node in NAMES:
                for sub in subs:
                    assert PAGE in await fetch(f"{node} u{sub.user_id}")
                assert PAGE not in await fetch(f"{node} stranger")


@pytest.mark.alone
async def test_a_node_killed_during_100_purchases_the_others_at_once_it_all_100_when_back(open_shop: Any) -> None:
    async with open_shop() as s:
        lags: list[float] = []
        for user_id in range(1, 101):
            if user_id == 21:
                s.real.kill("n2")
            await s.purchase(user_id)
            committed = time.monotonic()
            # Each running node's writer has applied it, and the node itself says so.
            await until(lambda: all(s.status(n).live_users >= user_id for n in ("n1", "n3")), 10)  # noqa: B023
            for node in ("n1", "n3"):
                await assert_live(s.real, node, [f"u{user_id}"])
            lags.append(time.monotonic() - committed)
        lags.sort()
        print(f"live on the running nodes after commit: p50 {lags[49]:.3f}s, max {lags[-1]:.3f}s")
        assert lags[-1] < 2.0, f"a purchase took {lags[-1]:.2f}s to reach the running nodes"
        emails = [f"u{user_id}" for user_id in range(1, 101)]
        for node in ("n1", "n3"):
            await assert_live(s.real, node, emails)
        assert not s.status("n2").reachable and s.status("n2").pending_adds > 0
        assert not (await s.status("n2").readiness()).ok

        s.real.start("n2")  # back with its config file's users: none
        took = await s.in_sync(["n2"], 100)
        print(f"the killed node had all 100 users {took:.2f}s after it started again")
        await assert_live(s.real, "n2", emails)
        assert s.status("n2").reachable


@pytest.mark.alone
async def test_a_restarted_node_has_its_users_live_again_within_10_seconds(open_shop: Any, tmp_path: Path) -> None:
    async with open_shop() as s:
        subs = [await s.purchase(user_id) for user_id in range(1, 21)]
        await s.in_sync(NAMES, 20)
        port = s.real.nodes["n1"].vless_port
        first, last = subs[0], subs[-1]
        routes = {"first": (port, str(first.uuid)), "last": (port, str(last.uuid))}
        async with vless_client(tmp_path, routes) as fetch:
            assert PAGE in await fetch("first") and PAGE in await fetch("last")
            # A restart is told from the uptime going back (whole seconds, RESTART_TOLERANCE): a real node
            # restarts after minutes or days, not within a second or two of its start.
            with s.real.api("n1") as api:
                with trio.fail_after(10):
                    while await api.uptime() < 5:
                        await trio.sleep(0.1)
            restarts = s.status("n1").restarts_detected

            s.real.kill("n1")
            s.real.start("n1")  # the same config file: no user
            started = time.monotonic()
            with trio.fail_after(30):
                while PAGE not in await fetch("first") or PAGE not in await fetch("last"):
                    await trio.sleep(0.05)
            took = time.monotonic() - started
            print(f"users of the restarted node live again {took:.2f}s after its V2Ray started")
            assert took < 10.0
        await s.in_sync(["n1"], 20)
        await assert_live(s.real, "n1", [f"u{sub.user_id}" for sub in subs])
        how = "uptime went back" if s.status("n1").restarts_detected > restarts else "API was down at a probe"
        print(f"the writer noticed the restart because its {how}")


async def test_a_node_removed_on_reload_loses_its_users_and_the_others_keep_theirs(open_shop: Any) -> None:
    async with open_shop() as s:
        for user_id in range(1, 6):
            await s.purchase(user_id)
        await s.in_sync(NAMES, 5)
        emails = [f"u{user_id}" for user_id in range(1, 6)]

        s.write(["n1", "n3"])
        result = reload_config(s.running.app)  # what SIGHUP runs
        assert result is not None and "[[nodes]]" in result.applied
        await until(lambda: "n2" not in s.fleet.statuses, 15)  # retired: its writer stopped
        await assert_gone(s.real, "n2", emails)
        for node in ("n1", "n3"):
            await assert_live(s.real, node, emails)

        await s.purchase(6)  # sold after the reload: on the remaining nodes only
        await s.in_sync(["n1", "n3"], 6)
        await assert_live(s.real, "n1", ["u6"])
        await assert_gone(s.real, "n2", ["u6"])


async def test_nginx_refuses_a_client_without_vpnds_certificate(tmp_path: Path) -> None:
    async with open_real_nodes(tmp_path / "nodes", ["n1"]) as real:
        stranger_ca = make_pki(tmp_path / "stranger", [])  # a "vpnd" certificate from another CA
        refused = {
            "client sent no required SSL certificate": ApiTls(real.pki.ca.read_bytes(), b"", b""),
            "client SSL certificate verify error": real.tls(pki=stranger_ca),
        }
        for logged, tls in refused.items():
            with real.api("n1", tls=tls) as api, trio.fail_after(30):
                with pytest.raises(XrayError, match="status: 400"):
                    await api.add_vless_user(TAG, "intruder", str(uuid.uuid4()), "")
                with pytest.raises(XrayError):
                    await api.uptime()
            assert logged in real.nginx_log()
        with XrayApi(real.nodes["n1"].api_address, prefix="v2ray.core.", timeout=5) as plain, trio.fail_after(30):
            with pytest.raises(XrayError):
                await plain.uptime()  # no TLS at all
        await assert_gone(real, "n1", ["intruder"])  # vpnd's own certificate: answered, nobody was added
