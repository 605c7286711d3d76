"""Referral levels, earnings and withdrawal requests. Functions take a connection.

A referrer's level counts their *paying* referrals: referred users with at least one paid purchase that
is not a top-up (a top-up of the least amount would otherwise buy a level). The earnings bucket itself is
kept by `vpnd.db.ledger.record`; here it is read, and held for a withdrawal.

A withdrawal request takes all of the user's withdrawable earnings off the balance at once (ledger reason
`withdrawal`, reference `withdrawal:<id>`), so what is held cannot be spent while the request waits. An
approval records the payout: the request turns `approved` exactly once (a conditional update under the
request's row lock), the held ledger row being the payout. A rejection gives the amount back to the
balance and to the earnings (`withdrawal_released`, once per request).
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

import attrs
import psycopg
from psycopg.rows import class_row

from vpnd.db import ledger
from vpnd.db.rows import one

WithdrawalStatus = Literal["pending", "approved", "rejected"]
STATUSES: tuple[WithdrawalStatus, ...] = ("pending", "approved", "rejected")
#: The longest payout details (a wallet address, a card number, a few words) a request keeps.
MAX_DETAILS = 200
#: The longest note an admin may add to a decision.
MAX_NOTE = 200


@attrs.frozen
class Withdrawal:
    id: int
    user_id: int
    amount_minor: int
    currency: str
    details: str
    status: WithdrawalStatus
    note: str | None
    decided_by: int | None
    created_at: dt.datetime
    decided_at: dt.datetime | None


_COLUMNS = "id, user_id, amount_minor, currency, details, status, note, decided_by, created_at, decided_at"


@attrs.frozen
class InviteFacts:
    """What the invite screen shows."""

    invited: int
    paying: int
    earned_minor: int
    withdrawable_minor: int
    pending: Withdrawal | None


def reference(withdrawal_id: int) -> str:
    return f"withdrawal:{withdrawal_id}"


def paying_referrals(conn: psycopg.Connection[Any], referrer_id: int) -> int:
    """How many of the referrer's referred users have paid at least once (a top-up does not count)."""
    row = one(
        conn.execute(
            """
            SELECT count(*) FROM referrals r
            WHERE r.referrer_id = %s
              AND EXISTS (SELECT 1 FROM purchases p
                          WHERE p.user_id = r.referred_id AND p.status = 'paid' AND p.kind <> 'topup')
            """,
            (referrer_id,),
        )
    )
    return int(row[0])


def invite_facts(conn: psycopg.Connection[Any], user_id: int) -> InviteFacts:
    row = one(
        conn.execute(
            """
            SELECT (SELECT count(*) FROM referrals WHERE referrer_id = %(id)s),
                   (SELECT coalesce(sum(delta_minor), 0) FROM balance_ledger
                     WHERE user_id = %(id)s AND reason IN ('referral_reward', 'referral_reversal'))
            """,
            {"id": user_id},
        )
    )
    return InviteFacts(
        int(row[0]),
        paying_referrals(conn, user_id),
        int(row[1]),
        ledger.withdrawable_of(conn, user_id),
        pending_of(conn, user_id),
    )


def display_name(conn: psycopg.Connection[Any], user_id: int) -> str:
    """@username, else the first name (for an admin's notice)."""
    row = conn.execute("SELECT username, first_name FROM users WHERE id = %s", (user_id,)).fetchone()
    if row is None:
        return ""
    return f"@{row[0]}" if row[0] else str(row[1])


def pending_of(conn: psycopg.Connection[Any], user_id: int) -> Withdrawal | None:
    with conn.cursor(row_factory=class_row(Withdrawal)) as cur:
        return cur.execute(
            f"SELECT {_COLUMNS} FROM withdrawals WHERE user_id = %s AND status = 'pending'", (user_id,)
        ).fetchone()


