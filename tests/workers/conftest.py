"""Helpers for the workers and outbox tests: vpnd's background services running in the test's Trio run.

`running(config)` starts vpnd (`vpnd.compose.open_vpnd`) with only the outbox sender and the workers
asked for. Seeding goes through the database like any other writer.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import psycopg
import pytest
import trio

from tests.harness import bot_config
from vpnd.compose import WORKERS, Services, Tuning, Vpnd, open_vpnd
from vpnd.config import Config
from vpnd.nurseries.outbox import OutboxSettings
from vpnd.nurseries.workers import Job
from vpnd_sandbox.telegram_fake import FakeTelegram, serve_fake_telegram


@asynccontextmanager
async def running(
    config: Config,
    *,
    outbox: bool = True,
    outbox_settings: OutboxSettings | None = None,
    workers: Sequence[str] | None = (),
    extra: Sequence[Job] = (),
    max_attempts: int = 5,
    single_instance: bool = False,
) -> AsyncIterator[Vpnd]:
    """Run the outbox sender and the named workers (`None`: all of them; `()`: none)."""
    names = ["listener", *(WORKERS if workers is None else workers)]  # commits wake their owners, as in the daemon
    if outbox:
        names.append("outbox")
    tuning = Tuning(send_attempts=max_attempts, send_max_backoff=2.0, outbox=outbox_settings, extra_jobs=tuple(extra))
    async with open_vpnd(config, Services.only(*names), single_instance=single_instance, tuning=tuning) as vpnd:
        yield vpnd


@pytest.fixture
def make_config(
    write_config: Callable[..., Path], db_dsn: str, fake_telegram: tuple[FakeTelegram, str]
) -> Callable[..., Config]:
    fake, base_url = fake_telegram

    def make(**sections: dict[str, Any]) -> Config:
        return bot_config(write_config, db_dsn, fake, base_url, **sections)

    return make


def start_users(fake: FakeTelegram, user_ids: Sequence[int]) -> None:
    """Users who have talked to the bot (so it may write to them)."""
    for uid in user_ids:
        fake.add_user(uid, f"User{uid}")
        fake.users[uid].started = True


def seed_users(dsn: str, user_ids: Sequence[int], *, language: str = "en", balance_minor: int = 0) -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "INSERT INTO users (id, first_name, language, referral_code, balance_minor) "
            "SELECT id, 'User' || id, %s, 'ref' || id, %s FROM unnest(%s::bigint[]) AS id",
            (language, balance_minor, list(user_ids)),
        )
        if balance_minor:
            conn.execute(
                "INSERT INTO balance_ledger (user_id, delta_minor, reason, reference) "
                "SELECT id, %s, 'topup', 'seed:' || id FROM unnest(%s::bigint[]) AS id",
                (balance_minor, list(user_ids)),
            )


def seed_subscriptions(
    dsn: str,
    user_ids: Sequence[int],
    expires_in: dt.timedelta | Sequence[dt.timedelta],
    *,
    kind: str = "paid",
    plan_code: str | None = "m1",
    auto_renew: bool = False,
) -> None:
    offsets = [expires_in] * len(user_ids) if isinstance(expires_in, dt.timedelta) else list(expires_in)
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "INSERT INTO subscriptions (user_id, kind, status, uuid, sub_token, plan_code, expires_at, auto_renew) "
            "SELECT id, %s, 'active', gen_random_uuid(), 'tok' || id, %s, now() + off, %s "
            "FROM unnest(%s::bigint[], %s::interval[]) AS t(id, off)",
            (kind, plan_code, auto_renew, list(user_ids), offsets),
        )


async def poll_until(condition: Callable[[], bool], timeout: float, step: float = 0.05) -> None:
    """Poll `condition` (the database, a fake) until it holds."""
    with trio.fail_after(timeout):
        while True:
            if condition():
                return
            await trio.sleep(step)


@attrs.define(eq=False)
class StoppableFake:
    """The fake Bot API served in its own cancel scope, so a test can take it down and bring it back."""

    fake: FakeTelegram
    nursery: trio.Nursery
    port: int = 0
    scope: trio.CancelScope | None = None
    stopped: trio.Event | None = None

    async def start(self) -> str:
        scope = trio.CancelScope()
        stopped = trio.Event()

        async def serve(task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                with scope:
                    await serve_fake_telegram(self.fake, port=self.port, task_status=task_status)
            finally:
                stopped.set()

        base_url: str = await self.nursery.start(serve)
        self.port = int(base_url.rsplit(":", 1)[1])
        self.scope, self.stopped = scope, stopped
        return base_url

    async def stop(self) -> None:
        assert self.scope is not None and self.stopped is not None
        self.scope.cancel()
        with trio.fail_after(10):
            await self.stopped.wait()
