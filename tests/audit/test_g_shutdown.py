"""Audit G (behaviour half) — SIGTERM: every task of the tree finishes, none restarts itself, exit 0
within the grace period, and the broadcast the seed left untracked is stopped and resumed.

The seed awaited its tracked `background_tasks` and conceded that a fire-and-forget broadcast task was
"never cancelled during shutdown". In vpnd every task has a parent, so:

* in process: a real SIGTERM (sent to this process while `run_daemon`'s signal receiver holds it) with
  handlers, the outbox, the Xray writer, the workers and a broadcast all busy; a Trio `Instrument` sees
  every task spawned under `run_daemon` and every exit. After it returns (the CLI then exits 0) every one
  of them has exited, no long-running service was started again after the stop, and no broadcast message
  left after the return. Started again, the broadcast resumes and each recipient has it exactly once;
* as a subprocess: SIGTERM while handlers are stuck on Telegram past the grace period → exit status 0
  within the grace period (plus start-up slack), STOPPING=1 sent, and the stuck updates handled after
  the restart — not lost, not doubled.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import attrs
import psycopg
import pytest
import trio

from tests.audit.stack import full_config, instance_lock_released, poll
from tests.harness import scalar, sql, start_daemon, wait_ready
from vpnd.app import App
from vpnd.db import broadcasts as bdb
from vpnd.nurseries.root import run_daemon
from vpnd.sdnotify import Notifier
from vpnd_sandbox.postgres import free_port
from vpnd_sandbox.telegram_fake import FakeTelegram
from vpnd_sandbox.xray_fake import FakeXray

#: A task alive at least this long before the stop is a "service" (a loop, a server, a broadcast), as
#: opposed to per-call helpers (a database call's cancel watcher, one HTTP request).
SERVICE_AGE = 1.0
#: A periodic loop's per-round waiter (one per wait, as long as the period): a helper of the loop, which is
#: the service; a worker that goes on with its rounds during the grace period spawns new ones.
PER_ROUND = "vpnd.periodic._wait_until.<locals>.first"


@attrs.define(eq=False)
class TaskTree(trio.abc.Instrument):
    """Every task spawned under the task named `root_name`, when it was spawned and whether it exited."""

    root_name: str
    root: trio.lowlevel.Task | None = None
    spawned: dict[trio.lowlevel.Task, float] = attrs.field(factory=dict)
    exited: set[trio.lowlevel.Task] = attrs.field(factory=set)
    stop_at: float | None = None
    #: (name, spawned at) of tasks under the root spawned after `stop_at`.
    after_stop: list[str] = attrs.field(factory=list)

    def _ours(self, task: trio.lowlevel.Task) -> bool:
        current: trio.lowlevel.Task | None = task
        while current is not None:
            if current is self.root:
                return True
            nursery = current.parent_nursery
            current = nursery.parent_task if nursery is not None else None
        return False

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        if self.root is None and task.name.endswith(self.root_name):
            self.root = task
        if self._ours(task):
            self.spawned[task] = time.monotonic()
            if self.stop_at is not None:
                self.after_stop.append(task.name)

    def task_exited(self, task: trio.lowlevel.Task) -> None:
        if task in self.spawned:
            self.exited.add(task)

    def mark_stop(self) -> list[str]:
        """The moment of the stop; returns the names of the services running then."""
        self.stop_at = time.monotonic()
        return sorted(
            {
                t.name
                for t, at in self.spawned.items()
                if t not in self.exited and self.stop_at - at >= SERVICE_AGE and not t.name.endswith(PER_ROUND)
            }
        )

    def still_running(self) -> list[str]:
        return sorted(t.name for t in self.spawned if t not in self.exited)


async def run_under_instrument(
    nursery: trio.Nursery, config: object
) -> tuple[App, TaskTree, trio.Event]:  # fmt: skip
    """`run_daemon` in its own task, watched by a TaskTree; (app, tree, event set when it returned)."""
    tree = TaskTree("run_daemon")
    trio.lowlevel.add_instrument(tree)
    returned = trio.Event()

    async def daemon(task_status: trio.TaskStatus[App] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await run_daemon(config, notifier=Notifier(None), task_status=task_status)  # type: ignore[arg-type]
        finally:
            returned.set()

    app: App = await nursery.start(daemon, name="run_daemon")
    return app, tree, returned


RECIPIENTS = 600
RATE = 100.0
NEWS = "Shutdown audit news"


def delivered(fake: FakeTelegram, users: list[int]) -> dict[int, int]:
    return {uid: sum(1 for m in fake.bot_messages(uid) if m.text == NEWS) for uid in users}


@pytest.mark.slow
async def test_sigterm_every_task_of_the_tree_finishes_none_restarts_and_the_broadcast_resumes_once(
    nursery: trio.Nursery,
    fake_telegram: tuple[FakeTelegram, str],
    fake_xray: FakeXray,
    db_dsn: str,
    write_config: Callable[..., Path],
    tmp_path: Path,
) -> None:
    fake, _ = fake_telegram
    fake.global_rate = fake.global_burst = RATE * 1.5
    config = full_config(
        write_config, db_dsn, tmp_path, fake_telegram, xray=fake_xray,
        telegram={"rate_per_second": RATE}, shutdown={"grace_seconds": 3.0},
    )  # fmt: skip
    users = list(range(100_000, 100_000 + RECIPIENTS))
    sql(db_dsn, "INSERT INTO users (id, first_name, referral_code) SELECT g, 'U' || g, 'r' || g "
                "FROM unnest(%s::bigint[]) g", users)  # fmt: skip
    for uid in users:
        fake.add_user(uid, f"U{uid}").started = True
    talkers = list(range(9001, 9011))
    for uid in talkers:
        fake.add_user(uid, f"T{uid}")
    with psycopg.connect(db_dsn) as conn:
        broadcast_id = bdb.create_broadcast(conn, created_by=1, text=NEWS, segment=bdb.Segment.parse("all")).id

    with trio.fail_after(90):
        app, tree, returned = await run_under_instrument(nursery, config)
        # Busy everywhere: the broadcast is sending, users talk, the Xray writer has a grant to apply.
        await trio.sleep(SERVICE_AGE + 0.5)
        await poll(lambda: sum(delivered(fake, users).values()) >= RECIPIENTS * 0.1, 30, what="broadcast under way")
        for uid in talkers:
            fake.user_sends(uid, "/start")
        sql(db_dsn, "INSERT INTO subscriptions (user_id, kind, status, uuid, sub_token, plan_code, expires_at) "
                    "VALUES (%s, 'paid', 'active', gen_random_uuid(), 'tok-g', 'm1', now() + interval '9 days')",
            users[0])  # fmt: skip
        app.xray_changed.nudge()
        services = tree.mark_stop()
        os.kill(os.getpid(), signal.SIGTERM)  # run_daemon's signal receiver takes it
        with trio.fail_after(config.shutdown.grace_seconds + 20):  # the grace plus slack for a busy machine
            await returned.wait()
        at_return = sum(delivered(fake, users).values())
        await trio.sleep(1.0)
        after_return = sum(delivered(fake, users).values())
        trio.lowlevel.remove_instrument(tree)

    assert app.lifecycle.reason == "SIGTERM"
    assert f"broadcast-{broadcast_id}" in services, services  # the broadcast ran as a task of the tree
    assert tree.still_running() == [], "tasks of the daemon outlived run_daemon"
    restarted = sorted(set(tree.after_stop) & set(services))
    assert restarted == [], f"services started again during shutdown: {restarted}"
    assert after_return == at_return, "the broadcast kept sending after the daemon returned"
    assert at_return < RECIPIENTS and scalar(db_dsn, "SELECT status FROM broadcasts") == "running"
    print(f"\nSIGTERM: {len(tree.spawned)} tasks spawned, all exited; {len(services)} services at the stop; "
          f"broadcast stopped at {at_return}/{RECIPIENTS}")  # fmt: skip

    # Started again: the broadcast resumes where it stopped; each recipient has it exactly once.
    with trio.fail_after(60):
        await instance_lock_released(db_dsn)
        app, tree, returned = await run_under_instrument(nursery, config)
        await poll(lambda: scalar(db_dsn, "SELECT status FROM broadcasts") == "done", 40, what="broadcast done")
        await poll(lambda: all(fake.bot_messages(uid) for uid in talkers), 20, what="talkers answered")
        app.lifecycle.request_stop("test")
        await returned.wait()
        trio.lowlevel.remove_instrument(tree)
    counts = delivered(fake, users)
    assert set(counts.values()) == {1}, {uid: n for uid, n in counts.items() if n != 1}
    assert fake.too_many_requests_sent == 0


@pytest.mark.slow
async def test_sigterm_with_handlers_stuck_past_the_grace_exits_0_in_time_and_loses_no_update(
    fake_telegram: tuple[FakeTelegram, str],
    fake_xray: FakeXray,
    db_dsn: str,
    write_config: Callable[..., Path],
    tmp_path: Path,
) -> None:
    fake, _ = fake_telegram
    port = free_port()
    grace = 2.0
    config = full_config(
        write_config, db_dsn, tmp_path, fake_telegram, xray=fake_xray,
        telegram={"poll_timeout": 1, "handler_timeout_seconds": 60.0},
        http={"listen": f"127.0.0.1:{port}"}, shutdown={"grace_seconds": grace},
    )  # fmt: skip
    stuck = list(range(9101, 9106))
    for uid in stuck:
        fake.add_user(uid, f"S{uid}")
    async with trio.open_nursery() as nursery:
        with trio.fail_after(60):
            daemon = await start_daemon(nursery, Path(config.path), tmp_path)
            await wait_ready(daemon, f"http://127.0.0.1:{port}")
            fake.inject_fault("timeout", count=len(stuck), hold_seconds=30.0, methods=["sendMessage"])
            for uid in stuck:
                fake.user_sends(uid, "/start")
            await fake.wait_until(lambda: fake.requests["sendMessage"] >= len(stuck), timeout=30)
            sent_at = trio.current_time()
            daemon.signal(signal.SIGTERM)
            # The handlers are stuck for 30 s (the fault) and would time out after 60: an exit long before
            # either proves the grace deadline cut them; the slack over the grace is for a busy machine.
            code = await daemon.wait(timeout=grace + 20)
            took = trio.current_time() - sent_at
            log = daemon.log()
            assert code == 0, log[-3000:]
            assert "STOPPING=1" in daemon.notify.lines()
            assert "event=grace_expired" in log and "event=stopped" in log
            assert not any(fake.bot_messages(uid) for uid in stuck)

            fake.clear_faults()
            await instance_lock_released(db_dsn)
            again = await start_daemon(nursery, Path(config.path), tmp_path)
            await wait_ready(again, f"http://127.0.0.1:{port}")
            await fake.wait_until(lambda: all(fake.bot_messages(uid) for uid in stuck), timeout=30)
            again.signal(signal.SIGTERM)  # a second answer sent until the exit is counted below
            assert await again.wait(timeout=grace + 20) == 0
        nursery.cancel_scope.cancel()
    assert {uid: len(fake.bot_messages(uid)) for uid in stuck} == dict.fromkeys(stuck, 1)
    print(f"\nSIGTERM with {len(stuck)} handlers stuck: exit 0 after {took:.2f}s (grace {grace:g}s)")
