"""The Xray config file: always mode 0640 (it holds every user's UUID), and its failures reach the admins.

Through the daemon's own writer (`run_xray`) against the fake Xray and a real PostgreSQL; alerts are
what the outbox would deliver to the admin.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import psycopg

from tests.xray.test_xray_writer import fake, make_config, running_writer, until  # noqa: F401 (fixtures)
from vpnd.db.users import upsert_user

ADMIN = 42


def mode(path: Path) -> int:
    return os.stat(path).st_mode & 0o7777


async def test_config_file_is_0640_whatever_mode_it_had(fake, make_config: Callable[..., Path]) -> None:  # noqa: F811
    config_file = make_config(fake.address)
    async with running_writer(config_file) as s:
        await until(lambda: s.status.file_current)
        assert mode(s.config_path) == 0o640
        await s.grant(1)
        await until(lambda: "u1" in s.file_clients())
    # Someone loosened the mode (or an old vpnd wrote it so): the next writer tightens it again,
    # both when it writes new content and when the content is already right.
    os.chmod(s.config_path, 0o644)
    async with running_writer(config_file) as s:
        await until(lambda: s.status.file_current)
        assert mode(s.config_path) == 0o640
        await s.grant(2)
        await until(lambda: "u2" in s.file_clients())
        assert mode(s.config_path) == 0o640
    os.chmod(s.config_path, 0o666)
    async with running_writer(config_file) as s:
        await until(lambda: s.status.file_current)
        assert mode(s.config_path) == 0o640


def admin_alerts(dsn: str) -> list[str]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT payload->>'text' FROM outbox WHERE chat_id = %s ORDER BY id", (ADMIN,)).fetchall()
    return [row[0] for row in rows]


async def test_broken_template_and_unwritable_file_alert_admins_once_per_incident(
    fake,  # noqa: F811
    make_config: Callable[..., Path],  # noqa: F811
    write_config: Callable[..., Path],
    db_dsn: str,
    tmp_path: Path,
) -> None:
    config_file = make_config(fake.address)
    text = config_file.read_text() + f"\n[telegram]\nadmin_ids = [{ADMIN}]\n"
    config_file.write_text(text)
    with psycopg.connect(db_dsn) as conn:
        upsert_user(conn, ADMIN, "admin", "Admin", "en")
    template = tmp_path / "template.json"
    good_template = template.read_text()

    async with running_writer(config_file) as s:
        await until(lambda: s.status.file_current)
        assert admin_alerts(db_dsn) == []  # all well: nothing to say

        template.write_text(good_template.replace('"inbounds"', '"inbounds" oops', 1))  # not JSON any more
        await s.round_done()
        await until(lambda: "template" in s.status.problems)
        await until(lambda: len(admin_alerts(db_dsn)) == 1)
        for _ in range(3):  # the incident goes on: rounds come and go, no new alert
            await s.round_done()
        alerts = admin_alerts(db_dsn)
        assert len(alerts) == 1, alerts
        assert "xray_template" in alerts[0] and "not valid JSON" in alerts[0] and str(template) in alerts[0]

        template.write_text(good_template)  # fixed: one "recovered"
        await s.round_done()
        await until(lambda: "template" not in s.status.problems)
        await until(lambda: len(admin_alerts(db_dsn)) == 2)
        assert "recovered" in admin_alerts(db_dsn)[1]

        # The file cannot be written (a directory stands where it should be).
        await s.grant(1)
        s.config_path.unlink()
        s.config_path.mkdir()
        await s.round_done()
        await until(lambda: "file" in s.status.problems)
        await until(lambda: len(admin_alerts(db_dsn)) == 3)
        for _ in range(3):
            await s.round_done()
        alerts = admin_alerts(db_dsn)
        assert len(alerts) == 3 and "xray_file" in alerts[2] and "cannot write" in alerts[2], alerts
        s.config_path.rmdir()
        s.app.xray_changed.nudge()
        await until(lambda: "u1" in s.file_clients(), timeout=40)
        await until(lambda: len(admin_alerts(db_dsn)) == 4, timeout=20)
        assert "xray_file" in admin_alerts(db_dsn)[3] and "recovered" in admin_alerts(db_dsn)[3]
        assert json.loads(s.config_path.read_text())  # whole and parseable
