"""Benchmark 2 — a broadcast to 10,000 recipients against Telegram's limits.

    python -m bench broadcast                       # 10,000 recipients: ~9 minutes (~20 msg/s + replies)
    python -m bench broadcast --recipients 3000
    VPND_BENCH_QUICK=1 python -m bench broadcast    # 1,500 recipients
    python -m bench broadcast --recipients 100000 --rate 300             # the 30/s run, time-scaled x10
    python -m bench broadcast --recipients 100000 --paid 1000            # a paid broadcast at 1,000/s
    python -m bench broadcast --recipients 100000 --rate 300 --interrupt  # SIGTERM at 30%, kill -9 at 60%

`--rate R` scales Telegram's free limit (the fake counts it in a strict sliding one-second window)
and vpnd's `rate_per_second` together: the ratio is what matters, so 100,000 recipients "at 30/s"
can run in minutes at R = 300. `--paid R` turns on `[broadcast] paid` with `paid_rate_per_second = R`
(the fake's paid lane allows R/s). The figures add vpnd's RSS sampled through the run (flat = constant
memory) and the 429 count, which must be 0. `--interrupt` stops vpnd twice during the broadcast — SIGTERM
at 30% of the recipients, kill -9 at 60% — and starts it again each time: the figures add how many
recipients were in doubt after each stop (attempted, never marked), got the message twice, or never.

The fake Bot API enforces Telegram's limits (30 messages/s overall, 1/s per chat with bursts of 5)
and answers 429 + retry_after past them; vpnd runs with its default outbound limits
([telegram].rate_per_second = 25, per_chat_per_second = 1). The recipients are users in the
database and started chats in the fake; the broadcast (segment "all") is created the way the admin
flow creates it (`vpnd.db.broadcasts.create_broadcast`) and picked up by the running daemon.

Meanwhile a few users keep talking to the bot (/start every ~2 s each): their reply latency is
measured before the broadcast (idle) and while it runs. Figures: the achieved rate (overall and the
median of 10-second windows) as a fraction of the limit, 429s sent by the fake, handler latency
idle vs during, vpnd's CPU and peak RSS. 10,000 messages at ≤ 30/s take at least 5.5 minutes, so
this benchmark is one long run; the window median is its "median of several".
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import random
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import psutil
import psycopg
import trio

from bench.common import (
    BenchDatabase,
    TimedTelegram,
    bench_database,
    machine_line,
    median,
    percentile,
    pick,
    print_table,
    start_vpnd,
    wait_polling,
)
from vpnd.db import broadcasts as bdb
from vpnd_sandbox.telegram_fake import serve_fake_telegram

RECIPIENT_BASE = 20_000_000
PROBE_BASE = 30_000_000
ADMIN_ID = 1
WINDOW = 10.0


def add_recipients(dsn: str, first_id: int, count: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO users (id, username, first_name, language, referral_code) "
            "SELECT g, 'user' || g, 'User', 'en', 'r' || g FROM generate_series(%s::bigint, %s::bigint) g",
            (first_id, first_id + count - 1),
        )


def create_broadcast(dsn: str) -> bdb.Broadcast:
    with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction():
        return bdb.create_broadcast(
            conn,
            created_by=ADMIN_ID,
            text="<b>News</b>: the benchmark broadcast. Thank you for staying with us!",
            segment=bdb.Segment("all"),
            button_text="Open",
            button_url="https://example.com/news",
        )


async def probe(fake: TimedTelegram, user_id: int, interval: float, until: trio.Event, latencies: list[float]) -> None:
    """One user sends /start every ~`interval` seconds and times the reply, until `until` is set."""
    rng = random.Random(user_id)
    await trio.sleep(rng.uniform(0, interval))
    while not until.is_set():
        target = fake.outputs(user_id) + 1
        sent = trio.current_time()
        fake.user_sends(user_id, "/start")
        await fake.wait_outputs(user_id, target, 60)
        latencies.append(fake.last_output_at[user_id] - sent)
        with trio.move_on_after(rng.uniform(0.5, 1.5) * interval):
            await until.wait()


async def run_probes(
    fake: TimedTelegram, users: list[int], interval: float, seconds: float | None, until: trio.Event
) -> list[float]:
    latencies: list[float] = []
    async with trio.open_nursery() as nursery:
        for user_id in users:
            nursery.start_soon(probe, fake, user_id, interval, until, latencies)
        if seconds is not None:
            await trio.sleep(seconds)
            until.set()
    return latencies


async def scenario(args: argparse.Namespace, db: BenchDatabase, workdir: Path) -> dict[str, Any]:
    dsn = db.fresh("broadcast")
    add_recipients(dsn, RECIPIENT_BASE, args.recipients)
    fake = TimedTelegram()  # Telegram's limits: 30/s overall, 1/s per chat (burst 5)
    fake.strict_window = True  # counted in any one second, as Telegram does
    fake.global_rate = fake.global_burst = args.rate
    overrides: dict[str, dict[str, Any]] = {"telegram": {"rate_per_second": args.rate * 25 / 30}}
    if args.paid:
        fake.paid_rate = args.paid
        overrides["broadcast"] = {"paid": True, "paid_rate_per_second": args.paid}
    recipients = set(range(RECIPIENT_BASE, RECIPIENT_BASE + args.recipients))
    for user_id in recipients:
        fake.add_user(user_id, "User").started = True
    probes = [PROBE_BASE + i for i in range(args.probes)]
    for user_id in probes:
        fake.add_user(user_id, "Probe")
    stops: list[dict[str, Any]] = []
    async with trio.open_nursery() as nursery:
        telegram_url = await nursery.start(functools.partial(serve_fake_telegram, fake))
        bot = await start_vpnd(nursery, workdir, dsn, fake, telegram_url, **overrides)
        try:
            await wait_polling(fake, bot)
            idle = await run_probes(fake, probes, args.probe_interval, args.idle_seconds, trio.Event())

            fake.record_times = True
            cpu_before = 0.0  # CPU seconds of the processes stopped by --interrupt
            cpu0 = bot.meter.cpu_seconds()
            created_at = trio.current_time()
            broadcast = create_broadcast(dsn)
            done = trio.Event()
            during: list[float] = []

            async def probes_during() -> None:
                during.extend(await run_probes(fake, probes, args.probe_interval, None, done))

            nursery.start_soon(probes_during)
            rss: list[float] = []

            async def sample_rss() -> None:
                while not done.is_set():
                    with contextlib.suppress(psutil.Error):  # between a stop and the next start
                        rss.append(bot.meter.rss_mib())
                    with trio.move_on_after(2.0):
                        await done.wait()

            async def interrupt() -> None:
                nonlocal bot, cpu_before, cpu0
                for fraction, how in ((0.3, signal.SIGTERM), (0.6, signal.SIGKILL)):
                    while True:
                        if delivered_to(fake, recipients) >= fraction * len(recipients):
                            break
                        await trio.sleep(0.5)
                    cpu_before += bot.meter.cpu_seconds() - cpu0
                    bot.process.send_signal(how)
                    await bot.process.wait()
                    stop = {"signal": how.name, "delivered": delivered_to(fake, recipients), "in_doubt": in_doubt(dsn)}
                    print(f"  … {how.name} at {stop['delivered']}: {stop['in_doubt']} in doubt; starting again")
                    stops.append(stop)
                    bot = await start_vpnd(nursery, workdir, dsn, fake, telegram_url, **overrides)
                    cpu0 = bot.meter.cpu_seconds()

            nursery.start_soon(sample_rss)
            if args.interrupt:
                nursery.start_soon(interrupt)
            sent_times = await wait_for_broadcast(fake, recipients, len(recipients), args)
            while True:  # its last marks and the finish
                if bdb_status(dsn, broadcast.id) == "done":
                    break
                await trio.sleep(0.2)
            done.set()
            cpu = cpu_before + bot.meter.cpu_seconds() - cpu0
            peak = bot.meter.peak_rss_mib()
            await trio.sleep(0.5)
        finally:
            await bot.stop()
        nursery.cancel_scope.cancel()
    return {
        "broadcast": broadcast,
        "created_at": created_at,
        "sent_times": sent_times,
        "idle": idle,
        "during": during,
        "cpu": cpu,
        "peak": peak,
        "fake": fake,
        "rss": rss,
        "stops": stops,
        "log_events": log_events(workdir),
        "per_chat": per_chat(fake, recipients),
    }


def log_events(workdir: Path) -> dict[str, int]:
    """Counts of the events worth a look in every vpnd log of the run (retries resend a message that
    may have arrived; a duplicate without a stop points at them)."""
    counts = dict.fromkeys(("telegram_retry", "telegram_stale_connection", "telegram_429", "broadcast_in_doubt"), 0)
    for path in workdir.rglob("*.log"):
        for line in path.read_text(errors="replace").splitlines():
            for event in counts:
                if f"event={event} " in line:
                    counts[event] += 1
                    if event in ("telegram_retry", "telegram_stale_connection"):
                        print(f"  {line[:300]}")
    return counts


def delivered_to(fake: TimedTelegram, recipients: set[int]) -> int:
    """Recipients that got the broadcast at least once."""
    return sum(1 for chat in fake.last_output_at if chat in recipients)


def per_chat(fake: TimedTelegram, recipients: set[int]) -> dict[int, int]:
    """How many bot messages each recipient got; the ones with more than one are printed (the fake
    keeps a chat's last few messages), so a duplicate can be told from another message."""
    counts = dict.fromkeys(recipients, 0)
    for _, chat in fake.output_log:
        if chat in counts:
            counts[chat] += 1
    for chat in [c for c, n in counts.items() if n > 1][:10]:
        texts = [(m.message_id, (m.text or m.caption or "")[:60]) for m in fake.messages.get(chat, []) if m.from_bot]
        print(f"  chat {chat} got {counts[chat]} messages: {texts}")
    return counts


def in_doubt(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM broadcast_recipients WHERE status = 'pending' AND attempted_at IS NOT NULL"
        ).fetchone()
    return int(row[0]) if row else 0


def bdb_status(dsn: str, broadcast_id: int) -> str:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return str(bdb.status_of(conn, broadcast_id))


async def wait_for_broadcast(
    fake: TimedTelegram, recipients: set[int], total: int, args: argparse.Namespace
) -> list[float]:
    """Wait until every recipient got the message; return the send times (trio time, sorted) of the first
    message to each."""
    deadline = trio.current_time() + total / min(15, args.rate / 2) + 120
    last_report = trio.current_time()
    seen = 0
    times: list[float] = []
    reached: set[int] = set()
    while True:
        for at, chat in fake.output_log[seen:]:
            if chat in recipients and chat not in reached:
                reached.add(chat)
                times.append(at)
        seen = len(fake.output_log)
        if len(times) >= total:
            return sorted(times)
        now = trio.current_time()
        if now > deadline:
            raise RuntimeError(f"broadcast incomplete: {len(times)}/{total} messages after {now - deadline:.0f}s")
        if now - last_report >= 30:
            last_report = now
            print(f"  … {len(times)}/{total} delivered", flush=True)
        await trio.sleep(0.5)


def report(result: dict[str, Any], args: argparse.Namespace) -> None:
    times: list[float] = result["sent_times"]
    fake: TimedTelegram = result["fake"]
    total = len(times)
    span = times[-1] - times[0]
    rate = (total - 1) / span if span > 0 else float("nan")
    windows: list[float] = []
    start = times[0]
    index = 0
    while start + WINDOW <= times[-1]:
        count = 0
        while index < total and times[index] < start + WINDOW:
            count += 1
            index += 1
        windows.append(count / WINDOW)
        start += WINDOW
    window_median = median(windows)
    limit = args.paid or fake.global_rate
    configured = args.paid or args.rate * 25 / 30
    rss: list[float] = result["rss"]
    quarter = max(1, len(rss) // 4)
    every = [at for at, _ in fake.output_log if times[0] <= at <= times[-1]]
    all_rate = (len(every) - 1) / span if span > 0 else float("nan")
    print_table(
        f"broadcast: {total} recipients, fake limits {fake.global_rate:g} msg/s free (sliding window)"
        + (f" and {args.paid:g} msg/s paid" if args.paid else "")
        + f", {fake.chat_rate:g}/s per chat; vpnd rate_per_second {args.rate * 25 / 30:g}",
        ["figure", "value"],
        [
            ["first message after creation (s)", times[0] - result["created_at"]],
            ["duration, first to last message (s)", span],
            ["achieved rate, overall (msg/s)", rate],
            [f"achieved rate, median of {len(windows)} {WINDOW:g}-s windows", window_median],
            [
                "fraction of Telegram's limit (overall / window median)",
                f"{rate / limit:.2f} / {window_median / limit:.2f}",
            ],
            ["all bot messages meanwhile, broadcast + replies (msg/s)", all_rate],
            [
                f"fraction of vpnd's configured rate ({configured:g}/s): broadcast / all",
                f"{rate / configured:.2f} / {all_rate / configured:.2f}",
            ],
            ["paid messages (fake's paid lane)", len(fake.paid_send_times)],
            [
                "429 responses from the fake (flood limits / all)",
                f"{fake.rate_limited} / {fake.too_many_requests_sent}",
            ],
            ["handler latency idle, p50 / p99 (ms)", _lat(result["idle"])],
            ["handler latency during the broadcast, p50 / p99 (ms)", _lat(result["during"])],
            ["vpnd CPU seconds per 1,000 messages sent", result["cpu"] / max(1, len(every)) * 1000],
            ["vpnd peak RSS (MiB)", result["peak"]],
            [
                "vpnd RSS first / last quarter of the run, median (MiB)",
                f"{median(rss[:quarter]):.1f} / {median(rss[-quarter:]):.1f}" if rss else "-",
            ],
            *[
                [f"{stop['signal']} at {stop['delivered']} delivered: recipients in doubt", stop["in_doubt"]]
                for stop in result["stops"]
            ],
            [
                "vpnd log: telegram_retry / stale_connection / telegram_429 / broadcast_in_doubt",
                " / ".join(str(n) for n in result["log_events"].values()),
            ],
            [
                "recipients who got it twice (or more) / never",
                f"{sum(1 for c in result['per_chat'].values() if c > 1)}"
                f" / {sum(1 for c in result['per_chat'].values() if c == 0)}",
            ],
        ],
    )


def _lat(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{percentile(values, 0.5) * 1000:.0f} / {percentile(values, 0.99) * 1000:.0f}  (n={len(values)})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench broadcast", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipients", type=int, default=pick(10_000, 1_500))
    parser.add_argument("--probes", type=int, default=10, help="users talking to the bot meanwhile")
    parser.add_argument("--probe-interval", type=float, default=2.0)
    parser.add_argument("--idle-seconds", type=float, default=pick(15.0, 6.0))
    parser.add_argument("--rate", type=float, default=30.0, help="Telegram's free limit (msg/s), time scale")
    parser.add_argument("--paid", type=float, default=0.0, help="paid broadcast at this rate (msg/s)")
    parser.add_argument(
        "--interrupt", action="store_true", help="SIGTERM vpnd at 30%% and kill -9 it at 60%%, restarting it each time"
    )
    args, _ = parser.parse_known_args(argv or [])
    print(f"# broadcast — {machine_line()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="vpnd-bench-") as tmp, bench_database() as db:
        result = trio.run(scenario, args, db, Path(tmp))
    report(result, args)


if __name__ == "__main__":
    main(sys.argv[1:])
