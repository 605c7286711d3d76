"""Pro-rata upgrade arithmetic and the price per month: exact integers, every edge."""

from __future__ import annotations

import pytest

from vpnd.pricing import UpgradeTerms, per_month_minor, upgrade_credit, upgrade_terms

DAY = 86400


def terms(paid: int, days: int, remaining: int, price: int, *, floor: int = 50, paid_cur: str = "USD",
          cur: str = "USD") -> UpgradeTerms | None:  # fmt: skip
    return upgrade_terms(
        paid_minor=paid, paid_currency=paid_cur, paid_days=days, remaining_seconds=remaining,
        price_minor=price, currency=cur, floor_minor=floor,
    )  # fmt: skip


def test_credit_is_the_unused_share_rounded_down() -> None:
    assert upgrade_credit(499, 30, 15 * DAY) == 249  # 249.5 → 249: never a fraction not paid
    assert upgrade_credit(500, 30, 15 * DAY) == 250  # exact
    assert upgrade_credit(499, 30, 1) == 0  # 499 / 2592000 of a cent
    assert upgrade_credit(2_592_000, 30, 1) == 1  # one second of a plan priced one cent per second
    assert upgrade_credit(1200, 90, 90 * DAY - 1) == 1199


def test_credit_of_nothing_left_and_of_more_than_bought() -> None:
    assert upgrade_credit(499, 30, 0) == 0
    assert upgrade_credit(499, 30, -3600) == 0  # already ended
    # Days stacked from earlier purchases are not credited at this purchase's price: capped at its days.
    assert upgrade_credit(499, 30, 75 * DAY) == 499
    assert upgrade_credit(0, 30, 15 * DAY) == 0  # a free (zero) payment credits nothing
    with pytest.raises(ValueError):
        upgrade_credit(499, 0, DAY)


def test_price_after_credit() -> None:
    assert terms(499, 30, 15 * DAY, 1200) == UpgradeTerms(249, 1200, 951)
    assert terms(499, 30, 0, 1200) == UpgradeTerms(0, 1200, 1200)  # nothing left: the whole price


def test_floor_and_not_offered() -> None:
    # credit 998 of a 1000 price with a 50 floor: 2 would be below the floor → not offered (never paid back).
    assert terms(1000, 30, 30 * DAY - 1 * 2592, 1000, floor=50) == UpgradeTerms(999, 1000, None)
    # credit exactly price − floor: not offered either (it would sell at the floor and lose the rest).
    assert terms(950, 30, 30 * DAY, 1000, floor=50) == UpgradeTerms(950, 1000, None)
    # one below: sold at price − credit = floor + 1.
    assert terms(949, 30, 30 * DAY, 1000, floor=50) == UpgradeTerms(949, 1000, 51)
    # a zero floor still means one minor unit: no zero-amount invoice.
    assert terms(999, 30, 30 * DAY, 1000, floor=0) == UpgradeTerms(999, 1000, None)
    assert terms(998, 30, 30 * DAY, 1000, floor=0) == UpgradeTerms(998, 1000, 2)
    # a downgrade right after buying the dearer plan: not offered.
    assert terms(1200, 90, 90 * DAY - 60, 499) == UpgradeTerms(1199, 499, None)


def test_stars_credit_only_against_stars_and_no_currency_mixing() -> None:
    assert terms(250, 30, 15 * DAY, 600, floor=1, paid_cur="XTR", cur="XTR") == UpgradeTerms(125, 600, 475)
    assert terms(250, 30, 15 * DAY, 1200, paid_cur="XTR", cur="USD") is None  # Stars paid: no USD credit
    assert terms(499, 30, 15 * DAY, 600, floor=1, paid_cur="USD", cur="XTR") is None
    assert terms(499, 30, 15 * DAY, 1200, paid_cur="usd", cur="USD") == UpgradeTerms(249, 1200, 951)
    assert terms(29900, 30, 15 * DAY, 99900, paid_cur="RUB", cur="USD") is None  # other currency


def test_price_per_month_exact_and_rounded_half_up() -> None:
    assert per_month_minor(499, 30) == 499
    assert per_month_minor(1200, 90) == 400
    assert per_month_minor(1000, 90) == 333  # 333.33…
    assert per_month_minor(500, 90) == 167  # 166.66… → 167
    assert per_month_minor(5, 60) == 3  # 2.5 → 3 (half up)
    assert per_month_minor(4000, 365) == 329  # 328.77…
    assert per_month_minor(300, 7) == 1286  # 1285.71…
    with pytest.raises(ValueError):
        per_month_minor(499, 0)
