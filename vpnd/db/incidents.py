"""Reads of incident states (`health_checks` rows; written by `vpnd.workers.health.record_observation`)."""

from __future__ import annotations

from typing import Any

import psycopg


def incident_is_open(conn: psycopg.Connection[Any], name: str) -> bool:
    """Whether `name` is recorded as failing (a primary-key read)."""
    row = conn.execute("SELECT NOT ok FROM health_checks WHERE name = %s", (name,)).fetchone()
    return bool(row and row[0])
