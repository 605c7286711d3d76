"""Support tickets: a user's message copied to the relay chat, and an admin's reply sent back.

A user's message is a `support_messages` row plus an outbox row to the relay chat (`submit`, one
transaction, so the copy exists if and only if the message was stored). When the outbox sender has
delivered the copy it records the id Telegram gave it (`note_relayed`); an admin's reply to that
message in the relay chat finds the ticket by it (`answer`) — a row, so it works after a restart.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable
from typing import Any

import attrs
import psycopg

from vpnd.db import conversation, outbox

#: The window of the per-user limit on messages to support.
RATE_WINDOW = dt.timedelta(hours=1)


@attrs.frozen
class Submitted:
    #: The new message's id (its reference "#id"); None when the user is over their limit.
    ticket_id: int | None
    #: Seconds until the user may write again (when refused).
    retry_after_seconds: int = 0


def submit(
    conn: psycopg.Connection[Any],
    user_id: int,
    body: str,
    *,
    relay_chat: int,
    per_hour: int,
    relay_text: Callable[[int], str],
) -> Submitted:
    """Store the user's message and queue its copy (`relay_text(ticket_id)`, HTML) to the relay chat,
    unless they sent `per_hour` messages in the last hour. Ends the "writing to support" state either way."""
    conversation.clear_state(conn, user_id)
    # One user's messages are counted one at a time (a second device cannot slip past the limit).
    conn.execute("SELECT 1 FROM users WHERE id = %s FOR UPDATE", (user_id,))
    row = conn.execute(
        "SELECT count(*), min(created_at), now() FROM (SELECT created_at FROM support_messages "
        "WHERE user_id = %s AND direction = 'user' AND created_at > now() - %s "
        "ORDER BY created_at DESC LIMIT %s) AS recent",
        (user_id, RATE_WINDOW, per_hour),
    ).fetchone()
    assert row is not None
    count, oldest, now = row
    if count >= per_hour:
        wait = (oldest + RATE_WINDOW - now).total_seconds()
        return Submitted(None, max(1, math.ceil(wait)))
    created = conn.execute(
        "INSERT INTO support_messages (user_id, direction, body, relay_chat_id) VALUES (%s, 'user', %s, %s) "
        "RETURNING id",
        (user_id, body, relay_chat),
    ).fetchone()
    assert created is not None
    ticket_id = int(created[0])
    outbox_id = outbox.enqueue_id(conn, relay_chat, relay_text(ticket_id), dedupe_key=f"support:{ticket_id}")
    conn.execute("UPDATE support_messages SET relay_outbox_id = %s WHERE id = %s", (outbox_id, ticket_id))
    return Submitted(ticket_id)


def note_relayed(conn: psycopg.Connection[Any], outbox_id: int, message_id: int) -> None:
    """The outbox delivered row `outbox_id` as `message_id`: if it was a relayed support message, remember
    which (a no-op for every other row; a small partial index keeps it cheap)."""
    conn.execute(
        "UPDATE support_messages SET relay_message_id = %s "
        "WHERE relay_outbox_id = %s AND relay_message_id IS NULL AND relay_outbox_id IS NOT NULL",
        (message_id, outbox_id),
    )


@attrs.frozen
class Answered:
    ticket_id: int
    user_id: int
    #: False when this reply was handled before (the same update again): nothing was sent twice.
    queued: bool


def answer(
    conn: psycopg.Connection[Any],
    relay_chat: int,
    relayed_message_id: int,
    reply_message_id: int,
    author_id: int,
    body: str,
    render: Callable[[str, int], str],
    confirm: Callable[[int], str],
) -> Answered | None:
    """An admin's reply (message `reply_message_id` in the relay chat) to the relayed copy
    `relayed_message_id`: store it, queue `render(user_language, ticket_id)` to the ticket's user and
    `confirm(ticket_id)` to the relay chat. None when that message is not a relayed ticket."""
    row = conn.execute(
        "SELECT s.id, s.user_id, u.language FROM support_messages s JOIN users u ON u.id = s.user_id "
        "WHERE s.relay_chat_id = %s AND s.relay_message_id = %s",
        (relay_chat, relayed_message_id),
    ).fetchone()
    if row is None:
        return None
    ticket_id, user_id, language = int(row[0]), int(row[1]), str(row[2])
    queued = outbox.enqueue(
        conn, user_id, render(language, ticket_id), dedupe_key=f"support-answer:{relay_chat}:{reply_message_id}"
    )
    if queued:
        conn.execute(
            "INSERT INTO support_messages (user_id, direction, body, author_id, answers_id) "
            "VALUES (%s, 'admin', %s, %s, %s)",
            (user_id, body, author_id, ticket_id),
        )
        outbox.enqueue(
            conn, relay_chat, confirm(ticket_id), dedupe_key=f"support-answered:{relay_chat}:{reply_message_id}"
        )
    return Answered(ticket_id, user_id, queued)


def answer_target(conn: psycopg.Connection[Any], relay_chat: int, relayed_message_id: int) -> bool:
    """Is `relayed_message_id` in the relay chat a relayed ticket?"""
    row = conn.execute(
        "SELECT 1 FROM support_messages WHERE relay_chat_id = %s AND relay_message_id = %s",
        (relay_chat, relayed_message_id),
    ).fetchone()
    return row is not None
