"""Reading vpnd's own source for the audit's structural checks (AST, not regexes)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import attrs

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


# --- resolving names to their definitions (enough for vpnd's own code; no type inference) ----------


Definition = ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda


@attrs.frozen
class Param:
    """A name that is a parameter of `function`: what it is depends on the callers."""

    function: ast.FunctionDef | ast.AsyncFunctionDef
    name: str

    def __str__(self) -> str:
        return f"{self.name}: a parameter of {self.function.name}"


def module_name(path: str) -> str:
    """ "vpnd/db/pool.py" → "vpnd.db.pool" ("vpnd/db/__init__.py" → "vpnd.db")."""
    name = path.removesuffix(".py").replace("/", ".")
    return name.removesuffix(".__init__")


class SourceIndex:
    """vpnd's daemon modules, parsed once, with parent links and name resolution.

    `resolve(path, node)` follows a name or attribute at `node` to the function it denotes: a local
    or nested def, a lambda or `partial(f, ...)` bound to a name, a module-level def, a `from vpnd.x
    import y`, `module.attr` through an imported vpnd module, or `self.method` in the enclosing class.
    What it cannot follow (a parameter, an outside library) comes back as a string saying why.
    """

    def __init__(self) -> None:
        self.trees: dict[str, ast.Module] = dict(daemon_modules())
        self.by_module = {module_name(path): path for path in self.trees}
        self.parents: dict[int, ast.AST] = {}
        self.path_of: dict[int, str] = {}
        for path, tree in self.trees.items():
            for node in ast.walk(tree):
                self.path_of[id(node)] = path
                for child in ast.iter_child_nodes(node):
                    self.parents[id(child)] = node

    def parent(self, node: ast.AST) -> ast.AST | None:
        return self.parents.get(id(node))

    def enclosing(self, node: ast.AST, kinds: tuple[type, ...]) -> list[ast.AST]:
        """Enclosing nodes of `kinds`, innermost first."""
        found = []
        current = self.parent(node)
        while current is not None:
            if isinstance(current, kinds):
                found.append(current)
            current = self.parent(current)
        return found

    def resolve(self, node: ast.expr) -> Definition | Param | str:
        path = self.path_of[id(node)]
        return self._resolve(path, node, depth=0)

    def resolve_all(self, node: ast.expr, depth: int = 0) -> list[tuple[ast.AST, Definition | str]]:
        """Every definition `node` may denote, with the expression it came from: a parameter is
        followed to the argument each caller passes (callers found by resolving every call in vpnd)."""
        found = self.resolve(node)
        if not isinstance(found, Param):
            return [(node, found)]
        if depth > 5:
            return [(node, f"{found}: callers too deep")]
        results: list[tuple[ast.AST, Definition | str]] = []
        for call in self.callers(found.function):
            argument = _argument(found.function, call, found.name)
            if argument is None:
                results.append((call, f"{found}: not passed at {where(self, call)}"))
            else:
                results.extend(self.resolve_all(argument, depth + 1))
        return results or [(node, f"{found}: no callers")]

    def callers(self, function: ast.FunctionDef | ast.AsyncFunctionDef) -> list[ast.Call]:
        """Calls anywhere in vpnd that resolve to `function`."""
        calls = []
        for tree in self.trees.values():
            for node in ast.walk(tree):
                if not isinstance(node, ast.Call):
                    continue
                func = node.func
                named = (isinstance(func, ast.Name) and func.id == function.name) or (
                    isinstance(func, ast.Attribute) and func.attr == function.name
                )
                if named and self.resolve(func) is function:
                    calls.append(node)
        return calls

    def _resolve(self, path: str, node: ast.expr, depth: int) -> Definition | Param | str:
        if depth > 10:
            return "too deep"
        if isinstance(node, ast.Lambda):
            return node
        if isinstance(node, ast.Call) and _is_partial(node.func) and node.args:
            return self._resolve(path, node.args[0], depth + 1)
        if isinstance(node, ast.Name):
            return self._resolve_name(path, node, node.id, depth)
        if isinstance(node, ast.Attribute):
            base = node.value
            if isinstance(base, ast.Name) and base.id == "self":
                for cls in self.enclosing(node, (ast.ClassDef,)):
                    assert isinstance(cls, ast.ClassDef)
                    for item in cls.body:
                        if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef) and item.name == node.attr:
                            return item
                return f"self.{node.attr}: not a method of the enclosing class"
            if isinstance(base, ast.Name):
                target = self._imported_module(path, base.id)
                if target is not None:
                    return self._lookup(target, node.attr, depth + 1)
            return f"{ast.unparse(node)}: attribute of a value"
        return f"{ast.unparse(node)}: not a name"

    def _resolve_name(self, path: str, at: ast.AST, name: str, depth: int) -> Definition | Param | str:
        for scope in self.enclosing(at, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            assert isinstance(scope, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if name in {a.arg for a in [*scope.args.posonlyargs, *scope.args.args, *scope.args.kwonlyargs]}:
                if isinstance(scope, ast.Lambda):
                    return f"{name}: a parameter of a lambda"
                return Param(scope, name)
            if isinstance(scope, ast.Lambda):
                continue
            found = self._bound_in(path, scope.body, name, depth)
            if found is not None:
                return found
        return self._lookup(path, name, depth)

    def _bound_in(self, path: str, body: list[ast.stmt], name: str, depth: int) -> Definition | Param | str | None:
        """A def, or an assignment of a lambda/partial/name, binding `name` in this block (not nested defs)."""
        todo: list[ast.AST] = list(body)
        while todo:
            stmt = todo.pop()
            if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef):
                if stmt.name == name:
                    return stmt
                continue  # its body is another scope
            if isinstance(stmt, ast.ClassDef | ast.Lambda):
                continue
            if isinstance(stmt, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in stmt.targets):
                return self._resolve(path, stmt.value, depth + 1)
            todo.extend(ast.iter_child_nodes(stmt))
        return None

    def _lookup(self, path: str, name: str, depth: int) -> Definition | Param | str:
        """`name` at module level of `path`: a def, an assignment, or an import from another vpnd module."""
        tree = self.trees[path]
        found = self._bound_in(path, tree.body, name, depth)
        if found is not None:
            return found
        for stmt in tree.body:
            if isinstance(stmt, ast.ImportFrom) and stmt.module:
                for alias in stmt.names:
                    if (alias.asname or alias.name) == name:
                        target = self.by_module.get(stmt.module)
                        if target is not None:
                            return self._lookup(target, alias.name, depth + 1)
                        return f"{name}: from {stmt.module}"
        return f"{name}: not found in {path}"

    def _imported_module(self, path: str, name: str) -> str | None:
        """The vpnd module file that `name` refers to in `path` (import vpnd.x as name, from vpnd import x)."""
        for stmt in self.trees[path].body:
            if isinstance(stmt, ast.Import):
                for alias in stmt.names:
                    if (alias.asname or alias.name) == name and alias.name in self.by_module:
                        return self.by_module[alias.name]
            if isinstance(stmt, ast.ImportFrom) and stmt.module:
                for alias in stmt.names:
                    if (alias.asname or alias.name) == name:
                        return self.by_module.get(f"{stmt.module}.{alias.name}")
        return None

    def calls_in(self, node: ast.AST) -> Iterator[ast.Call]:
        """Calls inside `node`, not descending into nested function definitions."""
        todo = list(ast.iter_child_nodes(node))
        while todo:
            child = todo.pop()
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda | ast.ClassDef):
                continue
            if isinstance(child, ast.Call):
                yield child
            todo.extend(ast.iter_child_nodes(child))


def _argument(function: ast.FunctionDef | ast.AsyncFunctionDef, call: ast.Call, name: str) -> ast.expr | None:
    """The expression `call` passes for parameter `name` of `function` (positional or keyword)."""
    for keyword in call.keywords:
        if keyword.arg == name:
            return keyword.value
    positional = [a.arg for a in [*function.args.posonlyargs, *function.args.args]]
    if positional and positional[0] in ("self", "cls"):
        positional = positional[1:]
    if name in positional:
        index = positional.index(name)
        if index < len(call.args) and not any(isinstance(a, ast.Starred) for a in call.args[: index + 1]):
            return call.args[index]
    return None


def _is_partial(func: ast.expr) -> bool:
    return (isinstance(func, ast.Name) and func.id == "partial") or (
        isinstance(func, ast.Attribute) and func.attr == "partial"
    )


def is_db_run(call: ast.Call) -> bool:
    """`<...>db.run(fn, ...)`: the database API (`app.db.run`, `self.app.db.run`, a local `db`)."""
    func = call.func
    if not (isinstance(func, ast.Attribute) and func.attr == "run"):
        return False
    owner = func.value
    return (isinstance(owner, ast.Name) and owner.id == "db") or (
        isinstance(owner, ast.Attribute) and owner.attr == "db"
    )


def where(index: SourceIndex, node: ast.AST) -> str:
    return f"{index.path_of[id(node)]}:{getattr(node, 'lineno', '?')}"
