"""Gifts: a plan bought for someone else, handed on as a code, redeemed once.

A gift is created by `vpnd.db.payments.finalize_purchase` when a purchase of kind `gift` is paid —
exactly once, like every grant (the purchase's payment is unique, and so is the gift's `purchase_id`).
Its code is unguessable (`secrets`, 12 characters from a 32-letter alphabet: 60 bits) and is all the
recipient needs: `/start gift_<code>` or typing it.

Redeeming is one transaction: the recipient's row lock (first in the lock order, as in payments),
then a conditional UPDATE of the gift (`... WHERE status = 'unredeemed'`), so of two redeemers at once
exactly one wins — the other waits for the row and then finds it redeemed — then the plan's days go to
the recipient through `grant_days`, the very code a paid purchase uses (the commit wakes the Xray
writer). The buyer may redeem their own gift (they paid for it; it is then simply their plan).

Wrong codes count against the user's promo-code allowance (`promo_attempts`, the same window and
limit): a code is a code, and one allowance for both kinds means guessing cannot be split across them.

An admin may refund an *unredeemed* gift: in one transaction, the buyer's row, then the gift's (the
same conditional UPDATE, so a refund and a redemption cannot both happen), then the ledger credits the
buyer the gift's value once (`reason 'refund'`, `reference 'gift:<id>'`). A gift paid in another
currency than the balance's cannot be refunded to it (refused, nothing changed).
"""

from __future__ import annotations

import datetime as dt
import secrets
from typing import Any, Literal

import attrs
import psycopg
from psycopg.rows import class_row

from vpnd.db import ledger, outbox, promo
from vpnd.db.subscriptions import Subscription, grant_days
from vpnd.db.users import language_of
from vpnd.money import format_money
from vpnd.texts import Texts

#: Upper-case letters and digits without the look-alikes 0/O and 1/I: easy to read out and type.
ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"
CODE_LENGTH = 12
#: A wrong-code attempt is recorded in `promo_attempts` with this prefix on the code typed.
ATTEMPT_PREFIX = "gift:"

GiftStatus = Literal["unredeemed", "redeemed", "refunded"]

COLUMNS = (
    "id, code, purchase_id, buyer_id, plan_code, days, value_minor, currency, status, created_at, "
    "redeemed_by, redeemed_at, refunded_at"
)


@attrs.frozen
class Gift:
    id: int
    code: str
    purchase_id: int
    buyer_id: int
    plan_code: str
    days: int
    value_minor: int
    currency: str
    status: str
    created_at: dt.datetime
    redeemed_by: int | None
    redeemed_at: dt.datetime | None
    refunded_at: dt.datetime | None


def new_code() -> str:
    return "".join(secrets.choice(ALPHABET) for _ in range(CODE_LENGTH))


def normalize_code(text: str) -> str | None:
    """The code in what a user typed or pasted (a bare code, `gift_<code>`, the whole t.me link), or None
    when it cannot be one (wrong length or characters) — such input is still a wrong attempt."""
    value = text.strip()
    if "start=" in value:
        value = value.rsplit("start=", 1)[1]
    value = value.removeprefix("gift_").removeprefix("GIFT_").strip().upper()
    if len(value) != CODE_LENGTH or any(c not in ALPHABET for c in value):
        return None
    return value


def create_gift(conn: psycopg.Connection[Any], purchase_id: int, buyer_id: int, plan_code: str, days: int,
                value_minor: int, currency: str) -> Gift:  # fmt: skip
    """The gift a paid gift purchase bought (the caller, finalize, holds the purchase's lock and runs once)."""
    with conn.cursor(row_factory=class_row(Gift)) as cur:
        while True:  # a collision of 60-bit codes is next to impossible; retry rather than fail
            gift = cur.execute(
                f"INSERT INTO gifts (code, purchase_id, buyer_id, plan_code, days, value_minor, currency) "
                f"VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (code) DO NOTHING RETURNING {COLUMNS}",
                (new_code(), purchase_id, buyer_id, plan_code, days, value_minor, currency),
            ).fetchone()
            if gift is not None:
                return gift


def get_gift(conn: psycopg.Connection[Any], code: str) -> Gift | None:
    with conn.cursor(row_factory=class_row(Gift)) as cur:
        return cur.execute(f"SELECT {COLUMNS} FROM gifts WHERE code = %s", (code,)).fetchone()


def gifts_of(conn: psycopg.Connection[Any], buyer_id: int, *, before_id: int | None = None,
             limit: int = 20) -> list[Gift]:  # fmt: skip
    """A buyer's gifts, newest first, in keyset pages."""
    with conn.cursor(row_factory=class_row(Gift)) as cur:
        return cur.execute(
            f"SELECT {COLUMNS} FROM gifts WHERE buyer_id = %s AND id < %s ORDER BY id DESC LIMIT %s",
            (buyer_id, before_id if before_id is not None else 2**63 - 1, limit),
        ).fetchall()


def unredeemed_of(conn: psycopg.Connection[Any], buyer_id: int, *, limit: int = 5) -> list[Gift]:
    """A buyer's newest unredeemed gifts (what an admin may refund)."""
    with conn.cursor(row_factory=class_row(Gift)) as cur:
        return cur.execute(
            f"SELECT {COLUMNS} FROM gifts WHERE buyer_id = %s AND status = 'unredeemed' ORDER BY id DESC LIMIT %s",
            (buyer_id, limit),
        ).fetchall()


