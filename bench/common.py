"""What every benchmark shares: run counts, the database, the timed fake Bot API, process meters, output.

Environment:

    VPND_BENCH_QUICK=1     every benchmark runs briefly (smaller N, fewer runs, a 2-minute soak)
    VPND_BENCH_RUNS=N      override the number of runs a benchmark takes the median of
    VPND_BENCH_PROFILE=1   pipeline: also profile vpnd under load with pyinstrument (see bench/README.md)

Everything listens on 127.0.0.1. Bots under test run as subprocesses so that their CPU time and
peak RSS are theirs alone; the fakes run in the benchmark's own process.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import os
import platform
import signal
import statistics
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import psutil
import psycopg
import trio

from tests.harness import start_daemon, wait_ready, write_config_file
from vpnd.db.migrations import migrate, packaged_schema
from vpnd_sandbox.postgres import Cluster, free_port, throwaway_cluster
from vpnd_sandbox.telegram_fake import ChatMessage, FakeTelegram, FakeUser

TEMPLATE_DB = "bench_template"


# ------------------------------------------------------------------------------------------ run sizes


def quick() -> bool:
    return os.environ.get("VPND_BENCH_QUICK", "") not in ("", "0")


def runs(default: int, quick_default: int) -> int:
    """How many runs to take the median of: VPND_BENCH_RUNS, else the (quick) default."""
    if os.environ.get("VPND_BENCH_RUNS"):
        return max(1, int(os.environ["VPND_BENCH_RUNS"]))
    return quick_default if quick() else default


def pick(default: Any, quick_value: Any) -> Any:
    return quick_value if quick() else default


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = psutil.virtual_memory().total / 2**30
    load = os.getloadavg()[0]
    return (
        f"{os.cpu_count()} cores ({cpu}), {memory:.0f} GiB, Linux {platform.release()}, "
        f"Python {sys.version.split()[0]}, {dt.date.today().isoformat()}, load average {load:.1f}"
    )


# ------------------------------------------------------------------------------------------ statistics


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (0 < fraction <= 1) of a non-empty sequence."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))
    return ordered[index]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def median_of(results: Sequence[dict[str, float]], key: str) -> float:
    return median([r[key] for r in results if key in r])


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A plain-text table (also valid Markdown), right-aligned numbers."""
    cells = [[str(c) for c in header]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print(title)
    for index, row in enumerate(cells):
        print(
            "| "
            + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
            + " |"
        )
        if index == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    print(flush=True)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    return str(value)


# ------------------------------------------------------------------------------------------ database


@attrs.define(eq=False)
class BenchDatabase:
    """A throwaway cluster with a migrated template database; each run gets a fresh copy."""

    cluster: Cluster
    counter: int = 0

    def fresh(self, label: str) -> str:
        self.counter += 1
        return self.cluster.create_database(f"{label}_{self.counter}", template=TEMPLATE_DB)

    def postgres_cpu_seconds(self) -> float:
        """CPU seconds used so far by the cluster's live processes (postmaster and backends)."""
        try:
            pid = int((self.cluster.datadir / "postmaster.pid").read_text().split()[0])
            main = psutil.Process(pid)
            total = 0.0
            for proc in [main, *main.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    times = proc.cpu_times()
                    total += times.user + times.system
            return total
        except (OSError, ValueError, psutil.Error):
            return float("nan")


@contextlib.contextmanager
def bench_database() -> Iterator[BenchDatabase]:
    with throwaway_cluster(prefix="vpnd-bench-pg-") as cluster:
        dsn = cluster.create_database(TEMPLATE_DB)
        with psycopg.connect(dsn, autocommit=True) as conn:
            migrate(conn, packaged_schema())
        yield BenchDatabase(cluster)


# ------------------------------------------------------------------------------------------ fake Telegram


@attrs.define(eq=False)
class TimedTelegram(FakeTelegram):
    """The fake Bot API, plus a count of bot output per chat (messages and edits) that users can await.

    Only for measuring: it behaves exactly like :class:`FakeTelegram` on the wire.
    """

    bot_outputs: dict[int, int] = attrs.field(factory=dict, init=False)
    last_output_at: dict[int, float] = attrs.field(factory=dict, init=False)
    #: (trio time, chat id) of every bot output while `record_times` is set.
    output_log: list[tuple[float, int]] = attrs.field(factory=list, init=False)
    record_times: bool = attrs.field(default=False, init=False)
    _output_waiters: dict[int, trio.Event] = attrs.field(factory=dict, init=False)
    #: Keep at most this many messages per chat (a long benchmark would otherwise grow the fake).
    keep_messages: int = attrs.field(default=4, init=False)

    def _add_message(self, user: FakeUser, *, from_bot: bool, **content: Any) -> ChatMessage:
        message = super()._add_message(user, from_bot=from_bot, **content)
        chat = self.messages[user.id]
        if len(chat) > self.keep_messages * 2:
            del chat[: len(chat) - self.keep_messages]
        if from_bot:
            self._bot_output(user.id)
        return message

    def _edited(self, message: ChatMessage) -> Any:
        result = super()._edited(message)
        self._bot_output(message.chat_id)
        return result

    def _bot_output(self, chat_id: int) -> None:
        now = trio.current_time()
        self.bot_outputs[chat_id] = self.bot_outputs.get(chat_id, 0) + 1
        self.last_output_at[chat_id] = now
        if self.record_times:
            self.output_log.append((now, chat_id))
        event = self._output_waiters.pop(chat_id, None)
        if event is not None:
            event.set()

    def outputs(self, chat_id: int) -> int:
        return self.bot_outputs.get(chat_id, 0)

    async def wait_outputs(self, chat_id: int, at_least: int, timeout: float) -> None:
        with trio.fail_after(timeout):
            while self.bot_outputs.get(chat_id, 0) < at_least:
                event = self._output_waiters.get(chat_id)
                if event is None:
                    event = self._output_waiters[chat_id] = trio.Event()
                await event.wait()

    def unlimited(self) -> None:
        """Lift the flood limits (throughput runs): the bots' own pace is what is measured."""
        self.global_rate = self.global_burst = 1e9
        self.chat_rate = self.chat_burst = 1e9

    def last_bot_message(self, chat_id: int) -> ChatMessage | None:
        for message in reversed(self.messages.get(chat_id, [])):
            if message.from_bot and not message.deleted:
                return message
        return None


# ------------------------------------------------------------------------------------------ processes


@attrs.define(eq=False)
class ProcessMeter:
    """CPU seconds and peak RSS of one process (Linux: VmHWM is the kernel's own peak)."""

    pid: int
    _process: psutil.Process = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._process = psutil.Process(self.pid)

    def cpu_seconds(self) -> float:
        times = self._process.cpu_times()
        return float(times.user + times.system)

    def rss_mib(self) -> float:
        return float(self._process.memory_info().rss) / 2**20

    def peak_rss_mib(self) -> float:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        return self.rss_mib()


def vpnd_sections(
    dsn: str, fake: FakeTelegram, telegram_url: str, port: int, **overrides: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """vpnd's config for a benchmark run: the fake Bot API, a fresh database, a free port."""
    sections: dict[str, dict[str, Any]] = {
        "telegram": {"token": fake.token, "api_base_url": telegram_url, "poll_timeout": 10, "admin_ids": [1]},
        "database": {"dsn": dsn},
        "http": {"listen": f"127.0.0.1:{port}", "public_base_url": f"http://127.0.0.1:{port}"},
        "shutdown": {"grace_seconds": 10.0},
    }
    for name, values in overrides.items():
        sections[name] = {**sections.get(name, {}), **values}
    return sections


@attrs.define(eq=False)
class BotProcess:
    """A bot under test running as a subprocess (vpnd or the reference bot)."""

    process: trio.Process
    meter: ProcessMeter
    log_path: Path
    http_url: str = ""
    config_path: Path | None = None

    def log_tail(self, size: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-size:]

    async def stop(self, timeout: float = 30) -> float:
        """SIGTERM, wait for exit (kill after `timeout`); return the seconds it took."""
        started = trio.current_time()
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            with trio.move_on_after(timeout):
                await self.process.wait()
            if self.process.returncode is None:
                self.process.kill()
                await self.process.wait()
        return trio.current_time() - started


async def start_vpnd(
    nursery: trio.Nursery,
    workdir: Path,
    dsn: str,
    fake: FakeTelegram,
    telegram_url: str,
    *,
    env: dict[str, str] | None = None,
    **overrides: dict[str, Any],
) -> BotProcess:
    """`python -m vpnd run` with a fake NOTIFY_SOCKET; returns after READY=1."""
    port = free_port()
    sections = vpnd_sections(dsn, fake, telegram_url, port, **overrides)
    config = write_config_file(workdir / f"vpnd-{port}.toml", sections)
    daemon = await start_daemon(nursery, config, workdir, env=env)
    try:
        await wait_ready(daemon, f"http://127.0.0.1:{port}", timeout=90)
    except trio.TooSlowError:
        daemon.process.kill()
        raise RuntimeError(f"vpnd did not become ready:\n{daemon.log()[-3000:]}") from None
    return BotProcess(
        daemon.process, ProcessMeter(daemon.process.pid), daemon.log_path, f"http://127.0.0.1:{port}", config
    )


async def wait_polling(fake: FakeTelegram, bot: BotProcess, timeout: float = 60) -> None:
    """Until the bot has a getUpdates long poll waiting at the fake."""
    with trio.fail_after(timeout):
        while fake.stats()["polls_waiting"] < 1:
            if bot.process.returncode is not None:
                raise RuntimeError(f"the bot exited {bot.process.returncode}:\n{bot.log_tail()}")
            await trio.sleep(0.05)
