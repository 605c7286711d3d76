"""The composition root: a subset of services starts only those, the app is frozen while it runs, and
`run_daemon` (the root around it) still stops on SIGTERM."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import attrs
import httpx
import pytest
import trio

from tests.harness import bot_config, start_vpnd
from vpnd.app import App
from vpnd.compose import SERVICE_NAMES, Services
from vpnd.nurseries.root import run_daemon
from vpnd.sdnotify import Notifier
from vpnd_sandbox.telegram_fake import FakeTelegram

IO_TIMEOUT = 30


async def test_only_http_serves_healthz_and_nobody_polls_telegram(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    config = bot_config(write_config, db_dsn, fake, base_url)
    with trio.fail_after(IO_TIMEOUT):
        vpnd = await start_vpnd(nursery, config, Services.only("http"))
        async with httpx.AsyncClient(base_url=vpnd.http_url, timeout=5) as client:
            assert (await client.get("/healthz")).status_code == 200
        await trio.sleep(1.0)  # a poller would have long-polled by now
        assert fake.requests["getUpdates"] == 0 and fake.requests["getMe"] == 0
        assert vpnd.started.xray is None and vpnd.started.outbox is None and vpnd.started.polling is None
        await vpnd.stop()


async def test_only_the_poller_polls_and_serves_no_http(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    config = bot_config(write_config, db_dsn, fake, base_url)
    with trio.fail_after(IO_TIMEOUT):
        vpnd = await start_vpnd(nursery, config, Services.only("poller"))
        await fake.wait_until(lambda: fake.requests["getUpdates"] >= 1, timeout=10)
        assert vpnd.http_url == "" and vpnd.started.bot_username == fake.bot_username
        await vpnd.stop()


async def test_the_app_is_frozen_while_running_but_its_config(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    config = bot_config(write_config, db_dsn, fake, base_url)
    with trio.fail_after(IO_TIMEOUT):
        vpnd = await start_vpnd(nursery, config, Services.only("http", "outbox"))
        app = vpnd.app
        for name in ("db", "texts", "health", "reload_hooks", "lifecycle"):
            with pytest.raises(attrs.exceptions.FrozenAttributeError):
                setattr(app, name, getattr(app, name))
        with pytest.raises(AttributeError):  # nothing can be hung on it either
            app.http_url = "http://elsewhere"  # type: ignore[attr-defined]
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            vpnd.started.http_url = "http://elsewhere"  # type: ignore[misc]
        app.config = attrs.evolve(app.config)  # what a SIGHUP reload does
        await vpnd.stop()


def test_services_are_named_and_checked() -> None:
    assert Services.all().names == frozenset(SERVICE_NAMES)
    assert "http" in Services.only("http") and "poller" not in Services.only("http")
    assert Services.all().without("poller", "http").workers() == Services.all().workers()
    with pytest.raises(ValueError, match="unknown services: pollr"):
        Services.only("pollr")


async def test_run_daemon_stops_on_sigterm(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    config = bot_config(write_config, db_dsn, fake, base_url, shutdown={"grace_seconds": 2.0})
    returned = trio.Event()

    async def daemon(task_status: trio.TaskStatus[App] = trio.TASK_STATUS_IGNORED) -> None:
        await run_daemon(config, notifier=Notifier(None), task_status=task_status)
        returned.set()

    with trio.fail_after(IO_TIMEOUT):
        app = await nursery.start(daemon)
        await fake.wait_until(lambda: fake.requests["getUpdates"] >= 1, timeout=10)
        os.kill(os.getpid(), signal.SIGTERM)
        await returned.wait()
    assert app.lifecycle.reason == "SIGTERM"
