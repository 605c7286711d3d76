"""Benchmark — fairness under a flood: what other users see while two chats flood vpnd.

    python -m bench flood                        # 2,000 messages + 1,200 button presses; 200 users at 10/s
    python -m bench flood --others 100 --spam 1000 --presses 600

The fake Bot API enforces Telegram's pace (30 messages/s overall; 1/s per chat after a burst of 5).
One chat sends `--spam` different messages and another presses the same menu button `--presses` times,
all queued at once; meanwhile `--others` users each send /start (10 new users a second) and press one
button on the menu they get. Printed: the other users' reply latency (update at the fake → the bot's
answer at the fake) p50/p99/max, how many were answered, the updates vpnd dropped or coalesced (from its
/metrics), and vpnd's CPU.

Variants, side by side: vpnd as configured by default (`[telegram].max_pending_per_chat = 20`), and with
the per-chat bound lifted to 1,000 (= the dispatcher's global bound: one chat can fill it, which is how the
update path behaved before per-chat queues — the poller then waits, and so does everyone).
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio

from bench.common import (
    BenchDatabase,
    TimedTelegram,
    bench_database,
    machine_line,
    percentile,
    print_table,
    start_vpnd,
    wait_polling,
)
from vpnd_sandbox.telegram_fake import serve_fake_telegram

SPAMMER, PRESSER = 9_000_001, 9_000_002
OTHERS_BASE = 9_100_000


@attrs.frozen
class Variant:
    label: str
    max_pending_per_chat: int


VARIANTS = (
    Variant("vpnd (per-chat bound 20)", 20),
    Variant("vpnd, bound lifted (1,000)", 1000),
)


async def measure(variant: Variant, db: BenchDatabase, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    fake = TimedTelegram()  # Telegram's limits on
    others = [OTHERS_BASE + i for i in range(args.others)]
    for uid in (SPAMMER, PRESSER, *others):
        fake.add_user(uid, f"U{uid % 1000}")
    async with trio.open_nursery() as nursery:
        telegram_url = await nursery.start(functools.partial(serve_fake_telegram, fake))
        bot = await start_vpnd(
            nursery,
            workdir,
            db.fresh("flood"),
            fake,
            telegram_url,
            telegram={"max_pending_per_chat": variant.max_pending_per_chat},
        )
        try:
            await wait_polling(fake, bot)
            fake.user_sends(PRESSER, "/start")
            await fake.wait_outputs(PRESSER, 1, 60)
            menu = fake.last_bot_message(PRESSER)
            assert menu is not None
            cpu0 = bot.meter.cpu_seconds()
            for n in range(args.spam):
                fake.user_sends(SPAMMER, f"spam {n}")
            for _ in range(args.presses):
                fake.user_presses_button(PRESSER, menu.message_id, "help")
            latencies: list[float] = []
            unanswered = 0

            async def other(uid: int) -> None:
                nonlocal unanswered
                try:
                    sent = trio.current_time()
                    fake.user_sends(uid, "/start")
                    await fake.wait_outputs(uid, 1, args.timeout)
                    latencies.append(trio.current_time() - sent)
                    reply = fake.last_bot_message(uid)
                    assert reply is not None
                    pressed = trio.current_time()
                    fake.user_presses_button(uid, reply.message_id, "help")
                    await fake.wait_outputs(uid, 2, args.timeout)
                    latencies.append(trio.current_time() - pressed)
                except trio.TooSlowError:
                    unanswered += 1

            started = trio.current_time()
            async with trio.open_nursery() as users:
                for uid in others:
                    users.start_soon(other, uid)
                    await trio.sleep(1 / args.rate)
            elapsed = trio.current_time() - started
            cpu = bot.meter.cpu_seconds() - cpu0
            async with httpx.AsyncClient() as client:
                metrics = (await client.get(f"{bot.http_url}/metrics")).text
        finally:
            await bot.stop()
        nursery.cancel_scope.cancel()
    dropped = {
        line.split('"')[1]: float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("vpnd_updates_dropped_total{")
    }
    return {
        "p50_ms": percentile(latencies, 0.5) * 1000 if latencies else float("nan"),
        "p99_ms": percentile(latencies, 0.99) * 1000 if latencies else float("nan"),
        "max_s": max(latencies) if latencies else float("nan"),
        "answered": f"{len(latencies)}/{2 * len(others)}",
        "unanswered_users": unanswered,
        "dropped": int(dropped.get("dropped", 0)),
        "coalesced": int(dropped.get("coalesced", 0)),
        "cpu_s": cpu,
        "seconds": elapsed,
    }


async def run_all(args: argparse.Namespace, db: BenchDatabase, workdir: Path) -> list[list[Any]]:
    rows = []
    for variant in VARIANTS:
        if args.only and not any(word in variant.label for word in args.only):
            continue
        result = await measure(variant, db, workdir, args)
        print(f"  {variant.label:<28} {result}", flush=True)
        rows.append(
            [
                variant.label,
                result["p50_ms"],
                result["p99_ms"],
                result["max_s"],
                result["answered"],
                result["dropped"],
                result["coalesced"],
                result["cpu_s"],
            ]
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench flood", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--others", type=int, default=200)
    parser.add_argument("--rate", type=float, default=10.0, help="new other users per second")
    parser.add_argument("--spam", type=int, default=2000)
    parser.add_argument("--presses", type=int, default=1200)
    parser.add_argument("--timeout", type=float, default=120.0, help="an other user's wait counted as unanswered")
    parser.add_argument("--only", nargs="*", default=[])
    args, _ = parser.parse_known_args(argv or [])
    print(f"# flood — {machine_line()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="vpnd-bench-") as tmp, bench_database() as db:
        rows = trio.run(run_all, args, db, Path(tmp))
    print_table(
        f"flood: {args.spam} messages + {args.presses} presses from two chats; {args.others} other users at "
        f"{args.rate:g}/s (/start, then one button); Telegram's limits on",
        ["variant", "others p50 ms", "others p99 ms", "max s", "answered", "dropped", "coalesced", "vpnd CPU s"],
        rows,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
