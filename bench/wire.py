"""Benchmark — wire: client CPU per Bot API call, PTB `send_message` vs httpx vs BotWire.

    python -m bench.wire                      # 3 runs of 2,000 sendMessage per client and concurrency
    python -m bench.wire --requests 500       # fewer
    VPND_BENCH_QUICK=1 python -m bench wire

The fake Bot API (flood limits lifted) runs in a child process, so the CPU seconds measured here
(`os.times()` of this process) are the client's alone: building the request, the HTTP/1.1 exchange
over a keep-alive connection to 127.0.0.1, and decoding the answer. *user* is the Python side; *system*
is the kernel's, mostly loopback TCP: a send that wakes the idle fake is charged to the sender, which is
why one-at-a-time costs more system time per call than 16 in flight. Each client sends the
same message (a /start-sized HTML text with a 3-button inline keyboard) to rotating chats:

* **PTB**: `TrioBot.send_message` as vpnd builds it (`build_bot`: HTTPXRequest, form body, the answer
  parsed into a `telegram.Message`);
* **httpx**: `AsyncClient.post(json=...)` and `.json()["result"]` — httpx without PTB;
* **BotWire**: `vpnd.telegram.wire` — h11 over a Trio stream, compact JSON, the raw ``result``.

Sequential (one call at a time) and 16 in flight; figures are medians of the runs.
"""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import telegram
import trio

from bench.common import machine_line, median, pick, print_table, runs
from vpnd.config import TelegramConfig
from vpnd.telegram.client import open_bot
from vpnd.telegram.wire import open_bot_wire

FIRST_CHAT = 80_000_000
CHATS = 64
TEXT = (
    "<b>Welcome to the VPN shop!</b>\n\nFast VLESS + REALITY servers, no logs. Your subscription: "
    "<i>none yet</i>. Choose a plan below to get a key in seconds, or try it free for 3 days."
)
KEYBOARD = {
    "inline_keyboard": [
        [{"text": "Buy a subscription", "callback_data": "menu:buy"}],
        [{"text": "My keys", "callback_data": "menu:keys"}, {"text": "Help", "callback_data": "menu:help"}],
    ]
}

Send = Callable[[int], Awaitable[Any]]


def serve_fake(chats: int) -> None:
    """Child process: the fake Bot API with limits lifted; prints its base URL, serves until killed."""
    from bench.common import TimedTelegram
    from vpnd_sandbox.telegram_fake import serve_fake_telegram

    fake = TimedTelegram()
    fake.unlimited()
    for index in range(chats):
        fake.add_user(FIRST_CHAT + index, "User")
        fake.user_sends(FIRST_CHAT + index, "/start")

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            base_url = await nursery.start(serve_fake_telegram, fake)
            print(base_url, flush=True)

    trio.run(run)


async def timed(send: Send, requests: int, concurrency: int) -> tuple[float, float, float]:
    """(user CPU ms, system CPU ms per request, requests per second): `requests` calls, `concurrency` at a time."""
    for index in range(50):  # warm up: connections open, caches filled
        await send(FIRST_CHAT + index % CHATS)
    started, wall_started = os.times(), time.perf_counter()

    async def worker(first: int) -> None:
        for index in range(first, requests, concurrency):
            await send(FIRST_CHAT + index % CHATS)

    async with trio.open_nursery() as nursery:
        for first in range(concurrency):
            nursery.start_soon(worker, first)
    ended, wall = os.times(), time.perf_counter() - wall_started
    user, system = ended.user - started.user, ended.system - started.system
    return user * 1000 / requests, system * 1000 / requests, requests / wall


async def measure(base_url: str, token: str, requests: int, concurrency: int) -> dict[str, tuple[float, float, float]]:
    figures: dict[str, tuple[float, float, float]] = {}

    async with open_bot(TelegramConfig(token=token, api_base_url=base_url)) as bot:
        markup = telegram.InlineKeyboardMarkup.de_json(KEYBOARD, None)

        async def ptb(chat_id: int) -> Any:
            return await bot.send_message(chat_id, TEXT, parse_mode="HTML", reply_markup=markup)

        figures["PTB send_message"] = await timed(ptb, requests, concurrency)

    limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
    async with httpx.AsyncClient(limits=limits, timeout=15.0) as client:
        url = f"{base_url}/bot{token}/sendMessage"

        async def httpx_post(chat_id: int) -> Any:
            response = await client.post(
                url, json={"chat_id": chat_id, "text": TEXT, "parse_mode": "HTML", "reply_markup": KEYBOARD}
            )
            return response.json()["result"]

        figures["httpx post + json"] = await timed(httpx_post, requests, concurrency)

    async with open_bot_wire(base_url, token) as wire:

        async def bot_wire(chat_id: int) -> Any:
            return await wire.call(
                "sendMessage", {"chat_id": chat_id, "text": TEXT, "parse_mode": "HTML", "reply_markup": KEYBOARD}
            )

        figures["BotWire.call"] = await timed(bot_wire, requests, concurrency)
    return figures


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.wire", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=pick(2000, 500), help="calls per client and run")
    parser.add_argument("--serve-fake", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_fake:
        serve_fake(CHATS)
        return

    from bench.common import TimedTelegram

    token = TimedTelegram.__attrs_attrs__.token.default
    child = subprocess.Popen([sys.executable, "-m", "bench.wire", "--serve-fake"], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        base_url = child.stdout.readline().strip()
        if not base_url.startswith("http"):
            raise SystemExit("the fake Bot API did not start")
        print(f"# wire — {machine_line()}", flush=True)
        count = runs(3, 1)
        rows = []
        for concurrency in (1, 16):
            results = [
                trio.run(functools.partial(measure, base_url, token, args.requests, concurrency)) for _ in range(count)
            ]
            for name in results[0]:
                user = median([r[name][0] for r in results])
                system = median([r[name][1] for r in results])
                rate = median([r[name][2] for r in results])
                rows.append((name, concurrency, args.requests, user, system, user + system, rate))
        user_baseline = {row[1]: row[3] for row in rows if row[0] == "PTB send_message"}
        total_baseline = {row[1]: row[5] for row in rows if row[0] == "PTB send_message"}
        print_table(
            f"client CPU per sendMessage, ms (median of {count} run(s); the fake Bot API in its own process)",
            ["client", "in flight", "requests", "user", "system", "total", "requests/s", "user vs PTB", "total vs PTB"],
            [(*row, row[3] / user_baseline[row[1]], row[5] / total_baseline[row[1]]) for row in rows],
        )
    finally:
        child.terminate()
        child.wait(timeout=10)


if __name__ == "__main__":
    main(sys.argv[1:])
