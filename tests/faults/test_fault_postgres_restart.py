"""PostgreSQL restarts (`pg_ctl restart -m fast`) under a steady stream of user messages.

The policy (README "One instance per database"): vpnd rides out a database restart — the pool
replaces its broken connections, the instance lock's keeper reconnects and takes the advisory lock
again within 30 s (else the daemon exits 1 and systemd restarts it). Updates are durable in the
inbox before the getUpdates offset moves, so none is lost or handled twice whatever happens.

The test runs its own throwaway cluster (the session's cluster is shared with every other test) and
`python -m vpnd run` as a subprocess. A supervisor restarts the daemon if it exits with a failure,
as systemd's `Restart=on-failure` would; the test then reports which way it went.
"""

from __future__ import annotations

import collections
from pathlib import Path

import attrs
import psycopg
import pytest
import trio

from tests.faults.support import ReplyClock, Supervisor, daemon_sections, until
from tests.harness import config_text, sql
from vpnd.db.migrations import migrate, packaged_schema
from vpnd.instance_lock import INSTANCE_LOCK_KEY
from vpnd_sandbox.postgres import Cluster, free_port, throwaway_cluster
from vpnd_sandbox.telegram_fake import FakeTelegram

USERS = list(range(41_001, 41_021))
RATE = 10.0  # messages per second, round robin over USERS
LOAD_SECONDS = 14.0  # at least; the load goes on until the last restart is done plus AFTER_LAST_RESTART
RESTARTS_AT = (4.0, 9.0)  # seconds into the load
AFTER_LAST_RESTART = 3.0  # seconds of load after PostgreSQL is back from the last restart
#: A starvation bound, not a speed figure: the first message after PostgreSQL is back must be answered
#: well within the instance lock's 30 s reconnect window plus a daemon restart (the figure is printed).
RECOVERY_BOUND = 60.0


def pg_restart_fast(cluster: Cluster) -> None:
    """`pg_ctl restart -m fast`, with the server's output going to its log file.

    (`Cluster.restart` omits `-l`: the restarted postmaster then inherits pg_ctl's captured stdout,
    and `subprocess.run` waits for that pipe to close — until its 120 s timeout.)
    """
    cluster.pg_ctl("-m", "fast", "-l", str(cluster.datadir / "server.log"), "-w", "-t", "60", "restart")


def make_database(cluster: Cluster) -> str:
    dsn = cluster.create_database("vpnd")
    with psycopg.connect(dsn, autocommit=True) as conn:
        migrate(conn, packaged_schema())
    return dsn


@attrs.define
class Outcome:
    sent: list[tuple[float, int, int]]  # (trio time, user, index of the user's message)
    expected: collections.Counter[int]
    clock: ReplyClock
    restart_window: list[tuple[float, float]]
    exits: list[int]
    log: str
    outcomes: dict[str, int]
    apologies: int
    daemon_died: bool

    def recoveries(self) -> list[float]:
        """Per restart: seconds from PostgreSQL being back to the reply to the first message sent after."""
        out = []
        for _, up_at in self.restart_window:
            after = [(at, uid, index) for at, uid, index in self.sent if at >= up_at]
            assert after, "the load ended before PostgreSQL was back"
            _, first_uid, first_index = after[0]
            reply_at = self.clock.reply_time(first_uid, first_index)
            assert reply_at is not None
            out.append(reply_at - up_at)
        return out


def unhandled(dsn: str) -> list[int]:
    return [row[0] for row in sql(dsn, "SELECT update_id FROM telegram_inbox WHERE handled_at IS NULL")]


