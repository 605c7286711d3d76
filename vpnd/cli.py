"""The `vpnd` command: run, check-config, migrate, backup, restore, sandbox, and the operator's admin/broadcast commands
(those live in `vpnd.admin_cli`). `run` hands the config to `vpnd.nurseries.root.run_daemon`.

Exit codes: 0 ok, 1 failure (logged with its cause, once), 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from functools import partial

import psycopg
import trio

from vpnd.admin_cli import add_parsers as add_admin_parsers
from vpnd.admin_cli import cmd_admin, cmd_broadcast
from vpnd.config import Config, ConfigError, load_config, render_effective, require_runtime_secrets
from vpnd.db import DatabaseUnavailable
from vpnd.db.migrations import SchemaError, migrate, packaged_schema, pending
from vpnd.errors import describe, leaf_exceptions
from vpnd.instance_lock import InstanceLockHeld, InstanceLockLost
from vpnd.logs import setup_logging
from vpnd.masking import configured_secrets

log = logging.getLogger("vpnd")

DEFAULT_CONFIG = os.environ.get("VPND_CONFIG", "/etc/vpnd/config.toml")

#: Failures whose message is the whole story: no traceback in the log.
EXPECTED_FAILURES: tuple[type[BaseException], ...] = (
    DatabaseUnavailable,
    SchemaError,
    InstanceLockHeld,
    InstanceLockLost,
    psycopg.OperationalError,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vpnd", description="Run a VPN subscription shop from a Telegram bot.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", "-c", default=DEFAULT_CONFIG, help=f"config file (default {DEFAULT_CONFIG})")
        return p

    run_parser = with_config(sub.add_parser("run", help="run the daemon (systemd: Type=notify)"))
    run_parser.add_argument(
        "--services",
        type=lambda text: frozenset(name for name in text.split(",") if name),
        default=None,
        help="run only these services, comma-separated (default: all; names in vpnd.compose.SERVICE_NAMES)",
    )
    run_parser.add_argument(
        "--standby",
        action="store_true",
        help="if another vpnd holds this database, wait and take over when it is gone (instead of exiting 1)",
    )
    with_config(sub.add_parser("check-config", help="validate the config and print it, secrets masked"))
    migrate_parser = with_config(sub.add_parser("migrate", help="apply pending database migrations"))
    migrate_parser.add_argument("--check", action="store_true", help="only report pending migrations (exit 1 if any)")
    backup_parser = with_config(
        sub.add_parser("backup", help="write a pg_dump of the database to [backup].directory (and rotate)")
    )
    backup_parser.add_argument("--list", action="store_true", help="list the backups, newest first")
    restore_parser = with_config(
        sub.add_parser("restore", help="replace the database's contents with a backup (vpnd must be stopped)")
    )
    restore_parser.add_argument("file", help="a backup file (vpnd-<time>.dump), e.g. from `vpnd backup --list`")
    restore_parser.add_argument("--yes", action="store_true", help="confirm: the current contents are replaced")
    sandbox = sub.add_parser("sandbox", help="run the demo: PostgreSQL, fake Telegram (web chat), fakes, vpnd")
    sandbox.add_argument("--port", type=int, default=8090, help="port of the web chat (default 8090)")
    add_admin_parsers(sub, with_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "sandbox":
        return run_sandbox(args.port)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"vpnd: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log.level, config.log.format, configured_secrets(config))
    handler = COMMANDS[args.command]
    return handler(config, args)


def run_sandbox(port: int) -> int:
    """`vpnd sandbox`: the demo lives in `vpnd_sandbox`, which the daemon never imports; it is imported
    here, when asked for, and its absence is told in one line with the extra to install."""
    try:
        from vpnd_sandbox.demo import main as sandbox_main
    except ImportError as exc:
        print(
            f"vpnd sandbox: the sandbox is not installed ({exc}); install vpnd with its `sandbox` extra: "
            "pip install 'vpnd[sandbox]' (from a source tree: pip install -e '.[sandbox]')",
            file=sys.stderr,
        )
        return 2
    return sandbox_main(port)


def cmd_check_config(config: Config, args: argparse.Namespace) -> int:
    from vpnd.config_checks import config_warnings

    sys.stdout.write(render_effective(config))
    for warning in config_warnings(config):
        print(f"# warning: {warning}", file=sys.stderr)
    print(f"# {config.path}: OK", file=sys.stderr)
    return 0


def cmd_migrate(config: Config, args: argparse.Namespace) -> int:
    try:
        require_runtime_secrets_db(config)
        schema = packaged_schema()
        with psycopg.connect(
            config.database.dsn, autocommit=True, connect_timeout=10, application_name="vpnd-migrate"
        ) as conn:
            if args.check:
                todo = list(pending(conn, schema))
                print(f"pending migrations: {', '.join(map(str, todo)) or 'none'} (code version {schema.version})")
                return 1 if todo else 0
            applied = migrate(conn, schema, lock_timeout=config.database.migration_lock_timeout_seconds)
        print(f"database at version {schema.version}; applied: {', '.join(map(str, applied)) or 'nothing'}")
        return 0
    except ConfigError as exc:
        print(f"vpnd: {exc}", file=sys.stderr)
        return 2
    except EXPECTED_FAILURES as exc:
        log.error("event=migrate_failed cause=%s", _quote(describe(exc)))
        return 1


def require_runtime_secrets_db(config: Config) -> None:
    if not config.database.dsn:
        raise ConfigError(config.path, "[database].dsn", "required (or set VPND_DATABASE_DSN)")


def cmd_run(config: Config, args: argparse.Namespace) -> int:
    from vpnd.compose import Services
    from vpnd.nurseries.root import run_daemon

    try:
        require_runtime_secrets(config)
        services = Services.all() if args.services is None else Services(args.services)
    except ConfigError as exc:
        print(f"vpnd: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"vpnd: --services: {exc}", file=sys.stderr)
        return 2
    log.info("event=starting version=%s config=%s", _version(), config.path)
    try:
        trio.run(partial(run_daemon, config, services=services, standby=args.standby))
    except Exception as exc:  # the daemon's one error boundary: classify, log once, exit code
        return _report_crash(exc)
    return 0


def _report_crash(exc: BaseException) -> int:
    leaves = leaf_exceptions(exc)
    if not leaves:  # only cancellations: a second signal cut the shutdown short
        log.warning("event=stopped_by_signal detail=%s", _quote("cancelled before the grace period ended"))
        return 0
    cause = leaves[0]
    if isinstance(cause, EXPECTED_FAILURES):
        log.error("event=crashed cause=%s", _quote(describe(cause)))
    else:
        log.error("event=crashed cause=%s", _quote(describe(cause)), exc_info=cause)
    return 1


def _quote(text: str) -> str:
    from vpnd.logs import quote

    return quote(text)


def _version() -> str:
    from vpnd import __version__

    return __version__


def cmd_backup(config: Config, args: argparse.Namespace) -> int:
    """`vpnd backup`: one backup now (what cron or a systemd timer runs), or `--list` them."""
    from vpnd.services import backup

    settings = config.backup
    if args.list:
        backups = backup.list_backups(settings.directory)
        for item in backups:
            print(f"{item.path}  {item.taken_at:%Y-%m-%d %H:%M:%S} UTC  {backup.describe_size(item.size)}")
        print(f"{len(backups)} backup(s) in {settings.directory} (keeping {settings.keep})", file=sys.stderr)
        return 0
    try:
        require_runtime_secrets_db(config)
        print(f"vpnd backup: dumping the database to {settings.directory} ...", file=sys.stderr)
        result = trio.run(backup.create_backup, config.database.dsn, settings)
    except ConfigError as exc:
        print(f"vpnd: {exc}", file=sys.stderr)
        return 2
    except backup.BackupError as exc:
        log.error("event=backup_failed cause=%s", _quote(str(exc)))
        print(f"vpnd backup: failed: {exc}", file=sys.stderr)
        return 1
    log.info("event=backup_done file=%s bytes=%d seconds=%.1f", result.file.path, result.file.size, result.seconds)
    print(f"{result.file.path}  {backup.describe_size(result.file.size)} in {result.seconds:.1f} s")
    for old in result.deleted:
        print(f"deleted {old} (keeping {settings.keep})", file=sys.stderr)
    return 0


def cmd_restore(config: Config, args: argparse.Namespace) -> int:
    """`vpnd restore FILE --yes`: the database's contents become the backup's (all or nothing)."""
    from pathlib import Path

    from vpnd.services import backup

    if not args.yes:
        print(
            f"vpnd restore: this replaces everything in the database with {args.file}; "
            "stop vpnd, then run again with --yes",
            file=sys.stderr,
        )
        return 2
    try:
        require_runtime_secrets_db(config)
        print(f"vpnd restore: restoring {args.file} ...", file=sys.stderr)
        result = trio.run(backup.restore_backup, config.database.dsn, config.backup, Path(args.file))
    except ConfigError as exc:
        print(f"vpnd: {exc}", file=sys.stderr)
        return 2
    except (backup.BackupError, psycopg.OperationalError) as exc:
        log.error("event=restore_failed cause=%s", _quote(describe(exc)))
        print(f"vpnd restore: failed: {describe(exc)}", file=sys.stderr)
        return 1
    code = packaged_schema().version
    version = result.schema_version
    print(f"restored {result.file} in {result.seconds:.1f} s; schema version {version} (this vpnd: {code})")
    if version is not None and version < code:
        print("the backup is older than this vpnd: run `vpnd migrate` before starting it", file=sys.stderr)
    return 0


COMMANDS: dict[str, Callable[[Config, argparse.Namespace], int]] = {
    "run": cmd_run,
    "check-config": cmd_check_config,
    "migrate": cmd_migrate,
    "backup": cmd_backup,
    "restore": cmd_restore,
    "admin": cmd_admin,
    "broadcast": cmd_broadcast,
}

if __name__ == "__main__":
    sys.exit(main())
