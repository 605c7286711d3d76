"""Benchmark — what traffic quotas cost the Xray writer's traffic reading.

    python -m bench quota                    # 10,000 and 100,000 online subscribers, 3 readings each
    python -m bench quota --sizes 20000

Every subscriber is online (every counter moved since the last reading: the worst case). One reading is
what a node's writer does every `[xray] traffic_interval`: `store_traffic` in batches of 2,000 (one
transaction each). Measured three ways on the same database:

* **no quota accounting** — `store_traffic` without quota rules (what vpnd did before plans had limits);
* **quota, unlimited plan** — with the rules, every subscriber on a plan without a quota (usage is still
  counted per period, nobody can cross a level);
* **quota, 100 GB plan** — every subscriber on a plan with a quota; in the first measured reading a tenth
  of them cross 80 % (their notices queued, in the same transactions).

Figures: the median wall time of one whole reading and the database's CPU time for it.
"""

from __future__ import annotations

import argparse
import time
from decimal import Decimal
from typing import Any

import psycopg

from bench.common import bench_database, machine_line, median, pick, print_table, runs
from vpnd.config import GIB, Config, Plan
from vpnd.db.quota import QuotaRules
from vpnd.db.xray_state import store_traffic
from vpnd.services.limits import rules_for_config
from vpnd.texts import Texts

BATCH = 2000  # vpnd.nurseries.xray.BATCH_SIZE
FIRST_ID = 10_000_000


def _plans() -> Config:
    def plan(code: str, gb: int) -> Plan:
        return Plan(code=code, title={"en": code}, days=30, price=Decimal("5"), currency="USD", stars=0, traffic_gb=gb)

    return Config(path="bench", plans=(plan("unl", 0), plan("q100", 100)))


def _populate(dsn: str, count: int, plan_code: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO users (id, referral_code) SELECT g, 'r' || g FROM generate_series(%(a)s, %(b)s) g",
            {"a": FIRST_ID, "b": FIRST_ID + count - 1},
        )
        conn.execute(
            "INSERT INTO subscriptions (user_id, kind, status, uuid, sub_token, plan_code, expires_at) "
            "SELECT g, 'paid', 'active', gen_random_uuid(), 't' || g, %(plan)s, now() + interval '30 days' "
            "FROM generate_series(%(a)s, %(b)s) g",
            {"a": FIRST_ID, "b": FIRST_ID + count - 1, "plan": plan_code},
        )
        conn.execute("ANALYZE")


def _reading(dsn: str, count: int, total_bytes: int, rules: QuotaRules | None) -> float:
    """One whole reading: every user's counter at `total_bytes` (split up/down), in writer batches."""
    samples = [(FIRST_ID + i, total_bytes // 10, total_bytes - total_bytes // 10) for i in range(count)]
    started = time.perf_counter()
    with psycopg.connect(dsn) as conn:
        for start in range(0, count, BATCH):
            with conn.transaction():
                store_traffic(conn, samples[start : start + BATCH], node="local", quota=rules)
    return time.perf_counter() - started


def measure(dsn_of: Any, count: int, label: str, plan_code: str, with_rules: bool) -> dict[str, float]:
    config = _plans()
    rules = rules_for_config(config, Texts.load()) if with_rules else None
    dsn = dsn_of(f"{label}_{count}")
    _populate(dsn, count, plan_code)
    _reading(dsn, count, 1024, rules)  # first reading: rows and periods created
    if plan_code == "q100":  # every tenth subscriber just under 80 %: the next reading queues their notice
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("UPDATE traffic_periods SET used_bytes = %s WHERE user_id %% 10 = 0", (80 * GIB - 1,))
    seconds = []
    for reading in range(runs(3, 2)):
        seconds.append(_reading(dsn, count, 2048 * (reading + 2), rules))
    return {"wall": median(seconds)}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench quota", description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=pick([10_000, 100_000], [10_000]))
    args = parser.parse_args(argv)
    print(f"# quota accounting — {machine_line()}")
    rows = []
    with bench_database() as db:
        for count in args.sizes:
            base = measure(db.fresh, count, "none", "unl", False)
            unlimited = measure(db.fresh, count, "unl", "unl", True)
            limited = measure(db.fresh, count, "q100", "q100", True)
            rows.append(
                [
                    f"{count:,}",
                    f"{base['wall']:.2f}",
                    f"{unlimited['wall']:.2f}",
                    f"{limited['wall']:.2f}",
                    f"{1e6 * (limited['wall'] - base['wall']) / count:.1f}",
                ]
            )
    print_table(
        "One traffic reading, every subscriber online (median seconds)",
        ["subscribers", "no quota accounting", "quota, unlimited plan", "quota, 100 GB plan", "added µs/user"],
        rows,
    )
