"""Promo codes: validation for a user, the remembered code, reservation and consumption, admin verbs.

A code's use limit is guarded twice:

* **Reservation** (`reserve_discount`, called by `create_purchase`): the promo row is locked and a
  discount is given only while `used_count + pending purchases of other users carrying the code`
  is below `max_uses`. So with one use left, of ten people buying at once exactly one gets the
  discounted price.
* **Consumption** (`consume`, called by `finalize_purchase`): `used_count` is incremented only
  `WHERE used_count < max_uses`, and `promo_redemptions (code, user_id)` records the use once per
  user. A late payment whose reservation had lapsed is still granted (the money was taken) but does
  not push the count past its limit — PostgreSQL's `CHECK (used_count <= max_uses)` backs this.

Codes are case-insensitive: they are stored and looked up in upper case.

**Kinds.** `percent` and `amount` are discounts: typing the code remembers it for the next plan
purchase, where it is reserved and consumed as above (an amount never takes a price below
`[payments] min_price`, like a percent; it applies only to prices in the code's currency). `days` and
`balance` are *redeemed* when typed (`redeem_now`): with the promo row locked, the use is counted
`WHERE used_count < max_uses`, the redemption row (one per user: its primary key) is written, and
the days are granted or the amount credited through the ledger — all in the typing transaction, so
two users racing for the last use get exactly one grant.

**Conditions.** `plan_code` (a discount for that plan only; other plans are quoted without it and the
code stays remembered), `user_id` (a personal code: for anyone else it does not exist — "no such
code", counted as a wrong attempt, so its existence does not leak), `first_purchase` (only for users
without a paid purchase; re-checked when the discounted purchase is paid).
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

import attrs
import psycopg
from psycopg.rows import class_row

from vpnd.db import ledger
from vpnd.db.subscriptions import Subscription, grant_days
from vpnd.money import format_money
from vpnd.pricing import parse_amount

PromoReason = Literal[
    "promo.not_found",
    "promo.inactive",
    "promo.expired",
    "promo.exhausted",
    "promo.already_used",
    "promo.too_many",
    "promo.first_only",
]
PromoKind = Literal["percent", "amount", "days", "balance"]
KINDS: tuple[PromoKind, ...] = ("percent", "amount", "days", "balance")
#: The ledger reason of a balance code's credit (reference `promo:<CODE>:<user id>`).
LEDGER_REASON = "promo"


class PromoExists(Exception):
    pass


class InvalidPromoCode(ValueError):
    pass


@attrs.frozen
class PromoCode:
    code: str
    percent: int | None
    max_uses: int | None
    used_count: int
    expires_at: dt.datetime | None
    active: bool
    created_by: int | None
    created_at: dt.datetime
    kind: PromoKind = "percent"
    #: amount / balance: the amount in `currency`'s minor units.
    amount_minor: int | None = None
    currency: str | None = None
    #: days: the days granted.
    grant_days: int | None = None
    plan_code: str | None = None
    user_id: int | None = None
    first_purchase: bool = False

    def uses_left(self) -> int | None:
        return None if self.max_uses is None else max(0, self.max_uses - self.used_count)

    def summary(self) -> str:
        """What it does and for whom, in English (the CLI): "-2.00 USD, plan m1, first purchase"."""
        if self.kind == "percent":
            what = f"-{self.percent}%"
        elif self.kind == "amount":
            what = f"-{format_money(self.amount_minor or 0, self.currency or '')}"
        elif self.kind == "days":
            what = f"+{self.grant_days} days"
        else:
            what = f"+{format_money(self.amount_minor or 0, self.currency or '')} balance"
        conditions = [f"plan {self.plan_code}"] if self.plan_code is not None else []
        conditions += [f"user {self.user_id}"] if self.user_id is not None else []
        conditions += ["first purchase"] if self.first_purchase else []
        return ", ".join([what, *conditions])

    @property
    def is_discount(self) -> bool:
        """Remembered for the next purchase (percent, amount) rather than redeemed when typed."""
        return self.kind in ("percent", "amount")

    def discount_for(self, plan_code: str | None, currency: str) -> tuple[int, int]:
        """(percent, amount off in minor units) for a plan priced in `currency`; (0, 0) when it does not apply."""
        if self.plan_code is not None and self.plan_code != plan_code:
            return 0, 0
        if self.kind == "percent" and self.percent:
            return self.percent, 0
        if self.kind == "amount" and self.amount_minor and (self.currency or "").upper() == currency.upper():
            return 0, self.amount_minor
        return 0, 0


@attrs.frozen
class PromoCheck:
    """The result of validating a code for a user: usable when `reason` is None (else a locale key)."""

    promo: PromoCode | None
    reason: PromoReason | None = None
    #: With reason "promo.too_many": how long until the user may try again.
    retry_after_seconds: float = 0.0
    #: A days code just redeemed: the subscription's new state.
    subscription: Subscription | None = None
    #: A balance code just redeemed: the balance after the credit.
    balance_minor: int | None = None

    @property
    def ok(self) -> bool:
        return self.promo is not None and self.reason is None


PROMO_COLUMNS = (
    "code, percent, max_uses, used_count, expires_at, active, created_by, created_at, "
    "kind, amount_minor, currency, grant_days, plan_code, user_id, first_purchase"
)

_CODE_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


def normalize_code(code: str) -> str:
    """Upper-case, trimmed; InvalidPromoCode for anything that cannot be a code (1-32 of A-Z 0-9 _ -)."""
    text = code.strip().upper()
    if not 1 <= len(text) <= 32 or not set(text) <= _CODE_CHARS:
        raise InvalidPromoCode(f"not a promo code: {code!r}")
    return text


def get_promo(conn: psycopg.Connection[Any], code: str, *, lock: bool = False) -> PromoCode | None:
    try:
        key = normalize_code(code)
    except InvalidPromoCode:
        return None
    with conn.cursor(row_factory=class_row(PromoCode)) as cur:
        return cur.execute(
            f"SELECT {PROMO_COLUMNS} FROM promo_codes WHERE code = %s" + (" FOR UPDATE" if lock else ""), (key,)
        ).fetchone()


def _reserved_by_others(conn: psycopg.Connection[Any], code: str, user_id: int) -> int:
    """Pending, unexpired purchases of other users that carry this code's discount."""
    row = conn.execute(
        "SELECT count(*) FROM purchases WHERE status = 'pending' AND promo_code = %s AND user_id <> %s "
        "AND expires_at > now()",
        (code, user_id),
    ).fetchone()
    return int(row[0]) if row else 0


