"""`python -m bench [NAME ...]`: run the named benchmarks (default: all) and print their figures."""

from __future__ import annotations

import importlib
import os
import sys

BENCHMARKS = ["lifecycle"]


def main(argv: list[str]) -> int:
    names = argv or BENCHMARKS
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    print(f"# machine: {os.cpu_count()} cores, python {sys.version.split()[0]}")
    for name in names:
        module = importlib.import_module(f"bench.{name}")
        module.main()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
