"""Maintenance mode, switched by an admin from the bot or `vpnd admin maintenance`: the change and its
`admin_audit` row in the caller's one transaction, like every admin action (`admin_actions`).

While it is on, users see a banner and cannot start a purchase, a trial, a pack or a promo code
(`vpnd.telegram.flows.maintenance`); what is already paid is still granted, existing keys keep
working (Xray and the subscription URL are untouched) and admins are never held back.
"""

from __future__ import annotations

from typing import Any

import psycopg

from vpnd.db import admin as admin_db
from vpnd.db import maintenance as maintenance_db
from vpnd.db.maintenance import Maintenance
from vpnd.services.admin_actions import Actor

#: The longest banner text an admin may set (it sits on top of the menu).
MAX_MESSAGE_CHARS = 500


def clean_message(message: str) -> str:
    """The banner text as stored: stripped; ValueError when it is too long or has control characters."""
    text = message.strip()
    if len(text) > MAX_MESSAGE_CHARS:
        raise ValueError(f"the message must be at most {MAX_MESSAGE_CHARS} characters, got {len(text)}")
    if any(ord(ch) < 32 and ch not in "\n\t" for ch in text):
        raise ValueError("the message must not contain control characters")
    return text


def switch(conn: psycopg.Connection[Any], actor: Actor, on: bool, message: str = "") -> Maintenance:
    """Turn maintenance on (with `message`, checked by `clean_message`) or off; audited."""
    text = clean_message(message) if on else ""
    previous = maintenance_db.read(conn)
    state = maintenance_db.write(conn, on, text, actor.admin_id)
    admin_db.audit(
        conn,
        actor.admin_id,
        "maintenance_on" if on else "maintenance_off",
        None,
        "ok",
        actor.details(message=text, was_on=previous.on),
    )
    return state


def status(conn: psycopg.Connection[Any]) -> Maintenance:
    return maintenance_db.read(conn)
