"""Sample a running bot with py-spy and summarize where its CPU goes (used by `pipeline --profile`).

py-spy samples every thread that is running (idle threads — waiting in epoll or on a lock — are left
out), so the summary is a CPU profile of the whole process: the Trio thread and the database worker
threads. Output: the collapsed stacks (for flamegraph tools) and a text summary by package and by
function, inclusive and self.
"""

from __future__ import annotations

import collections
import re
import shutil
import sys
import tempfile
from pathlib import Path

import trio

PROFILE_DIR = Path(tempfile.gettempdir()) / "vpnd-bench-profiles"

_PACKAGES = [
    ("vpnd.db / psycopg", re.compile(r"psycopg|vpnd/db/|db/pool\.py")),
    ("python-telegram-bot", re.compile(r"(^|[/ (])telegram/")),
    ("httpx / httpcore / h11", re.compile(r"httpx|httpcore|h11")),
    ("trio", re.compile(r"(^|[/ (])trio/|outcome")),
    ("json", re.compile(r"json/")),
    ("logging", re.compile(r"logging/")),
    ("vpnd (other)", re.compile(r"vpnd/")),
    ("attrs", re.compile(r"attr/")),
]


async def record(pid: int, seconds: float, name: str) -> Path:
    """Run `py-spy record` on `pid` for `seconds`; return the collapsed-stacks file."""
    PROFILE_DIR.mkdir(parents=True, exist_ok=True)
    raw = PROFILE_DIR / f"{name}.collapsed.txt"
    result = await trio.run_process(
        [
            _py_spy(),
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(max(1, int(seconds))),
            "--rate",
            "200",
            "--format",
            "raw",
            "--gil",
            "-o",
            str(raw),
        ],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    if result.returncode != 0 or not raw.exists():
        raise RuntimeError(f"py-spy failed ({result.returncode}): {result.stderr.decode(errors='replace')[-500:]}")
    return raw


def _py_spy() -> str:
    """py-spy from this interpreter's environment (the bench extra installs it), else from PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else (shutil.which("py-spy") or "py-spy")


def _frames(stack: str) -> list[str]:
    # py-spy raw: "frame;frame;frame count", frame = "function (file:line)"; thread/process prefixes vary.
    return [f for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]


def _function(frame: str) -> str:
    match = re.match(r"(.*?) \((.*?)(?::\d+)?\)$", frame)
    if not match:
        return frame
    function, path = match.groups()
    return f"{function} ({path})"


def summarize(raw: Path, top: int = 15) -> str:
    """A text summary of a collapsed-stacks file: packages (inclusive), hot functions (inclusive, self)."""
    total = 0
    inclusive: collections.Counter[str] = collections.Counter()
    self_time: collections.Counter[str] = collections.Counter()
    packages: collections.Counter[str] = collections.Counter()
    leaf_packages: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_function(f) for f in _frames(stack)]
        if not frames:
            continue
        total += count
        for function in set(frames):
            inclusive[function] += count
        self_time[frames[-1]] += count
        seen = {name for name, pattern in _PACKAGES for f in frames if pattern.search(f)}
        for name in seen:
            packages[name] += count
        leaf = next((name for name, pattern in _PACKAGES if pattern.search(frames[-1])), "other (stdlib, C)")
        leaf_packages[leaf] += count
    if not total:
        return "  (no samples)"

    def pct(n: int) -> str:
        return f"{100 * n / total:5.1f}%"

    lines = [f"  {total} samples (CPU, all threads)", "  by package — inclusive (on the stack) / self (running):"]
    for name, count in sorted(packages.items(), key=lambda kv: -kv[1]):
        lines.append(f"    {pct(count)} / {pct(leaf_packages.get(name, 0))}  {name}")
    if "other (stdlib, C)" in leaf_packages:
        lines.append(f"      — / {pct(leaf_packages['other (stdlib, C)'])}  other (stdlib, C)")
    lines.append("  hottest functions, inclusive:")
    for function, count in inclusive.most_common(top + 10):
        if any(skip in function for skip in ("<module>", "_run_module", "run (trio", "unrolled_run")):
            continue
        lines.append(f"    {pct(count)}  {function}")
    lines.append("  hottest functions, self:")
    for function, count in self_time.most_common(top):
        lines.append(f"    {pct(count)}  {function}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(summarize(Path(sys.argv[1])))
