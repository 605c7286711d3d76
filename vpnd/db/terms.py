"""Terms of service acceptance: one row per user and accepted version (history kept), and the /start
argument that arrived before the terms were accepted (processed right after, so no referral is lost)."""

from __future__ import annotations

from typing import Any

import attrs
import psycopg


@attrs.frozen
class TermsStatus:
    #: The user has accepted the current version.
    accepted: bool
    #: The user has accepted some version before (a new one is "updated terms", not a first visit).
    accepted_before: bool


@attrs.frozen
class PendingStart:
    argument: str
    #: The /start that carried it was the user's first contact (a referral counts only then).
    first_contact: bool


def status(conn: psycopg.Connection[Any], user_id: int, version: str) -> TermsStatus:
    row = conn.execute(
        "SELECT coalesce(bool_or(version = %s), false), count(*) > 0 FROM terms_acceptances WHERE user_id = %s",
        (version, user_id),
    ).fetchone()
    return TermsStatus(bool(row and row[0]), bool(row and row[1]))


def accept(conn: psycopg.Connection[Any], user_id: int, version: str) -> PendingStart | None:
    """Record the acceptance of `version` (once: a repeated press keeps the first time) and hand back
    the /start argument that waited for it, if any (taken: it is processed once)."""
    conn.execute(
        "INSERT INTO terms_acceptances (user_id, version) VALUES (%s, %s) ON CONFLICT DO NOTHING", (user_id, version)
    )
    row = conn.execute(
        "DELETE FROM terms_pending_starts WHERE user_id = %s RETURNING argument, first_contact", (user_id,)
    ).fetchone()
    return PendingStart(row[0], row[1]) if row else None


def remember_start(conn: psycopg.Connection[Any], user_id: int, argument: str, first_contact: bool) -> None:
    """Keep a /start argument until the terms are accepted. A later one replaces it; "first contact"
    stays true once a /start of the first contact was kept (nothing else happened in between: the user
    could do nothing before accepting)."""
    conn.execute(
        "INSERT INTO terms_pending_starts (user_id, argument, first_contact) VALUES (%s, %s, %s) "
        "ON CONFLICT (user_id) DO UPDATE SET argument = EXCLUDED.argument, "
        "first_contact = terms_pending_starts.first_contact OR EXCLUDED.first_contact, created_at = now()",
        (user_id, argument, first_contact),
    )
