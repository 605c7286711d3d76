"""Schema versions: fresh install, upgrades in order, concurrency, and refusing a newer database."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from vpnd.db.migrations import Migration, Schema, SchemaError, current_version, migrate, packaged_schema, pending

REPO = Path(__file__).resolve().parent.parent


def catalog(dsn: str) -> list[tuple[Any, ...]]:
    """Tables, columns, types, defaults, constraints and indexes: enough to compare two schemas."""
    with psycopg.connect(dsn) as conn:
        columns = conn.execute(
            "SELECT table_name, column_name, data_type, is_nullable, column_default "
            "FROM information_schema.columns WHERE table_schema = 'public' ORDER BY 1, 2"
        ).fetchall()
        constraints = conn.execute(
            "SELECT conrelid::regclass::text, pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE connamespace = 'public'::regnamespace ORDER BY 1, 2"
        ).fetchall()
        indexes = conn.execute("SELECT indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1").fetchall()
        triggers = conn.execute(
            "SELECT pg_get_triggerdef(oid) FROM pg_trigger WHERE NOT tgisinternal ORDER BY 1"
        ).fetchall()
        functions = conn.execute(
            "SELECT pg_get_functiondef(oid) FROM pg_proc WHERE pronamespace = 'public'::regnamespace ORDER BY 1"
        ).fetchall()
    return [*columns, *constraints, *indexes, *triggers, *functions]


def test_packaged_schema_is_the_top_level_schema_sql() -> None:
    schema = packaged_schema()
    assert schema.baseline_sql == (REPO / "schema.sql").read_text()
    versions = [m.version for m in schema.migrations]
    assert versions == sorted(set(versions)) and all(v >= 2 for v in versions)


def test_fresh_database_gets_current_schema(empty_db_dsn: str) -> None:
    with psycopg.connect(empty_db_dsn, autocommit=True) as conn:
        schema = packaged_schema()
        assert list(pending(conn, schema)) == list(range(1, schema.version + 1))
        migrate(conn, schema)
        assert current_version(conn) == schema.version
        assert migrate(conn, schema) == []  # idempotent
        assert list(pending(conn, schema)) == []


V1 = (
    "CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz);\n"
    "CREATE TABLE things (id bigint PRIMARY KEY);\n"
)
M2 = "ALTER TABLE things ADD COLUMN label text NOT NULL DEFAULT '';\n"
M3 = "CREATE INDEX things_label_idx ON things (label);\n"


def test_upgrade_path_equals_fresh_path(pg_server: Any, empty_db_dsn: str) -> None:
    """Baseline + migrations 2, 3 gives the same schema as the current schema.sql applied fresh."""
    old = Schema(V1)
    new = Schema(V1 + M2 + M3, (Migration(2, "label", M2), Migration(3, "label_index", M3)))
    with psycopg.connect(empty_db_dsn, autocommit=True) as conn:
        assert migrate(conn, old) == [1]
        assert migrate(conn, new) == [2, 3]
        assert current_version(conn) == 3
    fresh = pg_server.create_database(f"fresh_{Path(empty_db_dsn).name}")
    with psycopg.connect(fresh, autocommit=True) as conn:
        assert migrate(conn, new) == [1, 2, 3]
    assert catalog(empty_db_dsn) == catalog(fresh)


def test_failed_migration_leaves_last_good_version(empty_db_dsn: str) -> None:
    broken = Schema(V1, (Migration(2, "ok", M2), Migration(3, "broken", "ALTER TABLE nope ADD x int;")))
    with psycopg.connect(empty_db_dsn, autocommit=True) as conn:
        migrate(conn, Schema(V1))
        with pytest.raises(psycopg.errors.UndefinedTable):
            migrate(conn, broken)
        assert current_version(conn) == 2


def test_newer_database_is_refused(empty_db_dsn: str) -> None:
    schema = Schema(V1, (Migration(2, "label", M2),))
    with psycopg.connect(empty_db_dsn, autocommit=True) as conn:
        migrate(conn, schema)
        with pytest.raises(SchemaError, match="version 2, newer than this vpnd knows \\(up to 1\\)"):
            migrate(conn, Schema(V1))


def test_concurrent_migrations_in_threads_apply_once(empty_db_dsn: str) -> None:
    schema = Schema(V1, (Migration(2, "label", M2), Migration(3, "label_index", M3)))
    results: list[list[int]] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            with psycopg.connect(empty_db_dsn, autocommit=True) as conn:
                results.append(migrate(conn, schema))
        except Exception as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    assert sorted(results, key=len) == [[], [], [], [1, 2, 3]]


def test_two_concurrent_vpnd_migrate_commands(empty_db_dsn: str, write_config: Callable[..., Path]) -> None:
    config = write_config(database={"dsn": empty_db_dsn})
    command = [sys.executable, "-m", "vpnd", "migrate", "--config", str(config)]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    with psycopg.connect(empty_db_dsn) as conn:
        rows = conn.execute("SELECT version, count(*) FROM schema_migrations GROUP BY 1 ORDER BY 1").fetchall()
    assert rows == [(v, 1) for v in range(1, packaged_schema().version + 1)]
    check = subprocess.run([*command, "--check"], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and "pending migrations: none" in check.stdout


def test_notify_migration_on_a_version_4_database_equals_the_fresh_schema(pg_server: Any, empty_db_dsn: str) -> None:
    """0005 (commit-time notify triggers) applied to a database at version 4 gives what schema.sql gives."""
    schema = packaged_schema()
    notify = next(m for m in schema.migrations if m.name == "notify")
    with psycopg.connect(empty_db_dsn, autocommit=True) as conn:
        migrate(conn, schema)
        conn.execute("DROP FUNCTION vpnd_notify() CASCADE")  # and with it the triggers: version 4 had neither
        undo_card_payments(conn)  # nor what 0006 added
        conn.execute("DELETE FROM schema_migrations WHERE version >= %s", (notify.version,))
        since = [m.version for m in schema.migrations if m.version >= notify.version]  # numbers may skip (branches)
        assert list(pending(conn, schema)) == since
        assert migrate(conn, schema) == since
    fresh = pg_server.create_database(f"fresh_{Path(empty_db_dsn).name}")
    with psycopg.connect(fresh, autocommit=True) as conn:
        migrate(conn, schema)
    assert catalog(empty_db_dsn) == catalog(fresh)
    assert sum("vpnd_notify" in str(row) for row in catalog(fresh)) == 4  # the function and three triggers


def undo_card_payments(conn: psycopg.Connection[Any]) -> None:
    """Back to version 5: the method/provider checks without 'card', no Telegram charge id."""
    conn.execute(
        "ALTER TABLE payments DROP COLUMN telegram_payment_charge_id;"
        "ALTER TABLE purchases DROP CONSTRAINT purchases_method_check, ADD CONSTRAINT purchases_method_check "
        "CHECK (method IN ('cryptopay', 'stars', 'balance'));"
        "ALTER TABLE payments DROP CONSTRAINT payments_provider_check, ADD CONSTRAINT payments_provider_check "
        "CHECK (provider IN ('cryptopay', 'stars', 'balance'));"
    )


def test_card_payments_migration_on_a_version_5_database_equals_the_fresh_schema(
    pg_server: Any, empty_db_dsn: str
) -> None:
    """0006 (card payments) applied to a database at version 5, with a Stars payment in it, gives schema.sql."""
    schema = packaged_schema()
    card = next(m for m in schema.migrations if m.name == "card_payments")
    with psycopg.connect(empty_db_dsn, autocommit=True) as conn:
        migrate(conn, schema)
        undo_card_payments(conn)
        conn.execute("DELETE FROM schema_migrations WHERE version >= %s", (card.version,))
        conn.execute("INSERT INTO users (id, referral_code) VALUES (1, 'r1')")
        conn.execute(
            "INSERT INTO purchases (id, user_id, kind, method, amount_minor, currency, expires_at, status) "
            "VALUES (1, 1, 'plan', 'stars', 499, 'USD', now(), 'paid')"
        )
        conn.execute(
            "INSERT INTO payments (purchase_id, user_id, provider, provider_payment_id, amount_minor, currency, "
            "outcome) VALUES (1, 1, 'stars', 'stx1', 250, 'XTR', 'granted')"
        )
        assert migrate(conn, schema) == [m.version for m in schema.migrations if m.version >= card.version]
        assert conn.execute("SELECT provider, telegram_payment_charge_id FROM payments").fetchall() == [("stars", None)]
        conn.execute("DELETE FROM payments; DELETE FROM purchases; DELETE FROM users")
    fresh = pg_server.create_database(f"fresh_{Path(empty_db_dsn).name}")
    with psycopg.connect(fresh, autocommit=True) as conn:
        migrate(conn, schema)
    assert catalog(empty_db_dsn) == catalog(fresh)
