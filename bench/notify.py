"""Benchmark — `vpnd admin revoke` → the user removed from Xray, reconcile only vs commit-time notify.

    python -m bench notify                         # 3 revokes before, 10 after, reconcile_interval 60 s
    python -m bench notify --reconcile-interval 20 --before 2

The same `vpnd run` (a subprocess) against the fake Xray API, twice: *before* on a database whose
notify triggers (migration 0005) are dropped — the CLI's commit wakes nobody, as it was, so the
Xray writer sees the revoke at its next periodic round — and *after* with the triggers, where the
commit's notification wakes the writer through the daemon's listener. Each revoke is a real
`python -m vpnd admin revoke` process; the latency runs from its confirmation line (printed after
its commit) to the fake Xray no longer listing the user. A random pause of up to 5 s separates revokes. Before, a revoke
waits for the next periodic round: up to `reconcile_interval` (here close to all of it, as each
revoke follows the previous round by a few seconds).
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
import trio

from bench.common import (
    PUBLIC_KEY,
    BenchDatabase,
    bench_database,
    machine_line,
    median,
    pick,
    print_table,
    start_vpnd,
)
from bench.xray_support import TAG, server_template
from vpnd.db.subscriptions import grant_days
from vpnd_sandbox.postgres import free_port
from vpnd_sandbox.telegram_fake import FakeTelegram, serve_fake_telegram
from vpnd_sandbox.xray_fake import FakeXray, start_fake_xray

USER_BASE = 50_000_000


def seed(dsn: str, count: int, *, triggers: bool) -> list[int]:
    """`count` users with 30 days each; without `triggers`, the schema as it was before migration 0005."""
    ids = list(range(USER_BASE, USER_BASE + count))
    with psycopg.connect(dsn) as conn:
        if not triggers:
            conn.execute("DROP FUNCTION vpnd_notify() CASCADE")
        conn.execute(
            "INSERT INTO users (id, first_name, referral_code) SELECT g, 'User', 'n' || g FROM unnest(%s::bigint[]) g",
            (ids,),
        )
        for user_id in ids:
            grant_days(conn, user_id, 30, kind="paid")
    return ids


async def revoke(config: Path, user_id: int, xray: FakeXray, bound: float) -> tuple[float, float]:
    """(seconds the CLI took to commit, seconds from its "revoked" line to the user gone from Xray).

    The CLI prints that line after its commit; the fake Xray is watched from before the CLI starts,
    so a removal that comes before the line is read counts as 0, not as the CLI's exit time.
    """
    email = f"u{user_id}"
    gone_at = 0.0

    async def watch() -> None:
        nonlocal gone_at
        while True:  # polled: the fake Xray runs in threads and signals nothing
            if email not in xray.users(TAG):
                gone_at = time.monotonic()
                return
            await trio.sleep(0.001)

    command = [sys.executable, "-m", "vpnd", "admin", "revoke", str(user_id), "--config", str(config)]
    with trio.fail_after(bound):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            started = time.monotonic()
            process = await trio.lowlevel.open_process(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            assert process.stdout is not None
            output = b""
            while b"revoked" not in output:
                chunk = await process.stdout.receive_some()
                if not chunk:
                    raise RuntimeError(f"vpnd admin revoke ended without confirming: {output.decode()!r}")
                output += chunk
            committed = time.monotonic()
            await process.wait()
    return committed - started, max(0.0, gone_at - committed)


async def mode(db: BenchDatabase, workdir: Path, *, triggers: bool, revokes: int, interval: float) -> list[float]:
    """Latencies (seconds) of `revokes` CLI revokes against one daemon."""
    dsn = db.fresh("notify" if triggers else "reconcile")
    users = seed(dsn, revokes, triggers=triggers)
    template_path = workdir / f"template-{triggers}.json"
    template_path.write_text(json.dumps(server_template(free_port(), free_port())))
    (workdir / f"xray-{triggers}").mkdir()
    telegram = FakeTelegram()
    cli_config = workdir / f"cli-{triggers}.toml"
    cli_config.write_text(f'[database]\ndsn = "{dsn}"\n')
    latencies: list[float] = []
    with start_fake_xray("xray.", inbound_tags=(TAG,)) as xray:
        async with trio.open_nursery() as nursery:
            telegram_url = await nursery.start(functools.partial(serve_fake_telegram, telegram))
            bot = await start_vpnd(
                nursery,
                workdir,
                dsn,
                telegram,
                telegram_url,
                workers={"expiry_interval": 3600, "renewal_interval": 3600},
                xray={
                    "enabled": True,
                    "template_path": str(template_path),
                    "config_path": str(workdir / f"xray-{triggers}" / "config.json"),
                    "inbound_tag": TAG,
                    "api_address": xray.address,
                    "reconcile_interval": interval,
                    "public_key": PUBLIC_KEY,
                    "short_id": "0123abcd",
                    "host": "vpn.example.test",
                },
            )
            try:
                with trio.fail_after(60):
                    while True:  # every seeded user is live
                        if len(xray.users(TAG)) == len(users):
                            break
                        await trio.sleep(0.05)
                for n, user_id in enumerate(users):
                    await trio.sleep(random.uniform(0, 5))
                    cli_seconds, latency = await revoke(cli_config, user_id, xray, interval + 30)
                    latencies.append(latency)
                    label = "notify" if triggers else "reconcile only"
                    print(
                        f"  {label}: revoke {n + 1}/{len(users)} gone from Xray {latency * 1000:8.1f} ms after "
                        f"the CLI's commit (the CLI took {cli_seconds:.2f} s to get there)",
                        flush=True,
                    )
            finally:
                await bot.stop()
            nursery.cancel_scope.cancel()
    return latencies


async def scenario(args: argparse.Namespace, db: BenchDatabase, workdir: Path) -> dict[str, list[float]]:
    return {
        "before": await mode(db, workdir, triggers=False, revokes=args.before, interval=args.reconcile_interval),
        "after": await mode(db, workdir, triggers=True, revokes=args.after, interval=args.reconcile_interval),
    }


def report(outcome: dict[str, list[float]], args: argparse.Namespace) -> None:
    labels = {
        "before": "before: reconcile only (CLI wakes nobody)",
        "after": "after: commit-time notify → listener",
    }
    rows = [[labels[name], len(values), median(values) * 1000, max(values) * 1000] for name, values in outcome.items()]
    print_table(
        f"notify: `vpnd admin revoke` committed → user gone from the fake Xray "
        f"(reconcile_interval {args.reconcile_interval:g} s)",
        ["mode", "revokes", "median ms", "max ms"],
        rows,
    )
    ratio = median(outcome["before"]) / max(median(outcome["after"]), 1e-6)
    print(f"  median speed-up: {ratio:,.0f}×\n", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench notify", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reconcile-interval", type=float, default=pick(60.0, 15.0), help="the writer's period (s)")
    parser.add_argument("--before", type=int, default=pick(3, 2), help="revokes with reconcile only")
    parser.add_argument("--after", type=int, default=pick(10, 5), help="revokes with commit-time notify")
    args, _ = parser.parse_known_args(argv or [])
    print(f"# notify — {machine_line()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="vpnd-bench-") as tmp, bench_database() as db:
        outcome = trio.run(scenario, args, db, Path(tmp))
    report(outcome, args)


if __name__ == "__main__":
    main(sys.argv[1:])
