"""Migration 0016 (referral earnings, withdrawals) on a database from before it: the same schema as
schema.sql, and rewards earned before it become withdrawable as far as the balance still holds them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg

from tests.test_migrations import catalog
from vpnd.db.migrations import migrate, packaged_schema


def test_referral_migration_backfills_earnings_and_equals_the_fresh_schema(pg_server: Any, empty_db_dsn: str) -> None:
    schema = packaged_schema()
    levels = next(m for m in schema.migrations if m.name == "referral_levels")
    with psycopg.connect(empty_db_dsn, autocommit=True) as conn:
        migrate(conn, schema)
        conn.execute("DROP TABLE withdrawals; DROP TABLE referral_earnings")
        conn.execute("DELETE FROM schema_migrations WHERE version >= %s", (levels.version,))
        # (user, balance, ledger rows): earned and kept; earned then spent past it; earned then reversed; none.
        users = {
            1: (800, [(300, "referral_reward"), (500, "topup")]),
            2: (200, [(500, "referral_reward"), (-300, "purchase")]),
            3: (100, [(300, "referral_reward"), (-300, "referral_reversal"), (100, "topup")]),
            4: (900, [(900, "topup")]),
        }
        for user_id, (balance, rows) in users.items():
            conn.execute(
                "INSERT INTO users (id, referral_code, balance_minor) VALUES (%s, %s, %s)",
                (user_id, f"r{user_id}", balance),
            )
            for index, (delta, reason) in enumerate(rows):
                conn.execute(
                    "INSERT INTO balance_ledger (user_id, delta_minor, reason, reference) VALUES (%s, %s, %s, %s)",
                    (user_id, delta, reason, f"seed:{user_id}:{index}"),
                )
        assert migrate(conn, schema) == [m.version for m in schema.migrations if m.version >= levels.version]
        earnings = conn.execute("SELECT user_id, withdrawable_minor FROM referral_earnings ORDER BY user_id").fetchall()
        assert earnings == [(1, 300), (2, 200)]
        # Idempotent: running its SQL again changes nothing.
        conn.execute(levels.sql)
        assert conn.execute("SELECT count(*) FROM referral_earnings").fetchone() == (2,)
    fresh = pg_server.create_database(f"fresh_{Path(empty_db_dsn).name}")
    with psycopg.connect(fresh, autocommit=True) as conn:
        migrate(conn, schema)
    assert catalog(empty_db_dsn) == catalog(fresh)