def _already_used(conn: psycopg.Connection[Any], code: str, user_id: int) -> bool:
    row = conn.execute("SELECT 1 FROM promo_redemptions WHERE code = %s AND user_id = %s", (code, user_id)).fetchone()
    return row is not None


def has_paid(conn: psycopg.Connection[Any], user_id: int) -> bool:
    """The user has a paid purchase (of any kind: a top-up counts)."""
    row = conn.execute("SELECT 1 FROM purchases WHERE user_id = %s AND status = 'paid' LIMIT 1", (user_id,)).fetchone()
    return row is not None


def _check(conn: psycopg.Connection[Any], promo: PromoCode | None, user_id: int) -> PromoCheck:
    if promo is None or (promo.user_id is not None and promo.user_id != user_id):
        return PromoCheck(None, "promo.not_found")  # someone else's personal code does not exist for you
    if not promo.active:
        return PromoCheck(promo, "promo.inactive")
    now = conn.execute("SELECT now()").fetchone()
    if promo.expires_at is not None and now is not None and promo.expires_at <= now[0]:
        return PromoCheck(promo, "promo.expired")
    if _already_used(conn, promo.code, user_id):
        return PromoCheck(promo, "promo.already_used")
    if promo.max_uses is not None:
        taken = promo.used_count + _reserved_by_others(conn, promo.code, user_id)
        if taken >= promo.max_uses:
            return PromoCheck(promo, "promo.exhausted")
    if promo.first_purchase and has_paid(conn, user_id):
        return PromoCheck(promo, "promo.first_only")
    return PromoCheck(promo)


