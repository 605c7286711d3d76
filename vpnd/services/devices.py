"""Devices: the check a subscription fetch passes, what a user sees of their devices, the admins' actions.

The limit of a subscription is its plan's `devices` (0: unlimited, from the running config, so a reload
applies) plus the slots an admin granted (`subscriptions.extra_devices`). Each function here is a plain
transaction body (`await db.run(fn, ...)`, or the admin CLI's one transaction).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any, ClassVar

import attrs
import psycopg

from vpnd.db import admin as admin_db
from vpnd.db import devices as devices_db
from vpnd.db.devices import Admission, Device
from vpnd.db.quota import usage_of
from vpnd.db.subscriptions import Subscription, get_subscription
from vpnd.db.users import get_user
from vpnd.db.xray_state import subscription_by_token
from vpnd.devices import DeviceInfo, device_key
from vpnd.quota import Limits
from vpnd.services.admin_actions import Actor, NoSubscription, Refused, UserNotFound

Conn = psycopg.Connection[Any]
LimitsFor = Callable[[str | None, str], Limits]

#: The most device slots one admin grant may add (and the most extra slots a subscription may have).
MAX_GRANT_DEVICES = 100


@attrs.frozen
class Fetch:
    """What a subscription fetch serves: the subscription, the numbers of `Subscription-Userinfo`, and
    whether this device may have the links."""

    subscription: Subscription
    upload: int
    download: int
    #: The period's quota in bytes (0: unlimited).
    total: int
    #: Over the traffic quota: no links until a pack, a grant or the next period.
    traffic_blocked: bool
    #: The device check (None: not made — no device id sent, or nothing to serve anyway).
    admission: Admission | None
    #: The user's language (None: not chosen), for the profile's title.
    language: str | None = None
    #: When the traffic quota starts again (None: never, or no quota).
    resets_at: dt.datetime | None = None
    #: The device limit: plan + extra (0: unlimited).
    device_limit: int = 0


def fetch_subscription(
    conn: Conn, token: str, device: DeviceInfo | None, limits_for: LimitsFor, now: dt.datetime
) -> Fetch | None:
    """The subscription behind `token` as `device` may see it (None: no such token).

    Traffic: the current quota period's used bytes. Xray counts up- and downlink apart but a period
    stores one sum, so the period's bytes are reported as download and upload as 0 (apps add the two
    for "used"). A subscription without a period yet (older than quotas) reports its lifetime totals.
    """
    usage = subscription_by_token(conn, token)
    if usage is None:
        return None
    sub = usage.subscription
    limits = limits_for(sub.plan_code, sub.kind)
    view = usage_of(conn, sub.user_id, limits)
    if view.period is not None:
        upload, download = 0, view.used_bytes
    else:
        upload, download = usage.traffic.uplink, usage.traffic.downlink
    admission = None
    if device is not None and sub.is_active(now) and not view.blocked:
        admission = devices_db.admit_device(conn, sub.user_id, device, limits.devices)
    user = get_user(conn, sub.user_id)
    language = user.language if user is not None else None
    device_limit = limits.devices + view.extra_devices if limits.devices else 0
    return Fetch(
        sub, upload, download, view.total_bytes, view.blocked, admission, language, view.resets_at, device_limit
    )


@attrs.frozen
class AccountFetch:
    """What the account page (the subscription URL opened in a browser) shows."""

    fetch: Fetch
    #: Devices holding a slot.
    devices_used: int


def fetch_account(conn: Conn, token: str, limits_for: LimitsFor, now: dt.datetime) -> AccountFetch | None:
    """The subscription behind `token` for its account page (None: no such token). A browser is not a
    device: the fetch is made without one, so it never takes a slot nor counts as a device's fetch."""
    fetch = fetch_subscription(conn, token, None, limits_for, now)
    if fetch is None:
        return None
    return AccountFetch(fetch, devices_db.count_devices(conn, fetch.subscription.user_id))


@attrs.frozen
class DevicesView:
    """A user's devices with their limit (0: unlimited), for the bot and the admins."""

    user_id: int
    devices: list[Device]
    #: The device limit: plan + extra (0: unlimited).
    limit: int
    #: Slots granted by admins.
    extra: int
    has_subscription: bool

    @property
    def used(self) -> int:
        return len(self.devices)


