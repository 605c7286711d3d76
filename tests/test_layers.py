"""Layers that point one way (issue 15): every module of vpnd/ has a place, and imports only downwards.

    domain ← db ← runtime ← services ← interfaces ← root

* **domain** — values and pure functions: plans and prices, money formatting, texts, share links,
  keyboards, the configuration's value classes. No I/O beyond reading a packaged file once at start.
* **db** — every SQL statement, one module per domain and verb (`vpnd/db/`). It imports only domain
  values and itself, and not `vpnd.config` either: what a query needs from the configuration is passed
  in as a value by its caller.
* **runtime** — what services run on: the `App` bundle of shared resources (pool, health, metrics,
  nudges), clients of outside peers (Telegram, Crypto Pay, Xray's API), logging, the periodic loop.
* **services** — rules plus `db.run` calls: payments, admin actions, workers, alerts.
* **interfaces** — thin edges that parse, call a service and render: the Telegram flows and admin
  menu, the admin CLI, HTTP routes.
* **root** — compose and own the tasks: the nurseries, the entry point, reload.

A module may import modules of its own layer and of the layers below it. Imports under
`if TYPE_CHECKING:` count too: a type from a higher layer is knowledge of that layer all the same
(and the cure is the same: move the value down). Imports inside functions count as well.

Besides the arrows: nothing in vpnd/ imports the sandbox (`vpnd_sandbox`, a test peer), and no module
outside vpnd/db/ runs SQL (no `.execute`/`.executemany`/`.cursor`/`.copy` calls, no string that is an
SQL statement — the db layer's functions take the connection and do it).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vpnd"

LAYERS = ("domain", "db", "runtime", "services", "interfaces", "root")

#: Module (or package: it covers everything below it) → layer. The most specific entry wins.
#: A module that no entry covers fails the test: place a new module here when you add it.
MAP: dict[str, str] = {
    # domain: values and pure functions
    "vpnd": "domain",  # the package's __init__ (version)
    "vpnd.errors": "domain",
    "vpnd.config": "domain",  # attrs values read once at start (and their parser)
    "vpnd.config_checks": "domain",  # gaps in the config values (pure)
    "vpnd.connect_apps": "domain",  # the client apps catalog (a packaged data file, read with the config)
    "vpnd.masking": "domain",
    "vpnd.pricing": "domain",
    "vpnd.roles": "domain",  # admin roles and the action → least role table (pure)
    "vpnd.quota": "domain",
    "vpnd.devices": "domain",  # device ids from client apps' headers, bounded (pure)
    "vpnd.account_page": "domain",  # the subscription URL's page for browsers: browser or app, the HTML (pure)
    "vpnd.money": "domain",
    "vpnd.support_text": "domain",  # the support contact as a link, HTML fitted to Telegram's limit (pure)
    "vpnd.texts": "domain",
    "vpnd.qr": "domain",  # QR code PNGs (pure)
    "vpnd.key_message": "domain",  # the key message's caption and buttons (pure)
    "vpnd.locales": "domain",
    "vpnd.xray": "domain",
    "vpnd.xray.links": "domain",
    "vpnd.xray.protowire": "domain",
    "vpnd.xray.render": "domain",  # the config file from a template (sync, file writes only)
    "vpnd.telegram": "interfaces",
    "vpnd.telegram.keyboards": "domain",  # keyboards and callback data are plain values (the outbox stores them)
    # db: all SQL
    "vpnd.db": "db",
    # runtime: what the services run on
    "vpnd.app": "runtime",  # `App`, the resources the root builds and hands down
    "vpnd.health": "runtime",
    "vpnd.metrics": "runtime",
    "vpnd.lifecycle": "runtime",
    "vpnd.nudge": "runtime",
    "vpnd.logs": "runtime",
    "vpnd.periodic": "runtime",
    "vpnd.sdnotify": "runtime",
    "vpnd.instance_lock": "runtime",
    "vpnd.cryptopay": "runtime",  # the Crypto Pay client
    "vpnd.yookassa": "runtime",  # the YooKassa client
    "vpnd.xray.api": "runtime",  # the Xray gRPC client
    "vpnd.telegram.client": "runtime",  # the Bot API client and sender
    "vpnd.telegram.wire": "runtime",
    "vpnd.telegram.ratelimit": "runtime",
    "vpnd.web": "runtime",  # the small ASGI layer HTTP routes are written on
    # services: rules + db.run calls
    "vpnd.payments": "services",
    "vpnd.services": "services",
    "vpnd.services.admin_actions": "services",  # admin actions with their audit rows, for the bot and the CLI
    "vpnd.services.devices": "services",  # the device check of a subscription fetch, device admin actions
    "vpnd.workers": "services",
    "vpnd.alerts": "services",
    # interfaces: parse, call, render
    "vpnd.payments.webhook": "interfaces",  # the Crypto Pay webhook route
    "vpnd.payments.checkout_webhook": "interfaces",  # the YooKassa notification route
    "vpnd.subscription_url": "interfaces",  # the /sub/<token> route
    "vpnd.connect_page": "interfaces",  # the /connect/<token>/<app> import pages
    "vpnd.admin_cli": "interfaces",
    "vpnd.telegram.admin": "interfaces",  # the admin menu: verbs, callback data, views, one module per concern
    # root: compose and own tasks
    "vpnd.compose": "root",  # the composition root: builds the app, runs the chosen services
    "vpnd.nurseries": "root",
    "vpnd.reload": "root",
    "vpnd.cli": "root",  # the process entry point: runs the root (`serve`) or an interface (admin commands)
    "vpnd.__main__": "root",
}

#: Known wrong arrows, (importing module, imported module) → why it is still here. Shrinks to empty.
ALLOWED: dict[tuple[str, str], str] = {
    ("vpnd.cli", "vpnd_sandbox.demo"): "`vpnd sandbox` imports the demo lazily; it belongs to the sandbox's own entry",
}

#: Modules outside vpnd/db/ still running SQL themselves. Shrinks to empty.
SQL_ALLOWED: dict[str, str] = {}

#: Calls that run SQL on a psycopg connection or cursor.
SQL_CALLS = frozenset({"execute", "executemany", "cursor", "copy"})

#: A string that is an SQL statement (vpnd writes SQL keywords in capitals).
SQL_TEXT = re.compile(
    r"\s*\(?\s*(SELECT\s|INSERT\s+INTO\s|UPDATE\s+\w+\s.*\bSET\s|DELETE\s+FROM\s|WITH\s+\w+\s+AS\s)", re.S
)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str | None:
    """The layer of the most specific MAP entry covering `module` ("vpnd" itself covers only __init__)."""
    if module in MAP:
        return MAP[module]
    name = module.rpartition(".")[0]
    while name and name != "vpnd":
        if name in MAP:
            return MAP[name]
        name = name.rpartition(".")[0]
    return None


@attrs.frozen
class Import:
    importer: str
    imported: str
    line: int


def imports_of(module: str, tree: ast.Module, *, is_package: bool) -> Iterator[Import]:
    """Every vpnd/vpnd_sandbox module `tree` imports, wherever the import statement is (TYPE_CHECKING too)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(module, alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                # `from vpnd import alerts` imports the module vpnd.alerts; `from vpnd.x import y` imports x.
                candidate = f"{source}.{alias.name}"
                yield Import(module, candidate if _is_module(candidate) else source, node.lineno)


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def wrong_arrows(
    module: str, source: str, *, is_package: bool = False, allowed: dict[tuple[str, str], str] = ALLOWED
) -> list[str]:
    """What is wrong with the imports of one module's source (empty: nothing)."""
    tree = ast.parse(source)
    found: list[str] = []
    own = layer_of(module)
    if own is None:
        return [f"{module} is in no layer: place it in tests/test_layers.py MAP"]
    for imp in imports_of(module, tree, is_package=is_package):
        top = imp.imported.split(".")[0]
        if top == "vpnd_sandbox" and (module, imp.imported) not in allowed:
            found.append(f"{module}:{imp.line} imports the sandbox ({imp.imported}), a test peer")
            continue
        if top != "vpnd":  # outside libraries, and an allowed sandbox import
            continue
        target = layer_of(imp.imported)
        if target is None:
            found.append(f"{module}:{imp.line} imports {imp.imported}, which is in no layer")
        elif LAYERS.index(target) > LAYERS.index(own) and (module, imp.imported) not in allowed:
            found.append(f"{module} ({own}):{imp.line} imports {imp.imported} ({target})")
        elif (
            own == "db"
            and (imp.imported == "vpnd.config" or imp.imported.startswith("vpnd.config."))
            and (module, imp.imported) not in allowed
        ):
            found.append(f"{module}:{imp.line} imports vpnd.config: pass what the query needs as values")
    return found


def sql_calls(module: str, source: str, allowed: dict[str, str] = SQL_ALLOWED) -> list[str]:
    """Where a module outside vpnd/db/ runs SQL itself (the allowed ones aside)."""
    if module == "vpnd.db" or module.startswith("vpnd.db.") or module in allowed:
        return []
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in SQL_CALLS:
            found.append(f"{module}:{node.lineno} calls .{node.func.attr}(): SQL belongs in vpnd/db/")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and SQL_TEXT.match(node.value):
            found.append(f"{module}:{node.lineno} holds SQL text: SQL belongs in vpnd/db/")
    return found


def vpnd_sources() -> Iterator[tuple[str, str, bool]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        yield module_name(path), path.read_text(), path.name == "__init__.py"


def test_every_module_is_placed_and_imports_only_downwards() -> None:
    problems = [
        p for module, source, package in vpnd_sources() for p in wrong_arrows(module, source, is_package=package)
    ]
    assert problems == []


def test_no_sql_outside_db() -> None:
    problems = [p for module, source, _ in vpnd_sources() for p in sql_calls(module, source)]
    assert problems == []


def test_allow_lists_hold_only_what_is_still_true() -> None:
    """An entry whose import or SQL is gone must go too, so the lists only shrink."""
    imports = {
        (imp.importer, imp.imported)
        for module, source, package in vpnd_sources()
        for imp in imports_of(module, ast.parse(source), is_package=package)
    }
    assert [pair for pair in ALLOWED if pair not in imports] == []
    modules = {module: source for module, source, _ in vpnd_sources()}
    stale = [m for m in SQL_ALLOWED if m not in modules or not sql_calls(m, modules[m], allowed={})]
    assert stale == []


# --- the checks catch what they should (synthetic sources; nothing planted in vpnd/) ---------------


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        (
            "vpnd.db.payments",
            "from vpnd.telegram.texts import Texts\n",
            "vpnd.db.payments (db):1 imports vpnd.telegram.texts",
        ),
        ("vpnd.db.payments", "from vpnd.config import Config\n", "imports vpnd.config: pass what"),
        ("vpnd.pricing", "import vpnd.db.purchases\n", "vpnd.pricing (domain):1 imports vpnd.db.purchases (db)"),
        (
            "vpnd.workers.trials",
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from vpnd.telegram.texts import Texts\n",
            "vpnd.workers.trials (services):3 imports vpnd.telegram.texts (interfaces)",
        ),
        (
            "vpnd.payments.service",
            "def f():\n    from vpnd.nurseries import root\n",
            "(services):2 imports vpnd.nurseries.root (root)",
        ),
        ("vpnd.telegram.flows.menu", "from ..router import Router\n", None),
        ("vpnd.db.users", "from . import rows\nfrom vpnd.pricing import Plan\n", None),
        ("vpnd.cli", "from vpnd_sandbox.demo import main\n", "imports the sandbox (vpnd_sandbox.demo)"),
        ("vpnd.brand_new", "import trio\n", "vpnd.brand_new is in no layer"),
    ],
)
def test_a_wrong_import_is_caught(module: str, source: str, expected: str | None) -> None:
    problems = wrong_arrows(module, source, allowed={})
    if expected is None:
        assert problems == []
    else:
        assert len(problems) == 1 and expected in problems[0], problems


