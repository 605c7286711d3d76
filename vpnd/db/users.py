"""Users: upsert from Telegram, language, referral codes, reachability. Functions take a connection."""

from __future__ import annotations

import datetime as dt
import secrets
from typing import Any

import attrs
import psycopg
from psycopg.rows import class_row

from vpnd.db.rows import one


@attrs.frozen
class User:
    id: int
    username: str | None
    first_name: str
    language: str
    language_chosen: bool
    referral_code: str
    referred_by: int | None
    balance_minor: int
    pending_promo_code: str | None
    reachable: bool
    #: When an admin banned them (None: not banned): the bot ignores them, Xray does not know them.
    banned_at: dt.datetime | None = None


USER_COLUMNS = (
    "id, username, first_name, language, language_chosen, referral_code, referred_by, balance_minor, "
    "pending_promo_code, reachable, banned_at"
)

UPSERT_USER = f"""
INSERT INTO users (id, username, first_name, language, referral_code)
VALUES (%(id)s, %(username)s, %(first_name)s, %(language)s, %(referral_code)s)
ON CONFLICT (id) DO UPDATE SET
    username = EXCLUDED.username,
    first_name = EXCLUDED.first_name,
    reachable = true,
    updated_at = now()
RETURNING {USER_COLUMNS}, (xmax = 0) AS created
"""

GET_USER = f"SELECT {USER_COLUMNS} FROM users WHERE id = %s"


@attrs.frozen
class UpsertResult:
    user: User
    created: bool


def new_referral_code() -> str:
    return secrets.token_urlsafe(6).replace("-", "x").replace("_", "y")


def upsert_user(
    conn: psycopg.Connection[Any], user_id: int, username: str | None, first_name: str, language: str
) -> UpsertResult:
    """Create the user or refresh their names; a new user's language comes from Telegram."""
    row = one(
        conn.execute(
            UPSERT_USER,
            {
                "id": user_id,
                "username": username,
                "first_name": first_name[:256],
                "language": language,
                "referral_code": new_referral_code(),
            },
        )
    )
    created = bool(row[-1])
    return UpsertResult(User(*row[:-1]), created)


def get_user(conn: psycopg.Connection[Any], user_id: int) -> User | None:
    with conn.cursor(row_factory=class_row(User)) as cur:
        return cur.execute(GET_USER, (user_id,)).fetchone()


def find_user(conn: psycopg.Connection[Any], query: str) -> User | None:
    """By numeric id or @username (case-insensitive)."""
    query = query.strip()
    if query.lstrip("-").isdecimal():
        return get_user(conn, int(query))
    with conn.cursor(row_factory=class_row(User)) as cur:
        return cur.execute(
            f"SELECT {USER_COLUMNS} FROM users WHERE lower(username) = lower(%s) LIMIT 1", (query.lstrip("@"),)
        ).fetchone()


def set_language(conn: psycopg.Connection[Any], user_id: int, language: str) -> None:
    conn.execute(
        "UPDATE users SET language = %s, language_chosen = true, updated_at = now() WHERE id = %s",
        (language, user_id),
    )


def record_referral(conn: psycopg.Connection[Any], referred_id: int, referral_code: str) -> int | None:
    """Record who invited a new user, once, never themselves; return the referrer's id if recorded."""
    row = conn.execute(
        """
        WITH referrer AS (SELECT id FROM users WHERE referral_code = %(code)s AND id <> %(referred)s)
        INSERT INTO referrals (referred_id, referrer_id)
        SELECT %(referred)s, id FROM referrer
        ON CONFLICT (referred_id) DO NOTHING
        RETURNING referrer_id
        """,
        {"code": referral_code, "referred": referred_id},
    ).fetchone()
    if row is None:
        return None
    conn.execute("UPDATE users SET referred_by = %s WHERE id = %s", (row[0], referred_id))
    return int(row[0])


@attrs.frozen
class ReferralStats:
    invited: int
    earned_minor: int


def referral_stats(conn: psycopg.Connection[Any], user_id: int) -> ReferralStats:
    row = one(
        conn.execute(
            """
            SELECT (SELECT count(*) FROM referrals WHERE referrer_id = %(id)s),
                   (SELECT coalesce(sum(delta_minor), 0) FROM balance_ledger
                     WHERE user_id = %(id)s AND reason = 'referral_reward')
            """,
            {"id": user_id},
        )
    )
    return ReferralStats(int(row[0]), int(row[1]))


def mark_unreachable(conn: psycopg.Connection[Any], user_id: int) -> None:
    conn.execute("UPDATE users SET reachable = false, updated_at = now() WHERE id = %s", (user_id,))


def mark_reachable(conn: psycopg.Connection[Any], user_id: int) -> None:
    """The user unblocked the bot: messages reach them again."""
    conn.execute("UPDATE users SET reachable = true, updated_at = now() WHERE id = %s", (user_id,))


def balance_and_pending_promo(conn: psycopg.Connection[Any], user_id: int) -> tuple[int, str | None] | None:
    """The user's balance (minor units) and the promo code they entered for their next purchase."""
    row = conn.execute("SELECT balance_minor, pending_promo_code FROM users WHERE id = %s", (user_id,)).fetchone()
    return None if row is None else (int(row[0]), row[1])


def languages_of(conn: psycopg.Connection[Any], user_ids: list[int]) -> dict[int, str]:
    """The language of each of `user_ids` that is a known user."""
    return dict(conn.execute("SELECT id, language FROM users WHERE id = ANY(%s)", (user_ids,)).fetchall())


def language_of(conn: psycopg.Connection[Any], user_id: int, default: str = "en") -> str:
    """The language a message to `user_id` is written in (their choice, or `default` for strangers)."""
    row = conn.execute("SELECT language FROM users WHERE id = %s", (user_id,)).fetchone()
    return str(row[0]) if row else default


@attrs.frozen
class BanChange:
    user: User
    #: False when the user already was in the asked state (nothing changed).
    changed: bool


def set_banned(
    conn: psycopg.Connection[Any], user_id: int, banned: bool, reason: str | None = None
) -> BanChange | None:
    """Ban or unban (None: no such user). A change also touches the user's subscription row, so the
    Xray writers' next delta (which reads subscriptions changed since its last pass) sees it; the
    trigger on `banned_at` wakes them at commit."""
    row = conn.execute(
        "UPDATE users SET banned_at = CASE WHEN %(banned)s THEN now() END, "
        "ban_reason = CASE WHEN %(banned)s THEN %(reason)s END, updated_at = now() "
        "WHERE id = %(id)s AND (banned_at IS NOT NULL) <> %(banned)s RETURNING id",
        {"id": user_id, "banned": banned, "reason": reason},
    ).fetchone()
    if row is not None:
        conn.execute("UPDATE subscriptions SET updated_at = now() WHERE user_id = %s", (user_id,))
    user = get_user(conn, user_id)
    return None if user is None else BanChange(user, row is not None)


def is_banned(conn: psycopg.Connection[Any], user_id: int) -> bool:
    row = conn.execute("SELECT banned_at IS NOT NULL FROM users WHERE id = %s", (user_id,)).fetchone()
    return bool(row and row[0])


def banned_ids(conn: psycopg.Connection[Any], limit: int = 1000) -> list[tuple[int, dt.datetime, str | None]]:
    """Banned users, most recent first: (id, banned at, reason)."""
    rows = conn.execute(
        "SELECT id, banned_at, ban_reason FROM users WHERE banned_at IS NOT NULL ORDER BY banned_at DESC LIMIT %s",
        (limit,),
    ).fetchall()
    return [(int(r[0]), r[1], r[2]) for r in rows]
