"""Reading vpnd's own source for the audit's structural checks (AST, not regexes)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "vpnd"
#: Fakes and the demo are test peers, not the daemon: structural rules are about the daemon.
EXCLUDED = {"sandbox"}


def daemon_modules() -> Iterator[tuple[str, ast.Module]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent)
        if EXCLUDED & set(relative.parts):
            continue
        yield str(relative), ast.parse(path.read_text(), filename=str(relative))


def calls_named(tree: ast.AST, name: str) -> Iterator[ast.Call]:
    """Calls of `name(...)` or `x.name(...)`."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            if (isinstance(func, ast.Name) and func.id == name) or (
                isinstance(func, ast.Attribute) and func.attr == name
            ):
                yield node


def function(tree: ast.Module, qualname: str) -> ast.FunctionDef | ast.AsyncFunctionDef:
    parts = qualname.split(".")
    body: list[ast.stmt] = tree.body
    found: ast.AST | None = None
    for part in parts:
        found = next(
            n for n in body if isinstance(n, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and n.name == part
        )
        body = found.body  # type: ignore[attr-defined]
    assert isinstance(found, ast.FunctionDef | ast.AsyncFunctionDef)
    return found
