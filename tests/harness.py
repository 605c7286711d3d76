"""In-process test harness: the fake Bot API, and vpnd's whole service tree in the test's Trio run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import trio

from vpnd.app import App, open_app
from vpnd.config import Config, load_config
from vpnd.nurseries.root import serve_app
from vpnd_sandbox.telegram_fake import FakeTelegram

#: A valid REALITY public key (x25519, base64url) for link building in tests.
TEST_PUBLIC_KEY = "Z84J2IelR9ch3k8VtlVhhs5ycBUlXA7wHBWcBrjqnAw"


@attrs.define(eq=False)
class Running:
    """A vpnd instance running in the test's Trio run."""

    app: App
    done: trio.Event

    async def stop(self, timeout: float = 15) -> None:
        self.app.lifecycle.request_stop("test")
        with trio.fail_after(timeout):
            await self.done.wait()


async def start_vpnd(nursery: trio.Nursery, config: Config) -> Running:
    done = trio.Event()

    async def run(task_status: trio.TaskStatus[App] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with open_app(config) as app:
                await serve_app(app, task_status=task_status)
        finally:
            done.set()

    app = await nursery.start(run)
    return Running(app, done)


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
    base: dict[str, dict[str, Any]] = {
        "telegram": {
            "token": fake.token,
            "api_base_url": base_url,
            "poll_timeout": 2,
            "admin_ids": [1],
            "handler_timeout_seconds": 10.0,
        },
        "database": {"dsn": db_dsn, "pool_min": 1, "pool_max": 6},
        "http": {"listen": "127.0.0.1:0", "public_base_url": "https://vpn.example.test"},
        "shutdown": {"grace_seconds": 5.0},
        "xray": {"public_key": TEST_PUBLIC_KEY, "short_id": "0123abcd", "host": "vpn.example.test"},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    default_plans = (
        '[[plans]]\ncode = "m1"\ntitle = { en = "1 month", ru = "1 месяц" }\ndays = 30\nprice = "4.99"\n'
        'currency = "USD"\nstars = 250\n'
    )
    return load_config(write_config(default_plans + plans, **base), environ={})