def validate_promo(conn: psycopg.Connection[Any], user_id: int, code: str) -> PromoCheck:
    """Exists, active, not expired, uses left (counting other users' reservations), not used by this user."""
    return _check(conn, get_promo(conn, code), user_id)


def apply_promo(conn: psycopg.Connection[Any], user_id: int, code: str) -> PromoCheck:
    """Validate and, when usable, remember a discount code on `users.pending_promo_code` for the next
    purchase, or redeem a days or balance code now (`redeem_now`). The caller holds the user's row lock."""
    check = _check(conn, get_promo(conn, code, lock=True), user_id)
    if check.ok and check.promo is not None and not check.promo.is_discount:
        return redeem_now(conn, check.promo, user_id)
    if check.ok and check.promo is not None:
        conn.execute(
            "UPDATE users SET pending_promo_code = %s, updated_at = now() WHERE id = %s", (check.promo.code, user_id)
        )
    return check


def clear_pending_promo(conn: psycopg.Connection[Any], user_id: int, code: str | None = None) -> None:
    """Forget the remembered code (only if it is still `code`, when given)."""
    conn.execute(
        "UPDATE users SET pending_promo_code = NULL, updated_at = now() "
        "WHERE id = %s AND pending_promo_code IS NOT NULL AND (%s::text IS NULL OR pending_promo_code = %s)",
        (user_id, code, code),
    )


def reserve_discount(conn: psycopg.Connection[Any], user_id: int, code: str) -> PromoCheck:
    """Validate `code` for a purchase being created, with the promo row locked (see the module doc).

    The caller holds the user's row lock and has already expired the user's older pending
    purchases. A code that can never apply again (gone, disabled, expired, used by this user) is
    forgotten; one that is only fully reserved by others stays remembered for later.
    """
    check = _check(conn, get_promo(conn, code, lock=True), user_id)
    if check.reason == "promo.exhausted":
        promo = check.promo
        if promo is not None and promo.max_uses is not None and promo.used_count >= promo.max_uses:
            clear_pending_promo(conn, user_id, code)
    elif check.reason is not None:
        clear_pending_promo(conn, user_id, code)
    return check


def redeem_now(conn: psycopg.Connection[Any], promo: PromoCode, user_id: int) -> PromoCheck:
    """Redeem a checked days or balance code (its row locked by the caller): count the use under the
    limit, record it once for the user, grant the days or credit the balance."""
    counted = conn.execute(
        "UPDATE promo_codes SET used_count = used_count + 1 "
        "WHERE code = %s AND active AND (max_uses IS NULL OR used_count < max_uses) RETURNING code",
        (promo.code,),
    ).fetchone()
    if counted is None:
        return PromoCheck(promo, "promo.exhausted")
    inserted = conn.execute(
        "INSERT INTO promo_redemptions (code, user_id) VALUES (%s, %s) ON CONFLICT DO NOTHING RETURNING code",
        (promo.code, user_id),
    ).fetchone()
    if inserted is None:  # unreachable under the user's row lock; refuse rather than grant twice
        raise RuntimeError(f"promo {promo.code} redeemed twice by user {user_id}")
    if promo.kind == "days":
        assert promo.grant_days is not None
        return PromoCheck(promo, subscription=grant_days(conn, user_id, promo.grant_days, kind="paid"))
    assert promo.kind == "balance" and promo.amount_minor is not None
    ledger.record(conn, user_id, promo.amount_minor, LEDGER_REASON, f"promo:{promo.code}:{user_id}")
    return PromoCheck(promo, balance_minor=ledger.balance_of(conn, user_id))


