"""Benchmark 3 — activation latency: a paid Crypto Pay invoice → the user live in Xray.

    python -m bench activation                  # 3 runs of: 50 purchases/min for 60 s, 1,000/min for 20 s
    python -m bench activation --fake-xray      # against the fake Xray API even where V2Ray is installed

Peers: the fake Crypto Pay (signed `invoice_paid` webhooks to vpnd's HTTP server), a real V2Ray
where the `v2ray` binary is installed (Debian's package; otherwise the fake Xray API), and between
vpnd and Xray a pass-through gRPC proxy that notes when Xray acknowledged each user's AddUser.
Purchases are created beforehand with vpnd's own service code (`start_cryptopay_purchase`, as the
bot's Buy button does); each is then paid at the target rate. Latency runs from `pay()` in the fake
(the webhook leaves at once) to Xray's OK for that user's AddUser: webhook → verify → finalize
(payment, subscription, outbox in one transaction) → nudge → the Xray writer's live apply.

Also counted: config file writes per 1,000 activations (atomic replacements of the file vpnd owns)
and Xray restarts (the same V2Ray process must still be running: vpnd never restarts Xray for users).
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
import trio

from bench.common import (
    BenchDatabase,
    bench_database,
    machine_line,
    median,
    percentile,
    pick,
    print_table,
    runs,
    start_vpnd,
)
from bench.xray_support import TAG, FileWatch, TimingProxy, timing_proxy, xray_peer
from tests.keys import PUBLIC_KEY
from vpnd.compose import Services, open_vpnd
from vpnd.config import load_config
from vpnd.cryptopay import open_cryptopay_client
from vpnd.payments.service import start_cryptopay_purchase
from vpnd_sandbox.cryptopay_fake import FakeCryptoPay, serve_fake_cryptopay
from vpnd_sandbox.telegram_fake import FakeTelegram, serve_fake_telegram

USER_BASE = 40_000_000


def add_users(dsn: str, first_id: int, count: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO users (id, username, first_name, language, referral_code) "
            "SELECT g, 'buyer' || g, 'Buyer', 'en', 'b' || g FROM generate_series(%s::bigint, %s::bigint) g",
            (first_id, first_id + count - 1),
        )


async def create_purchases(config_path: Path, cryptopay: FakeCryptoPay, users: list[int]) -> dict[int, int]:
    """user id → invoice id, through vpnd's purchase service (an App without the instance lock)."""
    config = load_config(config_path, environ={})
    invoices: dict[int, int] = {}
    limiter = trio.CapacityLimiter(8)
    async with (
        open_vpnd(config, Services.only(), single_instance=False) as vpnd,
        open_cryptopay_client(cryptopay.token, f"{cryptopay.base_url}/api") as client,
    ):
        app = vpnd.app

        async def buy(user_id: int) -> None:
            async with limiter:
                purchase, _ = await start_cryptopay_purchase(app, client, user_id, plan_code="m1")
                assert purchase.invoice_id is not None
                invoices[user_id] = purchase.invoice_id

        async with trio.open_nursery() as nursery:
            for user_id in users:
                nursery.start_soon(buy, user_id)
    return invoices


async def phase(
    cryptopay: FakeCryptoPay,
    proxy: TimingProxy,
    watch: FileWatch,
    invoices: dict[int, int],
    users: list[int],
    per_minute: float,
) -> dict[str, float]:
    """Pay `users`' invoices at `per_minute`; wait until each is live; latencies and file writes."""
    interval = 60.0 / per_minute
    paid_at: dict[int, float] = {}
    watch.poll()
    writes_before = watch.writes
    async with trio.open_nursery() as nursery:

        async def watch_file() -> None:
            while True:
                watch.poll()
                await trio.sleep(0.05)

        nursery.start_soon(watch_file)
        start = trio.current_time()
        for index, user_id in enumerate(users):
            await trio.sleep_until(start + index * interval)
            paid_at[user_id] = time.monotonic()
            cryptopay.pay(invoices[user_id])
        with trio.fail_after(120):  # Xray acknowledges on gRPC threads: poll for it
            while True:
                if all(proxy.added(u) is not None for u in users):
                    break
                await trio.sleep(0.02)
        await trio.sleep(2.0)  # the file follows the live apply within MIN_WRITE_INTERVAL (1 s)
        nursery.cancel_scope.cancel()
    latencies = [proxy.added(u) - paid_at[u] for u in users]  # type: ignore[operator]
    return {
        "rate": per_minute,
        "n": len(users),
        "p50_ms": percentile(latencies, 0.5) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "max_ms": max(latencies) * 1000,
        "writes_per_1k": (watch.writes - writes_before) / len(users) * 1000,
    }


