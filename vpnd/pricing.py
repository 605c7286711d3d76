"""Prices, discounts and rewards: pure functions over integers, no I/O.

Money is an integer number of minor units (cents) of a currency, never a float (`vpnd.money`). Config prices are
`Decimal` strings ("4.99"); they become minor units here, exactly or not at all. Discounts round in
the shop's favour by at most one minor unit (the customer pays the ceiling), rewards round down,
and no price goes below the configured minimum — nor below one minor unit (one Star), because a
zero-amount invoice cannot be paid by any provider.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from decimal import ROUND_DOWN, Decimal, DecimalException, InvalidOperation
from typing import Literal

import attrs

from vpnd.config import GIB, PaymentsConfig, Plan, TrafficPack

# The money helpers live in vpnd.money; re-exported so older imports from here keep working.
from vpnd.money import STARS_CURRENCY as STARS_CURRENCY
from vpnd.money import format_money as format_money
from vpnd.money import from_minor as from_minor
from vpnd.money import minor_exponent as minor_exponent

#: Amounts beyond this are refused (PostgreSQL's bigint holds them, but no real price is near it).
MAX_MINOR = 10**15


class InvalidAmount(ValueError):
    """An amount that is not a positive number of whole minor units (or is out of bounds)."""


def to_minor(amount: Decimal, currency: str) -> int:
    """`Decimal("4.99")` → 499 for USD; InvalidAmount when the amount has finer precision than a cent."""
    if not amount.is_finite() or abs(amount) >= MAX_MINOR:
        raise InvalidAmount(f"not a usable amount: {amount}")
    try:
        scaled = amount.scaleb(minor_exponent(currency))
        if scaled != scaled.to_integral_value():
            raise InvalidAmount(f"{amount} is not a whole number of {currency} minor units")
        minor = int(scaled)
    except DecimalException:
        raise InvalidAmount(f"not a usable amount: {amount}") from None
    if abs(minor) > MAX_MINOR:
        raise InvalidAmount(f"not a usable amount: {amount}")
    return minor


def received_to_minor(amount: Decimal, currency: str) -> int:
    """A provider's reported amount in minor units, rounded down (paying a fraction less is short)."""
    if not amount.is_finite() or abs(amount) >= MAX_MINOR:
        raise InvalidAmount(f"not a usable amount: {amount}")
    return int(amount.scaleb(minor_exponent(currency)).to_integral_value(rounding=ROUND_DOWN))


def parse_amount(text: str, currency: str) -> int:
    """A user-typed amount ("10", "7.50", "7,5") → minor units; InvalidAmount if it is not one."""
    cleaned = text.strip().replace(",", ".").replace(" ", "")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        raise InvalidAmount(f"not a number: {text!r}") from None
    minor = to_minor(value, currency)
    if minor <= 0:
        raise InvalidAmount("the amount must be positive")
    return minor


