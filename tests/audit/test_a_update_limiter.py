"""Audit A — the update concurrency limit: one limiter, owned by the handler nursery, wrapping only handlers.

The seed bot registered a semaphore middleware on `dp.update` and checked by reading that it did not
wrap background tasks. Here the structure is checked from the source, and the behaviour by running
the daemon with every update slot blocked (tests/telegram/test_polling.py::test_blocked_handlers_...
and tests/audit/test_b_database.py, whose scenario runs workers while handlers run).
"""

from __future__ import annotations

import ast

from tests.audit.source import calls_named, daemon_modules, function

UPDATE_LIMITER_MODULE = "vpnd/telegram/dispatch.py"
#: The database bridge has its own limiter: worker threads = pool size (not an update semaphore).
THREAD_LIMITER_MODULE = "vpnd/db/pool.py"


#: Every CapacityLimiter in the daemon and what it limits. A new one must be added here, on purpose.
KNOWN_LIMITERS = {
    UPDATE_LIMITER_MODULE: "updates being handled ([telegram].max_concurrent_updates)",
    THREAD_LIMITER_MODULE: "database worker threads (= pool size)",
    "vpnd/nurseries/outbox.py": "outbox sends in flight",
}


def test_capacity_limiters_are_created_in_known_places_only() -> None:
    creators = {path for path, tree in daemon_modules() for _ in calls_named(tree, "CapacityLimiter")}
    assert creators <= set(KNOWN_LIMITERS), creators - set(KNOWN_LIMITERS)
    assert UPDATE_LIMITER_MODULE in creators


def test_the_update_limiter_is_acquired_only_in_the_dispatcher() -> None:
    """`async with ....limiter` on an update path happens in dispatch.py only, and the update limit's
    setting reaches no other module: background work cannot wait on it."""
    acquirers = {path for path, tree in daemon_modules() if _limiter_blocks(tree)}
    assert acquirers <= {UPDATE_LIMITER_MODULE, THREAD_LIMITER_MODULE}, acquirers
    max_updates = {
        path
        for path, tree in daemon_modules()
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute | ast.Name | ast.keyword)
        and getattr(node, "attr", getattr(node, "id", getattr(node, "arg", None))) == "max_concurrent_updates"
    }
    assert max_updates <= {UPDATE_LIMITER_MODULE, "vpnd/nurseries/telegram.py", "vpnd/config.py"}, max_updates


def _limiter_blocks(tree: ast.Module) -> list[ast.AsyncWith]:
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.AsyncWith)
        and any(
            isinstance(item.context_expr, ast.Attribute) and item.context_expr.attr == "limiter" for item in node.items
        )
    ]


def test_one_acquire_and_only_the_handler_inside_it() -> None:
    tree = dict(daemon_modules())[UPDATE_LIMITER_MODULE]
    blocks = _limiter_blocks(tree)
    assert len(blocks) == 1, "exactly one place acquires the update limiter"
    (block,) = blocks
    awaited = [n for n in ast.walk(block) if isinstance(n, ast.Await)]
    assert len(awaited) == 1, "inside the limiter: one await, the handler under its error boundary"
    call = awaited[0].value
    assert isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr == "_handle_one"
    # No nested acquire: the handler path does not reach the limiter again.
    handle_one = function(tree, "Dispatcher._handle_one")
    assert not _limiter_blocks(ast.Module(body=[handle_one], type_ignores=[]))
