"""Plan limits as values: a subscription's traffic quota and device limit, usage levels, period bounds.

Pure functions, no I/O. The database side (periods, blocking, notices) is `vpnd.db.quota`; the limits
themselves always come from the running config (a reload that changes a plan applies to its subscribers).
"""

from __future__ import annotations

import calendar
import datetime as dt

import attrs

from vpnd.config import Config

#: Usage notices, in percent of the quota: each is sent once per period (100: the user was taken off).
LEVELS: tuple[int, ...] = (80, 95, 100)


@attrs.frozen
class Limits:
    """What a subscription of one plan may use (0: unlimited)."""

    plan_code: str | None
    #: Bytes per period.
    traffic_bytes: int = 0
    devices: int = 0
    #: "never", "monthly" or "per_period".
    reset: str = "never"
    #: The plan's days (the length of a "per_period" period).
    days: int = 30

    @property
    def limits_traffic(self) -> bool:
        return self.traffic_bytes > 0


UNLIMITED = Limits(None)


def limits_of(config: Config, plan_code: str | None, kind: str = "paid") -> Limits:
    """The limits of a subscription of `plan_code`; a trial without a plan code (before plans had limits)
    has the trial plan's; a plan no longer configured has none."""
    plan = config.plan(plan_code) if plan_code else (config.trial_plan if kind == "trial" else None)
    if plan is None:
        return UNLIMITED
    return Limits(plan.code, plan.traffic_limit_bytes, plan.devices, plan.traffic_reset, plan.days)


def usage_level(used: int, total: int) -> int:
    """The highest of `LEVELS` that `used` bytes reach of `total` (0: below all, or no quota)."""
    if total <= 0:
        return 0
    reached = 0
    for level in LEVELS:
        if used * 100 >= total * level:
            reached = level
    return reached


def add_months(when: dt.datetime, months: int) -> dt.datetime:
    """`when` plus whole calendar months, the day clamped to the month's last (Jan 31 + 1 = Feb 28/29)."""
    index = when.month - 1 + months
    year, month = when.year + index // 12, index % 12 + 1
    day = min(when.day, calendar.monthrange(year, month)[1])
    return when.replace(year=year, month=month, day=day)


def period_bounds(anchor: dt.datetime, limits: Limits, now: dt.datetime) -> tuple[dt.datetime, dt.datetime | None]:
    """The quota period that contains `now`, for periods counted from `anchor` (the subscription's start).

    "monthly": whole calendar months from the anchor (each counted from the anchor, so a 31st stays the
    31st where the month has one); "per_period": every `days` days; "never": one period from the anchor.
    A `now` before the anchor (clocks) is in the first period.
    """
    if limits.reset == "monthly":
        months = max(0, (now.year - anchor.year) * 12 + now.month - anchor.month)
        if months > 0 and add_months(anchor, months) > now:
            months -= 1  # this month's anniversary is still ahead
        return add_months(anchor, months), add_months(anchor, months + 1)
    if limits.reset == "per_period":
        length = dt.timedelta(days=max(1, limits.days))
        count = max(0, (now - anchor) // length)
        start = anchor + count * length
        return start, start + length
    return anchor, None


@attrs.frozen
class Usage:
    """A subscription's traffic in its current period, as shown to the user and to admins."""

    used: int
    #: The period's whole quota, packs and grants included (0: unlimited).
    total: int
    #: When the quota starts again (None: it never does, or there is no quota).
    resets_at: dt.datetime | None

    @property
    def unlimited(self) -> bool:
        return self.total <= 0


def current_usage(
    limits: Limits, anchor: dt.datetime, now: dt.datetime, period: tuple[int, int, dt.datetime | None] | None
) -> Usage:
    """The usage of a subscription that started at `anchor`, from its current period `(used bytes,
    extra bytes, ends_at)`; before its first period (no traffic yet) the bounds come from `anchor`."""
    if period is None:
        used, extra, ends_at = 0, 0, period_bounds(anchor, limits, now)[1]
    else:
        used, extra, ends_at = period
    if not limits.limits_traffic:
        return Usage(used, 0, None)
    return Usage(used, limits.traffic_bytes + extra, ends_at)


def format_bytes(count: int) -> str:
    """A byte count as people read it: "512 MB", "12.3 GB", "1.5 TB" (binary units)."""
    units = (("TB", 2**40), ("GB", 2**30), ("MB", 2**20), ("KB", 2**10))
    for name, size in units:
        if count >= size:
            value = count / size
            return f"{value:.1f} {name}".replace(".0 ", " ") if value < 100 else f"{value:.0f} {name}"
    return f"{count} B"