# --- redeeming --------------------------------------------------------------------------------


@attrs.frozen
class Redemption:
    """What a redemption attempt came to. `reason` is a locale key when it was refused."""

    gift: Gift | None = None
    subscription: Subscription | None = None
    reason: str | None = None
    retry_after_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.reason is None


def redeem(
    conn: psycopg.Connection[Any],
    user_id: int,
    text: str,
    *,
    max_wrong: int,
    window_minutes: int,
    texts: Texts,
    default_language: str = "en",
) -> Redemption:
    """Redeem the gift whose code is in `text` for `user_id`, in the caller's transaction (see the module doc).

    Refusals (nothing given): `gifts.too_many` (the wrong-code allowance is used up; checked before the
    code is even looked at), `gifts.not_found` (recorded as a wrong attempt), `gifts.already_redeemed`,
    `gifts.refunded`. The buyer is told (outbox) when someone else redeemed their gift.
    """
    promo.lock_user(conn, user_id)
    wait = promo.wrong_attempts_wait(conn, user_id, max_wrong, window_minutes)
    if wait is not None:
        return Redemption(reason="gifts.too_many", retry_after_seconds=wait)
    code = normalize_code(text)
    with conn.cursor(row_factory=class_row(Gift)) as cur:
        gift = (
            cur.execute(
                f"UPDATE gifts SET status = 'redeemed', redeemed_by = %s, redeemed_at = now() "
                f"WHERE code = %s AND status = 'unredeemed' RETURNING {COLUMNS}",
                (user_id, code),
            ).fetchone()
            if code is not None
            else None
        )
    if gift is None:
        found = get_gift(conn, code) if code is not None else None
        if found is None:
            promo.record_wrong_attempt(conn, user_id, ATTEMPT_PREFIX + text.strip()[:58], "gift_not_found")
            return Redemption(reason="gifts.not_found")
        return Redemption(found, reason="gifts.refunded" if found.status == "refunded" else "gifts.already_redeemed")
    subscription = grant_days(conn, user_id, gift.days, kind="paid", plan_code=gift.plan_code)
    if gift.buyer_id != user_id:
        language = language_of(conn, gift.buyer_id, default_language)
        outbox.enqueue(
            conn, gift.buyer_id, texts.get(language, "gifts.buyer_told", code=gift.code, days=gift.days),
            dedupe_key=f"gift_redeemed:{gift.id}",
        )  # fmt: skip
    return Redemption(gift, subscription)


# --- refunding --------------------------------------------------------------------------------


@attrs.frozen
class Refund:
    """An admin's refund of a gift: done (`balance_minor` after it), or refused with `reason`
    (`not_found`, `redeemed`, `refunded`, `other_currency`)."""

    gift: Gift | None
    reason: str | None = None
    balance_minor: int = 0

    @property
    def ok(self) -> bool:
        return self.reason is None


def refund(
    conn: psycopg.Connection[Any],
    code: str,
    *,
    balance_currency: str,
    texts: Texts,
    default_language: str = "en",
) -> Refund:
    """Refund an unredeemed gift to the buyer's balance, once, in the caller's transaction (module doc)."""
    wanted = normalize_code(code)
    found = get_gift(conn, wanted) if wanted is not None else None
    if found is None:
        return Refund(None, "not_found")
    if found.currency.upper() != balance_currency.upper():
        return Refund(found, "other_currency")
    promo.lock_user(conn, found.buyer_id)  # the lock order: the buyer's row, then the gift's
    with conn.cursor(row_factory=class_row(Gift)) as cur:
        gift = cur.execute(
            f"UPDATE gifts SET status = 'refunded', refunded_at = now() WHERE id = %s AND status = 'unredeemed' "
            f"RETURNING {COLUMNS}",
            (found.id,),
        ).fetchone()
    if gift is None:
        now = get_gift(conn, found.code)
        assert now is not None
        return Refund(now, "refunded" if now.status == "refunded" else "redeemed")
    if gift.value_minor > 0:
        ledger.record(conn, gift.buyer_id, gift.value_minor, ledger.REFUND, f"gift:{gift.id}")
    balance = ledger.balance_of(conn, gift.buyer_id)
    language = language_of(conn, gift.buyer_id, default_language)
    text = texts.get(
        language, "gifts.refunded_buyer", code=gift.code, amount=format_money(gift.value_minor, gift.currency),
        balance=format_money(balance, gift.currency),
    )  # fmt: skip
    outbox.enqueue(conn, gift.buyer_id, text, dedupe_key=f"gift_refunded:{gift.id}")
    return Refund(gift, balance_minor=balance)


def void_refunded_purchase(conn: psycopg.Connection[Any], purchase_id: int) -> bool:
    """The gift of a purchase whose payment the provider refunded (Stars) can no longer be redeemed.
    Returns whether an unredeemed gift was voided (a redeemed one stays: its days were given)."""
    row = conn.execute(
        "UPDATE gifts SET status = 'refunded', refunded_at = now() WHERE purchase_id = %s AND status = 'unredeemed' "
        "RETURNING id",
        (purchase_id,),
    ).fetchone()
    return row is not None
