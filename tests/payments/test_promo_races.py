"""Promo codes redeemed at the same moment, on a real PostgreSQL: the last use goes to exactly one user,
one user cannot redeem a code twice; and the pure rules for an amount off."""

from __future__ import annotations

import threading
from decimal import Decimal

import psycopg
import pytest

from tests.admin.harness import seed_users
from tests.harness import scalar, sql
from vpnd.db import promo
from vpnd.pricing import Offer, amount_off, price_offer


def race(dsn: str, user_ids: list[int], code: str) -> list[promo.PromoCheck]:
    """Every user types `code` at once, each in their own transaction (as `apply_promo_code` runs it)."""
    barrier = threading.Barrier(len(user_ids))
    results: list[promo.PromoCheck] = []
    errors: list[BaseException] = []

    def redeem(user_id: int) -> None:
        try:
            with psycopg.connect(dsn, connect_timeout=5) as conn:
                conn.execute("SET statement_timeout = '10s'")
                barrier.wait(timeout=10)
                with conn.transaction():
                    promo.lock_user(conn, user_id)
                    results.append(promo.apply_promo(conn, user_id, code))
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=redeem, args=(user_id,)) for user_id in user_ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors, errors
    assert len(results) == len(user_ids)
    return results


def test_the_last_use_of_a_balance_code_goes_to_exactly_one_of_many_racing_users(db_dsn: str) -> None:
    users = seed_users(db_dsn, None, 2000, 8)
    with psycopg.connect(db_dsn) as conn:
        promo.create_promo(
            conn, "LAST", promo.PromoTerms(kind="balance", amount_minor=500, currency="USD"), max_uses=1
        )
    results = race(db_dsn, users, "LAST")
    assert sorted(r.reason or "ok" for r in results) == ["ok"] + ["promo.exhausted"] * 7
    assert scalar(db_dsn, "SELECT used_count FROM promo_codes WHERE code = 'LAST'") == 1
    assert scalar(db_dsn, "SELECT count(*) FROM promo_redemptions WHERE code = 'LAST'") == 1
    assert sql(db_dsn, "SELECT count(*), sum(delta_minor) FROM balance_ledger") == [(1, 500)]
    assert scalar(db_dsn, "SELECT sum(balance_minor) FROM users") == 500


def test_a_days_code_with_three_uses_gives_days_to_three_of_ten_racing_users(db_dsn: str) -> None:
    users = seed_users(db_dsn, None, 3000, 10)
    with psycopg.connect(db_dsn) as conn:
        promo.create_promo(conn, "THREE", promo.PromoTerms(kind="days", grant_days=7), max_uses=3)
    results = race(db_dsn, users, "three")
    winners = [r for r in results if r.ok]
    assert len(winners) == 3 and all(r.subscription is not None for r in winners)
    assert {r.reason for r in results if not r.ok} == {"promo.exhausted"}
    assert scalar(db_dsn, "SELECT count(*) FROM subscriptions") == 3
    assert scalar(db_dsn, "SELECT used_count FROM promo_codes") == 3


def test_one_user_redeeming_the_same_code_twice_at_once_gets_it_once(db_dsn: str) -> None:
    (user,) = seed_users(db_dsn, None, 4000, 1)
    with psycopg.connect(db_dsn) as conn:
        promo.create_promo(conn, "TWICE", promo.PromoTerms(kind="balance", amount_minor=250, currency="USD"))
    results = race(db_dsn, [user, user, user], "TWICE")
    assert sorted(r.reason or "ok" for r in results) == ["ok", "promo.already_used", "promo.already_used"]
    assert scalar(db_dsn, "SELECT balance_minor FROM users WHERE id = %s", user) == 250
    assert scalar(db_dsn, "SELECT used_count FROM promo_codes") == 1


def test_bad_terms_are_refused_before_anything_is_written(db_dsn: str) -> None:
    with psycopg.connect(db_dsn) as conn:
        for kind, value in (("percent", "0"), ("percent", "101"), ("amount", "0"), ("amount", "-1"),
                            ("days", "0"), ("days", "2.5"), ("balance", "abc"), ("gift", "5")):  # fmt: skip
            with pytest.raises(ValueError):
                promo.PromoTerms.parse(kind, value, currency="USD")
        with pytest.raises(ValueError, match="bound to a plan"):
            promo.PromoTerms.parse("days", "7", currency="USD", plan_code="m1")
        terms = promo.PromoTerms.parse("amount", "2,50", currency="usd", plan_code="m1", first_purchase=True)
        created = promo.create_promo(conn, "fine", terms)
    assert (created.kind, created.amount_minor, created.currency, created.plan_code) == ("amount", 250, "USD", "m1")
    assert created.summary() == "-2.50 USD, plan m1, first purchase"
    assert created.discount_for("m1", "USD") == (0, 250)
    assert created.discount_for("y1", "USD") == (0, 0)  # another plan
    assert created.discount_for("m1", "EUR") == (0, 0)  # another currency: no conversion guessed
    assert scalar(db_dsn, "SELECT count(*) FROM promo_codes") == 1
    with psycopg.connect(db_dsn) as conn, pytest.raises(psycopg.errors.CheckViolation):
        conn.execute("INSERT INTO promo_codes (code, kind, grant_days, plan_code) VALUES ('X', 'days', 3, 'm1')")


def test_an_amount_off_never_goes_below_the_floor_and_scales_the_stars_price() -> None:
    assert amount_off(499, 200, 10) == 299
    assert amount_off(499, 10_000, 10) == 10
    assert amount_off(499, 0, 10) == 499
    assert amount_off(5, 2, 10) == 5  # a price under the floor is never raised
    offer = Offer(kind="plan", plan_code="m1", days=30, price_minor=499, currency="USD", stars=250)
    price = price_offer(offer, 0, 10, amount_off_minor=200)
    assert (price.amount_minor, price.discount_percent, price.stars) == (299, 0, 150)
    assert price_offer(offer, 20, 10, amount_off_minor=200).amount_minor == 400  # a percent wins; never both
    topup = Offer(kind="topup", plan_code=None, days=None, price_minor=1000, currency="USD", stars=None)
    assert price_offer(topup, 0, 10, amount_off_minor=200).amount_minor == 1000
    assert Decimal(price.amount_minor) / 100 == Decimal("2.99")
