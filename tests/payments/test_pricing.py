"""Pure price arithmetic: integers only, floors, rounding in one stated direction."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vpnd.config import PaymentsConfig, Plan
from vpnd.money import TELEGRAM_CURRENCIES, minor_exponent
from vpnd.pricing import (
    InvalidAmount,
    discounted,
    format_money,
    from_minor,
    min_price_minor,
    parse_amount,
    plan_offer,
    price_offer,
    receipt_provider_data,
    received_to_minor,
    referral_reward,
    stars_price,
    to_minor,
    topup_offer,
    topup_presets_minor,
)


def test_decimal_to_minor_is_exact() -> None:
    assert to_minor(Decimal("4.99"), "USD") == 499
    assert to_minor(Decimal("12"), "USD") == 1200
    assert to_minor(Decimal("500"), "JPY") == 500
    assert to_minor(Decimal("1.234"), "KWD") == 1234
    with pytest.raises(InvalidAmount):
        to_minor(Decimal("4.999"), "USD")
    with pytest.raises(InvalidAmount):
        to_minor(Decimal("NaN"), "USD")
    assert from_minor(499, "USD") == Decimal("4.99")
    assert str(from_minor(1200, "USD")) == "12.00"
    assert format_money(499, "USD") == "4.99 USD"
    assert format_money(250, "XTR") == "250 ⭐"


def test_received_amounts_round_down() -> None:
    assert received_to_minor(Decimal("4.99"), "USD") == 499
    assert received_to_minor(Decimal("4.989999"), "USD") == 498  # a fraction short is short


def test_parse_user_amounts() -> None:
    assert parse_amount("10", "USD") == 1000
    assert parse_amount(" 7,5 ", "USD") == 750
    for bad in ("", "abc", "0", "-3", "1.001", "1e999999", "1e20", "Infinity"):
        with pytest.raises(InvalidAmount):
            parse_amount(bad, "USD")


def test_discount_floor_and_rounding() -> None:
    assert discounted(499, 10, 50) == 450  # 449.1 → the customer pays the ceiling
    assert discounted(499, 100, 50) == 50  # never below the configured minimum
    assert discounted(499, 100, 0) == 1  # nor below one minor unit
    assert discounted(40, 10, 50) == 40  # a floor above the price does not raise the price
    assert discounted(1000, 0, 50) == 1000
    with pytest.raises(ValueError):
        discounted(1000, 101, 0)


def test_referral_and_stars() -> None:
    assert referral_reward(499, 10) == 49
    assert referral_reward(499, 0) == 0
    assert stars_price(250, 10) == 225
    assert stars_price(250, 100) == 1
    assert stars_price(3, 50) == 2


def test_offers_and_prices() -> None:
    plan = Plan("m1", {"en": "1 month"}, 30, Decimal("4.99"), "USD", 250)
    offer = plan_offer(plan)
    assert (offer.kind, offer.price_minor, offer.days, offer.stars) == ("plan", 499, 30, 250)
    price = price_offer(offer, 20, 50)
    assert (price.amount_minor, price.stars, price.discount_percent) == (400, 200, 20)
    payments = PaymentsConfig()
    topup = topup_offer(1000, payments)
    assert price_offer(topup, 50, 50).amount_minor == 1000  # top-ups are never discounted
    with pytest.raises(InvalidAmount):
        topup_offer(50, payments)  # below topup_min = 1
    with pytest.raises(InvalidAmount):
        topup_offer(50001, payments)  # above topup_max = 500
    assert topup_presets_minor(payments) == (500, 1000, 2500)
    assert min_price_minor(payments, "USD") == 10


@given(
    price=st.integers(min_value=1, max_value=10**12),
    percent=st.integers(min_value=0, max_value=100),
    floor=st.integers(min_value=0, max_value=10**6),
)
def test_discount_bounds(price: int, percent: int, floor: int) -> None:
    after = discounted(price, percent, floor)
    assert isinstance(after, int)
    assert 1 <= after <= price
    assert after >= min(price, max(floor, 1))
    # Exactly the ceiling of the exact discounted price, unless a floor lifted it.
    exact = Decimal(price) * (100 - percent) / 100
    if after > max(floor, 1):
        assert after - 1 < exact <= after


@given(st.integers(min_value=0, max_value=10**14))
def test_minor_round_trip(minor: int) -> None:
    assert to_minor(from_minor(minor, "USD"), "USD") == minor


def test_a_plan_is_offered_in_the_currencies_it_has_a_price_in() -> None:
    plan = Plan("m1", {"en": "1 month"}, 30, Decimal("4.99"), "USD", 0, {"RUB": Decimal("299"), "KWD": Decimal("1.5")})
    assert (plan_offer(plan).price_minor, plan_offer(plan).currency) == (499, "USD")
    assert (plan_offer(plan, "usd").price_minor, plan_offer(plan, "rub").currency) == (499, "RUB")
    assert plan_offer(plan, "RUB").price_minor == 29900
    assert plan_offer(plan, "KWD").price_minor == 1500  # 1.500 KWD: three decimals
    with pytest.raises(InvalidAmount):
        plan_offer(plan, "EUR")  # not sold in euros


def test_telegram_card_currencies_use_their_iso_minor_units() -> None:
    """Telegram's `exp` (currencies.json) is the ISO 4217 minor unit for every currency it takes."""
    assert {c for c in TELEGRAM_CURRENCIES if minor_exponent(c) == 0} == {
        "CLP",
        "ISK",
        "JPY",
        "KRW",
        "PYG",
        "UGX",
        "VND",
    }
    assert {c for c in TELEGRAM_CURRENCIES if minor_exponent(c) == 3} == {"KWD"}
    assert "XTR" not in TELEGRAM_CURRENCIES and "USD" in TELEGRAM_CURRENCIES


def test_receipt_provider_data_is_one_item_at_the_price() -> None:
    import json

    data = json.loads(receipt_provider_data("VPN, 30 days", 500, "JPY", 1))
    assert data == {
        "receipt": {
            "items": [
                {
                    "description": "VPN, 30 days",
                    "quantity": "1.00",
                    "amount": {"value": "500", "currency": "JPY"},
                    "vat_code": 1,
                    "payment_mode": "full_payment",
                    "payment_subject": "service",
                }
            ]
        }
    }
