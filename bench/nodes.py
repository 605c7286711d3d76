"""Benchmark — several Xray nodes: paid → live on every node, and a fresh node's full reconcile.

    python -m bench nodes                     # 1, 3, 10 nodes: 5,000 users, 100 purchases; reconcile 100,000 (1, 3)
    VPND_BENCH_QUICK=1 python -m bench nodes  # 2,000 users, 30 purchases; reconcile 10,000
    python -m bench nodes --nodes 3 --tls-nodes --purchases 200 --reconcile-nodes 3 --profile

Every node is a real V2Ray 4.x process on loopback (Debian's `v2ray`; its own API port, plaintext gRPC
as the config allows for loopback addresses): node "local" is `[xray]` (vpnd also writes its config
file), the others are `[[nodes]]`. vpnd is its Xray fleet (`open_vpnd` with the listener and xray
services: one writer per node) in a child process, so the benchmark's probes share no CPU or GIL with it.

* **paid → live on every node**: the database holds thousands of active subscribers, already live on
  every node; then each purchase grants 30 days to a new user in one transaction, as a payment does
  (the notify trigger wakes the writers at commit), one at a time with a short random pause. Latency
  runs from the commit to the moment a VLESS client with the user's UUID gets through the node: the
  benchmark speaks VLESS to each node's inbound (the header with the UUID, aimed at a loopback server
  that answers at once) every few milliseconds until the answer comes back. That observes the nodes
  themselves, as a user would, and changes nothing in them (an AddUser probe would race vpnd's own add).
  Once more with the remote nodes' APIs behind nginx terminating mutual TLS (`--tls-nodes`), the
  channel a real remote node is reached by (certificates from `tests/nodes/pki.py`).
* **full reconcile**: a fresh database with 100,000 active subscribers and fresh, empty V2Rays; the
  fleet's start (each node's first round: every user added over the API) is timed, then a sample of
  users is checked to get through every node.

`--profile` samples the fleet process with py-spy during the purchases and the reconcile with the most nodes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import psycopg
import trio

from bench import profiling
from bench.common import ProcessMeter, bench_database, machine_line, percentile, pick, print_table
from bench.xray_support import TAG, server_template, v2ray_binary, v2ray_run_command, wait_for_port
from tests.harness import PLANS, config_sections, write_config_file
from tests.keys import PUBLIC_KEY
from tests.nodes.pki import make_pki
from vpnd.db.subscriptions import grant_days
from vpnd_sandbox.postgres import free_port

SUBSCRIBERS = 50_000_000  # first id of the users active before the run
BUYERS = 60_000_000  # first id of the users who buy during it
#: Pause between two VLESS probes of a node that refused the user (the figures' resolution).
PROBE_INTERVAL = 0.003
TOKEN = "7000000001:AAFakeTokenForTheVpndSandboxBot000000"


# ------------------------------------------------------------------------------------------ the nodes


@attrs.frozen
class Node:
    name: str
    api_port: int
    vless_port: int
    template_path: Path
    config_path: Path

    @property
    def api_address(self) -> str:
        return f"127.0.0.1:{self.api_port}"


@contextlib.contextmanager
def v2ray_nodes(workdir: Path, count: int) -> Iterator[list[Node]]:
    """`count` V2Ray processes with no client yet: node "local", then "n1", "n2", …"""
    binary = v2ray_binary()
    assert binary is not None
    nodes: list[Node] = []
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for index in range(count):
            name = "local" if index == 0 else f"n{index}"
            node = Node(name, free_port(), free_port(), workdir / f"{name}-template.json", workdir / f"{name}.json")
            template = server_template(node.api_port, node.vless_port)
            template["log"] = {"loglevel": "warning", "access": "none"}  # no line per refused probe
            node.template_path.write_text(json.dumps(template, indent=2))
            node.config_path.write_text(json.dumps(template, indent=2))
            with (workdir / f"{name}.log").open("wb") as log:
                processes.append(
                    subprocess.Popen(
                        v2ray_run_command(binary, node.config_path),
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                    )
                )
            nodes.append(node)
        for node in nodes:
            wait_for_port(node.api_port)
        yield nodes
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)


def vpnd_config(workdir: Path, dsn: str, nodes: Sequence[Node], channels: Mapping[str, str] | None = None) -> Path:
    """`[xray]` drives the first node (and writes its file), `[[nodes]]` the others; `channels`: the
    `[[nodes]]` keys by which vpnd reaches them (default: their loopback API in plaintext)."""
    local, *remote = nodes
    channels = channels or {node.name: f'api_address = "{node.api_address}"\n' for node in remote}
    sections = config_sections(
        dsn,
        telegram={"token": TOKEN},
        database={"pool_max": 10},  # the default
        xray={
            "enabled": True,
            "template_path": str(local.template_path),
            "config_path": str(local.config_path),
            "inbound_tag": TAG,
            "api_address": local.api_address,
            "api_prefix": "v2ray.core.",
            "flow": "",  # V2Ray 4 has no Vision
            "reconcile_interval": 60.0,
        },
    )
    tables = "".join(
        f'\n[[nodes]]\nname = "{node.name}"\nlocation = {{ en = "Node {node.name}" }}\n'
        f'host = "{node.name}.example.test"\npublic_key = "{PUBLIC_KEY}"\nshort_id = "0123abcd"\n'
        f'{channels[node.name]}api_prefix = "v2ray.core."\ninbound_tag = "{TAG}"\nflow = ""\n'
        for node in remote
    )
    return write_config_file(workdir / "vpnd.toml", sections, PLANS + tables)


#: `keepalive`: without it nginx opens a new connection to V2Ray's API for every call, and under
#: thousands of calls V2Ray closes some before answering (nginx: 502, "upstream prematurely closed
#: connection"), which vpnd rightly takes for an outage: the node never gets in sync.
NGINX_SERVER = """
    upstream api_{port} {{
        server 127.0.0.1:{api_port};
        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{port} ssl http2;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_client_certificate {ca};
        ssl_verify_client on;
        location / {{ grpc_pass grpc://api_{port}; }}
    }}
"""


@contextlib.contextmanager
def nginx_mtls(workdir: Path, nodes: Sequence[Node]) -> Iterator[dict[str, str]]:
    """nginx terminating mutual TLS in front of each node's loopback API (one certificate per node,
    vpnd's client certificate, one CA: `tests/nodes/pki.py`); yields the `[[nodes]]` keys by name."""
    pki = make_pki(workdir / "pki", [node.name for node in nodes])
    ports = {node.name: free_port() for node in nodes}
    servers = "".join(
        NGINX_SERVER.format(
            port=ports[node.name], cert=pki.cert(node.name), key=pki.key(node.name), ca=pki.ca, api_port=node.api_port
        )
        for node in nodes
    )
    temp = " ".join(
        f"{kind}_temp_path {workdir}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = workdir / "nginx.conf"
    conf.write_text(
        f"worker_processes 1;\npid {workdir}/nginx.pid;\nerror_log stderr warn;\nevents {{}}\n"
        f"http {{\n    access_log off;\n    {temp}\n{servers}}}\n"
    )
    with (workdir / "nginx.log").open("wb") as log:
        process = subprocess.Popen(
            ["nginx", "-p", str(workdir), "-c", str(conf), "-e", "stderr", "-g", "daemon off;"],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        for port in ports.values():
            wait_for_port(port)
        keys = "".join(f'{key} = "{value}"\n' for key, value in pki.node_keys().items())
        yield {name: f'api_address = "127.0.0.1:{port}"\n{keys}' for name, port in ports.items()}
    finally:
        process.terminate()
        process.wait(timeout=10)


# ------------------------------------------------------------------------------------------ VLESS probes


async def serve_target(*, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Where probes lead: a loopback server that writes two bytes to whoever connects."""

    async def answer(stream: trio.SocketStream) -> None:
        async with stream:
            with contextlib.suppress(trio.BrokenResourceError):
                await stream.send_all(b"ok")

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(answer, listeners)


async def gets_through(node: Node, user_uuid: str, target_port: int) -> bool:
    """One VLESS request (version 0, UUID, no addons, TCP to 127.0.0.1:target) through `node`:
    True when the target's answer comes back (after the 2-byte VLESS response header)."""
    request = (
        b"\x00"
        + uuid.UUID(user_uuid).bytes
        + b"\x00\x01"
        + target_port.to_bytes(2, "big")
        + b"\x01"
        + socket.inet_aton("127.0.0.1")
    )
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", node.vless_port)
        async with stream:
            try:
                await stream.send_all(request)
                received = b""
                while len(received) < 4:
                    chunk = await stream.receive_some(64)
                    if not chunk:
                        return False  # refused: V2Ray closes the connection
                    received += chunk
            except trio.BrokenResourceError:
                return False
    return received == b"\x00\x00ok"


async def live_after(node: Node, user_uuid: str, target_port: int, since: float) -> float:
    """Probe until the user gets through `node`; the seconds from `since` to that answer."""
    while True:  # polled: V2Ray tells nobody when a user is added
        if await gets_through(node, user_uuid, target_port):
            return time.monotonic() - since
        await trio.sleep(PROBE_INTERVAL)


async def live_everywhere(nodes: Sequence[Node], user_uuid: str, target_port: int, since: float) -> list[float]:
    """Every node probed at once; the seconds from `since` until the user got through each."""
    latencies: list[float] = []

    async def probe(node: Node) -> None:
        latencies.append(await live_after(node, user_uuid, target_port, since))

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for node in nodes:
                nursery.start_soon(probe, node)
    return latencies


# ------------------------------------------------------------------------------------------ database


def add_subscribers(dsn: str, count: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO users (id, first_name, referral_code) "
            "SELECT g, 'X', 'x' || g FROM generate_series(%s::bigint, %s::bigint) g",
            (SUBSCRIBERS, SUBSCRIBERS + count - 1),
        )
        conn.execute(
            "INSERT INTO subscriptions (user_id, kind, status, uuid, sub_token, plan_code, expires_at) "
            "SELECT id, 'paid', 'active', gen_random_uuid(), 't' || id, 'm1', now() + interval '30 days' "
            "FROM users WHERE id >= %s",
            (SUBSCRIBERS,),
        )
        conn.execute("ANALYZE subscriptions")


def add_buyers(dsn: str, count: int) -> list[int]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO users (id, first_name, referral_code) "
            "SELECT g, 'Buyer', 'b' || g FROM generate_series(%s::bigint, %s::bigint) g",
            (BUYERS, BUYERS + count - 1),
        )
    return list(range(BUYERS, BUYERS + count))


def sample_uuids(dsn: str, count: int) -> list[str]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT uuid FROM subscriptions WHERE user_id >= %s ORDER BY random() LIMIT %s", (SUBSCRIBERS, count)
        ).fetchall()
    return [str(row[0]) for row in rows]


def grant(conn: psycopg.Connection[Any], user_id: int) -> tuple[str, float]:
    """A purchase's grant in its own transaction; (the new UUID, time.monotonic() just after commit)."""
    with conn.transaction():
        subscription = grant_days(conn, user_id, 30, kind="paid", plan_code="m1")
    return str(subscription.uuid), time.monotonic()


# ------------------------------------------------------------------------------------------ the fleet (child)


async def child(mode: str, config_path: Path) -> dict[str, Any]:
    """vpnd's Xray fleet. "fleet": report once every node is in sync, then run until stdin closes.
    "reconcile": time the fleet's start (every node's first round) and stop."""
    from vpnd.compose import Services, open_vpnd
    from vpnd.config import load_config
    from vpnd.nurseries.xray import run_xray

    config = load_config(config_path, environ={})
    meter = ProcessMeter(os.getpid())
    async with open_vpnd(config, Services.only("listener"), single_instance=False) as vpnd:
        async with trio.open_nursery() as nursery:
            started = trio.current_time()
            fleet = await nursery.start(run_xray, vpnd.app)
            seconds = trio.current_time() - started
            with trio.fail_after(600):
                while True:
                    if all(status.in_sync for status in fleet.statuses.values()):
                        break
                    await trio.sleep(0.01)
            out = {
                "seconds": seconds,
                "nodes": {name: {"live": s.live_users, "api_calls": s.api_calls} for name, s in fleet.statuses.items()},
                "peak_mib": meter.peak_rss_mib(),
            }
            if mode == "fleet":
                print(json.dumps(out), flush=True)
                await trio.to_thread.run_sync(sys.stdin.read)  # until the benchmark closes it
            vpnd.app.lifecycle.request_stop("benchmark")
            nursery.cancel_scope.cancel()
    return out


@attrs.define(eq=False)
class Fleet:
    """The child process running vpnd's fleet."""

    process: trio.Process
    meter: ProcessMeter
    log_path: Path

    @classmethod
    async def start(cls, mode: str, config_path: Path, log_path: Path) -> Fleet:
        with log_path.open("wb") as log:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "bench.nodes", "--child", mode, str(config_path)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
            )
        return cls(process, ProcessMeter(process.pid), log_path)

    async def report(self, timeout: float) -> dict[str, Any]:
        """The JSON line the child prints when its nodes are in sync."""
        assert self.process.stdout is not None
        output = b""
        with trio.fail_after(timeout):
            while b"\n" not in output:
                chunk = await self.process.stdout.receive_some()
                if not chunk:
                    raise RuntimeError(f"the fleet exited:\n{self.log_path.read_text(errors='replace')[-3000:]}")
                output += chunk
        return dict(json.loads(output.splitlines()[0]))

    async def stop(self) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.aclose()
        with trio.move_on_after(30):
            await self.process.wait()
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


# ------------------------------------------------------------------------------------------ the cases


async def check_probes(nodes: Sequence[Node], dsn: str, target_port: int, sample: int) -> None:
    """Sampled subscribers get through every node; an unknown UUID gets through none."""
    for user_uuid in sample_uuids(dsn, sample):
        for node in nodes:
            if not await gets_through(node, user_uuid, target_port):
                raise RuntimeError(f"subscriber {user_uuid} does not get through node {node.name}")
    for node in nodes:
        if await gets_through(node, str(uuid.uuid4()), target_port):
            raise RuntimeError(f"an unknown UUID gets through node {node.name}: the probe is wrong")


async def paid_to_live(
    db_dsn: str, workdir: Path, count: int, subscribers: int, purchases: int, profile: float, tls: bool = False
) -> dict[str, Any]:
    add_subscribers(db_dsn, subscribers)
    buyers = add_buyers(db_dsn, purchases)
    every: list[float] = []
    each: list[float] = []
    with contextlib.ExitStack() as stack:
        nodes = stack.enter_context(v2ray_nodes(workdir, count))
        conn = stack.enter_context(psycopg.connect(db_dsn, autocommit=True))
        channels = stack.enter_context(nginx_mtls(workdir, nodes[1:])) if tls else None
        config_path = vpnd_config(workdir, db_dsn, nodes, channels)
        async with trio.open_nursery() as nursery:
            target_port = await nursery.start(serve_target)
            fleet = await Fleet.start("fleet", config_path, workdir / "fleet.log")
            try:
                ready = await fleet.report(timeout=900)
                await check_probes(nodes, db_dsn, target_port, sample=3)
                if profile:
                    nursery.start_soon(_profile, fleet.process.pid, profile, f"nodes-purchases-{count}")
                cpu_before = fleet.meter.cpu_seconds()
                for n, buyer in enumerate(buyers):
                    await trio.sleep(random.uniform(0.1, 0.4))
                    user_uuid, committed = await trio.to_thread.run_sync(grant, conn, buyer)
                    latencies = await live_everywhere(nodes, user_uuid, target_port, committed)
                    every.append(max(latencies))
                    each.extend(latencies)
                    if (n + 1) % 20 == 0:
                        print(
                            f"  {count} nodes: {n + 1}/{purchases} purchases, live on every node "
                            f"p50 {percentile(every, 0.5) * 1000:.1f} ms so far",
                            flush=True,
                        )
                cpu = fleet.meter.cpu_seconds() - cpu_before
            finally:
                await fleet.stop()
            nursery.cancel_scope.cancel()
    return {
        "nodes": f"{count}, mTLS (nginx)" if tls else count,
        "subscribers": subscribers,
        "purchases": purchases,
        "initial_s": ready["seconds"],
        "each_p50": percentile(each, 0.5) * 1000,
        "every_p50": percentile(every, 0.5) * 1000,
        "every_p99": percentile(every, 0.99) * 1000,
        "every_max": max(every) * 1000,
        "cpu_ms": cpu / purchases * 1000,
    }


async def full_reconcile(db_dsn: str, workdir: Path, count: int, users: int, profile: float) -> dict[str, Any]:
    add_subscribers(db_dsn, users)
    with v2ray_nodes(workdir, count) as nodes:
        config_path = vpnd_config(workdir, db_dsn, nodes)
        async with trio.open_nursery() as nursery:
            target_port = await nursery.start(serve_target)
            fleet = await Fleet.start("reconcile", config_path, workdir / "fleet.log")
            if profile:
                # past the child's imports:
                nursery.start_soon(_profile, fleet.process.pid, profile, f"nodes-reconcile-{count}", 5.0)
            try:
                result = await fleet.report(timeout=3600)
            finally:
                await fleet.stop()
            await check_probes(nodes, db_dsn, target_port, sample=20)
            nursery.cancel_scope.cancel()
    if any(node["live"] != users for node in result["nodes"].values()):
        raise RuntimeError(f"not every user is live on every node: {result['nodes']}")
    return {
        "nodes": count,
        "users": users,
        "calls_per_user": sum(node["api_calls"] for node in result["nodes"].values()) / (users * count),
        "start_s": result["seconds"],
        "per_node": users / result["seconds"],
        "total": users * count / result["seconds"],
        "peak_mib": result["peak_mib"],
    }


async def _profile(pid: int, seconds: float, name: str, delay: float = 0.0) -> None:
    await trio.sleep(delay)
    raw = await profiling.record(pid, seconds, name)
    print(f"profile of the fleet ({name}, {seconds:g} s), collapsed stacks in {raw}:")
    print(profiling.summarize(raw), flush=True)


async def run(args: argparse.Namespace) -> None:
    live_rows: list[list[Any]] = []
    reconcile_rows: list[list[Any]] = []
    with bench_database() as db, tempfile.TemporaryDirectory(prefix="vpnd-bench-nodes-") as tmp:
        cases = [(count, False) for count in args.nodes] + [(count, True) for count in args.tls_nodes if count > 1]
        for count, tls in cases:
            workdir = Path(tmp) / f"live{count}{'-tls' if tls else ''}"
            workdir.mkdir()
            profile = args.profile_seconds if args.profile and count == max(args.nodes) and not tls else 0.0
            dsn = db.fresh(f"live{count}")
            r = await paid_to_live(dsn, workdir, count, args.subscribers, args.purchases, profile, tls)
            live_rows.append(
                [
                    r["nodes"],
                    r["subscribers"],
                    r["purchases"],
                    r["initial_s"],
                    r["each_p50"],
                    r["every_p50"],
                    r["every_p99"],
                    r["every_max"],
                    r["cpu_ms"],
                ]
            )
            print(f"  {r['nodes']} nodes: live on every node p50 {r['every_p50']:.1f} ms, p99 {r['every_p99']:.1f} ms")
        for count in args.reconcile_nodes:
            workdir = Path(tmp) / f"reconcile{count}"
            workdir.mkdir()
            profile = args.profile_seconds if args.profile and count == max(args.reconcile_nodes) else 0.0
            r = await full_reconcile(db.fresh(f"reconcile{count}"), workdir, count, args.reconcile_users, profile)
            reconcile_rows.append(
                [r["nodes"], r["users"], r["calls_per_user"], r["start_s"], r["per_node"], r["total"], r["peak_mib"]]
            )
            print(f"  {count} nodes: {args.reconcile_users:,} users each in {r['start_s']:.1f} s", flush=True)
    print_table(
        "nodes: purchase committed → a VLESS client with the user's UUID gets through (real V2Ray per node)",
        [
            "nodes",
            "subscribers",
            "purchases",
            "initial sync s",
            "one node p50 ms",
            "every node p50 ms",
            "every node p99 ms",
            "max ms",
            "vpnd CPU ms/purchase",
        ],
        live_rows,
    )
    print_table(
        "nodes: full reconcile of fresh, empty V2Rays (each node's first round)",
        [
            "nodes",
            "users per node",
            "API calls per user",
            "fleet start s (every node's first round)",
            "users/s per node",
            "users/s all nodes",
            "peak RSS MiB",
        ],
        reconcile_rows,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench nodes", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, nargs="*", default=[1, 3, 10], help="node counts for paid → live")
    parser.add_argument(
        "--tls-nodes",
        type=int,
        nargs="*",
        default=[3],
        help="node counts for paid → live with the remote nodes' "
        "APIs behind nginx terminating mutual TLS (the local node stays on loopback)",
    )
    parser.add_argument("--subscribers", type=int, default=pick(5000, 2000), help="active users before purchases")
    parser.add_argument("--purchases", type=int, default=pick(100, 30))
    parser.add_argument("--reconcile-nodes", type=int, nargs="*", default=[1, 3])
    parser.add_argument("--reconcile-users", type=int, default=pick(100_000, 10_000))
    parser.add_argument(
        "--profile", action="store_true", help="py-spy the fleet: purchases and reconcile, largest node count"
    )
    parser.add_argument("--profile-seconds", type=float, default=20.0)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args, _ = parser.parse_known_args(argv or [])
    if args.child:
        mode, config_path = args.child
        out = trio.run(child, mode, Path(config_path))
        if mode == "reconcile":
            print(json.dumps(out), flush=True)
        return
    print(f"# nodes — {machine_line()}", flush=True)
    if v2ray_binary() is None:
        print("  skipped: needs real V2Ray processes as nodes (apt-get install -y v2ray)", flush=True)
        return
    trio.run(run, args)


if __name__ == "__main__":
    main(sys.argv[1:])
