"""Secrets stay out of `vpnd check-config` output and out of the logs, whatever they look like.

Through the command line: `check-config` prints the effective configuration, `migrate` against an
unreachable database logs libpq's error (which can carry pieces of a badly written DSN).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VPND_") and k != "CREDENTIALS_DIRECTORY"}
    return subprocess.run([sys.executable, "-m", "vpnd", *args], capture_output=True, text=True, timeout=60, env=env)


DSNS = [
    # (DSN, pieces of the password that must not be shown, what must still be shown)
    (
        "postgresql://vpnd:s3cr@t-Tail99@db.internal/vpnd",
        ["s3cr", "t-Tail99"],
        "postgresql://vpnd:***@db.internal/vpnd",
    ),
    ("postgresql://vpnd:Pl41n-pw@db.internal:5433/vpnd?password=Qu3ry-pw", ["Pl41n", "Qu3ry"], "db.internal:5433"),
    ("host=db.internal password='it\\'s Qu0ted s3cret' dbname=vpnd", ["Qu0ted", "s3cret"], "host=db.internal"),
    ("host=db.internal password=Esc\\ aped-pw dbname=vpnd", ["Esc", "aped-pw"], "dbname=vpnd"),
]


@pytest.mark.parametrize(("dsn", "hidden", "shown"), DSNS)
def test_check_config_masks_the_whole_dsn_password(
    write_config: Callable[..., Path], dsn: str, hidden: list[str], shown: str
) -> None:
    result = run_cli("check-config", "--config", str(write_config(database={"dsn": dsn})))
    assert result.returncode == 0, result.stderr
    dsn_line = next(line for line in result.stdout.splitlines() if line.startswith("dsn = "))
    for piece in hidden:
        assert piece not in result.stdout + result.stderr, dsn_line
    assert shown in dsn_line and "***" in dsn_line


def test_check_config_shows_nothing_of_other_secrets(write_config: Callable[..., Path]) -> None:
    path = write_config(
        telegram={"token": "123456:Zx9-Telegram-Secret-Part"},
        cryptopay={"enabled": True, "token": "Cr7-pay-token-long-enoughWv"},
        metrics={"username": "prom", "password": "Mq4-metrics-passwordZq"},
        telegram_payments={"enabled": True, "provider_token": "381764678:LIVE:Pv8-card-provider"},
    )
    result = run_cli("check-config", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert 'provider_token = "***"' in result.stdout
    for secret in ("Zx9", "Telegram-Secret", "Cr7", "Wv", "Mq4", "Zq", "381764678", "Pv8-card"):
        values = [line for line in result.stdout.splitlines() if line.startswith(("token = ", "password = "))]
        values += [line for line in result.stdout.splitlines() if line.startswith("provider_token = ")]
        assert all(secret not in line for line in values), values
    assert 'token = "123456:***"' in result.stdout  # the bot id is public and tells which bot


@pytest.mark.parametrize(
    ("dsn", "secret_pieces"),
    [
        # libpq splits a raw "@" in the password at the first "@": the tail becomes the "host"
        # and shows up in the connection error.
        ("postgresql://vpnd:pw@T41l-secret@127.0.0.1:1/vpnd", ["T41l-secret"]),
        # A short password is still a password (here it shows up in the host name).
        ("postgresql://vpnd:k9q@k9q.invalid:1/vpnd", ["k9q"]),
    ],
)
def test_logged_connection_errors_carry_no_piece_of_the_password(
    write_config: Callable[..., Path], dsn: str, secret_pieces: list[str]
) -> None:
    path = write_config(database={"dsn": dsn, "connect_timeout_seconds": 5})
    result = run_cli("migrate", "--config", str(path))
    assert result.returncode == 1, result.stderr
    assert "event=migrate_failed" in result.stderr
    for piece in secret_pieces:
        assert piece not in result.stderr, result.stderr
