"""Every button of the admin menu, as one typed set: `Verb`.

A verb is a short code on the wire and a pattern its arguments must match. Buttons are built with
`Verb.X.data(...)` (which checks the arguments and the 64-byte limit) and every press is parsed with
`parse` (which refuses an unknown code or arguments of the wrong shape), so a handler only ever sees
arguments of the shape its verb declares: a forged or stale button never reaches one.
"""

from __future__ import annotations

import enum
import re

import attrs

from vpnd.telegram.admin import callback_data

_ID = r"-?\d{1,19}"
_NONCE = r"[0-9a-f]{8}"
_CODE = r"[A-Z0-9_-]{1,32}"
_GIFT = r"[A-Z2-9]{12}"
#: The audit viewer's one filter: "-" (none), a<action>, d<admin id> or t<target>.
_AUDIT_FILTER = r"(?:-|a[a-z_]{1,24}|d\d{1,19}|t[A-Za-z0-9_@.-]{1,24})"
_USER_FILTER = r"(?:all|active|expiring|expired|trial|paid|banned)"


class Verb(enum.Enum):
    """code, arguments pattern (what follows ``adm:<code>:``)."""

    MENU = ("", "")
    STATS = ("st", "")
    HEALTH = ("hl", "")
    NODES = ("nd", "")
    CANCEL = ("x", "")
    FIND_USER = ("fu", "")
    USER = ("u", _ID)
    GRANT = ("g", _ID)
    GRANT_CONFIRM = ("gc", rf"{_ID}:\d{{1,4}}:[01]:{_NONCE}")
    REVOKE = ("rv", _ID)
    REVOKE_CONFIRM = ("rvc", rf"{_ID}:{_NONCE}")
    REISSUE = ("rk", _ID)
    REISSUE_CONFIRM = ("rkc", rf"{_ID}:{_NONCE}")
    AUTO_RENEW = ("ar", rf"{_ID}:(?:on|off)")
    BAN = ("bn1", rf"{_ID}:(?:on|off)")
    BAN_CONFIRM = ("bnc", rf"{_ID}:(?:on|off):{_NONCE}")
    BALANCE = ("bal", _ID)
    BALANCE_CONFIRM = ("balc", rf"{_ID}:{_ID}:{_NONCE}")
    DEVICES = ("dv", _ID)
    DEVICES_RESET = ("dvr", _ID)
    DEVICES_RESET_CONFIRM = ("dvrc", rf"{_ID}:{_NONCE}")
    DEVICE_GRANT = ("dvg", _ID)
    DEVICE_GRANT_CONFIRM = ("dvgc", rf"{_ID}:{_NONCE}")
    PROMOS = ("pr", "")
    PROMO_NEW = ("pn", "")
    PROMO_DISABLE = ("pd", _CODE)
    EXPORT = ("ex", "users|payments")
    BROADCAST_COMPOSE = ("bc", "")
    BROADCAST_NO_BUTTON = ("bn", "")
    BROADCAST_SEGMENT = (
        "bs",
        r"(?:all|active|trial|nosub|neverpaid)|(?:expiring|expired|paid):\d{1,4}|(?:lang|plan):[A-Za-z0-9_-]{1,32}",
    )
    BROADCAST_START = ("bgo", _NONCE)
    BROADCAST_TEST = ("bt", _NONCE)
    BROADCAST_SCHEDULE = ("bsc", _NONCE)
    BROADCAST_VARIANT = ("bv", _NONCE)
    BROADCAST_REPORT = ("brp", r"\d{1,19}")
    BROADCASTS = ("bl", "")
    BROADCAST_PAUSE = ("bp", r"\d{1,19}")
    BROADCAST_RESUME = ("br", r"\d{1,19}")
    BROADCAST_CANCEL = ("bx", r"\d{1,19}")
    REFUND = ("rf", r"\d{1,19}")
    REFUND_CONFIRM = ("rfc", r"\d{1,19}")
    GIFT_REFUND = ("gfr", _GIFT)
    GIFT_REFUND_CONFIRM = ("gfrc", _GIFT)
    EXTEND_ALL = ("xa", "")
    EXTEND_ALL_CONFIRM = ("xac", rf"\d{{1,6}}:[01]:{_NONCE}")
    MAINTENANCE = ("mt", "")
    MAINTENANCE_ON = ("mton", "")
    MAINTENANCE_OFF = ("mtoff", "")
    ROTATE_KEYS = ("rot", "")
    ROTATE_KEYS_NEW = ("rotn", "")
    ROTATE_KEYS_START = ("rots", rf"[01]:{_NONCE}")
    ROTATE_KEYS_STEER = ("rotv", r"\d{1,19}:(?:pause|resume|cancel)")
    WITHDRAWAL_APPROVE = ("wda", r"\d{1,19}")
    WITHDRAWAL_REJECT = ("wdr", r"\d{1,19}")
    TRIAL_EXTEND = ("te", _ID)
    TRIAL_EXTEND_CONFIRM = ("tec", rf"{_ID}:[1-7]:{_NONCE}")
    USERS_FILTERS = ("ulf", "")
    USERS = ("ul", rf"{_USER_FILTER}:(?:-|[a-z]{{2}}):[ab]:\d{{1,19}}")
    AUDIT = ("au", rf"{_AUDIT_FILTER}:-?\d{{1,19}}")
    AUDIT_FILTER = ("auf", "")

    def __init__(self, code: str, args: str) -> None:
        self.code = code
        self.args = re.compile(args)

    def data(self, *args: object) -> str:
        """This verb's callback data with `args`; ValueError when they do not fit the verb or 64 bytes."""
        joined = callback_data.SEPARATOR.join(str(a) for a in args)
        if not self.args.fullmatch(joined):
            raise ValueError(f"{self.name} does not take {args!r}")
        return callback_data.encode(self.code, args)


_BY_CODE = {verb.code: verb for verb in Verb}


@attrs.frozen
class Press:
    """A parsed admin button press: its verb and its arguments (already of the verb's shape)."""

    verb: Verb
    args: tuple[str, ...]

    def number(self, index: int) -> int:
        return int(self.args[index])


def parse(data: str) -> Press | None:
    """The press `data` stands for; None for an unknown verb or arguments of the wrong shape."""
    parts = callback_data.split(data)
    if parts is None:
        return None
    code, args = parts
    verb = _BY_CODE.get(code)
    if verb is None or not verb.args.fullmatch(args):
        return None
    return Press(verb, tuple(args.split(callback_data.SEPARATOR)) if args else ())