def test_sql_outside_db_is_caught() -> None:
    source = "def f(conn):\n    conn.execute('SELECT 1')\n    with conn.cursor() as cur:\n        pass\n"
    assert len(sql_calls("vpnd.telegram.router", source, allowed={})) == 3  # two calls, one SQL text
    statements = ["UPDATE users AS u SET x = 1", "INSERT INTO t VALUES (1)", "DELETE FROM t", "WITH a AS (SELECT 1)"]
    for statement in statements:
        assert len(sql_calls("vpnd.workers.trials", f"Q = {statement!r}\n", allowed={})) == 1, statement
    prose = "Q = 'With Xray enabled, every value is checked'\nR = 'Select a plan'\n"
    assert sql_calls("vpnd.workers.trials", prose, allowed={}) == []
    assert sql_calls("vpnd.db.users", source, allowed={}) == []


#: Where the texts may be loaded: once per app, and once per admin CLI process (it has no App).
TEXTS_LOADED_IN = frozenset({"vpnd.app", "vpnd.admin_cli"})


def texts_loads(module: str, source: str) -> list[str]:
    """References to `Texts.load` (a call, or a factory handed to attrs) outside TEXTS_LOADED_IN."""
    if module in TEXTS_LOADED_IN:
        return []
    return [
        f"{module}:{node.lineno} loads the texts: take them from the caller (App.texts)"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Attribute)
        and node.attr == "load"
        and isinstance(node.value, ast.Name)
        and node.value.id == "Texts"
    ]


def test_texts_are_loaded_once_and_handed_down() -> None:
    """No module global of texts, no re-parse of the locale JSON per call (`PaymentRules` did both)."""
    assert [p for module, source, _ in vpnd_sources() for p in texts_loads(module, source)] == []
    planted = "_TEXTS = Texts.load()\n@attrs.frozen\nclass R:\n    texts: Texts = attrs.field(factory=Texts.load)\n"
    assert len(texts_loads("vpnd.payments.service", planted)) == 2
