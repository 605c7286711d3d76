"""The scheduled backup (`[backup].interval_hours`): a backup whenever the newest one is that old.

The round only looks at the backup folder, so a restart does not add a backup, and one made by
`vpnd backup` from cron counts too. A failed backup is logged and counted (`vpnd_backups{result}`);
the admins hear of it from the "backup" health check once the newest backup is too old
(`[backup].max_age_hours`). Cancelled on shutdown: pg_dump is killed and its partial file removed.
"""

from __future__ import annotations

import datetime as dt
import logging

from vpnd.app import App
from vpnd.logs import quote
from vpnd.services import backup

log = logging.getLogger("vpnd.workers.backup")

WORKER_NAME = "backup"
#: How often the folder is looked at (a backup is due at most this late).
CHECK_SECONDS = 300.0


def period(app: App) -> float:
    hours = app.config.backup.interval_hours
    return min(CHECK_SECONDS, hours * 3600) if hours > 0 else CHECK_SECONDS


async def backup_round(app: App) -> int:
    """Make a backup when one is due; 1 when it made one."""
    settings = app.config.backup
    if settings.interval_hours <= 0:
        return 0
    age, _ = backup.newest_age_seconds(settings.directory, dt.datetime.now(dt.UTC))
    if age is not None and age < settings.interval_hours * 3600:
        return 0
    try:
        result = await backup.create_backup(app.config.database.dsn, settings)
    except backup.BackupError as exc:
        app.metrics.backups.labels("failed").inc()
        log.error("event=backup_failed cause=%s", quote(str(exc)))
        return 0
    app.metrics.backups.labels("ok").inc()
    app.metrics.backup_age_seconds.set(0)
    log.info(
        "event=backup_done file=%s bytes=%d seconds=%.1f deleted=%d",
        result.file.path.name,
        result.file.size,
        result.seconds,
        len(result.deleted),
    )
    return 1
