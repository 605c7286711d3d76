"""Benchmark 4 — the Xray writer at scale: render + atomic write for 10,000 and 100,000 clients.

    python -m bench xray_scale                       # sizes 10,000 and 100,000, median of 3 runs each
    python -m bench xray_scale --sizes 10000 50000

Two measurements per size, each in a fresh child process so that its peak RSS (VmHWM) is its own:

* **render + write**: vpnd's renderer (`ConfigRenderer`, batches of 2,000 clients as the writer
  streams them) and `write_atomically` (temp file, fsync, rename, directory fsync), timed apart;
* **writer, end to end**: vpnd's Xray writer (`run_xray`) against PostgreSQL holding that many
  active subscriptions, with Xray's API down so that the round does only what the file needs —
  stream the desired set from the database, render, write — timed from start to the file on disk.

Peak memory is reported as the child's peak RSS and as its growth over the RSS it had just before
the measured work (imports, the template and the database pool already there).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg

from bench.common import ProcessMeter, bench_database, machine_line, median, pick, print_table, runs
from bench.xray_support import TAG, server_template
from tests.keys import PUBLIC_KEY
from vpnd_sandbox.postgres import free_port

BATCH = 2000  # the writer's database batch (vpnd.nurseries.xray.BATCH_SIZE)


# ------------------------------------------------------------------------------------------ children


def _rss_now() -> float:
    return ProcessMeter(os.getpid()).rss_mib()


def _peak() -> float:
    return ProcessMeter(os.getpid()).peak_rss_mib()


def child_render(count: int, workdir: Path) -> dict[str, Any]:
    from vpnd.xray.render import Client, ConfigRenderer, load_template, write_atomically

    template_path = workdir / "template.json"
    template_path.write_text(json.dumps(server_template(free_port(), free_port()), indent=2))
    template = load_template(template_path, inbound_tag=TAG)
    target = workdir / "config.json"
    rng = uuid.UUID(int=0x1234)

    def batches() -> Iterator[list[Client]]:
        # Ids of equal length: numeric order is byte order, the order the database streams them in.
        for start in range(0, count, BATCH):
            yield [
                Client(uuid=str(uuid.UUID(int=rng.int + i)), email=f"u{50_000_000 + i}", flow="xtls-rprx-vision")
                for i in range(start, min(count, start + BATCH))
            ]

    baseline = _rss_now()
    started = time.perf_counter()
    renderer = ConfigRenderer(template)
    parts = [renderer.begin()]
    for batch in batches():
        parts.append(renderer.clients(batch))
    parts.append(renderer.end())
    data = b"".join(parts)
    rendered = time.perf_counter()
    write_atomically(target, data)
    written = time.perf_counter()
    peak = _peak()
    del parts, data
    assert json.loads(target.read_bytes())  # valid JSON, as Xray will parse it (after the peak was read)
    return {
        "render_s": rendered - started,
        "write_s": written - rendered,
        "total_s": written - started,
        "bytes": target.stat().st_size,
        "peak_mib": peak,
        "growth_mib": peak - baseline,
    }


def child_writer(count: int, dsn: str, workdir: Path) -> dict[str, Any]:
    import trio

    from tests.harness import write_config_file
    from vpnd.compose import Services, open_vpnd
    from vpnd.config import load_config
    from vpnd.nurseries.xray import run_xray

    template_path = workdir / "template.json"
    template_path.write_text(json.dumps(server_template(free_port(), free_port()), indent=2))
    config_path = workdir / "xray" / "config.json"
    config_path.parent.mkdir(exist_ok=True)
    sections = {
        "telegram": {"token": "7000000001:AAFakeTokenForTheVpndSandboxBot000000"},
        "database": {"dsn": dsn, "pool_min": 1, "pool_max": 4},
        "xray": {
            "enabled": True,
            "template_path": str(template_path),
            "config_path": str(config_path),
            "inbound_tag": TAG,
            "api_address": f"127.0.0.1:{free_port()}",  # nothing listens: Xray is down
            "api_prefix": "xray.",
            "public_key": PUBLIC_KEY,
            "short_id": "0123abcd",
            "host": "vpn.example.test",
        },
    }
    config = load_config(write_config_file(workdir / "vpnd.toml", sections), environ={})
    result: dict[str, Any] = {}

    async def run() -> None:
        async with open_vpnd(config, Services.only(), single_instance=False) as vpnd, trio.open_nursery() as nursery:
            app = vpnd.app
            baseline = _rss_now()
            started = trio.current_time()
            status = (await nursery.start(run_xray, app)).status()
            with trio.fail_after(600):  # the first round writes the file (no API: nothing else to do)
                while True:
                    if status.file_writes >= 1:
                        break
                    await trio.sleep(0.01)
            result["total_s"] = trio.current_time() - started
            result["peak_mib"] = _peak()
            result["growth_mib"] = _peak() - baseline
            app.lifecycle.request_stop("benchmark")
            nursery.cancel_scope.cancel()

    trio.run(run)
    clients = json.loads(config_path.read_bytes())["inbounds"][1]["settings"]["clients"]
    if len(clients) != count:
        raise RuntimeError(f"the written config lists {len(clients)} clients, expected {count}")
    result["bytes"] = config_path.stat().st_size
    return result


# ------------------------------------------------------------------------------------------ parent


def add_subscriptions(dsn: str, count: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO users (id, first_name, referral_code) "
            "SELECT g, 'X', 'x' || g FROM generate_series(50000000::bigint, %s::bigint) g",
            (50_000_000 + count - 1,),
        )
        conn.execute(
            "INSERT INTO subscriptions (user_id, kind, status, uuid, sub_token, expires_at) "
            "SELECT id, 'paid', 'active', gen_random_uuid(), 't' || id, now() + interval '30 days' "
            "FROM users WHERE id >= 50000000"
        )
        conn.execute("ANALYZE subscriptions")


def run_child(args: list[str]) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "bench.xray_scale", "--child", *args],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"child {args[:2]} failed:\n{result.stderr[-3000:]}")
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench xray_scale", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=pick([10_000, 100_000], [10_000, 100_000]))
    parser.add_argument("--runs", type=int, default=runs(3, 1))
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args, _ = parser.parse_known_args(argv or [])
    if args.child:
        kind, count, *rest = args.child
        with tempfile.TemporaryDirectory(prefix="vpnd-bench-xray-") as tmp:
            if kind == "render":
                out = child_render(int(count), Path(tmp))
            else:
                out = child_writer(int(count), rest[0], Path(tmp))
        print(json.dumps(out))
        return

    print(f"# xray_scale — {machine_line()}", flush=True)
    rows: list[list[Any]] = []
    with bench_database() as db:
        for size in args.sizes:
            dsn = db.fresh(f"xray{size}")
            add_subscriptions(dsn, size)
            render = [run_child(["render", str(size)]) for _ in range(args.runs)]
            writer = [run_child(["writer", str(size), dsn]) for _ in range(args.runs)]
            for label, results in (("render + atomic write", render), ("writer: DB → file", writer)):
                rows.append(
                    [
                        f"{size:,} clients, {label}",
                        median([r.get("render_s", float("nan")) * 1000 for r in results]),
                        median([r.get("write_s", float("nan")) * 1000 for r in results]),
                        median([r["total_s"] * 1000 for r in results]),
                        median([r["bytes"] / 2**20 for r in results]),
                        median([r["peak_mib"] for r in results]),
                        median([r["growth_mib"] for r in results]),
                    ]
                )
                print(f"  {rows[-1][0]}: {rows[-1][3]:.0f} ms", flush=True)
    print_table(
        f"xray_scale: medians of {args.runs} runs (each in a fresh process)",
        ["case", "render ms", "write ms", "total ms", "file MiB", "peak RSS MiB", "RSS growth MiB"],
        rows,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
