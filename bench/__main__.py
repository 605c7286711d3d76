"""`python -m bench [NAME ...] [--option ...]`: run the named benchmarks (default: all) and print their figures.

    python -m bench                          # everything (the soak alone takes 30 minutes)
    VPND_BENCH_QUICK=1 python -m bench       # everything, briefly (about 14 minutes on 2 cores)
    python -m bench pipeline --profile       # options after the names go to each named benchmark
    python -m bench soak --minutes 60

Each benchmark is also `python -m bench.NAME --help`.
"""

from __future__ import annotations

import importlib
import os
import sys
import time

from bench.common import machine_line, quick

BENCHMARKS = [
    "pipeline",
    "flood",
    "broadcast",
    "activation",
    "xray_scale",
    "lifecycle",
    "soak",
    "wire",
    "notify",
    "nodes",
    "quota",
]


def main(argv: list[str]) -> int:
    if any(arg in ("-h", "--help") for arg in argv) and not any(not a.startswith("-") for a in argv):
        print(__doc__)
        print("benchmarks: " + ", ".join(BENCHMARKS))
        return 0
    first_option = next((i for i, arg in enumerate(argv) if arg.startswith("-")), len(argv))
    names = argv[:first_option]
    options = argv[first_option:]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    print(f"# vpnd benchmarks — {machine_line()}{' — QUICK mode' if quick() else ''}", flush=True)
    for name in names or BENCHMARKS:
        started = time.monotonic()
        module = importlib.import_module(f"bench.{name}")
        module.main(options)
        load = os.getloadavg()[0]
        print(f"# {name}: {time.monotonic() - started:.0f} s (load average now {load:.1f})\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
