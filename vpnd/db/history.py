"""What a user paid, and what the admins hear of each payment: read from the payments the data holds.

Nothing here lists the payment methods: a row's method is its `payments.provider`, whatever wrote it
(Crypto Pay, Stars, the balance, an auto-renewal, or a method added later), and its name is shown as
the texts have it (`method.<provider>`) or as stored.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import attrs
import psycopg

from vpnd.db import outbox
from vpnd.money import format_money
from vpnd.texts import Texts

#: The payment id of an auto-renewal (`provider = 'balance'`) starts with this, then the ledger reference.
AUTO_RENEW_PREFIX = "auto_renew:"


@attrs.frozen
class HistoryEntry:
    """One payment of the user: a plan bought, a top-up, either of them refunded or under review."""

    purchase_id: int
    paid_at: dt.datetime
    kind: str  # "plan", "pack" (plan_code: the pack's code), "gift" (a plan bought as a gift) or "topup"
    plan_code: str | None
    method: str  # the payment's provider, as stored
    amount_minor: int
    currency: str
    outcome: str  # "granted", "refunded" or "amount_mismatch"
    auto_renewal: bool


@attrs.frozen
class HistoryPage:
    entries: list[HistoryEntry]
    #: There is an older page.
    has_more: bool


HISTORY_PAGE = """
SELECT pu.id, p.created_at, pu.kind, pu.plan_code, p.provider, p.amount_minor, p.currency, p.outcome,
       starts_with(p.provider_payment_id, %(auto_renew)s)
FROM purchases pu JOIN payments p ON p.purchase_id = pu.id
WHERE pu.user_id = %(user_id)s
ORDER BY p.created_at DESC, p.id DESC
LIMIT %(limit)s OFFSET %(offset)s
"""


def history_page(conn: psycopg.Connection[Any], user_id: int, page: int, per_page: int) -> HistoryPage:
    """Page `page` (0: the newest) of `user_id`'s payments, newest first, `per_page` to a page.

    The user is the only filter and always the caller's own (the Telegram sender), so no page number
    reaches another user's rows. A user's payments are few (the purchases index finds them), so an
    offset is fine here.
    """
    rows = conn.execute(
        HISTORY_PAGE,
        {"auto_renew": AUTO_RENEW_PREFIX, "user_id": user_id, "limit": per_page + 1, "offset": page * per_page},
    ).fetchall()
    return HistoryPage([HistoryEntry(*row) for row in rows[:per_page]], len(rows) > per_page)


NOTICE_FACTS = """
SELECT pu.user_id, u.username, pu.kind, pu.plan_code, pu.promo_code, p.provider, p.amount_minor, p.currency,
       starts_with(p.provider_payment_id, %(auto_renew)s), r.id, r.username
FROM purchases pu
JOIN payments p ON p.purchase_id = pu.id
JOIN users u ON u.id = pu.user_id
LEFT JOIN users r ON r.id = u.referred_by
WHERE pu.id = %(purchase_id)s
"""


def queue_payment_notice(
    conn: psycopg.Connection[Any], chat_id: int, texts: Texts, language: str, purchase_id: int
) -> bool:
    """Queue the admin chat's notice of the payment of `purchase_id`, in the caller's transaction.

    Call it in the transaction that finalizes the payment: the notice commits with the payment or not
    at all, and its dedupe key makes it one per purchase however often finalize runs. Returns whether
    a row was queued.
    """
    row = conn.execute(NOTICE_FACTS, {"auto_renew": AUTO_RENEW_PREFIX, "purchase_id": purchase_id}).fetchone()
    if row is None:
        return False
    user_id, username, kind, plan_code, promo_code, method, amount, currency, auto, referrer, referrer_name = row
    none = texts.get(language, "notice.none")
    text = texts.get(
        language,
        "notice.payment",
        purchase_id=purchase_id,
        user=_who(user_id, username),
        plan=(f"🎁 {plan_code}" if kind == "gift" else plan_code)
        if kind in ("plan", "pack", "gift")
        else texts.get(language, "history.topup"),
        amount=format_money(amount, currency),
        method=method_name(texts, language, method, auto_renewal=auto),
        promo=promo_code or none,
        referrer=_who(referrer, referrer_name) if referrer is not None else none,
    )
    return outbox.enqueue(conn, chat_id, text, dedupe_key=f"payment_notice:{purchase_id}")


def method_name(texts: Texts, language: str, method: str, *, auto_renewal: bool = False) -> str:
    """A payment method's name in `language`: its text `method.<method>`, else the stored name itself."""
    if auto_renewal:
        return texts.get(language, "method.auto_renewal")
    return texts.get_or(language, f"method.{method}", method)


def _who(user_id: int, username: str | None) -> str:
    return f"{user_id} (@{username})" if username else str(user_id)
