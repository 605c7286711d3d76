"""The health check: an outage of the Bot API or of PostgreSQL → one alert; recovery → one message."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
import trio

from tests.harness import bot_config, sql
from tests.workers.conftest import StoppableFake, poll_until, running, start_users
from vpnd.app import App
from vpnd.db.migrations import migrate, packaged_schema
from vpnd.nurseries.outbox import OutboxSettings
from vpnd_sandbox.postgres import throwaway_cluster
from vpnd_sandbox.telegram_fake import FakeTelegram

ADMIN = 1  # bot_config's [telegram].admin_ids
RETRY_SOON = OutboxSettings(poll_interval=0.2, retry_base=0.3, retry_cap=0.5, max_attempts=100)


async def wait_until_settled(dsn: str, timeout: float = 30.0) -> None:
    """Wait until the outbox has nothing pending: anything queued by those rounds has been sent."""
    await poll_until(lambda: not sql(dsn, "SELECT count(*) FROM outbox WHERE status = 'pending'")[0][0], timeout)


def admin_alerts(fake: FakeTelegram) -> list[str]:
    return [m.text or "" for m in fake.bot_messages(ADMIN)]


def health_rounds(app: App) -> int:
    """Rounds the health worker has completed (its `vpnd_worker_rounds_total` sample)."""
    return int(app.metrics.registry.get_sample_value("vpnd_worker_rounds_total", {"worker": "health"}) or 0)


async def more_rounds(app: App, count: int, timeout: float = 30.0) -> None:
    """Wait until the health worker has completed `count` more rounds (not a fixed sleep)."""
    target = health_rounds(app) + count
    await poll_until(lambda: health_rounds(app) >= target, timeout)


async def test_bot_api_outage_one_alert_then_one_recovery(
    nursery: trio.Nursery, db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake = FakeTelegram()
    api = StoppableFake(fake, nursery)
    base_url = await api.start()
    start_users(fake, [ADMIN])
    config = bot_config(write_config, db_dsn, fake, base_url, workers={"health_interval": 0.3})
    async with running(config, outbox_settings=RETRY_SOON, workers=["health"], max_attempts=2) as services:
        app = services.app
        ready = await app.health.readiness()
        assert {k: v.ok for k, v in ready.items() if k.startswith("health.")} == {
            "health.database": True,
            "health.telegram": True,
            "health.outbox": True,
        }
        await api.stop()
        alert_sql = "SELECT 1 FROM outbox WHERE dedupe_key LIKE 'health:telegram:%'"
        await poll_until(lambda: bool(sql(db_dsn, alert_sql)), 30)
        assert not (await app.health.readiness())["health.telegram"].ok
        assert app.metrics.registry.get_sample_value("vpnd_health_check_ok", {"check": "telegram"}) == 0
        await more_rounds(app, 5)  # five more failing rounds: still one alert
        assert len(sql(db_dsn, "SELECT 1 FROM outbox WHERE dedupe_key LIKE 'health:%'")) == 1

        await api.start()  # the same address again
        await poll_until(lambda: len(admin_alerts(fake)) >= 2, 60)
        await more_rounds(app, 3)  # nothing else follows
        await wait_until_settled(db_dsn)
        assert (await app.health.readiness())["health.telegram"].ok
    alerts = admin_alerts(fake)
    assert len(alerts) == 2, alerts
    assert alerts[0].startswith("🚨 Health check telegram is failing")
    assert alerts[1].startswith("✅ Health check telegram recovered: getMe: @vpnd_demo_bot")


@pytest.mark.slow
async def test_database_outage_is_reported_after_it_ends(
    fake_telegram: tuple[FakeTelegram, str], write_config: Callable[..., Path]
) -> None:
    """While PostgreSQL is down nothing can be queued; the outage is remembered and, once the
    database answers again, the admins get one "failing" and one "recovered" message."""
    fake, base_url = fake_telegram
    start_users(fake, [ADMIN])
    with throwaway_cluster(prefix="vpnd-health-") as cluster:
        dsn = cluster.create_database("health")
        with psycopg.connect(dsn, autocommit=True) as conn:
            migrate(conn, packaged_schema())
        config = bot_config(
            write_config,
            dsn,
            fake,
            base_url,
            workers={"health_interval": 0.3},
            database={"connect_timeout_seconds": 1.0, "pool_min": 1, "pool_max": 4},
        )
        async with running(config, outbox_settings=RETRY_SOON, workers=["health"], max_attempts=2) as services:
            app = services.app
            await trio.to_thread.run_sync(cluster.stop)
            registry = app.metrics.registry
            await poll_until(lambda: registry.get_sample_value("vpnd_health_check_ok", {"check": "database"}) == 0, 60)
            await more_rounds(app, 3)  # the outage lasts a few failing rounds
            await trio.to_thread.run_sync(cluster.start)
            await poll_until(lambda: len(admin_alerts(fake)) >= 2, 60)
            await more_rounds(app, 3)  # nothing else follows
            await wait_until_settled(dsn)
        alerts = admin_alerts(fake)
    assert len(alerts) == 2, alerts
    assert alerts[0].startswith("🚨 Health check database is failing")
    assert alerts[1].startswith("✅ Health check database recovered")
