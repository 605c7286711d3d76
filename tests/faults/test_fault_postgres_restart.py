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

import psycopg
import pytest
import trio

from tests.faults.support import ReplyClock, Supervisor, config_text, daemon_sections, sql, until
from vpnd.db.migrations import migrate, packaged_schema
from vpnd.instance_lock import INSTANCE_LOCK_KEY
from vpnd.sandbox.postgres import Cluster, free_port, throwaway_cluster
from vpnd.sandbox.telegram_fake import FakeTelegram

USERS = list(range(41_001, 41_021))
RATE = 10.0  # messages per second, round robin over USERS
LOAD_SECONDS = 14.0
RESTARTS_AT = (4.0, 9.0)  # seconds into the load


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


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_postgres_restart_under_load_loses_nothing_and_serves_again_quickly(
    fake_telegram: tuple[FakeTelegram, str], tmp_path: Path
) -> None:
    telegram, telegram_url = fake_telegram
    telegram.global_rate = telegram.global_burst = 500.0
    telegram.chat_rate, telegram.chat_burst = 20.0, 20.0
    for uid in USERS:
        telegram.add_user(uid, f"User {uid}")

    with throwaway_cluster(prefix="vpnd-faults-pg-") as cluster:
        dsn = await trio.to_thread.run_sync(make_database, cluster)
        port = free_port()
        config_path = tmp_path / "config.toml"
        config_path.write_text(
            config_text(daemon_sections(token=telegram.token, telegram_url=telegram_url, dsn=dsn, port=port))
        )
        sent: list[tuple[float, int, int]] = []  # (trio time, user, index of the user's message)
        per_user: collections.Counter[int] = collections.Counter()
        clock = ReplyClock(telegram, USERS)
        restart_window: list[tuple[float, float]] = []
        exits: list[int] = []

        async with trio.open_nursery() as nursery:
            supervisor = Supervisor(nursery, config_path, tmp_path, port)
            await supervisor.start()

            async def systemd() -> None:
                """Restart=on-failure: a daemon that exits 1 is started again at once."""
                while True:
                    code = await supervisor.current.process.wait()
                    exits.append(code)
                    if code == 0:
                        return
                    await supervisor.start(ready=False)

            async def load() -> None:
                index = 0
                start = trio.current_time()
                while trio.current_time() - start < LOAD_SECONDS:
                    uid = USERS[index % len(USERS)]
                    telegram.user_sends(uid, f"load {index}")
                    sent.append((trio.current_time(), uid, per_user[uid]))
                    per_user[uid] += 1
                    index += 1
                    await trio.sleep(1 / RATE)

            async def restart_postgres() -> None:
                start = trio.current_time()
                for at in RESTARTS_AT:
                    await trio.sleep_until(start + at)
                    down = trio.current_time()
                    await trio.to_thread.run_sync(pg_restart_fast, cluster)
                    restart_window.append((down, trio.current_time()))

            nursery.start_soon(systemd)
            nursery.start_soon(clock.run)
            with trio.fail_after(120):
                async with trio.open_nursery() as work:
                    work.start_soon(load)
                    work.start_soon(restart_postgres)

                def replied(uid: int) -> int:
                    return len(telegram.bot_messages(uid))

                expected = collections.Counter(uid for _, uid, _ in sent)
                try:
                    await until(lambda: all(replied(u) >= expected[u] for u in USERS), timeout=60, step=0.1)
                except trio.TooSlowError:
                    raise AssertionError(f"not every message was answered; log:\n{supervisor.tail()}") from None
                await trio.sleep(1.5)  # a duplicate would arrive now
                # The instance lock's keeper noticed and took the lock again (it checks every 5 s).
                await until(lambda: lock_holders(dsn) == ["vpnd-instance-lock"], timeout=35, step=0.2)
                assert supervisor.alive(), supervisor.tail()
                log = supervisor.logs()
                assert await supervisor.stop() == 0, supervisor.tail()
            nursery.cancel_scope.cancel()

        # Exactly one reply per message, every update in the inbox handled once.
        for uid in USERS:
            assert len(telegram.bot_messages(uid)) == expected[uid], uid
        rows = sql(dsn, "SELECT outcome, count(*) FROM telegram_inbox GROUP BY outcome")
        outcomes = dict(rows)  # type: ignore[arg-type]
        apologies = sum(
            1 for uid in USERS for m in telegram.bot_messages(uid) if "something went wrong" in (m.text or "")
        )

    # Serving again: the first message sent after PostgreSQL was back got its reply within 5 s.
    recoveries = []
    for _, up_at in restart_window:
        after = [(at, uid, index) for at, uid, index in sent if at >= up_at]
        assert after, "the load ended before PostgreSQL was back"
        _, first_uid, first_index = after[0]
        reply_at = clock.reply_time(first_uid, first_index)
        assert reply_at is not None
        recoveries.append(reply_at - up_at)
    latencies = sorted((clock.reply_time(uid, index) or float("inf")) - at for at, uid, index in sent)
    print(
        f"\n{len(restart_window)} x pg_ctl restart -m fast (took "
        f"{', '.join(f'{up - down:.2f}s' for down, up in restart_window)}); {len(sent)} messages over "
        f"{LOAD_SECONDS:g}s; daemon exits: {exits}; lock sessions lost/reacquired: "
        f"{log.count('event=instance_lock_session_lost')}/{log.count('event=instance_lock_reacquired')}; "
        f"inbox outcomes {outcomes}; apologies {apologies}; first post-restart message answered "
        f"{', '.join(f'{r:.2f}s' for r in recoveries)} after PostgreSQL was back; reply latency "
        f"median {latencies[len(latencies) // 2]:.2f}s, max {latencies[-1]:.2f}s"
    )
    assert sum(outcomes.values()) == len(sent)
    assert exits == [0], f"the daemon did not ride out the restart: exit codes {exits}"
    assert apologies == 0
    assert max(recoveries) <= 5.0
    assert log.count("event=instance_lock_reacquired") >= 1


def lock_holders(dsn: str) -> list[str]:
    """application_name of every session holding vpnd's instance lock."""
    rows = sql(
        dsn,
        "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
        "WHERE l.locktype = 'advisory' AND l.granted AND ((l.classid::bigint << 32) | l.objid::bigint) = %s",
        (INSTANCE_LOCK_KEY,),
    )
    return [row[0] for row in rows]
