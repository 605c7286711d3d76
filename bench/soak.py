"""Benchmark 6 — soak: mixed load for a long time; vpnd's RSS every minute and its slope.

    python -m bench soak                   # 30 minutes
    python -m bench soak --minutes 120
    VPND_BENCH_QUICK=1 python -m bench soak   # 2 minutes, RSS every 10 s

One vpnd process against the fakes at Telegram's real limits (30 msg/s, 1/s per chat), the fake
Crypto Pay (webhooks) and Xray (a real V2Ray where installed, else the fake API), all at once:

* **updates**: 300 users, 8 updates/s in all — /start, and presses of the menu's Help and « Menu
  buttons (message edits + callback answers);
* **payments**: a Crypto Pay purchase paid every 2 s (webhook → subscription → outbox message →
  Xray user added live; the config file follows);
* **broadcasts**: one to every reachable user (3,000 extra recipients) every 10 minutes (in quick
  mode once, after 20 s);
* **workers**: reminders, trials, expiry, renewal, housekeeping every 10 s instead of minutes.

RSS is sampled every minute (10 s in quick mode). The slope is a least-squares fit over the samples
after the first (start-up) one, in MiB per hour; a leak shows as a slope that does not flatten.
"""

from __future__ import annotations

import argparse
import functools
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

import psycopg
import trio

from bench.activation import create_purchases
from bench.broadcast import add_recipients, create_broadcast
from bench.common import (
    BenchDatabase,
    TimedTelegram,
    bench_database,
    machine_line,
    percentile,
    pick,
    print_table,
    start_vpnd,
)
from bench.xray_support import TAG, xray_peer
from tests.keys import PUBLIC_KEY
from vpnd_sandbox.cryptopay_fake import FakeCryptoPay, serve_fake_cryptopay
from vpnd_sandbox.telegram_fake import SandboxError, serve_fake_telegram

CHATTERS = 300
CHATTER_BASE = 70_000_000
BUYER_BASE = 71_000_000
RECIPIENT_BASE = 72_000_000
RECIPIENTS = 3000
UPDATE_RATE = 8.0
PAYMENT_INTERVAL = 2.0
WORKER_INTERVAL = 10.0


