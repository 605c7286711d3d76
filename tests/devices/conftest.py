"""Device tests: a config with plans that limit devices, served over real HTTP."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.devices.harness import PLANS, XRAY
from vpnd_sandbox.postgres import free_port


@pytest.fixture
def config_file(write_config: Callable[..., Path], db_dsn: str) -> Callable[..., Path]:
    def make(**sections: Any) -> Path:
        return write_config(
            PLANS,
            database={"dsn": db_dsn, "pool_min": 1, "pool_max": 6},
            http={"listen": f"127.0.0.1:{free_port()}"},
            shutdown={"grace_seconds": 1.0},
            xray=XRAY,
            **sections,
        )

    return make
