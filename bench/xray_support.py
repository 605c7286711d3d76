"""Xray peers for the benchmarks: a real V2Ray (Debian's `v2ray`) or the fake API, and a timing proxy.

`TimingProxy` is a pass-through gRPC server between vpnd and Xray: it forwards every call unchanged
and records when each `AlterInbound` add of a user (email ``u<id>``) came back OK from Xray — the
moment the user is live. It adds one loopback hop (well under a millisecond) to each call.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import attrs
import grpc

from vpnd_sandbox.postgres import free_port
from vpnd_sandbox.xray_fake import start_fake_xray

TAG = "vless-in"
_EMAIL = re.compile(rb"u(\d{1,19})")


def server_template(api_port: int, vless_port: int) -> dict[str, Any]:
    """A V2Ray/Xray server config with the API inbound and a VLESS inbound whose clients vpnd fills."""
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


@attrs.define(eq=False)
class XrayPeer:
    """What vpnd talks to: its API address (the proxy's), the prefix, and how to check for restarts."""

    kind: str  # "v2ray" | "fake"
    address: str
    prefix: str
    flow: str
    process: subprocess.Popen[bytes] | None = None

    def restarts(self) -> str:
        if self.process is None:
            return "0 (fake API: never restarted by anyone)"
        alive = self.process.poll() is None
        return f"0 (same V2Ray process {self.process.pid}, still running)" if alive else "V2Ray process ended!"


def v2ray_binary() -> str | None:
    return shutil.which("v2ray")


def v2ray_run_command(binary: str, config: Path) -> list[str]:
    version = subprocess.run([binary, "-version"], capture_output=True, text=True, timeout=10).stdout
    if version.startswith("V2Ray 4."):
        return [binary, "-config", str(config)]
    return [binary, "run", "-c", str(config)]


def wait_for_port(port: int, timeout: float = 15) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


@contextlib.contextmanager
def xray_peer(workdir: Path, *, prefer_real: bool = True) -> Iterator[tuple[XrayPeer, Path, Path]]:
    """A running Xray API for vpnd: (peer, template_path, config_path).

    With V2Ray installed: V2Ray started from the template's rendering with no clients (the file
    vpnd will own), otherwise the fake Xray API. The config file is created before vpnd starts.
    """
    api_port, vless_port = free_port(), free_port()
    template_path = workdir / "xray-template.json"
    config_path = workdir / "xray" / "config.json"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    template = server_template(api_port, vless_port)
    template_path.write_text(json.dumps(template, indent=2))
    config_path.write_text(json.dumps(template, indent=2))
    binary = v2ray_binary() if prefer_real else None
    if binary is not None:
        log = (workdir / "v2ray.log").open("wb")
        process = subprocess.Popen(
            v2ray_run_command(binary, config_path), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        log.close()
        try:
            wait_for_port(api_port)
            yield XrayPeer("v2ray", f"127.0.0.1:{api_port}", "v2ray.core.", "", process), template_path, config_path
        finally:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
    else:
        with start_fake_xray("xray.", inbound_tags=(TAG,)) as fake:
            yield XrayPeer("fake", fake.address, "xray.", "xtls-rprx-vision"), template_path, config_path


@attrs.define(eq=False)
class TimingProxy:
    """gRPC pass-through to `upstream`, timing successful user adds (time.monotonic())."""

    upstream: str
    port: int = 0
    added_at: dict[int, float] = attrs.field(factory=dict)
    calls: dict[str, int] = attrs.field(factory=dict)
    errors: int = 0
    _lock: threading.Lock = attrs.field(factory=threading.Lock)
    _channel: grpc.Channel | None = None
    _server: grpc.Server | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self._channel = grpc.insecure_channel(self.upstream)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
        server.add_generic_rpc_handlers((_Forwarder(self),))
        self.port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self._server = server

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=1).wait(5)
        if self._channel is not None:
            self._channel.close()

    def forward(self, method: str, request: bytes, context: grpc.ServicerContext) -> bytes:
        assert self._channel is not None
        call = self._channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        short = method.rsplit("/", 1)[-1]
        with self._lock:
            self.calls[short] = self.calls.get(short, 0) + 1
        try:
            response: bytes = call(request, timeout=context.time_remaining() or 10)
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details()  # type: ignore[attr-defined]
            with self._lock:
                self.errors += 1
            if short == "AlterInbound" and b"AddUserOperation" in request and "already exists" in (details or ""):
                self._record(request)
            context.abort(code, details or "")
        if short == "AlterInbound" and b"AddUserOperation" in request:
            self._record(request)
        return response

    def _record(self, request: bytes) -> None:
        now = time.monotonic()
        match = _EMAIL.search(request.split(b"AddUserOperation", 1)[-1])
        if match is None:
            return
        user_id = int(match.group(1))
        with self._lock:
            self.added_at.setdefault(user_id, now)

    def added(self, user_id: int) -> float | None:
        with self._lock:
            return self.added_at.get(user_id)


class _Forwarder(grpc.GenericRpcHandler):
    def __init__(self, proxy: TimingProxy) -> None:
        self.proxy = proxy

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method: str = handler_call_details.method  # type: ignore[attr-defined]

        def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
            return self.proxy.forward(method, request, context)

        return grpc.unary_unary_rpc_method_handler(handle)


@contextlib.contextmanager
def timing_proxy(upstream: str) -> Iterator[TimingProxy]:
    proxy = TimingProxy(upstream)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()


@attrs.define(eq=False)
class FileWatch:
    """Counts replacements of a file (atomic writes give it a new inode) by polling its stat."""

    path: Path
    writes: int = 0
    _last: tuple[int, int] | None = None

    def poll(self) -> None:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return
        key = (stat.st_ino, stat.st_mtime_ns)
        if self._last is not None and key != self._last:
            self.writes += 1
        self._last = key

    def clients(self) -> int:
        """How many clients the file's VLESS inbound lists now."""
        config = json.loads(self.path.read_text())
        for inbound in config.get("inbounds", []):
            if inbound.get("tag") == TAG:
                return len(inbound.get("settings", {}).get("clients", []))
        return 0
