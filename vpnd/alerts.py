"""Admin alerts for incidents that no health probe sees: a broken Xray template, an Xray config file
that cannot be written, a REALITY key missing from the config, a spike of wrong promo codes.

An incident is a named state in `health_checks`, the table the health worker keeps for its probes,
so it gets the same rules (`vpnd.workers.health.record_observation`): the change to failing queues
one alert to every admin in the transaction that records it, the end of an alerted failure queues
one "recovered", and a failure is alerted at most once per `ALERT_EVERY`. Reporting the same state
again queues nothing, so callers may report on every round or every user request. The admin health
view lists these states with the probes'.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import psycopg

from vpnd.app import App
from vpnd.config import Config
from vpnd.texts import Texts
from vpnd.workers.health import Alert, record_observation

#: At most one "failing" alert per incident name per this long (the health worker's default).
ALERT_EVERY = dt.timedelta(hours=1)

#: Incident names (rows of `health_checks`).
XRAY_TEMPLATE = "xray_template"
XRAY_FILE = "xray_file"
XRAY_LINKS = "xray_links"
PROMO_GUESSING = "promo_guessing"
#: `[trial] required_channel` cannot be checked (the trial is granted without the check meanwhile).
TRIAL_CHANNEL = "trial_channel"


def record_incident(
    conn: psycopg.Connection[Any], texts: Texts, config: Config, name: str, ok: bool, detail: str
) -> Alert | None:
    """Record the incident's state in the caller's transaction; queue the alert it calls for."""
    return record_observation(
        conn,
        texts,
        name,
        ok,
        detail,
        admin_ids=config.telegram.admin_ids,
        default_language=config.telegram.default_language,
        every=ALERT_EVERY,
    )


async def report_incident(app: App, texts: Texts, name: str, ok: bool, detail: str) -> Alert | None:
    """Record the state in its own transaction (a queued alert wakes the outbox sender at commit)."""
    alert = await app.db.run(record_incident, texts, app.config, name, ok, detail)
    return alert
