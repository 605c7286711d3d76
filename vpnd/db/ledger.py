"""The balance ledger: every change of a user's balance, with its reason and reference.

`record` is the only way a balance changes: it inserts the ledger row and moves `users.balance_minor`
by the same delta in the caller's transaction, so the balance always equals the sum of its ledger.
The ledger's `UNIQUE (reason, reference)` makes each change happen at most once (a top-up credited
twice, a referral reward paid twice, a purchase charged twice are all the same no-op).

Callers must already hold the user's row lock (`SELECT ... FOR UPDATE`) when they debit, so the
balance they checked is the balance they change; `record` checks again and refuses to go below zero
before PostgreSQL's `CHECK (balance_minor >= 0)` would abort the transaction.

Referral earnings are a bucket inside the balance (`referral_earnings.withdrawable_minor`, the part that
may be withdrawn; `vpnd.db.referrals`), kept by `record` too: a referral reward adds to it; a reversed
reward, a withdrawal and its release move it first; any other debit (a plan paid from the balance, an
admin's debit) spends the rest of the balance first and earnings last, so the bucket never exceeds the
balance and a top-up never becomes withdrawable.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import attrs
import psycopg
from psycopg.rows import class_row

from vpnd.db.rows import one

# Reasons (the ledger's vocabulary; admin tools and auto-renewal add their own the same way).
TOPUP = "topup"
PURCHASE = "purchase"
REFERRAL_REWARD = "referral_reward"
REFUND = "refund"
ADMIN = "admin"
#: The part of a repriced payment that bought no whole plan (see `vpnd.db.payments`).
PAYMENT_CREDIT = "payment_credit"
#: A referral reward taken back because the purchase that earned it was refunded.
REFERRAL_REVERSAL = "referral_reversal"
#: Referral earnings held for a withdrawal request (`withdrawal:<id>`): the payout once approved.
WITHDRAWAL = "withdrawal"
#: A rejected withdrawal's hold given back to the balance and to the earnings.
WITHDRAWAL_RELEASED = "withdrawal_released"
#: The reasons that move the referral earnings bucket itself (others only cap it at the balance).
EARNINGS_REASONS = frozenset({REFERRAL_REWARD, REFERRAL_REVERSAL, WITHDRAWAL, WITHDRAWAL_RELEASED})


class InsufficientBalance(Exception):
    """A debit larger than the balance. Nothing was changed."""

    reason_key = "payments.insufficient_balance"

    def __init__(self, needed_minor: int, balance_minor: int) -> None:
        super().__init__(f"balance {balance_minor} does not cover {needed_minor}")
        self.needed_minor = needed_minor
        self.balance_minor = balance_minor


@attrs.frozen
class LedgerEntry:
    id: int
    user_id: int
    delta_minor: int
    reason: str
    reference: str
    created_at: dt.datetime


ENTRY_COLUMNS = "id, user_id, delta_minor, reason, reference, created_at"


def purchase_reference(purchase_id: int) -> str:
    return f"purchase:{purchase_id}"


def record(
    conn: psycopg.Connection[Any], user_id: int, delta_minor: int, reason: str, reference: str
) -> LedgerEntry | None:
    """Apply one balance change; None when `(reason, reference)` was already applied (a no-op).

    Raises InsufficientBalance (before writing anything) when a debit exceeds the balance.
    """
    if delta_minor == 0:
        raise ValueError("a ledger entry must change the balance")
    if delta_minor < 0:
        balance = balance_of(conn, user_id)
        if balance + delta_minor < 0:
            # Only refuse a debit that would really happen: a replay of an applied one is a no-op.
            if _exists(conn, reason, reference):
                return None
            raise InsufficientBalance(-delta_minor, balance)
    with conn.cursor(row_factory=class_row(LedgerEntry)) as cur:
        entry = cur.execute(
            f"INSERT INTO balance_ledger (user_id, delta_minor, reason, reference) VALUES (%s, %s, %s, %s) "
            f"ON CONFLICT (reason, reference) DO NOTHING RETURNING {ENTRY_COLUMNS}",
            (user_id, delta_minor, reason, reference),
        ).fetchone()
    if entry is None:
        return None
    conn.execute(
        "UPDATE users SET balance_minor = balance_minor + %s, updated_at = now() WHERE id = %s",
        (delta_minor, user_id),
    )
    _follow_earnings(conn, user_id, delta_minor, reason)
    return entry


def _follow_earnings(conn: psycopg.Connection[Any], user_id: int, delta_minor: int, reason: str) -> None:
    """Move the referral earnings bucket with a balance change just applied (see the module's docstring)."""
    if reason in EARNINGS_REASONS:
        conn.execute(
            "INSERT INTO referral_earnings (user_id, withdrawable_minor) VALUES (%(user)s, GREATEST(0, %(delta)s)) "
            "ON CONFLICT (user_id) DO UPDATE SET updated_at = now(), "
            "withdrawable_minor = GREATEST(0, referral_earnings.withdrawable_minor + %(delta)s)",
            {"user": user_id, "delta": delta_minor},
        )
    if delta_minor < 0:  # whatever the reason, earnings never exceed the balance: they are spent last
        conn.execute(
            "UPDATE referral_earnings e SET withdrawable_minor = u.balance_minor, updated_at = now() FROM users u "
            "WHERE e.user_id = %s AND u.id = e.user_id AND e.withdrawable_minor > u.balance_minor",
            (user_id,),
        )


def withdrawable_of(conn: psycopg.Connection[Any], user_id: int) -> int:
    """The referral earnings part of a user's balance (what may be withdrawn)."""
    row = conn.execute("SELECT withdrawable_minor FROM referral_earnings WHERE user_id = %s", (user_id,)).fetchone()
    return int(row[0]) if row else 0


@attrs.frozen
class Reversal:
    """What `debit_or_owe` did: debited from the balance, and recorded as owed (the rest)."""

    debited_minor: int = 0
    owed_minor: int = 0
    #: This (reason, reference) had been reversed before: nothing changed now.
    repeated: bool = False


def debit_or_owe(
    conn: psycopg.Connection[Any], user_id: int, amount_minor: int, reason: str, reference: str
) -> Reversal:
    """Take back `amount_minor` once per (reason, reference): from the balance as far as it goes, the rest owed.

    The balance never goes negative: what it cannot cover is written to `balance_owed`. Takes the
    user's row lock (callers that already hold other users' locks must follow the lock order).
    """
    if amount_minor <= 0:
        raise ValueError("a reversal must take something back")
    owed_before = conn.execute(
        "SELECT 1 FROM balance_owed WHERE reason = %s AND reference = %s", (reason, reference)
    ).fetchone()
    if owed_before is not None or _exists(conn, reason, reference):
        return Reversal(repeated=True)
    row = conn.execute("SELECT balance_minor FROM users WHERE id = %s FOR UPDATE", (user_id,)).fetchone()
    if row is None:
        raise LookupError(f"no user {user_id}")
    debit = min(int(row[0]), amount_minor)
    if debit > 0:
        record(conn, user_id, -debit, reason, reference)
    owed = amount_minor - debit
    if owed > 0:
        conn.execute(
            "INSERT INTO balance_owed (user_id, amount_minor, reason, reference) VALUES (%s, %s, %s, %s)",
            (user_id, owed, reason, reference),
        )
    return Reversal(debit, owed)


def owed_of(conn: psycopg.Connection[Any], user_id: int) -> int:
    """What a user owes in total (reversals their balance could not cover)."""
    return int(
        one(conn.execute("SELECT coalesce(sum(amount_minor), 0) FROM balance_owed WHERE user_id = %s", (user_id,)))[0]
    )


def _exists(conn: psycopg.Connection[Any], reason: str, reference: str) -> bool:
    row = conn.execute(
        "SELECT 1 FROM balance_ledger WHERE reason = %s AND reference = %s", (reason, reference)
    ).fetchone()
    return row is not None


def balance_of(conn: psycopg.Connection[Any], user_id: int) -> int:
    row = conn.execute("SELECT balance_minor FROM users WHERE id = %s", (user_id,)).fetchone()
    if row is None:
        raise LookupError(f"no user {user_id}")
    return int(row[0])


def ledger_sum(conn: psycopg.Connection[Any], user_id: int) -> int:
    """The sum of a user's ledger (equals `balance_of`; checked by tests and the health check)."""
    return int(
        one(conn.execute("SELECT coalesce(sum(delta_minor), 0) FROM balance_ledger WHERE user_id = %s", (user_id,)))[0]
    )


def entries(
    conn: psycopg.Connection[Any], user_id: int, *, before_id: int | None = None, limit: int = 20
) -> list[LedgerEntry]:
    """A user's ledger, newest first, in keyset pages (`before_id` = the last id of the previous page)."""
    with conn.cursor(row_factory=class_row(LedgerEntry)) as cur:
        return cur.execute(
            f"SELECT {ENTRY_COLUMNS} FROM balance_ledger WHERE user_id = %s AND id < %s ORDER BY id DESC LIMIT %s",
            (user_id, before_id if before_id is not None else 2**63 - 1, limit),
        ).fetchall()


def mismatched_balances(conn: psycopg.Connection[Any], *, after_user_id: int = 0, limit: int = 500) -> list[int]:
    """Users (a keyset page) whose balance differs from their ledger sum; should always be empty."""
    rows = conn.execute(
        """
        SELECT u.id FROM (SELECT id, balance_minor FROM users WHERE id > %s ORDER BY id LIMIT %s) AS u
        CROSS JOIN LATERAL (SELECT sum(delta_minor) AS total FROM balance_ledger WHERE user_id = u.id) AS l
        WHERE u.balance_minor <> coalesce(l.total, 0)
        ORDER BY u.id
        """,
        (after_user_id, limit),
    ).fetchall()
    return [int(r[0]) for r in rows]
