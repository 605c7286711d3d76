"""Injected faults: which Bot API requests fail, and how (see :meth:`FakeTelegram.inject_fault`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import attrs
import trio

from vpnd_sandbox.telegram.wire import ApiError, BotReply, JSONDict, error_reply

if TYPE_CHECKING:
    from vpnd_sandbox.telegram.state import FakeTelegram

FaultKind = Literal["5xx", "429", "409", "timeout", "drop"]

CONFLICT_OTHER_POLL = (
    "Conflict: terminated by other getUpdates request; make sure that only one bot instance is running"
)


@attrs.define(eq=False)
class FaultRule:
    """One injected fault. A request matches when ``methods`` is None or contains its method (lowercase).

    It fires for the next ``remaining`` matching requests (None: unlimited), each with ``probability``,
    until Trio time ``until`` (None: no end). Rules are tried in injection order; the first firing wins.
    """

    kind: FaultKind
    methods: frozenset[str] | None
    remaining: int | None
    probability: float
    until: float | None
    retry_after: int
    hold_seconds: float
    fired: int = 0

    def to_json(self) -> JSONDict:
        return {
            "kind": self.kind,
            "methods": sorted(self.methods) if self.methods is not None else None,
            "remaining": self.remaining,
            "probability": self.probability,
            "until": self.until,
            "retry_after": self.retry_after,
            "hold_seconds": self.hold_seconds,
            "fired": self.fired,
        }


def pick_fault(fake: FakeTelegram, method: str) -> FaultRule | None:
    """The first rule that fires for `method` (lowercase), counted; spent and expired rules are dropped."""
    now = trio.current_time()
    fake.faults[:] = [
        r for r in fake.faults if (r.remaining is None or r.remaining > 0) and (r.until is None or now < r.until)
    ]
    for rule in fake.faults:
        if rule.methods is not None and method not in rule.methods:
            continue
        if rule.probability < 1.0 and fake._random.random() >= rule.probability:
            continue
        rule.fired += 1
        if rule.remaining is not None:
            rule.remaining -= 1
        return rule
    return None


async def fault_reply(fake: FakeTelegram, rule: FaultRule) -> BotReply:
    """What a fired rule answers: an error, or a broken connection (no body) — at once for ``drop``, after
    ``hold_seconds`` or :meth:`FakeTelegram.release_held_requests` for ``timeout``."""
    if rule.kind == "5xx":
        return error_reply(ApiError(502, "Bad Gateway"))
    if rule.kind == "429":
        return error_reply(
            ApiError(
                429,
                f"Too Many Requests: retry after {rule.retry_after}",
                {"retry_after": rule.retry_after},
            )
        )
    if rule.kind == "409":
        return error_reply(ApiError(409, CONFLICT_OTHER_POLL))
    if rule.kind == "timeout":
        with trio.move_on_after(rule.hold_seconds):
            await fake._release_held.wait()
    return BotReply(0, None)
