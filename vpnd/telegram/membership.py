"""Channel membership for the trial's `[trial] required_channel`: what counts as a member, and a cache.

Pure: no I/O. `is_member` reads a Bot API `ChatMember`; `MembershipCache` remembers *positive* answers for
a while, bounded in size, so pressing "Take the trial" again does not ask Telegram again. A negative answer
is never cached: the user was told to join and will press "Check again" right after doing so.
"""

from __future__ import annotations

import collections
from typing import Any

import attrs

#: Statuses of someone who is in the chat ("restricted" only while its `is_member` is true).
MEMBER_STATUSES = frozenset({"creator", "administrator", "member"})
#: At most this many users are remembered; the least recently confirmed go first.
CACHE_LIMIT = 10_000


def is_member(member: dict[str, Any]) -> bool:
    """A `ChatMember` of someone in the chat: member/administrator/creator, or restricted but still in it
    (`is_member`). "left" and "kicked" are not."""
    status = member.get("status")
    if status in MEMBER_STATUSES:
        return True
    return status == "restricted" and member.get("is_member") is True


def join_url(channel: str, invite_link: str) -> str:
    """Where the "Join" button leads: the invite link when configured (a private channel needs it), else
    the public channel's t.me address."""
    if invite_link:
        return invite_link
    return f"https://t.me/{channel.removeprefix('@')}"


def chat_param(channel: str) -> int | str:
    """`chat_id` for the Bot API: the numeric id as a number, "@username" as it is."""
    return int(channel) if channel.lstrip("-").isdigit() else channel


@attrs.define(eq=False)
class MembershipCache:
    """(channel, user id) pairs confirmed as members, with the time each confirmation stops counting (LRU,
    bounded). The channel is part of the key: after a reload names another channel, nobody counts as in it."""

    limit: int = CACHE_LIMIT
    _until: collections.OrderedDict[tuple[str, int], float] = attrs.field(factory=collections.OrderedDict, init=False)

    def confirmed(self, channel: str, user_id: int, now: float) -> bool:
        key = (channel, user_id)
        until = self._until.get(key)
        if until is None:
            return False
        if until <= now:
            del self._until[key]
            return False
        return True

    def remember(self, channel: str, user_id: int, now: float, ttl: float) -> None:
        if ttl <= 0:
            return
        key = (channel, user_id)
        self._until[key] = now + ttl
        self._until.move_to_end(key)
        while len(self._until) > self.limit:
            self._until.popitem(last=False)

    def __len__(self) -> int:
        return len(self._until)
