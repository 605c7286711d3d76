"""The admin menu's callback data on the wire: ``adm`` or ``adm:<code>[:<arg>...]``, at most 64 bytes.

Telegram refuses a button whose `callback_data` is over 64 bytes, so every piece of data is checked
when it is built (`encode`), long before a user could press it. The router splits data on ``:`` and
hands the admin menu everything after ``adm``; `join` puts it back together for parsing and logs.
"""

from __future__ import annotations

from collections.abc import Sequence

from vpnd.telegram.keyboards import MAX_CALLBACK_BYTES

#: The router's verb for every admin button.
PREFIX = "adm"
SEPARATOR = ":"


class TooLong(ValueError):
    """Callback data over Telegram's 64 bytes."""


def encode(code: str, args: Sequence[object] = ()) -> str:
    data = SEPARATOR.join([PREFIX, *([code] if code else []), *(str(a) for a in args)])
    if len(data.encode()) > MAX_CALLBACK_BYTES:
        raise TooLong(f"callback data over {MAX_CALLBACK_BYTES} bytes: {data!r}")
    return data


def join(parts: Sequence[str]) -> str:
    """The data of a press whose parts after ``adm`` the router passed on (for parsing and audit)."""
    return SEPARATOR.join([PREFIX, *parts])


def split(data: str) -> tuple[str, str] | None:
    """(code, the arguments as one string) of admin data; None when it is not admin data."""
    prefix, _, rest = data.partition(SEPARATOR)
    if prefix != PREFIX or len(data.encode()) > MAX_CALLBACK_BYTES:
        return None
    code, _, args = rest.partition(SEPARATOR)
    return code, args
