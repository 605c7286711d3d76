"""Audit F — order: limiter → error boundary → handler, each once, no recursion."""

from __future__ import annotations

import ast

from tests.audit.source import daemon_modules, function


def test_error_boundary_sits_inside_the_limiter_around_every_handler_once() -> None:
    tree = dict(daemon_modules())["vpnd/telegram/dispatch.py"]
    handle_one = function(tree, "Dispatcher._handle_one")
    def calls_handler(node: ast.AST) -> bool:
        return any(
            isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "handler"
            for n in ast.walk(node)
        )

    boundaries = [n for n in ast.walk(handle_one) if isinstance(n, ast.Try) and calls_handler(n)]
    assert len(boundaries) == 1, "one error boundary around the handler"
    (boundary,) = boundaries
    caught = [h.type for h in boundary.handlers]
    assert any(isinstance(t, ast.Name) and t.id == "Exception" for t in caught), "the boundary catches Exception"
    assert not any(isinstance(t, ast.Name) and t.id == "BaseException" for t in caught), "never Cancelled"
    handler_calls = [
        n
        for n in ast.walk(boundary)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "handler"
    ]
    assert len(handler_calls) == 1, "the handler is called exactly once, inside the boundary"
    timeouts = [
        n for n in ast.walk(boundary) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "fail_after"
    ]
    assert timeouts, "each handler runs under a timeout"


def test_no_recursion_in_dispatch() -> None:
    """No step of the update path calls itself (the seed's "no middleware recursion"): the async
    functions, which are the path; plain data helpers such as `storable` may walk nested JSON."""
    tree = dict(daemon_modules())["vpnd/telegram/dispatch.py"]
    for node in ast.walk(tree):
        if isinstance(node, ast.AsyncFunctionDef):
            called = {
                n.func.attr if isinstance(n.func, ast.Attribute) else getattr(n.func, "id", "")
                for n in ast.walk(node)
                if isinstance(n, ast.Call)
            }
            assert node.name not in called, f"{node.name} calls itself"
