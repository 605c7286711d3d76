"""Device identification as client apps send it with a subscription fetch, as bounded values. Pure.

Happ, v2RayTun and other apps (the convention Happ set and Remnawave follows) send `x-hwid` (a stable
device id), `x-device-os`, `x-ver-os`, `x-device-model` and their `User-Agent`. Everything here is
untrusted: an id that is not a short run of printable ASCII is refused (`BadDeviceId`); the descriptive
headers are stripped of control characters and cut to a sane length, never refused.
"""

from __future__ import annotations

import hashlib
import re
from typing import Protocol

import attrs

#: The longest device id accepted (Happ's are 16-64 characters; a UUID is 36).
MAX_HWID = 128
#: Lengths kept of the descriptive headers.
MAX_OS = 32
MAX_OS_VERSION = 32
MAX_MODEL = 64
MAX_USER_AGENT = 200

_HWID = re.compile(r"[\x21-\x7e]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


@attrs.frozen
class DeviceInfo:
    """What a client app says about itself, cleaned and bounded (`read_device`)."""

    hwid: str
    os: str = ""
    os_version: str = ""
    model: str = ""
    user_agent: str = ""


class Described(Protocol):
    @property
    def hwid(self) -> str: ...
    @property
    def os(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def user_agent(self) -> str: ...


class BadDeviceId(ValueError):
    """The `x-hwid` header is not a device id (too long, or not printable ASCII)."""


def _text(raw: str | None, limit: int) -> str:
    """A header as text: its bytes (HTTP gives them as latin-1) read as UTF-8 where they are, control
    characters dropped, whitespace trimmed, cut to `limit` characters."""
    if not raw:
        return ""
    try:
        text = raw.encode("latin-1").decode("utf-8", errors="replace")
    except UnicodeEncodeError:
        text = raw
    return _CONTROL.sub("", text).strip()[:limit].strip()


def read_device(
    hwid: str | None, os: str | None, os_version: str | None, model: str | None, user_agent: str | None
) -> DeviceInfo | None:
    """The device a request describes; None when it sent no device id (or an empty one).

    Raises `BadDeviceId` for an id that is over `MAX_HWID` characters or not printable ASCII.
    """
    if hwid is None or not hwid.strip():
        return None
    hwid = hwid.strip()
    if len(hwid) > MAX_HWID or not _HWID.fullmatch(hwid):
        raise BadDeviceId(f"x-hwid must be 1 to {MAX_HWID} printable ASCII characters")
    return DeviceInfo(
        hwid=hwid,
        os=_text(os, MAX_OS),
        os_version=_text(os_version, MAX_OS_VERSION),
        model=_text(model, MAX_MODEL),
        user_agent=_text(user_agent, MAX_USER_AGENT),
    )


def device_name(device: Described) -> str:
    """What to call a device: its model, else its OS, else its app (user agent), else its id's start."""
    return device.model or device.os or device.user_agent[:40] or f"#{device.hwid[:8]}"


def device_key(hwid: str) -> str:
    """A short handle of a device id for callback data (64 bytes at most there): 12 hex digits of its
    SHA-256. Only ever matched against the acting user's own devices."""
    return hashlib.sha256(hwid.encode()).hexdigest()[:12]
