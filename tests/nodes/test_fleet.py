"""Several Xray nodes driven by one vpnd (`vpnd.nurseries.xray.XrayFleet`), against fake Xray APIs
that serve mutual TLS like a node behind its TLS proxy, and a real PostgreSQL.

Each node has its own writer: a node that is down or slow delays no other, is shown down (readiness,
metrics, an admin alert) and catches up when it returns; a node whose Xray restarted has its users
back within seconds; a reload adds and retires nodes; a plan may be limited to some nodes.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from tests.harness import open_app, sql, toml_value
from tests.keys import PUBLIC_KEY
from tests.nodes.pki import Pki, issue, make_ca, make_pki
from vpnd.app import App
from vpnd.config import load_config
from vpnd.db import subscriptions
from vpnd.db.nodes import list_nodes
from vpnd.db.users import upsert_user
from vpnd.db.xray_state import store_traffic, traffic_totals
from vpnd.nurseries.xray import XrayFleet, run_xray
from vpnd.reload import reload_config
from vpnd.subscription_url import user_links
from vpnd.xray.api import ApiTls, XrayApi, XrayUnavailable
from vpnd.xray.links import parse_vless_link
from vpnd_sandbox.xray_fake import FakeXray, start_fake_xray

TAG = "vless-in"
NODES = ("de1", "nl1")
LOCATIONS = {"de1": ("🇩🇪 Frankfurt", "🇩🇪 Франкфурт"), "nl1": ("🇳🇱 Amsterdam", "🇳🇱 Амстердам")}
ADMIN = 900


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), list(NODES))


@pytest.fixture
def fakes(pki: Pki) -> Iterator[dict[str, FakeXray]]:
    with ExitStack() as stack:
        yield {
            name: stack.enter_context(start_fake_xray(inbound_tags=(TAG,), tls=pki.fake_server_tls(name)))
            for name in NODES
        }


def node_toml(name: str, fake: FakeXray, pki: Pki) -> str:
    en, ru = LOCATIONS[name]
    keys: dict[str, Any] = {
        "name": name,
        "location": {"en": en, "ru": ru},
        "host": f"{name}.vpn.example.com",
        "public_key": PUBLIC_KEY,
        "short_id": "6ba85179e30d4fc2",
        "inbound_tag": TAG,
        "api_address": fake.address,
        **pki.node_keys(),
        "api_tls_server_name": "localhost",
    }
    return "[[nodes]]\n" + "".join(f"{key} = {toml_value(value)}\n" for key, value in keys.items())


@attrs.define
class Fleet:
    app: App
    fleet: XrayFleet
    fakes: dict[str, FakeXray]
    config_file: Path
    write: Callable[..., Path]

    def live(self, node: str) -> set[str]:
        return set(self.fakes[node].users(TAG))

    async def grant(self, user_id: int, plan_code: str | None = None) -> subscriptions.Subscription:
        def work(conn: Any) -> subscriptions.Subscription:
            upsert_user(conn, user_id, None, f"user {user_id}", "en")
            return subscriptions.grant_days(conn, user_id, 30, kind="paid", plan_code=plan_code)

        sub = await self.app.db.run(work)
        self.app.xray_changed.nudge()  # what the notify listener does at commit (not running here)
        return sub

    async def reload(self, nodes: tuple[str, ...], plans: str = "") -> None:
        self.write(nodes, plans)
        assert reload_config(self.app) is not None


async def until(predicate: Callable[[], bool], timeout: float = 30.0) -> float:
    started = time.monotonic()
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)
    return time.monotonic() - started


@pytest.fixture
def make_fleet(
    fakes: dict[str, FakeXray], pki: Pki, write_config: Callable[..., Path], db_dsn: str
) -> Callable[..., Any]:
    @asynccontextmanager
    async def make(nodes: tuple[str, ...] = NODES, plans: str = "") -> AsyncIterator[Fleet]:
        def write(chosen: tuple[str, ...], extra_plans: str = "") -> Path:
            text = "".join(node_toml(name, fakes[name], pki) for name in chosen) + extra_plans
            return write_config(
                text,
                database={"dsn": db_dsn, "pool_min": 1, "pool_max": 6},
                telegram={"admin_ids": [ADMIN]},
                xray={"reconcile_interval": 30.0},
            )

        path = write(nodes, plans)
        async with open_app(load_config(path, environ={}), single_instance=False) as app:
            async with trio.open_nursery() as nursery:
                fleet = await nursery.start(run_xray, app)
                yield Fleet(app, fleet, fakes, path, write)
                app.lifecycle.request_stop("test")

    return make


PREMIUM = """
[[plans]]
code = "premium"
days = 30
price = "9.99"
currency = "USD"
nodes = ["nl1"]
"""


async def test_a_purchase_goes_live_on_every_node_over_mutual_tls(make_fleet: Any) -> None:
    async with make_fleet() as s:
        assert set(s.fleet.statuses) == {"de1", "nl1"}  # [xray] is disabled: no local node
        for user_id in (1, 2, 3):
            await s.grant(user_id)
        await until(lambda: all(s.live(node) == {"u1", "u2", "u3"} for node in NODES), 10)
        health = await s.app.health.readiness()
        assert health["node:de1"].ok and health["node:nl1"].ok
        registry = s.app.metrics.registry
        assert registry.get_sample_value("vpnd_xray_node_up", {"node": "nl1"}) == 1
        await until(lambda: registry.get_sample_value("vpnd_xray_node_users", {"node": "de1"}) == 3)


async def test_each_user_gets_one_link_per_location_and_a_plan_may_keep_to_some_nodes(make_fleet: Any) -> None:
    async with make_fleet(plans=PREMIUM) as s:
        everywhere = await s.grant(1)
        premium = await s.grant(2, plan_code="premium")
        await until(lambda: s.live("nl1") == {"u1", "u2"} and s.live("de1") == {"u1"}, 10)
        await trio.sleep(0.5)
        assert s.live("de1") == {"u1"}  # the premium user never reaches the other node

        config = s.app.config
        links = [parse_vless_link(link) for link in user_links(config, everywhere, "ru")]
        assert [(link.host, link.name) for link in links] == [
            ("de1.vpn.example.com", "🇩🇪 Франкфурт"),
            ("nl1.vpn.example.com", "🇳🇱 Амстердам"),
        ]
        assert {link.uuid for link in links} == {str(everywhere.uuid)}
        (only,) = [parse_vless_link(link) for link in user_links(config, premium, "en")]
        assert (only.host, only.name) == ("nl1.vpn.example.com", "🇳🇱 Amsterdam")

        # The plan is opened to every node on reload: its user joins de1 too.
        await s.reload(NODES, PREMIUM.replace('nodes = ["nl1"]', "nodes = []"))
        s.app.xray_changed.nudge()
        await until(lambda: s.live("de1") == {"u1", "u2"}, 10)


async def test_a_slow_node_delays_no_other_and_catches_up(make_fleet: Any, db_dsn: str) -> None:
    async with make_fleet() as s:
        await s.grant(1)
        await until(lambda: all(s.live(node) == {"u1"} for node in NODES), 10)
        s.fakes["nl1"].set_delay(60)  # every call hangs (until the client's 5 s timeout)
        await trio.sleep(0.1)
        await s.grant(2)
        waited = await until(lambda: "u2" in s.live("de1"), 10)
        assert waited < 1.0, f"de1 waited {waited:.2f}s behind the slow node"
        await s.grant(3)
        waited = await until(lambda: "u3" in s.live("de1"), 10)
        assert waited < 1.0, f"de1 waited {waited:.2f}s behind the slow node"
        assert "u2" not in s.live("nl1")
        s.fakes["nl1"].set_delay(0)
        await until(lambda: s.live("nl1") == {"u1", "u2", "u3"}, 20)


async def test_a_node_down_is_shown_alerted_and_converges_when_back(make_fleet: Any, db_dsn: str) -> None:
    async with make_fleet() as s:
        await s.grant(1)
        await until(lambda: all(s.live(node) == {"u1"} for node in NODES), 10)
        s.fakes["nl1"].stop()
        for user_id in range(2, 12):
            await s.grant(user_id)
        await until(lambda: len(s.live("de1")) == 11, 10)
        status = s.fleet.status("nl1")
        await until(lambda: not status.reachable, 10)
        registry = s.app.metrics.registry
        assert registry.get_sample_value("vpnd_xray_node_up", {"node": "nl1"}) == 0
        health = await s.app.health.readiness()
        assert not health["node:nl1"].ok and "unreachable" in health["node:nl1"].detail
        assert not health["node:nl1"].required and health["node:de1"].ok
        await until(lambda: sql(db_dsn, "SELECT ok FROM health_checks WHERE name = 'xray_node:nl1'") == [(False,)])
        alert = sql(db_dsn, "SELECT payload->>'text' FROM outbox WHERE chat_id = %s ORDER BY id DESC LIMIT 1", ADMIN)
        assert "nl1" in alert[0][0]
        with trio.fail_after(10):  # what `vpnd admin nodes` reads
            while (rows := {row.name: row for row in await s.app.db.run(list_nodes)})["nl1"].reachable:
                await trio.sleep(0.05)
        assert "unreachable" in rows["nl1"].detail and rows["de1"].reachable

        s.fakes["nl1"].start()  # the API is back (Xray kept its users): the rest is added
        await until(lambda: len(s.live("nl1")) == 11, 20)
        await until(lambda: sql(db_dsn, "SELECT ok FROM health_checks WHERE name = 'xray_node:nl1'") == [(True,)])
        await until(lambda: status.reachable and status.in_sync, 10)


async def test_a_restarted_node_has_its_users_back_within_seconds(make_fleet: Any) -> None:
    async with make_fleet() as s:
        for user_id in range(1, 21):
            await s.grant(user_id)
        await until(lambda: all(len(s.live(node)) == 20 for node in NODES), 10)
        s.fakes["de1"].stop()
        s.fakes["de1"].start(reset=True)  # a restarted Xray: only its config file's users (none here)
        assert s.live("de1") == set()
        waited = await until(lambda: len(s.live("de1")) == 20, 10)
        assert waited < 10.0
        assert len(s.live("nl1")) == 20


async def test_a_reload_adds_a_node_and_retires_a_removed_one(make_fleet: Any) -> None:
    async with make_fleet(nodes=("de1",)) as s:
        for user_id in (1, 2):
            await s.grant(user_id)
        await until(lambda: s.live("de1") == {"u1", "u2"}, 10)
        assert s.live("nl1") == set() and set(s.fleet.statuses) == {"de1"}

        await s.reload(NODES)
        await until(lambda: s.live("nl1") == {"u1", "u2"}, 10)
        assert "node:nl1" in s.app.health.checks

        await s.reload(("nl1",))
        await until(lambda: s.live("de1") == set(), 10)
        await until(lambda: set(s.fleet.statuses) == {"nl1"}, 10)
        assert "node:de1" not in s.app.health.checks
        assert s.app.metrics.registry.get_sample_value("vpnd_xray_node_up", {"node": "de1"}) is None
        assert s.live("nl1") == {"u1", "u2"}
        await s.grant(3)
        await until(lambda: s.live("nl1") == {"u1", "u2", "u3"}, 10)
        assert s.live("de1") == set()


async def test_traffic_of_every_node_sums_into_the_users_total(make_fleet: Any) -> None:
    async with make_fleet() as s:
        await s.grant(7)
        await until(lambda: all(s.live(node) == {"u7"} for node in NODES), 10)

        # Counters as two nodes report them, folded the way each writer does (its node's deltas).
        await s.app.db.run(lambda conn: store_traffic(conn, [(7, 100, 1000)], node="de1"))
        await s.app.db.run(lambda conn: store_traffic(conn, [(7, 5, 50)], node="nl1"))
        await s.app.db.run(lambda conn: store_traffic(conn, [(7, 150, 1500)], node="de1"))
        await s.app.db.run(lambda conn: store_traffic(conn, [(7, 3, 30)], node="nl1"))  # nl1 restarted: from 0
        totals = await s.app.db.run(traffic_totals, 7)
        assert (totals.uplink, totals.downlink) == (150 + 5 + 3, 1500 + 50 + 30)


async def test_the_api_refuses_a_client_without_the_nodes_certificate(fakes: dict[str, FakeXray], pki: Pki) -> None:
    fake = fakes["de1"]
    with XrayApi(fake.address, timeout=3) as plaintext:
        with pytest.raises(XrayUnavailable):
            await plaintext.uptime()
    stranger = make_ca(pki.directory / "stranger")
    issue(stranger, "vpnd", server=False)
    forged = ApiTls(
        pki.ca.read_bytes(), stranger.cert("vpnd").read_bytes(), stranger.key("vpnd").read_bytes(), "localhost"
    )
    with XrayApi(fake.address, timeout=3, tls=forged) as api:
        with pytest.raises(XrayUnavailable):
            await api.uptime()
    good = ApiTls(pki.ca.read_bytes(), pki.cert("vpnd").read_bytes(), pki.key("vpnd").read_bytes(), "localhost")
    with XrayApi(fake.address, timeout=3, tls=good) as api:
        assert await api.uptime() >= 0
    assert "BEGIN" not in repr(good)  # the key never reaches a log


def test_a_remote_api_in_the_clear_is_refused_naming_the_key(write_config: Callable[..., Path]) -> None:
    from vpnd.config import ConfigError

    text = (
        '[[nodes]]\nname = "de1"\nlocation = "DE"\nhost = "de1.example.com"\n'
        f'public_key = "{PUBLIC_KEY}"\napi_address = "203.0.113.5:10085"\n'
    )
    with pytest.raises(ConfigError, match=r"\[\[nodes\]\]\[0\]\.api_tls_ca: required"):
        load_config(write_config(text), environ={})
    with pytest.raises(ConfigError, match=r'\[\[plans\]\]\[0\]\.nodes: unknown node "fr1"'):
        load_config(write_config(text.replace("203.0.113.5", "127.0.0.1") + PREMIUM.replace("nl1", "fr1")), environ={})
