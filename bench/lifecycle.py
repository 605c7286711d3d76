"""Benchmark 5 — lifecycle: `vpnd run` → READY=1, and SIGTERM → exit, idle and under load.

    python -m bench lifecycle                  # 10 runs of each
    VPND_BENCH_RUNS=5 python -m bench lifecycle

vpnd runs as a subprocess with a fake NOTIFY_SOCKET, exactly as under systemd, on a fresh copy of a
migrated database, against a fresh fake Bot API:

* **idle**: nothing to do; start → READY=1, then, 1–2 s later (a random phase against the daemon's
  periodic loops), SIGTERM → exit 0.
* **under load**: 1,000 updates are already queued at the fake when vpnd starts (a backlog after
  downtime), and users keep sending /start at 100 updates/s (limits lifted, as in `pipeline`). READY=1
  is timed with that backlog; SIGTERM comes 3 s into the load, with handlers in flight, and is timed
  to exit 0 (in-flight handlers finish within [shutdown].grace_seconds = 10; queued ones stay in the
  inbox for the next start).
"""

from __future__ import annotations

import argparse
import functools
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

import trio

from bench.common import (
    BenchDatabase,
    TimedTelegram,
    bench_database,
    machine_line,
    median,
    print_table,
    runs,
    start_vpnd,
)
from vpnd_sandbox.telegram_fake import serve_fake_telegram

USERS = 50
BACKLOG = 1000
LOAD_RATE = 100.0
LOAD_BEFORE_SIGTERM = 3.0


async def one_run(db: BenchDatabase, workdir: Path, loaded: bool) -> dict[str, float]:
    dsn = db.fresh("lifecycle")
    fake = TimedTelegram()
    users = [60_000_000 + i for i in range(USERS)]
    for user_id in users:
        fake.add_user(user_id, "User")
    overrides: dict[str, Any] = {}
    if loaded:
        fake.unlimited()
        overrides["telegram"] = {"rate_per_second": 1000.0, "per_chat_per_second": 100.0}
        for index in range(BACKLOG):
            fake.user_sends(users[index % USERS], "/start")
    sent = BACKLOG if loaded else 0
    async with trio.open_nursery() as nursery:
        telegram_url = await nursery.start(functools.partial(serve_fake_telegram, fake))
        started = trio.current_time()
        bot = await start_vpnd(nursery, workdir, dsn, fake, telegram_url, **overrides)
        ready = trio.current_time() - started
        in_flight = 0.0
        if not loaded:
            await trio.sleep(random.Random(len(db.cluster.datadir.name) + db.counter).uniform(1.0, 2.0))
        else:
            rng = random.Random(0)

            async def generate() -> None:
                nonlocal sent
                next_at = trio.current_time()
                while True:
                    next_at += 1 / LOAD_RATE
                    await trio.sleep_until(next_at)
                    fake.user_sends(rng.choice(users), "/start")
                    sent += 1

            nursery.start_soon(generate)
            await trio.sleep(LOAD_BEFORE_SIGTERM)
            in_flight = sent - sum(fake.outputs(u) for u in users)
        stop = await bot.stop(timeout=60)
        code = bot.process.returncode
        nursery.cancel_scope.cancel()
    if code != 0:
        raise RuntimeError(f"vpnd exited {code}:\n{bot.log_tail()}")
    return {"ready": ready, "stop": stop, "unanswered_at_sigterm": in_flight}


async def measure(count: int, db: BenchDatabase, workdir: Path) -> dict[str, list[dict[str, float]]]:
    results: dict[str, list[dict[str, float]]] = {"idle": [], "load": []}
    for index in range(count):
        for mode in ("idle", "load"):
            result = await one_run(db, workdir, mode == "load")
            results[mode].append(result)
            print(
                f"  run {index + 1}/{count} {mode:<4}  READY {result['ready']:.3f}s  SIGTERM→exit {result['stop']:.3f}s"
                + (
                    f"  (updates unanswered at SIGTERM: {result['unanswered_at_sigterm']:.0f})"
                    if mode == "load"
                    else ""
                ),
                flush=True,
            )
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench lifecycle", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=runs(10, 3))
    args, _ = parser.parse_known_args(argv or [])
    print(f"# lifecycle — {machine_line()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="vpnd-bench-") as tmp, bench_database() as db:
        results = trio.run(measure, args.runs, db, Path(tmp))
    rows = []
    for mode, label in (("idle", "idle"), ("load", f"backlog {BACKLOG} updates, {LOAD_RATE:.0f} updates/s")):
        values = results[mode]
        ready = [r["ready"] for r in values]
        stop = [r["stop"] for r in values]
        rows.append(
            [
                label,
                median(ready),
                f"{min(ready):.2f}–{max(ready):.2f}",
                median(stop),
                f"{min(stop):.2f}–{max(stop):.2f}",
                median([r["unanswered_at_sigterm"] for r in values]) if mode == "load" else "-",
            ]
        )
    print_table(
        f"lifecycle: medians of {args.runs} runs (seconds)",
        ["state", "run → READY=1", "range", "SIGTERM → exit 0", "range", "unanswered at SIGTERM"],
        rows,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
