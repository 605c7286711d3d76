"""Run `vpnd` as a real subprocess with a fake systemd notify socket (tests, benchmarks)."""

from __future__ import annotations

import itertools
import os
import resource
import signal
import socket
import subprocess
import sys
from functools import partial
from pathlib import Path

import attrs
import httpx
import trio

_run_numbers = itertools.count()


@attrs.define(eq=False)
class NotifySocket:
    """A unix datagram socket playing systemd's NOTIFY_SOCKET; records every message with its time."""

    path: Path
    sock: trio.socket.SocketType
    messages: list[tuple[float, str]] = attrs.field(factory=list)
    changed: trio.Event = attrs.field(factory=trio.Event)

    async def open(self) -> None:
        await self.sock.bind(str(self.path))

    async def receive_forever(self) -> None:
        while True:
            data = await self.sock.recv(4096)
            for line in data.decode().splitlines():
                self.messages.append((trio.current_time(), line))
            self.changed.set()
            self.changed = trio.Event()

    async def wait_for(self, line: str, timeout: float = 20) -> float:
        """Wait for a message line; return when it arrived (trio time)."""
        with trio.fail_after(timeout):
            while True:
                for at, seen in self.messages:
                    if seen == line:
                        return at
                await self.changed.wait()

    def lines(self) -> list[str]:
        return [line for _, line in self.messages]


@attrs.define(eq=False)
class Daemon:
    process: trio.Process
    notify: NotifySocket
    log_path: Path
    started_at: float
    http_url: str = ""

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.process.send_signal(signum)

    async def wait(self, timeout: float = 30) -> int:
        with trio.fail_after(timeout):
            return await self.process.wait()

    async def get(self, path: str, timeout: float = 10) -> httpx.Response:
        async with httpx.AsyncClient(base_url=self.http_url, timeout=timeout) as client:
            return await client.get(path)


async def start_daemon(
    nursery: trio.Nursery,
    config_path: Path,
    workdir: Path,
    *,
    env: dict[str, str] | None = None,
    args: tuple[str, ...] = ("run",),
    nofile: int | None = None,
) -> Daemon:
    """Start `python -m vpnd run --config ...` with NOTIFY_SOCKET; return at once (see wait_ready).

    `nofile` sets the daemon's descriptor limit (RLIMIT_NOFILE, like `LimitNOFILE=` in the unit).
    """
    index = next(_run_numbers)
    notify = NotifySocket(workdir / f"notify-{index}.sock", trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM))
    await notify.open()
    nursery.start_soon(notify.receive_forever)
    log_path = workdir / f"daemon-{index}.log"
    full_env = {**os.environ, "NOTIFY_SOCKET": str(notify.path), **(env or {})}
    with log_path.open("wb") as log_file:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "vpnd", *args, "--config", str(config_path)],
            env=full_env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            preexec_fn=None if nofile is None else partial(_limit_descriptors, nofile),
        )
    return Daemon(process, notify, log_path, trio.current_time())


def _limit_descriptors(limit: int) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))


async def wait_ready(daemon: Daemon, http_url: str, timeout: float = 30) -> float:
    """Wait for READY=1; return seconds from start."""
    at = await daemon.notify.wait_for("READY=1", timeout)
    daemon.http_url = http_url
    return at - daemon.started_at
