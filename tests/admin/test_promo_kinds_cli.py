"""`vpnd admin promo create --kind ...` as a real subprocess: each kind, the conditions, the old
`CODE PERCENT` form, clear refusals; `promo list` shows what each code does and for whom."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

from tests.harness import PLANS, cli_result, sql, vpnd_cli


def test_every_kind_and_condition_from_the_cli(write_config: Callable[..., Path], db_dsn: str) -> None:
    path = write_config(database={"dsn": db_dsn})
    path.write_text(path.read_text() + PLANS)  # plans come last in TOML
    cli = vpnd_cli(path)

    def create(*args: str) -> subprocess.CompletedProcess[str]:
        return cli("admin", "promo", "create", *args)

    old = create("spring", "20", "--max-uses", "5")
    assert old.returncode == 0 and "created SPRING: -20%, at most 5 uses" in old.stdout, old.stderr
    made = create("TWO", "--kind", "amount", "--value", "2", "--plan", "m1", "--first-purchase", "--days", "30")
    assert made.returncode == 0 and "created TWO: -2.00 USD, plan m1, first purchase, until" in made.stdout
    assert create("WEEK", "--kind", "days", "--value", "7").returncode == 0
    assert create("BACK", "--kind", "balance", "--value", "3.50", "--user", "1001").returncode == 0
    assert create("HALF", "--value", "50").returncode == 0  # --kind defaults to percent

    for args, why in (
        (("X1", "20", "--kind", "days"), "either CODE PERCENT or --kind"),
        (("X2", "--kind", "days"), "--value"),
        (("X3", "--kind", "days", "--value", "7", "--plan", "m1"), "bound to a plan"),
        (("X4", "--kind", "amount", "--value", "2", "--plan", "nope"), "no plan 'nope'"),
        (("X6", "--kind", "amount", "--value", "1.001"), "minor units"),
        (("X8", "--kind", "coupon", "--value", "1"), "invalid choice"),
        (("X9", "--kind", "balance", "--value", "1", "--user", "-5"), "user id"),
    ):
        refused = create(*args)
        assert refused.returncode == 2 and why in refused.stderr, (args, refused.stderr)
    assert create("two", "--kind", "days", "--value", "1").returncode == 1  # exists

    listing = cli_result(cli("admin", "promo", "list", "--json"))
    assert [
        (p["code"], p["kind"], p["percent"], p["amount_minor"], p["grant_days"], p["plan_code"], p["user_id"],
         p["first_purchase"])
        for p in listing
    ] == [
        ("BACK", "balance", None, 350, None, None, 1001, False),
        ("HALF", "percent", 50, None, None, None, None, False),
        ("SPRING", "percent", 20, None, None, None, None, False),
        ("TWO", "amount", None, 200, None, "m1", None, True),
        ("WEEK", "days", None, None, 7, None, None, False),
    ]  # fmt: skip
    text = cli("admin", "promo", "list").stdout
    assert "+3.50 USD balance, user 1001" in text and "+7 days" in text and "-20%" in text
    audit = sql(db_dsn, "SELECT action, target, result FROM admin_audit WHERE action = 'promo_create' ORDER BY id")
    assert [row[1:] for row in audit if row[2] == "ok"] == [
        ("SPRING", "ok"), ("TWO", "ok"), ("WEEK", "ok"), ("BACK", "ok"), ("HALF", "ok")
    ]  # fmt: skip
