"""The workers' pure rules: reminder stages, trial notices, health alerts, outbox backoff."""

from __future__ import annotations

import datetime as dt

from vpnd.nurseries.outbox import OutboxSettings, retry_delay
from vpnd.workers.common import instant_key
from vpnd.workers.health import Recorded, alert_decision
from vpnd.workers.reminders import dedupe_key, reminder_stage
from vpnd.workers.trials import trial_notice

H = dt.timedelta(hours=1)
D = dt.timedelta(days=1)
T0 = dt.datetime(2025, 3, 1, 12, 0, tzinfo=dt.UTC)


def test_reminder_stage_is_the_closest_one() -> None:
    def stage(left: dt.timedelta) -> str | None:
        found = reminder_stage(left)
        return found.code if found else None

    assert stage(4 * D) is None
    assert stage(3 * D) == "3d"
    assert stage(2 * D + 23 * H) == "3d"
    assert stage(D) == "1d"
    assert stage(20 * H) == "1d"
    assert stage(3 * H) == "3h"
    assert stage(dt.timedelta(minutes=5)) == "3h"
    assert stage(dt.timedelta(0)) is None
    assert stage(-H) is None


def test_reminder_key_holds_the_instant_whatever_the_zone() -> None:
    moscow = dt.timezone(dt.timedelta(hours=3))
    stage = reminder_stage(2 * D)
    assert stage is not None
    assert dedupe_key(7, T0, stage) == dedupe_key(7, T0.astimezone(moscow), stage)
    assert dedupe_key(7, T0, stage) != dedupe_key(7, T0 + dt.timedelta(microseconds=1), stage)
    assert instant_key(T0) == "2025-03-01T12:00:00.000000Z"


def test_trial_notices_follow_the_trial() -> None:
    start, end = T0, T0 + 3 * D

    def notice(at: dt.timedelta, paid: bool = False) -> str | None:
        return trial_notice(start, end, start + at, paid=paid)

    assert notice(H) is None
    assert notice(D + H) == "checkin"
    assert notice(2 * D + H) == "ends_soon"
    assert notice(3 * D + H) == "ended"
    assert notice(3 * D + H, paid=True) is None
    assert notice(D + H, paid=True) is None
    assert notice(7 * D) is None  # ended long ago: not announced on a first deployment


def test_short_trials_scale_their_marks() -> None:
    start, end = T0, T0 + D  # a one-day trial: check-in after 8 h, "ends soon" 8 h before the end
    assert trial_notice(start, end, start + 7 * H, paid=False) is None
    assert trial_notice(start, end, start + 9 * H, paid=False) == "checkin"
    assert trial_notice(start, end, start + 17 * H, paid=False) == "ends_soon"


def test_health_alerts_once_per_failure_and_once_per_recovery() -> None:
    every = H
    state: Recorded | None = None
    sent: list[tuple[float, str]] = []

    def observe(minutes: float, ok: bool) -> None:
        nonlocal state
        now = T0 + dt.timedelta(minutes=minutes)
        since, alert = alert_decision(state, ok, now, every)
        last = state.last_alert_at if state else None
        state = Recorded(ok, since, now if alert else last)
        if alert:
            sent.append((minutes, alert))

    observe(0, True)  # first sight, healthy: nothing to say
    observe(1, False)  # failing → alert
    observe(2, False)  # still failing → quiet
    observe(3, True)  # recovered → one recovery message
    observe(4, True)
    observe(10, False)  # flaps within the hour: quiet
    observe(11, True)  # the failure was never alerted: no recovery either
    observe(20, False)  # fails again within the hour: quiet …
    observe(64, False)  # … until the hour since the last alert is over, if it still fails
    observe(65, False)
    observe(70, True)  # its recovery follows
    assert sent == [(1, "failing"), (3, "recovered"), (64, "failing"), (70, "recovered")]


def test_health_first_observation_failing_alerts() -> None:
    since, alert = alert_decision(None, False, T0, H)
    assert (since, alert) == (T0, "failing")


def test_outbox_backoff_grows_to_a_cap() -> None:
    settings = OutboxSettings(retry_base=30, retry_cap=300)
    assert [retry_delay(n, settings) for n in (1, 2, 3, 4, 5, 6)] == [30, 60, 120, 240, 300, 300]
