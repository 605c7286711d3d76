"""Audit C — locks: one writer of Xray's file, no lock held across a database call, no database
connection held while the Xray writer waits on Xray.

The seed kept a `_config_file_lock` around its file writes and checked by reading that nothing else
happened under it. vpnd has no file lock at all — the file has exactly one writer task — so the
checks become: (1) only the Xray nursery's module writes the file, through `write_atomically`;
(2) no `async with <trio lock>` block reaches `db.run` (with one documented, deadlock-free exception);
(3) with a pool of ONE connection, the database stays usable while the writer is stuck in a slow
gRPC call to Xray, and the writer's thread work (stat, render, write) never touches the database.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from pathlib import Path

import trio

from tests.audit.source import SourceIndex, daemon_modules, is_db_run, where
from tests.audit.stack import file_emails, full_config, live_emails, poll
from tests.harness import open_app
from vpnd.db.subscriptions import grant_days
from vpnd.db.users import upsert_user
from vpnd.nurseries.xray import run_xray
from vpnd_sandbox.telegram_fake import FakeTelegram
from vpnd_sandbox.xray_fake import FakeXray

XRAY_NURSERY = "vpnd/nurseries/xray.py"
RENDER = "vpnd/xray/render.py"

# --- one writer of the Xray file -----------------------------------------------------------------

#: Calls that create, replace or write files: by name alone; on `os`/`shutil`; as `Path` methods.
ALWAYS_WRITES = {"write_text", "write_bytes", "mkstemp", "NamedTemporaryFile", "TemporaryFile",
                 "SpooledTemporaryFile", "fchmod", "fchown", "copyfile", "copy2", "touch"}  # fmt: skip
OS_WRITES = {"replace", "rename", "renames", "unlink", "remove", "chmod", "truncate", "copy", "move", "link",
             "symlink", "write"}  # fmt: skip
PATH_WRITES = {"replace": 1, "rename": 1, "unlink": 0}  # method → positional arguments (str.replace takes 2)
#: Where vpnd writes files at all, and why that cannot be Xray's config file.
KNOWN_FILE_WRITERS = {
    RENDER: "write_atomically and its temp files: the Xray config (called only by the Xray nursery)",
    "vpnd/telegram/admin/export.py": "tempfile.TemporaryFile for a CSV export (anonymous, unlinked at creation)",
    "vpnd/services/backup.py": "backups: vpnd-<time>.dump(.partial) files in [backup].directory, never a config",
    "vpnd/services/broadcast_report.py": "`vpnd broadcast report --csv FILE`: a new file the operator names (mode x)",
}


def _writes_files(call: ast.Call) -> bool:
    func = call.func
    name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
    base = ast.unparse(func.value) if isinstance(func, ast.Attribute) else ""
    if name in ALWAYS_WRITES or _opens_for_writing(call):
        return True
    if base in ("os", "shutil") and name in OS_WRITES:
        return True
    return name in PATH_WRITES and len(call.args) == PATH_WRITES[name] and base not in ("os", "shutil")


def _opens_for_writing(call: ast.Call) -> bool:
    """`open(..., "w"/"a"/"x"/"+")` or `os.open(..., O_WRONLY/O_RDWR/O_CREAT)`."""
    func = call.func
    name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
    if name != "open":
        return False
    texts = [ast.unparse(a) for a in [*call.args[1:], *(k.value for k in call.keywords if k.arg in ("mode", "flags"))]]
    return any(any(flag in t for flag in ("'w", "'a", "'x", "+", "O_WRONLY", "O_RDWR", "O_CREAT")) for t in texts)


def test_the_xray_config_file_has_one_writer() -> None:
    """Only vpnd/xray/render.py writes files that could be the Xray config, and only the Xray nursery
    calls it; only the Xray nursery reads `[xray].config_path` for writing."""
    writers: dict[str, list[str]] = {}
    atomic_callers: set[str] = set()
    config_path_users: set[str] = set()
    for path, tree in daemon_modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                func = node.func
                name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
                if _writes_files(node):
                    writers.setdefault(path, []).append(f"{path}:{node.lineno} {ast.unparse(func)}")
                if name == "write_atomically":
                    atomic_callers.add(path)
            if isinstance(node, ast.Attribute) and node.attr == "config_path":
                config_path_users.add(path)
    assert set(writers) <= set(KNOWN_FILE_WRITERS), {p: w for p, w in writers.items() if p not in KNOWN_FILE_WRITERS}
    assert atomic_callers == {XRAY_NURSERY}, atomic_callers
    # Readers of the path: the writer, the health check's free-space probe (os.statvfs of its directory),
    # and the config module that hands `[xray]`'s path to the local node (`XrayConfig.as_node`).
    assert config_path_users <= {XRAY_NURSERY, "vpnd/workers/health.py", "vpnd/config.py"}, config_path_users


# --- no lock held across a database call ----------------------------------------------------------

LOCK_FACTORIES = {"Lock", "StrictFIFOLock", "Semaphore", "Condition"}

#: Locks that are held across a database call, and why no lock↔connection cycle can form. The check
#: below proves the "why" structurally: no other holder of the lock calls the database.
ALLOWED_ACROSS_DB = {
    "_drain_lock": "the outbox marks a drain in progress with it; its only other holder is the shutdown "
    "task, which takes no connection — and a transaction function (sync, in a thread) can never wait on it",
}


def _lock_names(index: SourceIndex) -> set[str]:
    """Attribute/variable names bound to a Trio lock: `x = trio.Lock()`, `attrs.field(factory=trio.Lock)`."""
    names = set()
    for tree in index.trees.values():
        for node in ast.walk(tree):
            target_names: list[str] = []
            value: ast.expr | None = None
            if isinstance(node, ast.Assign):
                target_names = [ast.unparse(t).split(".")[-1] for t in node.targets]
                value = node.value
            elif isinstance(node, ast.AnnAssign) and node.value is not None:
                target_names = [ast.unparse(node.target).split(".")[-1]]
                value = node.value
            if value is None:
                continue
            text = ast.unparse(value)
            if any(f"trio.{factory}" in text for factory in LOCK_FACTORIES):
                names.update(target_names)
    return names


def _db_calls_reachable(index: SourceIndex, block: ast.AST, seen: set[int] | None = None) -> list[ast.Call]:
    """`db.run` calls in `block` and in the vpnd functions it calls (transitively, by resolution)."""
    seen = seen if seen is not None else set()
    found = []
    for call in index.calls_in(block):
        if is_db_run(call):
            found.append(call)
            continue
        callees = [call.func]
        if isinstance(call.func, ast.Attribute) and call.func.attr in ("start_soon", "start") and call.args:
            callees.append(call.args[0])  # a task started from inside the block runs under it too
        for callee in callees:
            target = index.resolve(callee)
            if isinstance(target, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) and id(target) not in seen:
                seen.add(id(target))
                found.extend(_db_calls_reachable(index, target, seen))
    return found


def _lock_blocks(index: SourceIndex, names: set[str]) -> list[tuple[str, ast.AsyncWith | ast.With]]:
    blocks = []
    for tree in index.trees.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.AsyncWith | ast.With):
                for item in node.items:
                    held = ast.unparse(item.context_expr).split(".")[-1]
                    if held in names:
                        blocks.append((held, node))
    return blocks


def test_no_lock_is_held_across_a_database_call() -> None:
    index = SourceIndex()
    names = _lock_names(index)
    assert {"_drain_lock"} <= names, names  # the scan sees the locks vpnd has
    blocks = _lock_blocks(index, names)
    across = {}
    for held, block in blocks:
        calls = _db_calls_reachable(index, block)
        if calls:
            across.setdefault(held, []).append(f"{where(index, block)} → " + ", ".join(where(index, c) for c in calls))
    unexplained = {held: sites for held, sites in across.items() if held not in ALLOWED_ACROSS_DB}
    assert unexplained == {}
    # The exception is deadlock-free: every other holder of that lock takes no connection.
    for held in ALLOWED_ACROSS_DB:
        holders = [block for name, block in blocks if name == held]
        with_db = [block for block in holders if _db_calls_reachable(index, block)]
        assert len(with_db) == 1 and len(holders) >= 2, [where(index, b) for b in holders]
    assert set(ALLOWED_ACROSS_DB) <= set(across), "an allowed exception no longer exists: drop it from the list"


def test_the_outbound_limiter_changes_its_state_without_awaiting() -> None:
    """The Telegram rate limiter needs no lock because it never awaits between checking and taking a
    slot: its one await is the sleep in `acquire`'s loop, after which it checks again."""
    tree = ast.parse((Path(__file__).parents[2] / "vpnd/telegram/ratelimit.py").read_text())
    awaits = [n for n in ast.walk(tree) if isinstance(n, ast.Await)]
    assert len(awaits) == 1 and ast.unparse(awaits[0]) == "await trio.sleep(wait)", [ast.unparse(a) for a in awaits]