def discounted(price_minor: int, percent: int, floor_minor: int) -> int:
    """The price after a `percent` discount, never below `floor_minor` (nor 1) and never above the price.

    The customer pays the ceiling of `price * (100 - percent) / 100`, computed on integers.
    """
    if price_minor <= 0:
        raise InvalidAmount("a price must be positive")
    if not 0 <= percent <= 100:
        raise ValueError(f"discount percent out of range: {percent}")
    after = -((-price_minor * (100 - percent)) // 100)  # ceiling division
    return min(price_minor, max(after, floor_minor, 1))


def referral_reward(amount_minor: int, percent: int) -> int:
    """The referrer's share of a payment, rounded down to a whole minor unit."""
    if amount_minor <= 0 or percent <= 0:
        return 0
    return amount_minor * percent // 100


#: A cashback level as a value: (paying referrals from which it applies, percent).
Level = tuple[int, int]


def referral_level(levels: Sequence[Level], paying: int) -> Level | None:
    """The level of a referrer with `paying` paying referrals (the highest threshold reached); None below the first."""
    reached = [level for level in levels if level[0] <= paying]
    return max(reached) if reached else None


def next_referral_level(levels: Sequence[Level], paying: int) -> Level | None:
    """The next level a referrer with `paying` paying referrals can reach; None at the top."""
    ahead = [level for level in levels if level[0] > paying]
    return min(ahead) if ahead else None


def stars_price(stars: int, percent: int) -> int:
    """A price in Telegram Stars after a discount (ceiling, at least one Star)."""
    if stars <= 0:
        raise InvalidAmount("a Stars price must be positive")
    return discounted(stars, percent, 1)


# --- what is being bought --------------------------------------------------------------------


@attrs.frozen
class Offer:
    """A thing for sale at its list price (before any promo discount)."""

    kind: Literal["plan", "topup", "pack", "gift"]
    price_minor: int
    currency: str
    #: The plan's code, or the traffic pack's.
    plan_code: str | None = None
    days: int | None = None
    #: List price in Telegram Stars; None when the thing cannot be bought with Stars.
    stars: int | None = None
    #: A traffic pack's bytes.
    pack_bytes: int | None = None


def _list_price(item: Plan | TrafficPack, what: str, currency: str | None) -> tuple[str, int]:
    """(currency, minor units) of `item`'s price in `currency` (default: its own); InvalidAmount when not sold in it."""
    currency = item.currency if currency is None or currency.upper() == item.currency.upper() else currency.upper()
    price = item.price_in(currency)
    if price is None:
        raise InvalidAmount(f"{what} {item.code} has no price in {currency}")
    return currency, to_minor(price, currency)


def plan_offer(plan: Plan, currency: str | None = None) -> Offer:
    """The plan at its list price in `currency` (default: its own); InvalidAmount when not sold in it."""
    currency, minor = _list_price(plan, "plan", currency)
    return Offer(
        kind="plan", price_minor=minor, currency=currency, plan_code=plan.code, days=plan.days, stars=plan.stars or None
    )


def pack_offer(pack: TrafficPack, currency: str | None = None) -> Offer:
    """The traffic pack at its price in `currency` (default: its own); InvalidAmount when not sold in it."""
    currency, minor = _list_price(pack, "traffic pack", currency)
    return Offer(
        kind="pack",
        price_minor=minor,
        currency=currency,
        plan_code=pack.code,
        stars=pack.stars or None,
        pack_bytes=pack.gb * GIB,
    )


def per_month_minor(price_minor: int, days: int) -> int:
    """A plan's price per month (30 days) in minor units: `price × 30 / days`, rounded half up, on integers."""
    if days <= 0:
        raise ValueError("days must be positive")
    return (price_minor * 30 * 2 + days) // (2 * days)


# --- pro-rata upgrades -------------------------------------------------------------------------

SECONDS_PER_DAY = 86400


@attrs.frozen
class UpgradeTerms:
    """Switching from the running plan A to plan B now, in one currency.

    `credit_minor` is the unused part of A; `price_minor` what B costs after it, or None when the
    switch is not offered (the credit would bring B to the price floor or below: never pay back).
    """

    credit_minor: int
    list_minor: int
    price_minor: int | None

    @property
    def offered(self) -> bool:
        return self.price_minor is not None


def upgrade_credit(paid_minor: int, paid_days: int, remaining_seconds: int) -> int:
    """The credit for the unused part of a plan: `floor(paid × remaining / (days × 86400))`.

    `paid_minor` is what the user paid for the plan's last purchase (its currency's minor units, or
    Stars); `remaining_seconds` is what is left of it (`expires_at - now`, whole seconds), taken as 0
    when negative and capped at the purchase's `paid_days` (days stacked from earlier purchases are not
    credited at this purchase's price). Rounds down: the shop never credits a fraction it was not paid.
    """
    if paid_days <= 0:
        raise ValueError("paid_days must be positive")
    if paid_minor <= 0:
        return 0
    whole = paid_days * SECONDS_PER_DAY
    remaining = min(max(remaining_seconds, 0), whole)
    return paid_minor * remaining // whole


def upgrade_terms(
    *,
    paid_minor: int,
    paid_currency: str,
    paid_days: int,
    remaining_seconds: int,
    price_minor: int,
    currency: str,
    floor_minor: int,
) -> UpgradeTerms | None:
    """What switching to a plan listed at `price_minor` in `currency` costs, given the running plan's
    last payment (`paid_minor` in `paid_currency` for `paid_days` days) with `remaining_seconds` left.

    None when the credit does not apply: it is only ever used in the currency it was paid in (a Stars
    credit only against a Stars price, USD against USD) — never converted, never moved to the balance.
    Otherwise the price is `price − credit`, but never below `floor_minor` (nor one unit); when the credit
    reaches `price − floor` the switch is not offered at all (`price_minor` None) rather than sold at the
    floor with the rest of the credit lost or paid back. All integers, no rounding beyond the credit's floor.
    """
    if paid_currency.upper() != currency.upper():
        return None
    credit = upgrade_credit(paid_minor, paid_days, remaining_seconds)
    floor = max(floor_minor, 1)
    if credit >= price_minor - floor:
        return UpgradeTerms(credit, price_minor, None)
    return UpgradeTerms(credit, price_minor, max(price_minor - credit, floor))


def receipt_provider_data(description: str, amount_minor: int, currency: str, vat_code: int) -> str:
    """`provider_data` carrying one fiscal receipt item (the format YooKassa documents for Telegram Payments)."""
    item = {
        "description": description[:128],
        "quantity": "1.00",
        "amount": {"value": str(from_minor(amount_minor, currency)), "currency": currency},
        "vat_code": vat_code,
        "payment_mode": "full_payment",
        "payment_subject": "service",
    }
    return json.dumps({"receipt": {"items": [item]}}, ensure_ascii=False)


def topup_offer(amount_minor: int, payments: PaymentsConfig) -> Offer:
    """A balance top-up of `amount_minor` in the balance currency, within the configured bounds."""
    check_topup_amount(amount_minor, payments)
    return Offer(kind="topup", price_minor=amount_minor, currency=payments.currency)


def check_topup_amount(amount_minor: int, payments: PaymentsConfig) -> None:
    low = to_minor(payments.topup_min, payments.currency)
    high = to_minor(payments.topup_max, payments.currency)
    if not low <= amount_minor <= high:
        raise InvalidAmount(
            f"a top-up must be between {format_money(low, payments.currency)} "
            f"and {format_money(high, payments.currency)}"
        )


def topup_presets_minor(payments: PaymentsConfig) -> tuple[int, ...]:
    """The preset top-up amounts (for buttons), in minor units."""
    return tuple(to_minor(amount, payments.currency) for amount in payments.topup_presets)


def min_price_minor(payments: PaymentsConfig, currency: str) -> int:
    """The configured minimum price, in the minor units of `currency` (rounded down)."""
    return received_to_minor(payments.min_price, currency)


@attrs.frozen
class Price:
    """What a purchase of an offer costs with a given discount."""

    amount_minor: int
    currency: str
    discount_percent: int
    #: Price in Stars, when the offer can be bought with Stars.
    stars: int | None


def price_offer(offer: Offer, discount_percent: int, floor_minor: int, *, amount_off_minor: int = 0) -> Price:
    """Apply a promo discount (plans only; a top-up is never discounted): a percent, or a fixed amount
    off (never below `floor_minor`; the Stars price drops by the same share of the price)."""
    percent = discount_percent if offer.kind == "plan" else 0
    off = amount_off_minor if offer.kind == "plan" and not percent else 0
    amount = discounted(offer.price_minor, percent, floor_minor) if percent else offer.price_minor
    if off:
        amount = amount_off(offer.price_minor, off, floor_minor)
    stars = stars_price(offer.stars, percent) if offer.stars else None
    if off and offer.stars:
        stars = max(1, -((-offer.stars * amount) // offer.price_minor))  # the same share, rounded up
    return Price(amount, offer.currency, percent, stars)


def amount_off(price_minor: int, off_minor: int, floor_minor: int) -> int:
    """The price less a fixed amount, never below `floor_minor` (nor 1) and never above the price."""
    if price_minor <= 0:
        raise InvalidAmount("a price must be positive")
    if off_minor < 0:
        raise ValueError(f"negative amount off: {off_minor}")
    return min(price_minor, max(price_minor - off_minor, floor_minor, 1))
