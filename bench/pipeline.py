"""Benchmark 1 — the update pipeline, vpnd against the seed's stack (aiogram 3 + asyncpg).

    python -m bench pipeline                    # K=100 users, N=4,000 updates per run, median of 3 runs
    python -m bench pipeline --updates 10000 --users 200
    python -m bench pipeline --profile          # also: py-spy profile of vpnd under this load

Both bots poll the same fake Bot API (its flood limits lifted: the bots' own pace is measured) and
use the same PostgreSQL schema. K simulated users each keep one update in flight: a user sends the
next one as soon as the bot has answered the previous (a closed loop), so the bot is fed as fast as
it takes updates and latency is not inflated by an artificial backlog. Latency is from the update's
arrival in the fake (feed) to the bot's answer arriving there (reply: sendMessage or
editMessageText). CPU seconds and peak RSS are the bot process's own (PostgreSQL's CPU is shown
apart). Each run starts a fresh bot process on a fresh database, after one warm-up round per user.

Variants, measured side by side in every run (order rotated between runs):
  /start   — upsert the user, read the menu facts, reply with the main menu
  buttons  — press "Help", then "« Menu", … on the menu message: upsert, edit the message, answer
  vpnd with [telegram].max_concurrent_updates 20 (the default) and 1.
vpnd runs with rate_per_second=1000 and per_chat_per_second=100 (its maximums) so that its outbound
limiter does not cap the figures; the baseline has no limiter.
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import attrs
import trio

from bench import profiling
from bench.common import (
    BenchDatabase,
    BotProcess,
    ProcessMeter,
    TimedTelegram,
    bench_database,
    machine_line,
    median_of,
    percentile,
    pick,
    print_table,
    runs,
    start_vpnd,
    wait_polling,
)
from vpnd_sandbox.postgres import free_port
from vpnd_sandbox.telegram_fake import serve_fake_telegram

USER_BASE = 10_000_000
ROUND_TIMEOUT = 60.0


@attrs.frozen
class Variant:
    label: str
    bot: str  # "vpnd" | "aiogram"
    flow: str  # "start" | "buttons"
    max_concurrent_updates: int = 20
    #: Extra environment for the bot process (experiments: `--only` plus a local VARIANTS entry).
    env: tuple[tuple[str, str], ...] = ()


VARIANTS = (
    Variant("aiogram /start", "aiogram", "start"),
    Variant("vpnd /start", "vpnd", "start"),
    Variant("aiogram buttons", "aiogram", "buttons"),
    Variant("vpnd buttons", "vpnd", "buttons"),
    Variant("vpnd /start mcu=1", "vpnd", "start", 1),
)


async def start_bot(
    nursery: trio.Nursery,
    variant: Variant,
    fake: TimedTelegram,
    telegram_url: str,
    dsn: str,
    workdir: Path,
    *,
    wrap: list[str] | None = None,
) -> BotProcess:
    """Start the bot under test and return once it is polling the fake."""
    if variant.bot == "vpnd":
        bot = await start_vpnd(
            nursery,
            workdir,
            dsn,
            fake,
            telegram_url,
            env=dict(variant.env),
            telegram={
                "max_concurrent_updates": variant.max_concurrent_updates,
                "rate_per_second": 1000.0,
                "per_chat_per_second": 100.0,
            },
        )
    else:
        log_path = workdir / f"aiogram-{free_port()}.log"
        command = [
            sys.executable, "-m", "bench.baseline_aiogram",
            "--api", telegram_url, "--token", fake.token, "--dsn", dsn,
        ]  # fmt: skip
        with log_path.open("wb") as log_file:
            process = await trio.lowlevel.open_process(
                [*(wrap or []), *command],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env={**os.environ, **dict(variant.env)},
            )
        bot = BotProcess(process, ProcessMeter(process.pid), log_path)
    await wait_polling(fake, bot)
    return bot


async def user_loop(fake: TimedTelegram, user_id: int, flow: str, count: int, latencies: list[float]) -> None:
    """One user keeps one update in flight, `count` times."""
    for index in range(count):
        target = fake.outputs(user_id) + 1
        if flow == "start":
            fed = trio.current_time()
            fake.user_sends(user_id, "/start")
        else:
            menu = fake.last_bot_message(user_id)
            assert menu is not None, "the warm-up /start left no menu to press on"
            fed = trio.current_time()
            fake.user_presses_button(user_id, menu.message_id, "help" if index % 2 == 0 else "menu")
        await fake.wait_outputs(user_id, target, ROUND_TIMEOUT)
        latencies.append(fake.last_output_at[user_id] - fed)


async def closed_loop(fake: TimedTelegram, users: list[int], flow: str, per_user: int) -> list[float]:
    latencies: list[float] = []
    async with trio.open_nursery() as nursery:
        for user_id in users:
            nursery.start_soon(user_loop, fake, user_id, flow, per_user, latencies)
    return latencies


async def measure_once(
    variant: Variant, db: BenchDatabase, workdir: Path, users: int, updates: int, profile_seconds: float = 0.0
) -> dict[str, float]:
    dsn = db.fresh(variant.bot)
    fake = TimedTelegram()
    fake.unlimited()
    user_ids = [USER_BASE + i for i in range(users)]
    for user_id in user_ids:
        fake.add_user(user_id, f"User{user_id % 1000}", username=f"user{user_id}")
    per_user = max(1, updates // users)
    async with trio.open_nursery() as nursery:
        telegram_url = await nursery.start(functools.partial(serve_fake_telegram, fake))
        bot = await start_bot(nursery, variant, fake, telegram_url, dsn, workdir)
        try:
            await closed_loop(fake, user_ids, "start", 1)  # warm-up; gives every user a menu message
            if profile_seconds:
                nursery.start_soon(_profile, bot.process.pid, profile_seconds, f"pipeline-{variant.bot}-{variant.flow}")
            cpu0, pg0, driver0 = bot.meter.cpu_seconds(), db.postgres_cpu_seconds(), _self_cpu()
            started = trio.current_time()
            latencies = await closed_loop(fake, user_ids, variant.flow, per_user)
            elapsed = trio.current_time() - started
            cpu = bot.meter.cpu_seconds() - cpu0
            pg = db.postgres_cpu_seconds() - pg0
            driver = _self_cpu() - driver0
            peak = bot.meter.peak_rss_mib()
        finally:
            await bot.stop()
        nursery.cancel_scope.cancel()
    done = len(latencies)
    return {
        "updates": done,
        "rate": done / elapsed,
        "p50_ms": percentile(latencies, 0.50) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "cpu_per_1k": cpu / done * 1000,
        "pg_cpu_per_1k": pg / done * 1000,
        "driver_cpu_pct": driver / elapsed * 100,
        "peak_rss_mib": peak,
    }


def _self_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _profile(pid: int, seconds: float, name: str) -> None:
    raw = await profiling.record(pid, seconds, name)
    print(f"profile of {name} ({seconds:g} s under load), collapsed stacks in {raw}:")
    print(profiling.summarize(raw), flush=True)


async def run_all(args: argparse.Namespace, db: BenchDatabase, workdir: Path) -> dict[str, list[dict[str, float]]]:
    results: dict[str, list[dict[str, float]]] = collections.defaultdict(list)
    variants = [v for v in VARIANTS if not args.only or any(word in v.label for word in args.only)]
    for run in range(args.runs if variants else 0):
        order = variants[run % len(variants) :] + variants[: run % len(variants)]
        for variant in order:
            result = await measure_once(variant, db, workdir, args.users, args.updates)
            results[variant.label].append(result)
            print(
                f"  run {run + 1}/{args.runs} {variant.label:<20} {result['rate']:7.0f} upd/s  "
                f"p50 {result['p50_ms']:6.1f} ms  p99 {result['p99_ms']:7.1f} ms  "
                f"cpu {result['cpu_per_1k']:5.2f} s/1k  rss {result['peak_rss_mib']:5.0f} MiB  "
                f"(driver {result['driver_cpu_pct']:3.0f}% cpu)",
                flush=True,
            )
    if args.profile:
        for label in ("vpnd /start", "aiogram /start"):
            variant = next(v for v in VARIANTS if v.label == label)
            await measure_once(variant, db, workdir, args.users, args.updates, profile_seconds=args.profile_seconds)
    return results


def report(results: dict[str, list[dict[str, float]]], args: argparse.Namespace) -> None:
    rows: list[list[Any]] = []
    for label, runs_ in results.items():
        rows.append(
            [
                label,
                median_of(runs_, "rate"),
                median_of(runs_, "p50_ms"),
                median_of(runs_, "p99_ms"),
                median_of(runs_, "cpu_per_1k"),
                median_of(runs_, "pg_cpu_per_1k"),
                median_of(runs_, "peak_rss_mib"),
            ]
        )
    print_table(
        f"pipeline: K={args.users} users, N={args.updates} updates per run, medians of {args.runs} runs",
        ["variant", "updates/s", "p50 ms", "p99 ms", "CPU s/1k upd", "PG CPU s/1k", "peak RSS MiB"],
        rows,
    )
    ratio_rows = []
    for flow, vpnd_label, base_label in (
        ("/start", "vpnd /start", "aiogram /start"),
        ("buttons", "vpnd buttons", "aiogram buttons"),
    ):
        if vpnd_label in results and base_label in results:
            v, b = results[vpnd_label], results[base_label]
            ratio_rows.append(
                [
                    flow,
                    median_of(v, "rate") / median_of(b, "rate"),
                    median_of(v, "p50_ms") / median_of(b, "p50_ms"),
                    median_of(v, "p99_ms") / median_of(b, "p99_ms"),
                    median_of(v, "cpu_per_1k") / median_of(b, "cpu_per_1k"),
                    median_of(v, "peak_rss_mib") / median_of(b, "peak_rss_mib"),
                ]
            )
    if ratio_rows:
        print_table(
            "pipeline: vpnd / aiogram ratios (throughput: higher is better for vpnd; the rest: lower is)",
            ["flow", "updates/s", "p50", "p99", "CPU/1k", "peak RSS"],
            ratio_rows,
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench pipeline", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, default=pick(100, 50))
    parser.add_argument("--updates", type=int, default=pick(4000, 1000))
    parser.add_argument("--runs", type=int, default=runs(3, 3))
    parser.add_argument("--only", nargs="*", default=[], help="variants whose label contains one of these words")
    parser.add_argument("--profile", action="store_true", help="py-spy vpnd /start under load after the runs")
    parser.add_argument("--profile-seconds", type=float, default=20.0)
    args, _ = parser.parse_known_args(argv or [])
    print(f"# pipeline — {machine_line()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="vpnd-bench-") as tmp, bench_database() as db:
        results = trio.run(run_all, args, db, Path(tmp))
    report(results, args)


if __name__ == "__main__":
    main(sys.argv[1:])