async def scenario(args: argparse.Namespace, db: BenchDatabase, workdir: Path) -> dict[str, Any]:
    plan = [(50.0, args.slow_seconds), (1000.0, args.fast_seconds)]
    sizes = [max(2, round(rate / 60 * seconds)) for rate, seconds in plan]
    total = sum(sizes) * args.runs
    dsn = db.fresh("activation")
    add_users(dsn, USER_BASE, total)
    user_ids = list(range(USER_BASE, USER_BASE + total))
    telegram = FakeTelegram()
    for user_id in user_ids:  # they get a "payment received" message through the outbox
        telegram.add_user(user_id, "Buyer").started = True
    cryptopay = FakeCryptoPay()
    results: list[dict[str, float]] = []
    with (
        xray_peer(workdir, prefer_real=not args.fake_xray) as (peer, template_path, config_path),
        timing_proxy(peer.address) as proxy,
    ):
        async with trio.open_nursery() as nursery:
            telegram_url = await nursery.start(functools.partial(serve_fake_telegram, telegram))
            cryptopay_url = await nursery.start(functools.partial(serve_fake_cryptopay, cryptopay))
            bot = await start_vpnd(
                nursery,
                workdir,
                dsn,
                telegram,
                telegram_url,
                cryptopay={"enabled": True, "token": cryptopay.token, "api_base_url": f"{cryptopay_url}/api"},
                xray={
                    "enabled": True,
                    "template_path": str(template_path),
                    "config_path": str(config_path),
                    "inbound_tag": TAG,
                    "api_address": proxy.address,
                    "api_prefix": peer.prefix,
                    "flow": peer.flow,
                    "reconcile_interval": 60.0,
                    "public_key": PUBLIC_KEY,
                    "short_id": "0123abcd",
                    "host": "vpn.example.test",
                },
            )
            try:
                cryptopay.webhook_url = f"{bot.http_url}/webhooks/cryptopay"
                assert bot.config_path is not None
                started = trio.current_time()
                invoices = await create_purchases(bot.config_path, cryptopay, user_ids)
                print(f"  {len(invoices)} purchases created in {trio.current_time() - started:.1f}s", flush=True)
                watch = FileWatch(config_path)
                cursor = 0
                cpu0 = bot.meter.cpu_seconds()
                for run in range(args.runs):
                    for (rate, _), size in zip(plan, sizes, strict=True):
                        users = user_ids[cursor : cursor + size]
                        cursor += size
                        result = await phase(cryptopay, proxy, watch, invoices, users, rate)
                        result["run"] = run
                        results.append(result)
                        print(
                            f"  run {run + 1}/{args.runs} {rate:6.0f}/min  n={size:4d}  p50 {result['p50_ms']:6.1f} ms"
                            f"  p99 {result['p99_ms']:6.1f} ms  file writes/1k {result['writes_per_1k']:5.0f}",
                            flush=True,
                        )
                cpu = bot.meter.cpu_seconds() - cpu0
                file_clients = watch.clients()
            finally:
                await bot.stop()
            nursery.cancel_scope.cancel()
        restarts = peer.restarts()
    return {
        "results": results,
        "peer": peer.kind,
        "restarts": restarts,
        "file_clients": file_clients,
        "activated": cursor,
        "cpu_per_1k": cpu / max(1, cursor) * 1000,
        "calls": dict(proxy.calls),
        "errors": proxy.errors,
        "webhooks_ok": len(cryptopay.successful_deliveries()),
    }


def report(outcome: dict[str, Any], args: argparse.Namespace) -> None:
    rows = []
    for rate in (50.0, 1000.0):
        per_run = [r for r in outcome["results"] if r["rate"] == rate]
        rows.append(
            [
                f"{rate:.0f} purchases/min",
                sum(int(r["n"]) for r in per_run),
                median([r["p50_ms"] for r in per_run]),
                median([r["p99_ms"] for r in per_run]),
                max(r["max_ms"] for r in per_run),
                median([r["writes_per_1k"] for r in per_run]),
            ]
        )
    peer = "a real V2Ray 4.x (Debian's v2ray)" if outcome["peer"] == "v2ray" else "the fake Xray API"
    print_table(
        f"activation: Crypto Pay webhook → live in Xray ({peer}); medians of {args.runs} runs",
        ["load", "activations", "p50 ms", "p99 ms", "max ms", "config writes / 1k activations"],
        rows,
    )
    print(f"  Xray restarts: {outcome['restarts']}")
    print(
        f"  config file lists {outcome['file_clients']} clients for {outcome['activated']} activations; "
        f"webhooks answered 200: {outcome['webhooks_ok']}; Xray API calls {outcome['calls']} "
        f"(errors {outcome['errors']})"
    )
    print(f"  vpnd CPU seconds per 1,000 activations (whole daemon): {outcome['cpu_per_1k']:.2f}\n", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench activation", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=runs(3, 2))
    parser.add_argument("--slow-seconds", type=float, default=pick(60.0, 30.0), help="length of the 50/min phase")
    parser.add_argument("--fast-seconds", type=float, default=pick(20.0, 10.0), help="length of the 1,000/min phase")
    parser.add_argument("--fake-xray", action="store_true", help="use the fake Xray API even if V2Ray is installed")
    args, _ = parser.parse_known_args(argv or [])
    print(f"# activation — {machine_line()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="vpnd-bench-") as tmp, bench_database() as db:
        outcome = trio.run(scenario, args, db, Path(tmp))
    report(outcome, args)


if __name__ == "__main__":
    main(sys.argv[1:])