def devices_view(conn: Conn, user_id: int, limits_for: LimitsFor) -> DevicesView:
    sub = get_subscription(conn, user_id)
    extra = devices_db.extra_devices(conn, user_id)
    plan_devices = limits_for(sub.plan_code, sub.kind).devices if sub is not None else 0
    limit = plan_devices + extra if plan_devices > 0 else 0
    return DevicesView(user_id, devices_db.list_devices(conn, user_id), limit, extra, sub is not None)


def remove_own_device(conn: Conn, user_id: int, key: str) -> Device | None:
    """Remove the device of `user_id` whose `device_key` is `key` (from a button); None when the user has
    none such. Only the user's own devices are looked at, so a crafted key removes nothing of anyone else's."""
    for device in devices_db.list_devices(conn, user_id):
        if device_key(device.hwid) == key:
            devices_db.remove_device(conn, user_id, device.hwid)
            return device
    return None


# --- admin actions (audited like those of `vpnd.services.admin_actions`) ---------------------------


@attrs.frozen
class AlreadyDone(Refused):
    """The confirmation button (its nonce) was used already: nothing changed (not audited again)."""

    reason: ClassVar[str] = "repeated"


def _audit(
    conn: Conn, actor: Actor, action: str, target: int, result: str = "ok", nonce: str | None = None, **facts: Any
) -> None:
    details = actor.details(**facts, **({"nonce": nonce} if nonce is not None else {}))
    admin_db.audit(conn, actor.admin_id, action, target, result, details)


def admin_devices(conn: Conn, actor: Actor, user_id: int, limits_for: LimitsFor) -> DevicesView | UserNotFound:
    """A user's devices and limit (read-only, audited like `lookup`)."""
    if admin_db.lock_user(conn, user_id) is None:
        _audit(conn, actor, "devices", user_id, UserNotFound.reason)
        return UserNotFound(user_id)
    _audit(conn, actor, "devices", user_id)
    return devices_view(conn, user_id, limits_for)


def reset_devices(
    conn: Conn, actor: Actor, user_id: int, *, nonce: str | None = None
) -> int | UserNotFound | AlreadyDone:
    """Forget every device of the user (each app takes a slot again at its next fetch); how many. Once
    per `nonce` (a confirmation button's)."""
    if nonce is not None and admin_db.nonce_used(conn, nonce):
        return AlreadyDone(user_id)
    if admin_db.lock_user(conn, user_id) is None:
        _audit(conn, actor, "devices_reset", user_id, UserNotFound.reason)
        return UserNotFound(user_id)
    removed = devices_db.reset_devices(conn, user_id)
    _audit(conn, actor, "devices_reset", user_id, nonce=nonce, removed=removed)
    return removed


def grant_devices(
    conn: Conn, actor: Actor, user_id: int, count: int, *, nonce: str | None = None
) -> int | UserNotFound | NoSubscription | AlreadyDone:
    """Add `count` device slots to the user's subscription (on top of the plan's); the extra slots now.
    Once per `nonce` (a confirmation button's)."""
    if not 1 <= count <= MAX_GRANT_DEVICES:
        raise ValueError(f"the number of device slots must be from 1 to {MAX_GRANT_DEVICES}")
    if nonce is not None and admin_db.nonce_used(conn, nonce):
        return AlreadyDone(user_id)
    if admin_db.lock_user(conn, user_id) is None:
        _audit(conn, actor, "grant_device", user_id, UserNotFound.reason, count=count)
        return UserNotFound(user_id)
    if devices_db.extra_devices(conn, user_id) + count > MAX_GRANT_DEVICES:
        raise ValueError(f"a subscription may have at most {MAX_GRANT_DEVICES} extra device slots")
    extra = devices_db.add_extra_devices(conn, user_id, count)
    if extra is None:
        _audit(conn, actor, "grant_device", user_id, NoSubscription.reason, count=count)
        return NoSubscription(user_id)
    _audit(conn, actor, "grant_device", user_id, nonce=nonce, count=count, extra_devices=extra)
    return extra
