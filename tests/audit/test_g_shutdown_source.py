"""Audit G (source half) — no except clause swallows cancellation; no task without a nursery.

The behaviour half (SIGTERM → every task finished, none restarted, exit 0 within the grace; the broadcast
stopped and resumed once) runs the daemon: tests/audit/test_g_shutdown.py.
"""

from __future__ import annotations

import ast

from tests.audit.source import daemon_modules


def _reraises(handler: ast.ExceptHandler) -> bool:
    return any(isinstance(n, ast.Raise) for n in ast.walk(handler))


def _names(node: ast.expr | None) -> set[str]:
    if node is None:
        return {"<bare>"}
    items = node.elts if isinstance(node, ast.Tuple) else [node]
    return {ast.unparse(item) for item in items}


def test_no_except_swallows_cancelled_or_base_exception() -> None:
    offenders = []
    for path, tree in daemon_modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.ExceptHandler):
                names = _names(node.type)
                dangerous = names & {"<bare>", "BaseException", "trio.Cancelled", "Cancelled", "BaseExceptionGroup"}
                if dangerous and not _reraises(node):
                    offenders.append(f"{path}:{node.lineno} except {', '.join(sorted(dangerous))}")
    assert offenders == []


def test_no_task_without_a_nursery() -> None:
    """No asyncio tasks, no spawn-and-forget: tasks start only via nursery.start/start_soon."""
    offenders = []
    for path, tree in daemon_modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in {"create_task", "ensure_future", "spawn_system_task"}:
                offenders.append(f"{path}:{node.lineno} {node.attr}")
            if isinstance(node, ast.Name) and node.id == "asyncio":
                offenders.append(f"{path}:{node.lineno} asyncio")
    assert offenders == []
