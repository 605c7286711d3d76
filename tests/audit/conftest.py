"""Fixtures of the audit's behaviour tests (the rest come from tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.audit.stack import TAG
from vpnd_sandbox.xray_fake import FakeXray, start_fake_xray


@pytest.fixture
def fake_xray() -> Iterator[FakeXray]:
    """The fake Xray API (gRPC on 127.0.0.1) with vpnd's inbound."""
    with start_fake_xray("xray.", inbound_tags=(TAG,)) as server:
        yield server
