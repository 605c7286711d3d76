"""Helpers of the fault suite: daemon configs, a supervisor for `python -m vpnd run`, SQL, Xray checks.

The daemon runs as a real subprocess (`tests.harness.start_daemon`); the fakes run in the test's
Trio run and talk to it over 127.0.0.1. `Supervisor` plays systemd: start, wait for READY=1, SIGKILL,
SIGTERM, restart, and keeps every run's log for the failure message.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio

from tests.harness import Daemon, config_sections, merge, sql, start_daemon, wait_ready
from vpnd_sandbox.demo import xray_template

TAG = "vless-reality"


def daemon_sections(
    *,
    token: str,
    telegram_url: str,
    dsn: str,
    port: int,
    **overrides: Mapping[str, Any],
) -> dict[str, dict[str, Any]]:
    """Sections of a daemon config against the fakes (`tests.harness.config_sections`, tuned for faults)."""
    faults: dict[str, dict[str, Any]] = {
        "telegram": {
            "token": token,
            "api_base_url": telegram_url,
            "poll_timeout": 1,
            "rate_per_second": 500.0,
            "per_chat_per_second": 50.0,
            "handler_timeout_seconds": 20.0,
        },
        "database": {"pool_max": 8, "connect_timeout_seconds": 5.0},
        "shutdown": {"grace_seconds": 3.0},
        "xray": {"inbound_tag": TAG},
    }
    return merge(config_sections(dsn, port=port, **faults), overrides)


def write_xray_template(path: Path, tag: str = TAG) -> Path:
    path.write_text(json.dumps(xray_template(tag), indent=2))
    return path


def file_clients(config_path: Path, tag: str = TAG) -> dict[str, str] | None:
    """email → uuid of the inbound's clients in Xray's config file; None when there is no file.

    Raises if the file exists but is not a complete, parseable Xray config.
    """
    try:
        text = config_path.read_text()
    except FileNotFoundError:
        return None
    document = json.loads(text)
    inbound = next(i for i in document["inbounds"] if i.get("tag") == tag)
    return {c["email"]: c["id"] for c in inbound["settings"]["clients"]}


def desired_xray_set(dsn: str) -> dict[str, str]:
    """What Xray must hold: every active, unexpired subscription ("u<user_id>" → uuid)."""
    rows = sql(
        dsn,
        "SELECT 'u' || user_id::text, uuid::text FROM subscriptions WHERE status = 'active' AND expires_at > now()",
    )
    return dict(rows)  # type: ignore[arg-type]


async def get_json(url: str, timeout: float = 5.0) -> tuple[int, Any]:
    async with httpx.AsyncClient(timeout=timeout) as client:
        response = await client.get(url)
    try:
        return response.status_code, response.json()
    except ValueError:
        return response.status_code, response.text


async def until(predicate: Any, timeout: float, step: float = 0.05, what: str = "condition") -> float:
    """Poll a sync `predicate` (state outside Trio: files, other processes, the database) until it holds."""
    started = trio.current_time()
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(step)
    return trio.current_time() - started


@attrs.define(eq=False)
class Supervisor:
    """Plays systemd for one daemon config: start, READY=1, kill, restart; keeps every run."""

    nursery: trio.Nursery
    config_path: Path
    workdir: Path
    port: int
    runs: list[Daemon] = attrs.field(factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def current(self) -> Daemon:
        return self.runs[-1]

    async def start(self, *, ready: bool = True, timeout: float = 40.0) -> Daemon:
        daemon = await start_daemon(self.nursery, self.config_path, self.workdir)
        self.runs.append(daemon)
        if ready:
            await self.wait_ready(daemon, timeout)
        return daemon

    async def wait_ready(self, daemon: Daemon, timeout: float = 40.0) -> float:
        try:
            return await wait_ready(daemon, self.url, timeout)
        except trio.TooSlowError:
            raise AssertionError(f"no READY=1 within {timeout}s; log:\n{daemon.log()[-4000:]}") from None

    def alive(self) -> bool:
        return bool(self.runs) and self.current.process.returncode is None

    async def kill(self) -> None:
        daemon = self.current
        daemon.signal(signal.SIGKILL)
        assert await daemon.wait(10) == -signal.SIGKILL

    async def stop(self, timeout: float = 20.0) -> int:
        daemon = self.current
        if daemon.process.returncode is not None:
            return daemon.process.returncode
        daemon.signal(signal.SIGTERM)
        return await daemon.wait(timeout)

    def logs(self) -> str:
        return "\n".join(f"--- run {i} ---\n{d.log()}" for i, d in enumerate(self.runs))

    def tail(self, chars: int = 4000) -> str:
        return self.logs()[-chars:]


@attrs.define(eq=False)
class ReplyClock:
    """When each bot message appeared in each watched chat (Trio time, ~20 ms resolution).

    Replies in a private chat come in the order of the user's messages, so the k-th bot message of a
    chat is the reply to the user's k-th message there (for flows that answer each message once).
    """

    telegram: Any
    chats: list[int]
    seen: dict[int, list[float]] = attrs.field(factory=dict)

    async def run(self) -> None:
        while True:
            now = trio.current_time()
            for chat in self.chats:
                times = self.seen.setdefault(chat, [])
                count = len(self.telegram.bot_messages(chat))
                times.extend([now] * (count - len(times)))
            await trio.sleep(0.02)

    def reply_time(self, chat: int, index: int) -> float | None:
        """When the reply to the chat's `index`-th (0-based) user message appeared."""
        times = self.seen.get(chat, [])
        return times[index] if index < len(times) else None


def until_sync(predicate: Any, timeout: float, step: float = 0.05) -> bool:
    """Poll `predicate` from a plain thread (hypothesis tests); True once it holds, False on timeout."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True
