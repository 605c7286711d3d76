"""`vpnd admin users` and `vpnd admin audit` as real subprocesses: filters, keyset pages, --json, usage errors."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.admin.test_admin_roles import seed_people
from tests.harness import cli_result, sql, vpnd_cli

Cli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def cli(write_config: Callable[..., Path], db_dsn: str) -> Cli:
    return vpnd_cli(write_config(database={"dsn": db_dsn}))


def test_users_filters_pages_and_json(cli: Cli, db_dsn: str) -> None:
    groups = seed_people(db_dsn)
    for name in ("trial", "expiring", "paid", "active", "expired", "banned"):
        found = cli_result(cli("admin", "users", "--filter", name, "--json"))
        assert {row["id"] for row in found["users"]} == groups[name], name
        assert found["next_after"] is None
    ru = cli_result(cli("admin", "users", "--lang", "ru", "--json"))
    assert {row["id"] for row in ru["users"]} == groups["ru"] and {row["language"] for row in ru["users"]} == {"ru"}
    banned = cli_result(cli("admin", "users", "--filter", "banned", "--json"))["users"]
    assert all(row["banned"] and row["kind"] == "paid" for row in banned)

    # Page by page with --after: every user once, in id order.
    seen: list[int] = []
    after: int | None = None
    while True:
        args = ["admin", "users", "--limit", "7", "--json", *(["--after", str(after)] if after is not None else [])]
        page = cli_result(cli(*args))
        seen += [row["id"] for row in page["users"]]
        after = page["next_after"]
        if after is None:
            break
    assert seen == list(range(3000, 3025))

    text = cli("admin", "users", "--filter", "expiring")
    assert text.returncode == 0, text.stderr
    assert [line.split()[0] for line in text.stdout.splitlines()] == ["3005", "3006", "3007"]
    more = cli("admin", "users", "--limit", "10")
    assert more.stdout.splitlines()[-1] == "more: --after 3009"

    for bad in (["--filter", "rich"], ["--lang", "xx"], ["--limit", "0"], ["--limit", "101"]):
        refused = cli("admin", "users", *bad, "--json")
        assert refused.returncode == 2, bad
    assert json.loads(cli("admin", "users", "--lang", "xx", "--json").stdout)["ok"] is False
    assert sql(db_dsn, "SELECT count(*) FROM admin_audit WHERE action = 'users' AND details->>'via' = 'cli'")[0][0] >= 9


def test_audit_filters_pages_and_json(cli: Cli, db_dsn: str) -> None:
    sql(
        db_dsn,
        "INSERT INTO admin_audit (admin_id, action, target, result, details) "
        "SELECT CASE WHEN g % 2 = 0 THEN 77 ELSE 88 END, CASE WHEN g % 3 = 0 THEN 'grant' ELSE 'lookup' END, "
        "(4000 + g % 5)::text, CASE WHEN g = 40 THEN 'forbidden' ELSE 'ok' END, jsonb_build_object('g', g) "
        "FROM generate_series(1, 40) g",
    )
    grants = cli_result(cli("admin", "audit", "--action", "grant", "--json"))["entries"]
    assert len(grants) == 13 and {e["action"] for e in grants} == {"grant"}
    assert [e["id"] for e in grants] == sorted((e["id"] for e in grants), reverse=True), "newest first"
    by_admin = cli_result(cli("admin", "audit", "--admin", "77", "--action", "lookup", "--json"))["entries"]
    assert {e["admin_id"] for e in by_admin} == {77} and len(by_admin) == 14
    by_target = cli_result(cli("admin", "audit", "--target", "4003", "--admin", "88", "--json"))["entries"]
    assert {(e["target"], e["admin_id"]) for e in by_target} == {("4003", 88)} and len(by_target) == 4
    newest = cli_result(cli("admin", "audit", "--admin", "88", "--limit", "1", "--json"))
    assert newest["entries"][0]["details"] == {"g": 39}

    # Older pages with --before; the CLI's own looks are audited (and are the newest rows).
    seen: list[int] = []
    before: int | None = None
    while True:
        args = ["admin", "audit", "--admin", "77", "--limit", "6", "--json"]
        page = cli_result(cli(*args, *(["--before", str(before)] if before is not None else [])))
        seen += [e["id"] for e in page["entries"]]
        before = page["next_before"]
        if before is None:
            break
    assert len(seen) == len(set(seen)) == 20 and seen == sorted(seen, reverse=True)

    text = cli("admin", "audit", "--action", "lookup", "--admin", "77", "--limit", "2")
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert "admin 77  lookup  " in lines[0] and lines[-1].startswith("more: --before ")
    looks = sql(db_dsn, "SELECT count(*) FROM admin_audit WHERE action = 'audit' AND admin_id = 0")[0][0]
    assert looks >= 8
    assert cli("admin", "audit", "--limit", "0").returncode == 2
