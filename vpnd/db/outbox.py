"""The outbox: messages to users, written in the transaction that causes them.

`enqueue` is called from inside a transaction function (it gets the same connection), so the message
exists if and only if the state change committed. A dedupe key makes a second enqueue of the same
message a no-op (e.g. `reminder:<user>:<expires_at>:3d`). The outbox sender delivers rows after commit.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import psycopg
from psycopg.types.json import Jsonb


def enqueue(
    conn: psycopg.Connection[Any],
    chat_id: int,
    text: str,
    *,
    dedupe_key: str | None = None,
    reply_markup: dict[str, Any] | None = None,
    not_before: dt.datetime | None = None,
    method: str = "sendMessage",
    extra: dict[str, Any] | None = None,
) -> bool:
    """Queue a message (HTML text, optional inline keyboard); False when the dedupe key was used already."""
    payload: dict[str, Any] = {"text": text, "parse_mode": "HTML", **(extra or {})}
    if reply_markup is not None:
        payload["reply_markup"] = reply_markup
    row = conn.execute(
        "INSERT INTO outbox (chat_id, dedupe_key, method, payload, not_before) "
        "VALUES (%s, %s, %s, %s, coalesce(%s, now())) ON CONFLICT (dedupe_key) DO NOTHING RETURNING id",
        (chat_id, dedupe_key, method, Jsonb(payload), not_before),
    ).fetchone()
    return row is not None


def payload_json(payload: dict[str, Any]) -> str:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