# --- the Xray writer holds no connection while it waits on Xray -------------------------------------


def test_the_writers_thread_work_never_touches_the_database() -> None:
    """What the writer runs in threads (stat, template load, render, the atomic write) reaches no database
    call and takes no connection; its transaction functions touch no file and no Xray."""
    index = SourceIndex()
    tree = index.trees[XRAY_NURSERY]
    thread_functions = []
    for call in ast.walk(tree):
        if isinstance(call, ast.Call) and ast.unparse(call.func).endswith("to_thread.run_sync") and call.args:
            target = index.resolve(call.args[0])
            assert not isinstance(target, str), f"{where(index, call)}: {target}"
            thread_functions.append(target)
    assert len(thread_functions) >= 4
    for function in thread_functions:
        text = ast.unparse(function)
        assert "db" not in {n.id for n in ast.walk(function) if isinstance(n, ast.Name)}, text
        assert not _db_calls_reachable(index, function)
        assert "psycopg" not in text and ".connection(" not in text
    for call in ast.walk(tree):
        if isinstance(call, ast.Call) and is_db_run(call):
            target = index.resolve(call.args[0])
            assert isinstance(target, ast.FunctionDef), where(index, call)
            body = ast.unparse(target)
            assert not any(word in body for word in ("open(", "write_atomically", "api.", "XrayApi")), target.name


