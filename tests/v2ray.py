"""A real V2Ray 4.x (Debian's `v2ray` package) for tests: server and client configs, the processes,
and a VLESS client check (a page fetched through a SOCKS inbound of a client V2Ray).

    apt-get install -y v2ray      # V2Ray 4.34 on Debian 12; tests skip when the binary is absent

V2Ray 4.x has no REALITY, so the VLESS inbound is plain TCP; the API wire format (prefix
"v2ray.core.") and the config layout are the same as Xray-core's.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import trio

V2RAY = shutil.which("v2ray")
NO_V2RAY = "no v2ray binary (install it with: apt-get install -y v2ray, or make system-deps as root)"
TAG = "vless-in"
PAGE = b"hello through vless"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def v2ray_commands(config: Path) -> tuple[list[str], list[str]]:
    """(run, test) argv for this v2ray: 4.x takes flags, 5.x takes subcommands."""
    assert V2RAY is not None
    version = subprocess.run([V2RAY, "-version"], capture_output=True, text=True, timeout=30).stdout
    if version.startswith("V2Ray 4."):
        return [V2RAY, "-config", str(config)], [V2RAY, "-test", "-config", str(config)]
    return [V2RAY, "run", "-c", str(config)], [V2RAY, "test", "-c", str(config)]


def server_template(api_port: int, vless_port: int) -> dict[str, Any]:
    return {
        "log": {"loglevel": "warning"},
        "api": {"tag": "api", "services": ["HandlerService", "StatsService"]},
        "stats": {},
        "policy": {"levels": {"0": {"statsUserUplink": True, "statsUserDownlink": True}}},
        "inbounds": [
            {
                "tag": "api",
                "listen": "127.0.0.1",
                "port": api_port,
                "protocol": "dokodemo-door",
                "settings": {"address": "127.0.0.1"},
            },
            {
                "tag": TAG,
                "listen": "127.0.0.1",
                "port": vless_port,
                "protocol": "vless",
                "settings": {"clients": [], "decryption": "none"},
                "streamSettings": {"network": "tcp", "security": "none"},
            },
        ],
        "outbounds": [{"protocol": "freedom", "tag": "direct"}],
        "routing": {"rules": [{"type": "field", "inboundTag": ["api"], "outboundTag": "api"}]},
    }


def client_config(routes: Iterable[tuple[int, int, str]]) -> dict[str, Any]:
    """One v2ray acting as VLESS client: per route (socks port, server's VLESS port, user id) a SOCKS
    inbound routed to its own VLESS outbound."""
    inbounds, outbounds, rules = [], [], []
    for n, (socks_port, vless_port, user_id) in enumerate(routes):
        inbounds.append(
            {
                "tag": f"socks{n}",
                "listen": "127.0.0.1",
                "port": socks_port,
                "protocol": "socks",
                "settings": {"auth": "noauth", "udp": False},
            }
        )
        outbounds.append(
            {
                "tag": f"vless{n}",
                "protocol": "vless",
                "settings": {
                    "vnext": [
                        {"address": "127.0.0.1", "port": vless_port, "users": [{"id": user_id, "encryption": "none"}]}
                    ]
                },
            }
        )
        rules.append({"type": "field", "inboundTag": [f"socks{n}"], "outboundTag": f"vless{n}"})
    return {"log": {"loglevel": "warning"}, "inbounds": inbounds, "outbounds": outbounds, "routing": {"rules": rules}}


async def serve_page(
    port: int, *, body: bytes = PAGE, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """An HTTP server on 127.0.0.1:`port` answering every request with `body`."""

    async def handle(stream: trio.SocketStream) -> None:
        with trio.move_on_after(5):
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                request += chunk
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
            )
        await stream.aclose()

    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    task_status.started()
    await trio.serve_listeners(handle, listeners)


async def fetch_via_socks(socks_port: int, http_port: int) -> bytes:
    """GET / through a SOCKS5 proxy; returns the raw response (b"" when the tunnel is refused)."""
    with trio.fail_after(30):
        stream = await trio.open_tcp_stream("127.0.0.1", socks_port)
        async with stream:

            async def receive_exactly(n: int) -> bytes:
                data = b""
                while len(data) < n:
                    chunk = await stream.receive_some(n - len(data))
                    if not chunk:
                        raise EOFError
                    data += chunk
                return data

            try:
                await stream.send_all(b"\x05\x01\x00")
                assert await receive_exactly(2) == b"\x05\x00"
                await stream.send_all(
                    b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + http_port.to_bytes(2, "big")
                )
                reply = await receive_exactly(10)
                if reply[1] != 0:
                    return b""
                await stream.send_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                response = b""
                while chunk := await stream.receive_some(65536):
                    response += chunk
                    head, sep, body = response.partition(b"\r\n\r\n")
                    if sep and b"Content-Length: %d" % len(body) in head:
                        break  # complete; don't wait for v2ray's idle timeout to close the tunnel
                return response
            except (EOFError, trio.BrokenResourceError):
                return b""


async def wait_for_port(port: int) -> None:
    with trio.fail_after(30):
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.05)
                continue
            await stream.aclose()
            return


class Processes:
    """The processes a test started (each logging to `<name>.log` in `directory`), stopped at its end."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        with open(self.directory / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.procs.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        """kill -9, as a crash would."""
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=5)

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.directory.glob("*.log")))

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


@asynccontextmanager
async def vless_client(
    directory: Path, routes: dict[str, tuple[int, str]], *, page: bytes = PAGE
) -> AsyncIterator[Callable[[str], Any]]:
    """A V2Ray VLESS client with a route per key (a server's VLESS port, user id) and a page to fetch
    (`page`, served on loopback): yields `fetch(key)`, the page's response through that route (b"" when
    refused)."""
    http_port = free_port()
    socks = {key: free_port() for key in routes}
    path = directory / "client.json"
    path.write_text(json.dumps(client_config((socks[key], port, user) for key, (port, user) in routes.items())))
    processes = Processes(directory)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(serve_page, http_port, body=page))
        processes.start("client", v2ray_commands(path)[0])
        try:
            for port in socks.values():
                await wait_for_port(port)

            async def fetch(key: str) -> bytes:
                return await fetch_via_socks(socks[key], http_port)

            yield fetch
        finally:
            processes.stop_all()
            nursery.cancel_scope.cancel()