def get_withdrawal(conn: psycopg.Connection[Any], withdrawal_id: int, *, lock: bool = False) -> Withdrawal | None:
    with conn.cursor(row_factory=class_row(Withdrawal)) as cur:
        return cur.execute(
            f"SELECT {_COLUMNS} FROM withdrawals WHERE id = %s" + (" FOR UPDATE" if lock else ""), (withdrawal_id,)
        ).fetchone()


def list_withdrawals(
    conn: psycopg.Connection[Any], *, status: WithdrawalStatus | None = None, limit: int = 50
) -> list[Withdrawal]:
    """The newest requests (of one status, or all), at most `limit`."""
    with conn.cursor(row_factory=class_row(Withdrawal)) as cur:
        return cur.execute(
            f"SELECT {_COLUMNS} FROM withdrawals WHERE %(status)s::text IS NULL OR status = %(status)s "
            "ORDER BY id DESC LIMIT %(limit)s",
            {"status": status, "limit": limit},
        ).fetchall()


@attrs.frozen
class Refusal:
    """Why a request was not made: `key` is the user's text."""

    key: str
    withdrawable_minor: int = 0


def request_withdrawal(
    conn: psycopg.Connection[Any], user_id: int, details: str, *, min_minor: int, currency: str
) -> Withdrawal | Refusal:
    """Hold all of the user's withdrawable earnings for a new request, or say why not (nothing changed).

    Under the user's row lock: one pending request per user, and the earnings must reach `min_minor`.
    """
    details = details.strip()
    if not details or len(details) > MAX_DETAILS:
        raise ValueError("payout details must be 1 to 200 characters")
    conn.execute("SELECT 1 FROM users WHERE id = %s FOR UPDATE", (user_id,))
    if pending_of(conn, user_id) is not None:
        return Refusal("referral.withdraw_pending")
    withdrawable = ledger.withdrawable_of(conn, user_id)
    if withdrawable < min_minor or withdrawable <= 0:
        return Refusal("referral.withdraw_below_min", withdrawable)
    with conn.cursor(row_factory=class_row(Withdrawal)) as cur:
        withdrawal = cur.execute(
            f"INSERT INTO withdrawals (user_id, amount_minor, currency, details) VALUES (%s, %s, %s, %s) "
            f"RETURNING {_COLUMNS}",
            (user_id, withdrawable, currency, details),
        ).fetchone()
    assert withdrawal is not None
    ledger.record(conn, user_id, -withdrawable, ledger.WITHDRAWAL, reference(withdrawal.id))
    return withdrawal


def decide_withdrawal(
    conn: psycopg.Connection[Any], withdrawal_id: int, *, approve: bool, decided_by: int, note: str | None
) -> tuple[Withdrawal | None, bool]:
    """Approve or reject a pending request: (the request, whether this call decided it).

    A request decided before (or none) changes nothing: an approval pays once however often it comes.
    A rejection releases the hold to the balance and to the earnings.
    """
    found = get_withdrawal(conn, withdrawal_id)
    if found is None:
        return None, False
    # The lock order of the balance: the user's row, then the request's (as `request_withdrawal`).
    conn.execute("SELECT 1 FROM users WHERE id = %s FOR UPDATE", (found.user_id,))
    current = get_withdrawal(conn, withdrawal_id, lock=True)
    if current is None or current.status != "pending":
        return current, False
    with conn.cursor(row_factory=class_row(Withdrawal)) as cur:
        decided = cur.execute(
            f"UPDATE withdrawals SET status = %s, note = %s, decided_by = %s, decided_at = now() "
            f"WHERE id = %s AND status = 'pending' RETURNING {_COLUMNS}",
            ("approved" if approve else "rejected", note, decided_by, withdrawal_id),
        ).fetchone()
    assert decided is not None
    if not approve:
        ledger.record(conn, decided.user_id, decided.amount_minor, ledger.WITHDRAWAL_RELEASED, reference(decided.id))
    return decided, True