async def restarts_under_load(
    telegram: FakeTelegram,
    telegram_url: str,
    tmp_path: Path,
    *,
    restarts_at: tuple[float, ...],
    load_seconds: float,
    restart_on_failure: bool,
) -> Outcome:
    """Run the daemon on its own cluster, send RATE messages/s, `pg_ctl restart -m fast` at the given times.

    With `restart_on_failure` a daemon that exits non-zero is started again at once (systemd's
    Restart=on-failure); without, the scenario ends early when it exits (`daemon_died`).
    """
    for uid in USERS:
        telegram.add_user(uid, f"User {uid}")
    with throwaway_cluster(prefix="vpnd-faults-pg-") as cluster:
        dsn = await trio.to_thread.run_sync(make_database, cluster)
        port = free_port()
        config_path = tmp_path / "config.toml"
        config_path.write_text(
            config_text(daemon_sections(token=telegram.token, telegram_url=telegram_url, dsn=dsn, port=port))
        )
        sent: list[tuple[float, int, int]] = []
        per_user: collections.Counter[int] = collections.Counter()
        clock = ReplyClock(telegram, USERS)
        restart_window: list[tuple[float, float]] = []
        exits: list[int] = []
        died = trio.Event()

        async with trio.open_nursery() as nursery:
            supervisor = Supervisor(nursery, config_path, tmp_path, port)
            await supervisor.start()

            async def systemd() -> None:
                while True:
                    code = await supervisor.current.process.wait()
                    exits.append(code)
                    if code == 0:
                        return
                    if not restart_on_failure:
                        died.set()
                        return
                    await supervisor.start(ready=False)

            restarts_done = trio.Event()

            async def load() -> None:
                index = 0
                start = trio.current_time()
                stop_at = start + load_seconds
                while True:
                    if restarts_done.is_set():
                        stop_at = max(stop_at, restart_window[-1][1] + AFTER_LAST_RESTART)
                    if trio.current_time() >= stop_at and restarts_done.is_set():
                        break
                    uid = USERS[index % len(USERS)]
                    telegram.user_sends(uid, f"load {index}")
                    sent.append((trio.current_time(), uid, per_user[uid]))
                    per_user[uid] += 1
                    index += 1
                    await trio.sleep(1 / RATE)

            async def restart_postgres() -> None:
                start = trio.current_time()
                for at in restarts_at:
                    await trio.sleep_until(start + at)
                    down = trio.current_time()
                    await trio.to_thread.run_sync(pg_restart_fast, cluster)
                    restart_window.append((down, trio.current_time()))
                restarts_done.set()

            nursery.start_soon(systemd)
            nursery.start_soon(clock.run)
            with trio.fail_after(200):
                async with trio.open_nursery() as work:

                    async def the_work() -> None:
                        async with trio.open_nursery() as inner:
                            inner.start_soon(load)
                            inner.start_soon(restart_postgres)
                        work.cancel_scope.cancel()

                    async def stop_when_died() -> None:
                        await died.wait()
                        work.cancel_scope.cancel()

                    work.start_soon(the_work)
                    work.start_soon(stop_when_died)
                expected = collections.Counter(uid for _, uid, _ in sent)
                if not died.is_set():

                    def replied(uid: int) -> int:
                        return len(telegram.bot_messages(uid))

                    try:
                        await until(lambda: all(replied(u) >= expected[u] for u in USERS), timeout=60, step=0.1)
                    except trio.TooSlowError:
                        raise AssertionError(f"not every message was answered; log:\n{supervisor.tail()}") from None
                    # Every answered update is also recorded as handled (the outcome write retries while
                    # PostgreSQL is away), so none would be handled and answered again after a restart.
                    try:
                        await until(lambda: not unhandled(dsn), timeout=60, step=0.2)
                    except trio.TooSlowError:
                        raise AssertionError(f"answered but not recorded: {unhandled(dsn)}") from None
                    # No wait for duplicates here: the counts are taken after the stop below (SIGTERM lets
                    # the handlers in flight finish), so a second answer sent by this daemon is counted.
                    # The lock is held again, by one session (the keeper re-took it or a new daemon did).
                    await until(lambda: lock_holders(dsn) == ["vpnd-instance-lock"], timeout=35, step=0.2)
                    assert supervisor.alive(), supervisor.tail()
                    assert await supervisor.stop() == 0, supervisor.tail()
                log = supervisor.logs()
            nursery.cancel_scope.cancel()

        outcomes = dict(sql(dsn, "SELECT coalesce(outcome, 'unhandled'), count(*) FROM telegram_inbox GROUP BY 1"))
        apologies = sum(
            1 for uid in USERS for m in telegram.bot_messages(uid) if "something went wrong" in (m.text or "")
        )
    return Outcome(sent, expected, clock, restart_window, exits, log, outcomes, apologies, died.is_set())  # type: ignore[arg-type]


