"""Lifecycle: `vpnd run` → READY=1, and SIGTERM → exit (idle), median of N runs.

    python -m bench lifecycle          # N=10
    VPND_BENCH_RUNS=5 python -m bench lifecycle

A throwaway PostgreSQL and the fake Bot API run in this process; vpnd runs as a subprocess with a
fake NOTIFY_SOCKET, exactly as under systemd.
"""

from __future__ import annotations

import os
import signal
import statistics
import tempfile
from pathlib import Path

import psycopg
import trio

from vpnd.db.migrations import migrate, packaged_schema
from vpnd.sandbox.daemon_process import start_daemon, wait_ready
from vpnd.sandbox.postgres import free_port, throwaway_cluster
from vpnd.sandbox.telegram_fake import FakeTelegram, serve_fake_telegram


def write_config(path: Path, dsn: str, telegram_url: str, token: str, port: int) -> None:
    path.write_text(
        f'[telegram]\ntoken = "{token}"\napi_base_url = "{telegram_url}"\npoll_timeout = 10\n'
        f'[database]\ndsn = "{dsn}"\npool_min = 2\npool_max = 10\n'
        f'[http]\nlisten = "127.0.0.1:{port}"\n[shutdown]\ngrace_seconds = 10.0\n'
    )


async def measure(runs: int, dsn: str, workdir: Path) -> tuple[list[float], list[float]]:
    ready_times: list[float] = []
    stop_times: list[float] = []
    async with trio.open_nursery() as nursery:
        fake = FakeTelegram()
        telegram_url = await nursery.start(serve_fake_telegram, fake)
        for index in range(runs):
            port = free_port()
            config = workdir / f"config-{index}.toml"
            write_config(config, dsn, telegram_url, fake.token, port)
            daemon = await start_daemon(nursery, config, workdir)
            ready_times.append(await wait_ready(daemon, f"http://127.0.0.1:{port}", timeout=60))
            stop_at = trio.current_time()
            daemon.signal(signal.SIGTERM)
            code = await daemon.wait(timeout=30)
            stop_times.append(trio.current_time() - stop_at)
            if code != 0:
                raise RuntimeError(f"vpnd exited {code}: {daemon.log()[-2000:]}")
        nursery.cancel_scope.cancel()
    return ready_times, stop_times


def main() -> None:
    runs = int(os.environ.get("VPND_BENCH_RUNS", "10"))
    with tempfile.TemporaryDirectory(prefix="vpnd-bench-") as tmp, throwaway_cluster() as cluster:
        dsn = cluster.create_database("bench")
        with psycopg.connect(dsn, autocommit=True) as conn:
            migrate(conn, packaged_schema())
        ready, stop = trio.run(measure, runs, dsn, Path(tmp))
    print(f"lifecycle: runs={runs}")
    for label, values in (("vpnd run -> READY=1", ready), ("SIGTERM  -> exit 0 ", stop)):
        median = statistics.median(values)
        print(f"  {label}  median {median:.3f}s  (min {min(values):.3f}, max {max(values):.3f})")


if __name__ == "__main__":
    main()
