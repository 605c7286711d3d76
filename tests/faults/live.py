"""vpnd with the fake Bot API and the fake Crypto Pay, running in a background thread's Trio run.

Hypothesis drives its examples from plain (synchronous) test functions, while vpnd must keep running
across all of them: starting a daemon per example would cost seconds each. `open_live(...)` starts
one Trio run in a thread — the fakes on 127.0.0.1 and vpnd's whole service tree (`tests.harness.start_vpnd`,
as `vpnd run` does minus signals) — and hands the test a `Live` whose `call`/`run`
reach into that run (`trio.from_thread`). Records logged at ERROR or above are kept for assertions.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import trio

from tests.harness import config_sections, merge, scalar, sql, start_vpnd, write_config_file
from vpnd.app import App
from vpnd.config import load_config
from vpnd_sandbox.cryptopay_fake import FakeCryptoPay, serve_fake_cryptopay
from vpnd_sandbox.telegram_fake import FakeTelegram, serve_fake_telegram

T = TypeVar("T")
ADMIN_ID = 1


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class Live:
    """Handle on the running vpnd (a plain class: hypothesis prints it by its short repr)."""

    def __init__(
        self,
        token: trio.lowlevel.TrioToken,
        telegram: FakeTelegram,
        cryptopay: FakeCryptoPay,
        app: App,
        http_url: str,
        dsn: str,
        errors: list[logging.LogRecord],
        finished: threading.Event,
        crash: list[BaseException],
    ) -> None:
        self.token = token
        self.telegram = telegram
        self.cryptopay = cryptopay
        self.app = app
        self.http_url = http_url
        self.dsn = dsn
        self.errors = errors
        self.finished = finished
        self.crash = crash

    def __repr__(self) -> str:
        return f"<Live vpnd at {self.http_url}>"

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a sync function inside the Trio run (the fakes are not thread-safe)."""
        return trio.from_thread.run_sync(fn, *args, trio_token=self.token)

    def run(self, afn: Callable[..., Awaitable[T]], *args: Any) -> T:
        return trio.from_thread.run(afn, *args, trio_token=self.token)

    @property
    def webhook_url(self) -> str:
        return f"{self.http_url.rstrip('/')}/webhooks/cryptopay"

    def alive(self) -> bool:
        return not self.finished.is_set()

    def sql(self, query: str, params: Any = None) -> list[tuple[Any, ...]]:
        return sql(self.dsn, query, *(params or ()))

    def scalar(self, query: str, params: Any = None) -> Any:
        return scalar(self.dsn, query, *(params or ()))

    def error_lines(self, since: int = 0) -> list[str]:
        return [f"{r.name}: {r.getMessage()[:300]}" for r in self.errors[since:]]


@contextlib.contextmanager
def open_live(dsn: str, workdir: Path, **overrides: dict[str, Any]) -> Iterator[Live]:
    """Start the thread, wait until vpnd is READY, yield; on exit stop vpnd gracefully and join."""
    started: queue.Queue[Live | BaseException] = queue.Queue()
    stop_box: list[trio.Event] = []
    finished = threading.Event()
    crash: list[BaseException] = []
    collect = _Collect()

    async def main() -> None:
        telegram = FakeTelegram()
        telegram.global_rate = telegram.global_burst = 10_000.0
        telegram.chat_rate = telegram.chat_burst = 10_000.0
        telegram.add_user(ADMIN_ID, "Admin")
        cryptopay = FakeCryptoPay(webhook_retry_delay=0.05)
        stop = trio.Event()
        stop_box.append(stop)
        async with trio.open_nursery() as fakes:
            telegram_url = await fakes.start(serve_fake_telegram, telegram)
            await fakes.start(serve_fake_cryptopay, cryptopay)
            live_sections: dict[str, dict[str, Any]] = {
                "telegram": {
                    "poll_timeout": 1,
                    "admin_ids": [ADMIN_ID],
                    "handler_timeout_seconds": 15.0,
                    "rate_per_second": 1000.0,
                    "per_chat_per_second": 100.0,
                },
                "database": {"pool_max": 8},
                "shutdown": {"grace_seconds": 3.0},
                "cryptopay": {
                    "enabled": True,
                    "token": cryptopay.token,
                    "api_base_url": f"{cryptopay.base_url}/api",
                    "poll_interval": 3600.0,  # the watcher's first round only: state changes come from requests
                },
            }
            sections = merge(config_sections(dsn, (telegram, telegram_url), **live_sections), overrides)
            config = load_config(write_config_file(workdir / "live-config.toml", sections), environ={})
            try:
                async with trio.open_nursery() as inner:
                    vpnd = await start_vpnd(inner, config)
                    cryptopay.webhook_url = f"{vpnd.http_url.rstrip('/')}/webhooks/cryptopay"
                    token = trio.lowlevel.current_trio_token()
                    live = Live(
                        token, telegram, cryptopay, vpnd.app, vpnd.http_url, dsn, collect.records, finished, crash
                    )
                    started.put(live)
                    await stop.wait()
                    await vpnd.stop()
            finally:
                fakes.cancel_scope.cancel()

    def thread_main() -> None:
        try:
            trio.run(main)
        except BaseException as exc:  # reported to the test thread, which fails with it
            crash.append(exc)
            started.put(exc)
        finally:
            finished.set()

    logging.getLogger().addHandler(collect)
    thread = threading.Thread(target=thread_main, name="vpnd-live", daemon=True)
    thread.start()
    try:
        first = started.get(timeout=60)
        if isinstance(first, BaseException):
            raise RuntimeError("vpnd did not start in the background thread") from first
        live = first
        yield live
    finally:
        if stop_box and not finished.is_set():
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(stop_box[0].set, trio_token=live.token)
        thread.join(timeout=30)
        logging.getLogger().removeHandler(collect)