def consume(conn: psycopg.Connection[Any], code: str, user_id: int, purchase_id: int) -> bool:
    """Count one use of `code` by `user_id` for a paid purchase; False when it cannot count (limit/used,
    a first-purchase code after another paid purchase, someone else's personal code).

    The caller holds the user's row lock (one redemption per user is then check-then-insert safe).
    """
    if _already_used(conn, code, user_id):
        return False
    counted = conn.execute(
        "UPDATE promo_codes SET used_count = used_count + 1 "
        "WHERE code = %s AND (max_uses IS NULL OR used_count < max_uses) AND (user_id IS NULL OR user_id = %s) "
        "AND (NOT first_purchase OR NOT EXISTS (SELECT 1 FROM purchases "
        "    WHERE user_id = %s AND status = 'paid' AND id <> %s)) RETURNING code",
        (code, user_id, user_id, purchase_id),
    ).fetchone()
    if counted is None:
        return False
    conn.execute(
        "INSERT INTO promo_redemptions (code, user_id, purchase_id) VALUES (%s, %s, %s)", (code, user_id, purchase_id)
    )
    clear_pending_promo(conn, user_id, code)
    return True


# --- wrong attempts (guessing) -----------------------------------------------------------------


def lock_user(conn: psycopg.Connection[Any], user_id: int) -> None:
    """Serialise one user's promo attempts (the limit is check-then-insert)."""
    conn.execute("SELECT 1 FROM users WHERE id = %s FOR UPDATE", (user_id,))


def wrong_attempts_wait(
    conn: psycopg.Connection[Any], user_id: int, max_wrong: int, window_minutes: int
) -> float | None:
    """Seconds until the user may type a code again, or None when they may now.

    They may not while their last `max_wrong` wrong attempts all fall within the window; they may
    again when the oldest of those leaves it.
    """
    row = conn.execute(
        "SELECT count(*), extract(epoch FROM min(created_at) + make_interval(mins => %s) - now()) FROM ("
        "  SELECT created_at FROM promo_attempts WHERE user_id = %s AND created_at > now() - make_interval(mins => %s)"
        "  ORDER BY created_at DESC LIMIT %s) recent",
        (window_minutes, user_id, window_minutes, max_wrong),
    ).fetchone()
    if row is None or int(row[0]) < max_wrong:
        return None
    return max(1.0, float(row[1]))


def record_wrong_attempt(conn: psycopg.Connection[Any], user_id: int, code: str, reason: str) -> None:
    conn.execute(
        "INSERT INTO promo_attempts (user_id, code, result) VALUES (%s, %s, %s)",
        (user_id, code.strip()[:64], reason.removeprefix("promo.")),
    )


def wrong_attempts_in_window(conn: psycopg.Connection[Any], window_minutes: int, cap: int) -> int:
    """Wrong attempts of all users within the window, counted up to `cap` (a bounded read)."""
    row = conn.execute(
        "SELECT count(*) FROM (SELECT 1 FROM promo_attempts WHERE created_at > now() - make_interval(mins => %s) "
        "LIMIT %s) recent",
        (window_minutes, cap),
    ).fetchone()
    return int(row[0]) if row else 0


def delete_attempts_before(conn: psycopg.Connection[Any], days: int, limit: int) -> int:
    """Delete up to `limit` attempts older than `days`; return how many."""
    cur = conn.execute(
        "DELETE FROM promo_attempts WHERE id IN (SELECT id FROM promo_attempts "
        "WHERE created_at < now() - make_interval(days => %s) ORDER BY created_at LIMIT %s)",
        (days, limit),
    )
    return cur.rowcount


# --- admin verbs ------------------------------------------------------------------------------


