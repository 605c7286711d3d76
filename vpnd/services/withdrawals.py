"""Withdrawal requests of referral earnings: a user asks (the bot), an admin approves or rejects (the admin
bot's buttons on the notice, or `vpnd admin withdrawal approve|reject`). Each step is one transaction run
by the caller (`await db.run(...)`, or the CLI's), with its messages queued in the outbox and, for a
decision, its `admin_audit` row — a refused decision (unknown, decided before) is audited too.

The money rules are `vpnd.db.referrals`: the request holds the earnings off the balance, an approval
records the payout exactly once, a rejection releases the hold.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import attrs
import psycopg

from vpnd.db import admin as admin_db
from vpnd.db import outbox, referrals
from vpnd.db.referrals import Refusal, Withdrawal
from vpnd.db.users import language_of
from vpnd.money import format_money
from vpnd.services.admin_actions import Actor, Refused
from vpnd.texts import Texts

Conn = psycopg.Connection[Any]


@attrs.frozen
class WithdrawalNotFound(Refused):
    reason: ClassVar[str] = "not_found"


@attrs.frozen
class WithdrawalDecided(Refused):
    """Decided before (approved or rejected): nothing changed now."""

    status: str = ""
    reason: ClassVar[str] = "decided"


def request(
    conn: Conn,
    user_id: int,
    details: str,
    *,
    min_minor: int,
    currency: str,
    admin_ids: Sequence[int],
    texts: Texts,
    default_language: str,
    buttons: Callable[[int], dict[str, Any]],
) -> Withdrawal | Refusal:
    """Make the request (holding the earnings) and queue each admin's notice with `buttons(id)` on it."""
    made = referrals.request_withdrawal(conn, user_id, details, min_minor=min_minor, currency=currency)
    if isinstance(made, Refusal):
        return made
    name = referrals.display_name(conn, user_id)
    for admin_id in admin_ids:
        text = texts.get(
            language_of(conn, admin_id, default_language), "admin.withdrawal.notice",
            id=made.id, user=user_id, name=name, amount=format_money(made.amount_minor, currency),
            details=made.details,
        )  # fmt: skip
        outbox.enqueue(
            conn, admin_id, text, dedupe_key=f"withdrawal:{made.id}:admin:{admin_id}", reply_markup=buttons(made.id)
        )
    return made


def decide(
    conn: Conn,
    actor: Actor,
    withdrawal_id: int,
    *,
    approve: bool,
    note: str | None,
    texts: Texts,
    default_language: str,
) -> Withdrawal | Refused:
    """Approve (the payout is recorded once) or reject (the hold goes back); the user is told; audited."""
    note = (note or "").strip()[: referrals.MAX_NOTE] or None
    action = "withdrawal_approve" if approve else "withdrawal_reject"
    decided, changed = referrals.decide_withdrawal(
        conn, withdrawal_id, approve=approve, decided_by=actor.admin_id, note=note
    )
    refusal: Refused | None = None
    if decided is None:
        refusal = WithdrawalNotFound(withdrawal_id)
    elif not changed:
        refusal = WithdrawalDecided(withdrawal_id, decided.status)
    if refusal is not None or decided is None:
        assert refusal is not None
        admin_db.audit(conn, actor.admin_id, action, withdrawal_id, refusal.reason, actor.details())
        return refusal
    facts = {"user_id": decided.user_id, "amount_minor": decided.amount_minor, "currency": decided.currency}
    admin_db.audit(conn, actor.admin_id, action, withdrawal_id, "ok", actor.details(**facts, note=note))
    amount = format_money(decided.amount_minor, decided.currency)
    language = language_of(conn, decided.user_id, default_language)
    key = "referral.withdraw_approved" if approve else "referral.withdraw_rejected"
    text = texts.get(language, key, id=decided.id, amount=amount)
    if note:
        text += "\n" + texts.get(language, "referral.withdraw_note", note=note)
    outbox.enqueue(conn, decided.user_id, text, dedupe_key=f"withdrawal:{decided.id}:decided")
    return decided
