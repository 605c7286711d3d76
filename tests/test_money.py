"""vpnd.money: amounts shown in the currency's own minor units (pure; the bot-level check is in
tests/telegram/test_money_shown.py)."""

from __future__ import annotations

from decimal import Decimal

import pytest

from vpnd.money import format_money, from_minor, minor_exponent
from vpnd.pricing import to_minor


@pytest.mark.parametrize(
    ("minor", "currency", "shown"),
    [
        (499, "USD", "4.99 USD"),
        (500, "JPY", "500 JPY"),
        (1234, "KWD", "1.234 KWD"),
        (1234, "bhd", "1.234 bhd"),
        (250, "XTR", "250 ⭐"),
        (1_500_000_000, "TON", "1.500000000 TON"),
        (2_500_000, "USDT", "2.500000 USDT"),
        (7, "EUR", "0.07 EUR"),
    ],
)
def test_format_money(minor: int, currency: str, shown: str) -> None:
    assert format_money(minor, currency) == shown


@pytest.mark.parametrize("currency", ["USD", "JPY", "KWD", "TON", "USDT", "XTR"])
def test_from_minor_is_the_inverse_of_to_minor(currency: str) -> None:
    for minor in (1, 99, 1000, 123456789):
        assert to_minor(from_minor(minor, currency), currency) == minor
    assert from_minor(1, currency) == Decimal(1).scaleb(-minor_exponent(currency))