def slope_per_hour(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MiB) samples, in MiB per hour."""
    if len(samples) < 2:
        return float("nan")
    xs = [t / 3600 for t, _ in samples]
    ys = [v for _, v in samples]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mean_x) ** 2 for x in xs)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / var if var else float("nan")


async def chat_load(fake: TimedTelegram, users: list[int], latencies: list[float]) -> None:
    """Open-loop updates at UPDATE_RATE: /start or a menu button press, random users."""
    rng = random.Random(1)
    next_at = trio.current_time()

    async def timed(user_id: int, target: int, sent: float) -> None:
        with trio.move_on_after(30):
            await fake.wait_outputs(user_id, target, 30)
            latencies.append(fake.last_output_at[user_id] - sent)

    async with trio.open_nursery() as nursery:
        while True:
            next_at += rng.expovariate(UPDATE_RATE)
            await trio.sleep_until(next_at)
            user_id = rng.choice(users)
            target, sent = fake.outputs(user_id) + 1, trio.current_time()
            last = fake.last_bot_message(user_id)
            data = next((d for d in ("help", "menu") if last is not None and d in last.callback_data), None)
            try:
                if data is not None and rng.random() < 0.6:
                    assert last is not None
                    fake.user_presses_button(user_id, last.message_id, data)
                else:
                    fake.user_sends(user_id, "/start")
            except SandboxError:
                fake.user_sends(user_id, "/start")
            nursery.start_soon(timed, user_id, target, sent)


async def payment_load(cryptopay: FakeCryptoPay, invoices: dict[int, int], paid: list[int]) -> None:
    next_at = trio.current_time()
    for invoice_id in invoices.values():
        next_at += PAYMENT_INTERVAL
        await trio.sleep_until(next_at)
        cryptopay.pay(invoice_id)
        paid.append(invoice_id)


async def broadcast_load(dsn: str, first_after: float, every: float, created: list[int]) -> None:
    await trio.sleep(first_after)
    while True:
        broadcast = await trio.to_thread.run_sync(create_broadcast, dsn)
        created.append(broadcast.id)
        print(f"  broadcast {broadcast.id} created for {broadcast.total} recipients", flush=True)
        await trio.sleep(every)


def database_counts(dsn: str) -> dict[str, Any]:
    with psycopg.connect(dsn, autocommit=True) as conn:

        def scalar(query: str) -> Any:
            row = conn.execute(query).fetchone()
            return row[0] if row else None

        return {
            "payments": scalar("SELECT count(*) FROM payments"),
            "active_subscriptions": scalar("SELECT count(*) FROM subscriptions WHERE status = 'active'"),
            "outbox_sent": scalar("SELECT count(*) FROM outbox WHERE status = 'sent'"),
            "outbox_other": scalar("SELECT count(*) FROM outbox WHERE status <> 'sent'"),
            "broadcast_sent": scalar("SELECT count(*) FROM broadcast_recipients WHERE status = 'sent'"),
            "broadcast_pending": scalar("SELECT count(*) FROM broadcast_recipients WHERE status = 'pending'"),
            "broadcasts_done": scalar("SELECT count(*) FROM broadcasts WHERE status = 'done'"),
            "inbox_unhandled": scalar("SELECT count(*) FROM telegram_inbox WHERE handled_at IS NULL"),
        }


async def scenario(args: argparse.Namespace, db: BenchDatabase, workdir: Path) -> dict[str, Any]:
    seconds = args.minutes * 60
    dsn = db.fresh("soak")
    buyers = int(seconds / PAYMENT_INTERVAL) + 5
    add_recipients(dsn, RECIPIENT_BASE, RECIPIENTS)
    add_recipients(dsn, BUYER_BASE, buyers)
    fake = TimedTelegram()  # Telegram's limits
    chatters = [CHATTER_BASE + i for i in range(CHATTERS)]
    for user_id in chatters:
        fake.add_user(user_id, "Chatter")
    for user_id in [*range(RECIPIENT_BASE, RECIPIENT_BASE + RECIPIENTS), *range(BUYER_BASE, BUYER_BASE + buyers)]:
        fake.add_user(user_id, "User").started = True
    cryptopay = FakeCryptoPay()
    interval = args.sample_seconds
    samples: list[tuple[float, float]] = []
    latencies: list[float] = []
    paid: list[int] = []
    broadcasts: list[int] = []
    workers = {
        f"{name}_interval": WORKER_INTERVAL for name in ("reminders", "trial", "expiry", "renewal", "housekeeping")
    }
    with xray_peer(workdir) as (peer, template_path, config_path):
        async with trio.open_nursery() as nursery:
            telegram_url = await nursery.start(functools.partial(serve_fake_telegram, fake))
            cryptopay_url = await nursery.start(functools.partial(serve_fake_cryptopay, cryptopay))
            bot = await start_vpnd(
                nursery,
                workdir,
                dsn,
                fake,
                telegram_url,
                cryptopay={"enabled": True, "token": cryptopay.token, "api_base_url": f"{cryptopay_url}/api"},
                payments={"purchase_ttl_minutes": int(args.minutes) + 60},
                workers=workers,
                xray={
                    "enabled": True,
                    "template_path": str(template_path),
                    "config_path": str(config_path),
                    "inbound_tag": TAG,
                    "api_address": peer.address,
                    "api_prefix": peer.prefix,
                    "flow": peer.flow,
                    "reconcile_interval": 30.0,
                    "public_key": PUBLIC_KEY,
                    "short_id": "0123abcd",
                    "host": "vpn.example.test",
                },
            )
            try:
                cryptopay.webhook_url = f"{bot.http_url}/webhooks/cryptopay"
                assert bot.config_path is not None
                invoices = await create_purchases(
                    bot.config_path, cryptopay, list(range(BUYER_BASE, BUYER_BASE + buyers))
                )
                async with trio.open_nursery() as load:
                    load.start_soon(chat_load, fake, chatters, latencies)
                    load.start_soon(payment_load, cryptopay, invoices, paid)
                    load.start_soon(broadcast_load, dsn, pick(60.0, 20.0), 600.0, broadcasts)
                    started = trio.current_time()
                    cpu0 = bot.meter.cpu_seconds()
                    for index in range(int(seconds // interval) + 1):
                        await trio.sleep_until(started + index * interval)
                        rss = bot.meter.rss_mib()
                        samples.append((trio.current_time() - started, rss))
                        messages = sum(fake.bot_outputs.values())
                        print(
                            f"  t={samples[-1][0] / 60:5.1f} min  RSS {rss:6.1f} MiB  updates answered "
                            f"{len(latencies):6d}  payments {len(paid):5d}  bot messages {messages:7d}",
                            flush=True,
                        )
                    cpu = bot.meter.cpu_seconds() - cpu0
                    elapsed = trio.current_time() - started
                    load.cancel_scope.cancel()
                peak = bot.meter.peak_rss_mib()
                counts = await trio.to_thread.run_sync(database_counts, dsn)
            finally:
                await bot.stop()
            nursery.cancel_scope.cancel()
    return {
        "samples": samples,
        "latencies": latencies,
        "paid": len(paid),
        "broadcasts": len(broadcasts),
        "cpu_pct": cpu / elapsed * 100,
        "peak": peak,
        "counts": counts,
        "fake": fake,
        "peer": peer.kind,
    }


def report(result: dict[str, Any], args: argparse.Namespace) -> None:
    samples: list[tuple[float, float]] = result["samples"]
    after_start = samples[1:]
    half = samples[len(samples) // 2 :]
    fake: TimedTelegram = result["fake"]
    counts = result["counts"]
    latencies = result["latencies"]
    print_table(
        f"soak: {args.minutes:g} minutes of mixed load (Xray: {result['peer']}), RSS every {args.sample_seconds:g} s",
        ["figure", "value"],
        [
            ["RSS first / last sample (MiB)", f"{samples[0][1]:.1f} / {samples[-1][1]:.1f}"],
            [
                "RSS min / max after start-up (MiB)",
                f"{min(v for _, v in after_start):.1f} / {max(v for _, v in after_start):.1f}",
            ],
            ["RSS slope after the first sample (MiB/hour)", slope_per_hour(after_start)],
            ["RSS slope over the second half (MiB/hour)", slope_per_hour(half)],
            ["peak RSS (MiB)", result["peak"]],
            ["vpnd CPU (% of one core)", result["cpu_pct"]],
            [
                "updates answered; reply p50 / p99 (ms)",
                f"{len(latencies)}; {percentile(latencies, 0.5) * 1000:.0f} / {percentile(latencies, 0.99) * 1000:.0f}",
            ],
            ["payments: paid at the fake / recorded by vpnd", f"{result['paid']} / {counts['payments']}"],
            ["active subscriptions (live in Xray)", counts["active_subscriptions"]],
            ["outbox messages sent / not sent (yet)", f"{counts['outbox_sent']} / {counts['outbox_other']}"],
            [
                "broadcasts created / done; recipients sent / pending",
                f"{result['broadcasts']} / {counts['broadcasts_done']}; "
                f"{counts['broadcast_sent']} / {counts['broadcast_pending']}",
            ],
            [
                "bot messages + edits at the fake; 429s",
                f"{sum(fake.bot_outputs.values())}; {fake.too_many_requests_sent}",
            ],
            ["inbox updates left unhandled at the end", counts["inbox_unhandled"]],
        ],
    )
    print("RSS samples (minutes, MiB): " + ", ".join(f"{t / 60:.1f}:{v:.1f}" for t, v in samples), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench soak", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=pick(30.0, 2.0))
    parser.add_argument("--sample-seconds", type=float, default=pick(60.0, 10.0))
    args, _ = parser.parse_known_args(argv or [])
    print(f"# soak — {machine_line()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="vpnd-bench-") as tmp, bench_database() as db:
        result = trio.run(scenario, args, db, Path(tmp))
    report(result, args)


if __name__ == "__main__":
    main(sys.argv[1:])