@attrs.frozen
class PromoTerms:
    """What a new code does and for whom (see the module doc); `check` says what is wrong with it."""

    kind: PromoKind = "percent"
    percent: int | None = None
    amount_minor: int | None = None
    currency: str | None = None
    grant_days: int | None = None
    plan_code: str | None = None
    user_id: int | None = None
    first_purchase: bool = False

    @classmethod
    def parse(
        cls,
        kind: str,
        value: str,
        *,
        currency: str,
        plan_code: str | None = None,
        user_id: int | None = None,
        first_purchase: bool = False,
    ) -> PromoTerms:
        """Terms from an admin's words: `value` is a percent, an amount of `currency` ("2.50") or days.
        ValueError (InvalidAmount included) naming what is wrong."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}")
        number = int(value) if kind in ("percent", "days") and value.strip().isdigit() else None
        if kind in ("percent", "days") and number is None:
            raise ValueError(f"{kind} needs a whole number, not {value!r}")
        terms = cls(
            kind=kind,  # checked against KINDS above
            percent=number if kind == "percent" else None,
            amount_minor=parse_amount(value, currency) if kind in ("amount", "balance") else None,
            currency=currency.upper() if kind in ("amount", "balance") else None,
            grant_days=number if kind == "days" else None,
            plan_code=plan_code,
            user_id=user_id,
            first_purchase=first_purchase,
        )
        terms.check()
        return terms

    def check(self) -> None:
        """ValueError naming what is wrong."""
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}")
        if self.kind == "percent" and not (self.percent is not None and 1 <= self.percent <= 100):
            raise ValueError("percent must be from 1 to 100")
        if self.kind in ("amount", "balance") and not (self.amount_minor and self.amount_minor > 0 and self.currency):
            raise ValueError("the amount must be positive")
        if self.kind == "days" and not (self.grant_days is not None and 1 <= self.grant_days <= 3650):
            raise ValueError("days must be from 1 to 3650")
        if self.plan_code is not None and self.kind not in ("percent", "amount"):
            raise ValueError("only a discount (percent, amount) can be bound to a plan")
        if self.user_id is not None and self.user_id <= 0:
            raise ValueError("user id must be positive")


def create_promo(
    conn: psycopg.Connection[Any],
    code: str,
    terms: PromoTerms | int,
    *,
    max_uses: int | None = None,
    expires_at: dt.datetime | None = None,
    valid_days: int | None = None,
    created_by: int | None = None,
) -> PromoCode:
    """A new code (`terms`, or a percent); PromoExists if the code is taken, ValueError for bad terms or limit.

    It expires at `expires_at`, or `valid_days` from now (the database's clock), or never."""
    key = normalize_code(code)
    if isinstance(terms, int):
        terms = PromoTerms(percent=terms)
    terms.check()
    if max_uses is not None and max_uses <= 0:
        raise ValueError("max_uses must be positive")
    with conn.cursor(row_factory=class_row(PromoCode)) as cur:
        promo = cur.execute(
            f"INSERT INTO promo_codes (code, percent, max_uses, expires_at, created_by, kind, amount_minor, currency, "
            f"grant_days, plan_code, user_id, first_purchase) VALUES (%s, %s, %s, "
            f"coalesce(%s::timestamptz, now() + make_interval(days => %s::int)), %s, %s, %s, %s, %s, %s, %s, %s) "
            f"ON CONFLICT (code) DO NOTHING RETURNING {PROMO_COLUMNS}",
            (
                key, terms.percent if terms.kind == "percent" else None, max_uses, expires_at, valid_days, created_by,
                terms.kind, terms.amount_minor if terms.kind in ("amount", "balance") else None,
                terms.currency.upper() if terms.currency and terms.kind in ("amount", "balance") else None,
                terms.grant_days if terms.kind == "days" else None, terms.plan_code, terms.user_id,
                terms.first_purchase,
            ),
        ).fetchone()  # fmt: skip
    if promo is None:
        raise PromoExists(key)
    return promo


def list_promos(conn: psycopg.Connection[Any], *, after_code: str | None = None, limit: int = 50) -> list[PromoCode]:
    """Codes in code order, a keyset page at a time (`after_code` = the last code of the previous page)."""
    with conn.cursor(row_factory=class_row(PromoCode)) as cur:
        return cur.execute(
            f"SELECT {PROMO_COLUMNS} FROM promo_codes WHERE code > %s ORDER BY code LIMIT %s",
            (after_code or "", limit),
        ).fetchall()


def disable_promo(conn: psycopg.Connection[Any], code: str) -> bool:
    """Switch a code off (it stays listed with its usage); False if there is no such active code."""
    try:
        key = normalize_code(code)
    except InvalidPromoCode:
        return False
    row = conn.execute(
        "UPDATE promo_codes SET active = false WHERE code = %s AND active RETURNING code", (key,)
    ).fetchone()
    return row is not None
