"""The one test harness: configs, the database as the test sees it, and vpnd in process or out of process.

- configs: `config_sections` (vpnd against the fakes and a test database, as TOML tables) and
  `config_text`/`write_config_file`/`bot_config` to turn them into a `Config`;
- `sql`/`scalar`: the test's own direct connection to the database;
- in process: `start_vpnd(nursery, config, services=..., tuning=...)` runs `vpnd.compose.open_vpnd` in
  the test's Trio run; `open_app(config)` opens only the database-level app (no services);
- out of process: `start_daemon`/`wait_ready` run `python -m vpnd run` with a fake NOTIFY_SOCKET
  (signals, kill -9, descriptor limits; the benchmarks use it too).
"""

from __future__ import annotations

import itertools
import json
import os
import resource
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import httpx
import psycopg
import trio

from tests.keys import PUBLIC_KEY, SHORT_ID
from vpnd.app import App
from vpnd.compose import Services, Started, Tuning, Vpnd, open_vpnd
from vpnd.config import Config, load_config
from vpnd.nurseries.broadcasts import Broadcasts
from vpnd.telegram.client import Sender
from vpnd_sandbox.cryptopay_fake import FakeCryptoPay
from vpnd_sandbox.telegram_fake import ChatMessage, FakeTelegram

#: Kept under its old name: tests written against the harness import it from here.
TEST_PUBLIC_KEY = PUBLIC_KEY
ADMIN = 1

PLANS = (
    '[[plans]]\ncode = "m1"\ntitle = { en = "1 month", ru = "1 месяц" }\ndays = 30\nprice = "4.99"\n'
    'currency = "USD"\nstars = 250\n'
)

_run_numbers = itertools.count()


# --- configs ---------------------------------------------------------------------------------------


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a TOML basic string is a JSON string for what we write
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{key} = {toml_value(v)}" for key, v in value.items()) + " }"
    return repr(value)


def config_text(sections: Mapping[str, Mapping[str, Any]], plans: str = PLANS) -> str:
    """TOML for `sections` (a dict per table), plans last (keys after [[plans]] would belong to it)."""
    lines: list[str] = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {toml_value(value)}" for key, value in values.items())
        lines.append("")
    return "\n".join(lines) + plans


