"""A broadcast's delivery report: sent, blocked the bot, failed, skipped — and a CSV of every recipient
with their outcome. Used by the admin bot (a document) and `vpnd broadcast report`.

"blocked" are the recipients Telegram refused with 403 (or whose chat is gone); they were marked
unreachable at that moment, so every later broadcast leaves them out until they write to the bot again.
"""

from __future__ import annotations

import csv
from typing import Any, TextIO

import psycopg

from vpnd.db import broadcasts as bdb

CSV_HEADER = ("user_id", "outcome", "sent_at", "error")
PAGE = 5000


def write_csv(conn: psycopg.Connection[Any], broadcast_id: int, out: TextIO) -> int:
    """Every recipient of the broadcast (user id order, keyset pages) as CSV rows; how many were written."""
    writer = csv.writer(out)
    writer.writerow(CSV_HEADER)
    after, written = 0, 0
    while True:
        page = bdb.recipient_outcomes(conn, broadcast_id, after_user_id=after, limit=PAGE)
        for r in page:
            writer.writerow(
                (r.user_id, r.outcome, r.sent_at.isoformat() if r.sent_at else "", _safe_cell(r.error or ""))
            )
        written += len(page)
        if len(page) < PAGE:
            return written
        after = page[-1].user_id


def write_csv_file(conn: psycopg.Connection[Any], broadcast_id: int, path: str) -> int:
    """The CSV into a new file at `path` (never over an existing one: an operator's typo cannot clobber a
    config); OSError (FileExistsError among them) when it cannot be created."""
    with open(path, "x", encoding="utf-8", newline="") as out:
        return write_csv(conn, broadcast_id, out)


def _safe_cell(value: str) -> str:
    """An error text cannot start a spreadsheet formula (CSV injection)."""
    return "'" + value if value[:1] in ("=", "+", "-", "@") else value