@pytest.mark.slow
@pytest.mark.alone  # bounds the recovery time under load
@pytest.mark.timeout(300)
async def test_postgres_restart_under_load_loses_nothing_and_serves_again(
    fake_telegram: tuple[FakeTelegram, str], tmp_path: Path
) -> None:
    """Two restarts; the daemon rides them out or exits 1 and is restarted (as systemd would)."""
    telegram, telegram_url = fake_telegram
    telegram.global_rate = telegram.global_burst = 500.0
    telegram.chat_rate, telegram.chat_burst = 20.0, 20.0
    result = await restarts_under_load(
        telegram, telegram_url, tmp_path, restarts_at=RESTARTS_AT, load_seconds=LOAD_SECONDS, restart_on_failure=True
    )
    recoveries = result.recoveries()
    span = result.sent[-1][0] - result.sent[0][0]
    latencies = sorted((result.clock.reply_time(u, i) or float("inf")) - at for at, u, i in result.sent)
    log = result.log
    print(
        f"\n{len(result.restart_window)} x pg_ctl restart -m fast (took "
        f"{', '.join(f'{up - down:.2f}s' for down, up in result.restart_window)}); {len(result.sent)} messages over "
        f"{span:.1f}s; daemon exit codes: {result.exits}; lock sessions lost/reacquired: "
        f"{log.count('event=instance_lock_session_lost')}/{log.count('event=instance_lock_reacquired')}; "
        f"inbox outcomes {result.outcomes}; apologies {result.apologies}; first post-restart message answered "
        f"{', '.join(f'{r:.2f}s' for r in recoveries)} after PostgreSQL was back; reply latency "
        f"median {latencies[len(latencies) // 2]:.2f}s, max {latencies[-1]:.2f}s"
    )
    # Nothing lost, nothing twice: one inbox row and one answer per message.
    assert sum(result.outcomes.values()) == len(result.sent), result.outcomes
    for uid in USERS:
        assert len(result.clock.telegram.bot_messages(uid)) == result.expected[uid], uid
    # A handler whose query PostgreSQL killed is answered by the error boundary's apology (rare).
    assert result.outcomes.get("error", 0) == result.apologies <= 2
    # Serving again after PostgreSQL is back, a daemon restart included (a starvation bound; the figure is
    # printed above — a few seconds on an idle machine).
    assert max(recoveries) <= RECOVERY_BOUND, recoveries
    # A daemon that did exit said why, readably: a database error, exit 1, no traceback.
    assert set(result.exits) <= {0, 1} and result.exits[-1] == 0, result.exits
    crashes = [line for line in log.splitlines() if "event=crashed" in line]
    assert len(crashes) == result.exits.count(1), crashes
    assert all("OperationalError" in line or "AdminShutdown" in line for line in crashes), crashes
    assert all("Traceback" not in line for line in crashes), crashes


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_postgres_restarts_do_not_stop_the_daemon(
    fake_telegram: tuple[FakeTelegram, str], tmp_path: Path
) -> None:
    """Ten restarts 1.2 s apart under load: per README the daemon reconnects and never exits."""
    telegram, telegram_url = fake_telegram
    telegram.global_rate = telegram.global_burst = 500.0
    telegram.chat_rate, telegram.chat_burst = 20.0, 20.0
    result = await restarts_under_load(
        telegram,
        telegram_url,
        tmp_path,
        restarts_at=tuple(1.0 + 1.2 * k for k in range(10)),
        load_seconds=14.0,
        restart_on_failure=False,
    )
    crashed = [line[-300:] for line in result.log.splitlines() if "event=crashed" in line]
    assert not result.daemon_died and result.exits == [0], (result.exits, crashed)


def lock_holders(dsn: str) -> list[str]:
    """application_name of every session holding vpnd's instance lock."""
    rows = sql(
        dsn,
        "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
        "WHERE l.locktype = 'advisory' AND l.granted AND ((l.classid::bigint << 32) | l.objid::bigint) = %s",
        INSTANCE_LOCK_KEY,
    )
    return [row[0] for row in rows]
