"""Audit E (source half) — bounded channels and bounded queries.

The measured half (RSS/tracemalloc under 20,000 updates and a 10,000-recipient broadcast) is in
tests/audit/test_e_memory.py.
"""

from __future__ import annotations

import ast
import re

from tests.audit.source import calls_named, daemon_modules


def test_every_memory_channel_has_a_finite_size() -> None:
    for path, tree in daemon_modules():
        for call in calls_named(tree, "open_memory_channel"):
            assert call.args, f"{path}:{call.lineno} open_memory_channel without a size"
            size = ast.unparse(call.args[0])
            assert "inf" not in size, f"{path}:{call.lineno} unbounded channel ({size})"


def _sql_strings(tree: ast.Module) -> list[tuple[int, str]]:
    """SQL SELECT statements in string literals and f-strings (interpolations shown as {})."""
    found = []
    inside_fstrings = set()
    texts: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            parts = []
            for value in node.values:
                inside_fstrings.add(id(value))
                parts.append(value.value if isinstance(value, ast.Constant) else "{}")
            texts.append((node.lineno, "".join(str(p) for p in parts)))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in inside_fstrings:
            texts.append((node.lineno, node.value))
    for line, raw in texts:
        text = " ".join(raw.split())
        if re.match(r"(?i)^(WITH|SELECT)\b", text) and re.search(r"(?i)\bFROM\b", text):
            found.append((line, text))
    return found


#: Statements that read one row by key, or aggregate: bounded without a LIMIT.
BOUNDED = re.compile(
    r"(?i)(WHERE\s+\S*(id|user_id|code|key|update_id|sub_token|purchase_id|invoice_id|name|reason|provider)\s*=\s*%|"
    r"=\s*ANY\s*\(%|"
    r"\b(count|sum|min|max|coalesce|exists)\s*\(|FOR UPDATE|pg_|\bLIMIT\b)"
)


def test_worker_and_domain_queries_are_bounded() -> None:
    """Every SELECT in the workers and the database layer has a LIMIT, a key lookup or an aggregate:
    no query returns "all users"."""
    offenders = []
    for path, tree in daemon_modules():
        if not (path.startswith(("vpnd/workers/", "vpnd/db/", "vpnd/nurseries/", "vpnd/payments/"))):
            continue
        for line, sql in _sql_strings(tree):
            if not BOUNDED.search(sql):
                offenders.append(f"{path}:{line}: {sql[:120]}")
    assert offenders == []