def merge(base: dict[str, dict[str, Any]], overrides: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """`base` with each section of `overrides` merged key by key."""
    for name, values in overrides.items():
        base[name] = {**base.get(name, {}), **values}
    return base


def config_sections(
    dsn: str,
    bot_api: tuple[FakeTelegram, str] | None = None,
    *,
    port: int = 0,
    **overrides: Mapping[str, Any],
) -> dict[str, dict[str, Any]]:
    """vpnd against the fake Bot API `bot_api` (fake, base_url) and the test database `dsn`.

    `overrides` are merged per section.

    `port=0` binds any free port (in process, `Started.http_url` tells which); a daemon started out of
    process gets a fixed port so the test knows its URL.
    """
    base: dict[str, dict[str, Any]] = {
        "telegram": {"poll_timeout": 2, "admin_ids": [ADMIN], "handler_timeout_seconds": 10.0},
        "database": {"dsn": dsn, "pool_min": 1, "pool_max": 6},
        "http": {"listen": f"127.0.0.1:{port}", "public_base_url": "https://vpn.example.test"},
        "shutdown": {"grace_seconds": 5.0},
        "xray": {"public_key": PUBLIC_KEY, "short_id": SHORT_ID, "host": "vpn.example.test"},
    }
    if port:
        base["http"]["public_base_url"] = f"http://127.0.0.1:{port}"
    if bot_api is not None:
        fake, base_url = bot_api
        base["telegram"].update(token=fake.token, api_base_url=base_url)
    return merge(base, overrides)


def write_config_file(path: Path, sections: Mapping[str, Mapping[str, Any]], plans: str = PLANS) -> Path:
    path.write_text(config_text(sections, plans))
    return path


def bot_config(
    write_config: Callable[..., Path],
    db_dsn: str,
    fake: FakeTelegram,
    base_url: str,
    *,
    plans: str = "",
    **sections: dict[str, Any],
) -> Config:
    """A config for vpnd against the fake Bot API and the test database; sections override defaults.

    `plans` (TOML `[[plans]]` tables) come after the default plan "m1".
    """
    path = write_config_file(write_config(), config_sections(db_dsn, (fake, base_url), **sections), PLANS + plans)
    return load_config(path, environ={})


# --- the database, as the test sees it ---------------------------------------------------------------


def sql(dsn: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    """One statement on the test's own connection (autocommit); its rows, if any."""
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        cur = conn.execute(query, params or None)
        return cur.fetchall() if cur.description else []


def scalar(dsn: str, query: str, *params: Any) -> Any:
    rows = sql(dsn, query, *params)
    return rows[0][0] if rows else None


# --- talking as a user ----------------------------------------------------------------------------


def button(message: ChatMessage, prefix: str) -> str:
    """The button whose data is `prefix`, else the first whose data starts with it."""
    if prefix in message.callback_data:
        return prefix
    for data in message.callback_data:
        if data.startswith(prefix):
            return data
    raise AssertionError(f"no button {prefix!r} on message {message.message_id}: {message.callback_data}")


async def press(fake: FakeTelegram, user_id: int, message: ChatMessage, prefix: str, **wait: Any) -> ChatMessage:
    """Press the button `prefix` (exact, or the first starting with it); the bot's next message."""
    fake.user_presses_button(user_id, message.message_id, button(message, prefix))
    return await fake.wait_for_bot_message(user_id, **wait)


async def say(fake: FakeTelegram, user_id: int, text: str, **wait: Any) -> ChatMessage:
    fake.user_sends(user_id, text)
    return await fake.wait_for_bot_message(user_id, **wait)


def has_button(prefix: str) -> Callable[[ChatMessage], bool]:
    return lambda m: any(d.startswith(prefix) for d in m.callback_data)


def text_has(fragment: str) -> Callable[[ChatMessage], bool]:
    return lambda m: fragment in (m.text or m.caption or "")


# --- vpnd in the test's Trio run -----------------------------------------------------------------------


@attrs.define(eq=False)
class Running:
    """A vpnd running in the test's Trio run (`start_vpnd`)."""

    vpnd: Vpnd
    done: trio.Event

    @property
    def app(self) -> App:
        return self.vpnd.app

    @property
    def started(self) -> Started:
        return self.vpnd.started

    @property
    def http_url(self) -> str:
        return self.vpnd.http_url

    @property
    def sender(self) -> Sender:
        return self.vpnd.sender

    @property
    def broadcasts(self) -> Broadcasts:
        assert self.started.broadcasts is not None, "the broadcasts service is not running"
        return self.started.broadcasts

    async def stop(self, timeout: float = 15) -> None:
        """A graceful stop, as on SIGTERM; returns once vpnd closed everything."""
        self.app.lifecycle.request_stop("test")
        with trio.fail_after(timeout):
            await self.done.wait()


async def start_vpnd(
    nursery: trio.Nursery,
    config: Config,
    services: Services | None = None,
    *,
    tuning: Tuning | None = None,
    single_instance: bool = True,
) -> Running:
    """Start vpnd (every service unless `services` says which) in `nursery`; return once it is ready."""
    done = trio.Event()

    async def run(task_status: trio.TaskStatus[Running] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            chosen = services or Services.all()
            async with open_vpnd(with_token(config), chosen, single_instance=single_instance, tuning=tuning) as vpnd:
                task_status.started(Running(vpnd, done))
                await vpnd.app.lifecycle.stopping.wait()
        finally:
            done.set()

    running: Running = await nursery.start(run)
    return running


async def start_shop(
    nursery: trio.Nursery,
    write_config: Callable[..., Path],
    db_dsn: str,
    fake_telegram: tuple[FakeTelegram, str],
    fake_cryptopay: tuple[FakeCryptoPay, str],
    **sections: dict[str, Any],
) -> Running:
    """vpnd selling through Crypto Pay (the fake's webhooks go to this vpnd) and the fake Bot API;
    `sections` override the config as for `bot_config`."""
    fake, base_url = fake_telegram
    pay, pay_url = fake_cryptopay
    shop = {"enabled": True, "token": pay.token, "api_base_url": pay_url}
    vpnd = await start_vpnd(nursery, bot_config(write_config, db_dsn, fake, base_url, cryptopay=shop, **sections))
    pay.webhook_url = f"{vpnd.http_url}/webhooks/cryptopay"
    return vpnd


@asynccontextmanager
async def open_app(config: Config, *, single_instance: bool = True) -> AsyncIterator[App]:
    """Only the database-level app (lock, schema, pool, health, metrics, texts): no service runs."""
    async with open_vpnd(with_token(config), Services.only(), single_instance=single_instance) as vpnd:
        yield vpnd.app


def with_token(config: Config) -> Config:
    """`config`, with a placeholder bot token if it has none (the bot client needs one to be built;
    tests without the fake Bot API never call it)."""
    if config.telegram.token:
        return config
    return attrs.evolve(config, telegram=attrs.evolve(config.telegram, token="1000:placeholder"))


# --- vpnd as a process (`python -m vpnd run`) -------------------------------------------------------------


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


def vpnd_cli(config_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """`run(*args)`: `python -m vpnd *args --config <config_path>` as a real process (no inherited
    environment but PATH: no secret leaks in from the test's), output captured."""

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "vpnd", *args, "--config", str(config_path)],
            capture_output=True,
            text=True,
            timeout=60,
            env={"PATH": "/usr/bin:/bin"},
        )

    return run


def cli_result(process: subprocess.CompletedProcess[str]) -> Any:
    """The `result` of a `--json` CLI answer that must have succeeded."""
    document = json.loads(process.stdout)
    assert document["ok"] is True, document
    return document["result"]
