"""The pure quota arithmetic (vpnd.quota): usage levels, calendar months, period bounds, byte counts."""

from __future__ import annotations

import datetime as dt

import pytest

from vpnd.quota import Limits, add_months, format_bytes, period_bounds, usage_level

UTC = dt.UTC
GIB = 2**30


def at(*parts: int) -> dt.datetime:
    return dt.datetime(*parts, tzinfo=UTC)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("used", "total", "level"),
    [
        (0, 100, 0),
        (79, 100, 0),
        (80, 100, 80),
        (94, 100, 80),
        (95, 100, 95),
        (99, 100, 95),
        (100, 100, 100),
        (10**15, 100, 100),
        # exact at the byte: 80 % of 1 GiB is 858993459.2 bytes
        (858_993_459, GIB, 0),
        (858_993_460, GIB, 80),
        (GIB - 1, GIB, 95),
        (GIB, GIB, 100),
        # no quota: never a level, however much was used
        (10**15, 0, 0),
        (5, -1, 0),
    ],
)
def test_usage_level_boundaries(used: int, total: int, level: int) -> None:
    assert usage_level(used, total) == level


def test_add_months_clamps_to_the_months_last_day() -> None:
    jan31 = at(2025, 1, 31, 12, 30)
    assert add_months(jan31, 1) == at(2025, 2, 28, 12, 30)
    assert add_months(at(2024, 1, 31, 12, 30), 1) == at(2024, 2, 29, 12, 30)  # leap year
    # counted from the anchor, the 31st comes back where the month has one
    assert add_months(jan31, 2) == at(2025, 3, 31, 12, 30)
    assert add_months(jan31, 3) == at(2025, 4, 30, 12, 30)
    assert add_months(jan31, 11) == at(2025, 12, 31, 12, 30)
    assert add_months(jan31, 12) == at(2026, 1, 31, 12, 30)
    assert add_months(jan31, 13) == at(2026, 2, 28, 12, 30)
    assert add_months(at(2025, 12, 15), 1) == at(2026, 1, 15)
    assert add_months(at(2025, 3, 31), -1) == at(2025, 2, 28)
    assert add_months(jan31, 0) == jan31


MONTHLY = Limits("m", traffic_bytes=GIB, reset="monthly")
PER_PERIOD = Limits("p", traffic_bytes=GIB, reset="per_period", days=30)
NEVER = Limits("n", traffic_bytes=GIB, reset="never")


def test_monthly_periods_from_a_31st_anchor() -> None:
    anchor = at(2025, 1, 31, 10)
    assert period_bounds(anchor, MONTHLY, at(2025, 1, 31, 10)) == (anchor, at(2025, 2, 28, 10))
    assert period_bounds(anchor, MONTHLY, at(2025, 2, 28, 9, 59)) == (anchor, at(2025, 2, 28, 10))
    assert period_bounds(anchor, MONTHLY, at(2025, 2, 28, 10)) == (at(2025, 2, 28, 10), at(2025, 3, 31, 10))
    assert period_bounds(anchor, MONTHLY, at(2025, 3, 15)) == (at(2025, 2, 28, 10), at(2025, 3, 31, 10))
    assert period_bounds(anchor, MONTHLY, at(2025, 3, 31, 10)) == (at(2025, 3, 31, 10), at(2025, 4, 30, 10))
    # a long gap (the worker was down for most of a year): the period that contains now, not the next one
    assert period_bounds(anchor, MONTHLY, at(2025, 11, 30, 11)) == (at(2025, 11, 30, 10), at(2025, 12, 31, 10))
    assert period_bounds(anchor, MONTHLY, at(2025, 12, 31, 9)) == (at(2025, 11, 30, 10), at(2025, 12, 31, 10))
    assert period_bounds(anchor, MONTHLY, at(2028, 2, 29, 10)) == (at(2028, 2, 29, 10), at(2028, 3, 31, 10))


def test_monthly_period_always_contains_now() -> None:
    anchor = at(2024, 1, 31, 23, 59, 59)
    now = anchor
    while now < at(2026, 6, 1):
        start, end = period_bounds(anchor, MONTHLY, now)
        assert end is not None and start <= now < end, now
        assert (end - start) >= dt.timedelta(days=28)
        now += dt.timedelta(hours=7, minutes=13)


def test_monthly_now_before_the_anchor_is_the_first_period() -> None:
    anchor = at(2025, 5, 10)
    assert period_bounds(anchor, MONTHLY, at(2025, 5, 9)) == (anchor, at(2025, 6, 10))
    assert period_bounds(anchor, MONTHLY, at(2025, 4, 20)) == (anchor, at(2025, 6, 10))
    assert period_bounds(anchor, PER_PERIOD, at(2025, 4, 20)) == (anchor, at(2025, 6, 9))


def test_per_period_every_plan_days() -> None:
    anchor = at(2025, 1, 31, 10)
    day30 = dt.timedelta(days=30)
    assert period_bounds(anchor, PER_PERIOD, anchor) == (anchor, anchor + day30)
    assert period_bounds(anchor, PER_PERIOD, anchor + day30 - dt.timedelta(microseconds=1)) == (anchor, anchor + day30)
    assert period_bounds(anchor, PER_PERIOD, anchor + day30) == (anchor + day30, anchor + 2 * day30)
    # a long gap: the period that contains now
    now = anchor + 400 * dt.timedelta(days=1)
    assert period_bounds(anchor, PER_PERIOD, now) == (anchor + 13 * day30, anchor + 14 * day30)
    one_day = Limits("d", traffic_bytes=GIB, reset="per_period", days=1)
    assert period_bounds(anchor, one_day, anchor + dt.timedelta(days=2, hours=1)) == (
        anchor + dt.timedelta(days=2),
        anchor + dt.timedelta(days=3),
    )
    # a plan with 0 days (never valid config, but never a division by zero either)
    zero = Limits("z", traffic_bytes=GIB, reset="per_period", days=0)
    assert period_bounds(anchor, zero, anchor + dt.timedelta(hours=25)) == (
        anchor + dt.timedelta(days=1),
        anchor + dt.timedelta(days=2),
    )


def test_never_is_one_period_from_the_anchor() -> None:
    anchor = at(2025, 1, 31, 10)
    assert period_bounds(anchor, NEVER, anchor) == (anchor, None)
    assert period_bounds(anchor, NEVER, at(2030, 1, 1)) == (anchor, None)


@pytest.mark.parametrize(
    ("count", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1 KB"),
        (1536, "1.5 KB"),
        (512 * 2**20, "512 MB"),
        (2**30 - 1, "1024 MB"),
        (2**30, "1 GB"),
        (int(12.34 * 2**30), "12.3 GB"),
        (100 * 2**30, "100 GB"),
        (int(99.5 * 2**30), "99.5 GB"),
        (1000 * 2**30, "1000 GB"),
        (int(1.5 * 2**40), "1.5 TB"),
        (3 * 2**40, "3 TB"),
    ],
)
def test_format_bytes(count: int, text: str) -> None:
    assert format_bytes(count) == text