async def test_database_stays_usable_while_the_writer_waits_on_a_slow_xray(
    fake_xray: FakeXray,
    fake_telegram: tuple[FakeTelegram, str],
    db_dsn: str,
    write_config: Callable[..., Path],
    tmp_path: Path,
) -> None:
    """Pool of ONE connection; Xray holds every call. While the writer is inside AddUser, the test's own
    `db.run` gets the connection: the writer holds no connection across a gRPC call. The file and the
    live set then converge."""
    config = full_config(
        write_config, db_dsn, tmp_path, fake_telegram, xray=fake_xray, database={"pool_min": 1, "pool_max": 1}
    )
    async with open_app(config, single_instance=False) as app, trio.open_nursery() as nursery:
        with trio.fail_after(90):
            await nursery.start(run_xray, app)
            fake_xray.set_delay(60.0, ["AlterInbound"])  # Xray holds AddUser until the test lowers the delay
            calls_before = len(fake_xray.calls())

            def grant(conn: object) -> None:
                upsert_user(conn, 4242, None, "Slow", "en")  # type: ignore[arg-type]
                grant_days(conn, 4242, 30, kind="paid")  # type: ignore[arg-type]

            await app.db.run(grant)
            app.xray_changed.nudge()
            await poll(lambda: "AlterInbound" in fake_xray.calls()[calls_before:], 30, 0.01, "the writer calls Xray")
            # The writer is inside the call and stays there until the delay is lowered below, so each of
            # these gets the pool's only connection while it waits (were the writer holding it, they would
            # wait for the call, and fail after 10 s).
            for _ in range(5):
                with trio.fail_after(10):
                    assert await app.db.run(lambda conn: conn.execute("SELECT 1").fetchone()[0]) == 1
            assert not live_emails(fake_xray)  # the AddUser is still being held
            fake_xray.set_delay(0)
            await poll(lambda: live_emails(fake_xray) == {"u4242"}, 30, what="the user is live")
            await poll(lambda: file_emails(config) == {"u4242"}, 30, what="the file lists the user")
            app.lifecycle.request_stop("test")
