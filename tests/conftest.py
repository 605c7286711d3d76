"""Shared fixtures: a real PostgreSQL (a throwaway cluster, or $VPND_TEST_DSN) and configs.

Each test gets its own database cloned from a migrated template, so tests never see each other's
rows and cloning costs milliseconds instead of a migration per test. Under pytest-xdist every worker
is its own session: its own throwaway cluster (or, on $VPND_TEST_DSN, its own template database).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests.harness import toml_value
from vpnd.db import Database, open_database
from vpnd.db.migrations import migrate, packaged_schema
from vpnd_sandbox.postgres import Cluster, throwaway_cluster

#: One per xdist worker ("gw0", ...): workers sharing $VPND_TEST_DSN must not drop each other's template.
TEMPLATE_DB = "vpnd_template_" + os.environ.get("PYTEST_XDIST_WORKER", "main")
_counter = itertools.count(1)


class ExternalServer:
    """The same interface as `Cluster`, over a server given by $VPND_TEST_DSN."""

    def __init__(self, dsn: str) -> None:
        self.base = dsn

    def dsn(self, dbname: str = "postgres") -> str:
        params = conninfo_to_dict(self.base)
        params["dbname"] = dbname
        return make_conninfo(**params)

    def create_database(self, name: str, template: str | None = None) -> str:
        with psycopg.connect(self.base, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            conn.execute(f'CREATE DATABASE "{name}"' + (f" TEMPLATE {template}" if template else ""))
        return self.dsn(name)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Cluster | ExternalServer]:
    external = os.environ.get("VPND_TEST_DSN")
    if external:
        yield ExternalServer(external)
        return
    with throwaway_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def template_dsn(pg_server: Cluster | ExternalServer) -> str:
    dsn = pg_server.create_database(TEMPLATE_DB)
    with psycopg.connect(dsn, autocommit=True) as conn:
        migrate(conn, packaged_schema())
    return dsn


@pytest.fixture
def db_dsn(pg_server: Cluster | ExternalServer, template_dsn: str) -> str:
    """A fresh, migrated database for this test."""
    return pg_server.create_database(f"t{os.getpid()}_{next(_counter)}", template=TEMPLATE_DB)


@pytest.fixture
def empty_db_dsn(pg_server: Cluster | ExternalServer) -> str:
    """A fresh database with no schema at all."""
    return pg_server.create_database(f"e{os.getpid()}_{next(_counter)}")


@pytest.fixture
async def database(db_dsn: str) -> AsyncIterator[Database]:
    async with open_database(db_dsn, min_size=1, max_size=4) as db:
        yield db


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[..., Path]:
    """Write a config.toml from TOML text (or sections as dicts) and return its path."""

    def write(text: str = "", name: str = "config.toml", **sections: dict[str, Any]) -> Path:
        lines = [text]
        for section, values in sections.items():
            lines.append(f"[{section}]")
            for key, value in values.items():
                lines.append(f"{key} = {toml_value(value)}")
        path = tmp_path / name
        path.write_text("\n".join(lines) + "\n")
        return path

    return write


@pytest.fixture
async def fake_telegram(nursery: Any) -> tuple[Any, str]:
    """The fake Bot API served on 127.0.0.1: (fake, base_url)."""
    from vpnd_sandbox.telegram_fake import FakeTelegram, serve_fake_telegram

    fake = FakeTelegram()
    base_url = await nursery.start(serve_fake_telegram, fake)
    return fake, base_url


@pytest.fixture
async def fake_cryptopay(nursery: Any) -> tuple[Any, str]:
    """The fake Crypto Pay served on 127.0.0.1: (fake, api_base_url)."""
    from vpnd_sandbox.cryptopay_fake import FakeCryptoPay, serve_fake_cryptopay

    fake = FakeCryptoPay()
    base_url = await nursery.start(serve_fake_cryptopay, fake)
    return fake, f"{base_url}/api"
