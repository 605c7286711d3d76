"""Broadcast queries on a real PostgreSQL: segments, set-wise recipients, keyset batches, status changes;
and the pure pieces (segment parsing, durations, progress text)."""

from __future__ import annotations

import datetime as dt

import psycopg
import pytest

from tests.admin.harness import give_subscription, seed_users
from tests.harness import sql
from vpnd.db import broadcasts as bdb
from vpnd.db.broadcasts import BadSegment, Segment
from vpnd.telegram.admin import views
from vpnd.telegram.admin.verbs import Verb
from vpnd.telegram.texts import Texts


def members(dsn: str, segment: Segment) -> list[int]:
    with psycopg.connect(dsn) as conn:
        broadcast = bdb.create_broadcast(conn, created_by=1, text="x", segment=segment)
        assert bdb.count_segment(conn, segment) == broadcast.total
        rows = conn.execute(
            "SELECT user_id FROM broadcast_recipients WHERE broadcast_id = %s ORDER BY user_id", (broadcast.id,)
        ).fetchall()
    return [r[0] for r in rows]


def test_segments(db_dsn: str) -> None:
    free = seed_users(db_dsn, None, 100, 3)
    paid = seed_users(db_dsn, None, 200, 2)
    trial = seed_users(db_dsn, None, 300, 2)
    expired = seed_users(db_dsn, None, 400, 1)
    revoked = seed_users(db_dsn, None, 500, 1)
    blocked = seed_users(db_dsn, None, 600, 1)
    give_subscription(db_dsn, paid, kind="paid", days=30)
    give_subscription(db_dsn, trial, kind="trial", days=2)
    give_subscription(db_dsn, expired + revoked + blocked, kind="paid", days=30)
    sql(db_dsn, "UPDATE subscriptions SET expires_at = now() - interval '1 day' WHERE user_id = %s", expired[0])
    sql(db_dsn, "UPDATE subscriptions SET status = 'revoked' WHERE user_id = %s", revoked[0])
    sql(db_dsn, "UPDATE subscriptions SET expires_at = now() + interval '12 hours' WHERE user_id = %s", paid[0])
    sql(db_dsn, "UPDATE users SET reachable = false WHERE id = %s", blocked[0])

    assert members(db_dsn, Segment("all")) == free + paid + trial + expired + revoked
    assert members(db_dsn, Segment("active")) == paid
    assert members(db_dsn, Segment("trial")) == trial
    assert members(db_dsn, Segment("nosub")) == free + expired + revoked
    assert members(db_dsn, Segment.parse("expiring", 1)) == [paid[0]]
    assert members(db_dsn, Segment.parse("expiring", 3)) == [paid[0], *trial]


def test_segment_parse() -> None:
    assert Segment.parse("nosub") == Segment("nosub")
    assert Segment.parse("expiring", 7).label() == "expiring within 7 days"
    for bad in [("everyone", None), ("expiring", None), ("expiring", 0), ("expiring", 10_000)]:
        with pytest.raises(BadSegment):
            Segment.parse(*bad)


def test_keyset_batches_marks_and_finish(db_dsn: str) -> None:
    users = seed_users(db_dsn, None, 1000, 25)
    with psycopg.connect(db_dsn) as conn:
        b = bdb.create_broadcast(conn, created_by=1, text="x", segment=Segment("all"))
        seen: list[int] = []
        after = 0
        while batch := bdb.next_pending(conn, b.id, after, 10):
            seen.extend(batch)
            after = batch[-1]
        assert seen == users
        bdb.mark_sent_many(conn, b.id, [(users[0], 42)])
        bdb.mark_failed(conn, b.id, users[1], "blocked", unreachable=True)
        assert bdb.skip_if_ineligible(conn, b.id, users[1], b.target) == "not_pending"
        assert bdb.skip_if_ineligible(conn, b.id, users[2], b.target) == "send"
        conn.execute("UPDATE users SET reachable = false WHERE id = %s", (users[2],))
        assert bdb.skip_if_ineligible(conn, b.id, users[2], b.target) == "skipped"
        assert bdb.next_pending(conn, b.id, 0, 3) == users[3:6]
        assert bdb.counts(conn, b.id) == bdb.Counts(total=25, pending=22, sent=1, failed=1, skipped=1)
        assert bdb.finish_if_complete(conn, b.id) is None
        conn.execute("UPDATE broadcast_recipients SET status = 'sent' WHERE status = 'pending'")
        done = bdb.finish_if_complete(conn, b.id)
        assert done is not None and done.status == "done" and done.finished_at is not None
        assert not bdb.change_status(conn, b.id, "pause").changed
        assert not conn.execute("SELECT reachable FROM users WHERE id = %s", (users[1],)).fetchone()[0]


@pytest.mark.parametrize("resend", [True, False])
def test_one_transaction_per_send_marks_the_finished_and_records_the_attempt(db_dsn: str, resend: bool) -> None:
    """`record_and_check` marks earlier sends (twice is harmless) and records the next attempt; after an
    unclean stop `settle_in_doubt` finds exactly the attempted-but-unmarked recipients."""
    users = seed_users(db_dsn, None, 2000, 6)
    with psycopg.connect(db_dsn) as conn:
        b = bdb.create_broadcast(conn, created_by=1, text="x", segment=Segment("all"))
        assert bdb.record_and_check(conn, b.id, users[0], b.target, []) == "send"
        assert bdb.record_and_check(conn, b.id, users[1], b.target, [(users[0], 10)]) == "send"
        assert bdb.record_and_check(conn, b.id, users[2], b.target, [(users[0], 99), (users[1], 11)]) == "send"
        assert bdb.record_and_check(conn, b.id, users[0], b.target, []) == "not_pending"
        marked = conn.execute(
            "SELECT user_id, message_id FROM broadcast_recipients WHERE status = 'sent' ORDER BY user_id"
        ).fetchall()
        assert marked == [(users[0], 10), (users[1], 11)]  # the first mark stands
        # users[2] went on the wire and vpnd died: in doubt. users[3..] were never attempted.
        assert bdb.settle_in_doubt(conn, b.id, resend=resend) == [users[2]]
        assert bdb.settle_in_doubt(conn, b.id, resend=resend) == []  # settled once
        status = conn.execute(
            "SELECT status, error FROM broadcast_recipients WHERE user_id = %s", (users[2],)
        ).fetchone()
        assert status == (("pending", None) if resend else ("skipped", bdb.IN_DOUBT_SKIPPED))
        assert bdb.counts(conn, b.id).pending == (4 if resend else 3)


def test_status_transitions(db_dsn: str) -> None:
    seed_users(db_dsn, None, 1, 1)
    with psycopg.connect(db_dsn) as conn:
        b = bdb.create_broadcast(conn, created_by=1, text="x", segment=Segment("all"))
        assert not bdb.change_status(conn, b.id, "resume").changed
        assert bdb.change_status(conn, b.id, "pause").broadcast.status == "paused"  # type: ignore[union-attr]
        assert bdb.statuses(conn, []) == {}
        assert bdb.statuses(conn, [b.id]) == {b.id: "paused"}
        assert bdb.change_status(conn, b.id, "resume").changed
        assert bdb.statuses(conn, []) == {b.id: "running"}
        cancelled = bdb.change_status(conn, b.id, "cancel")
        assert cancelled.changed and cancelled.broadcast is not None and cancelled.broadcast.finished_at is not None
        assert not bdb.change_status(conn, b.id, "resume").changed
        assert not bdb.change_status(conn, 999, "cancel").found


def test_views_are_pure_and_localized() -> None:
    texts = Texts.load()

    def t(key: str, **values: object) -> str:
        return texts.get("en", key, **values)

    assert [views.fmt_duration(s) for s in (7, 95, 3725, float("inf"))] == ["7s", "1m 35s", "1h 2m", "—"]
    b = bdb.Broadcast(
        7, 1, "x", None, None, "expiring", 3, "running", 100, 1, 2, dt.datetime(2026, 1, 1, tzinfo=dt.UTC), None
    )
    text = views.progress_text(t, b, "running", bdb.Counts(total=100, pending=50, sent=45, failed=3, skipped=2), 25.0)
    assert "Broadcast #7" in text and "Sent 45 · failed 3 · skipped 2 · left 50 of 100" in text
    assert "Rate: 25.0/s · ETA: 2s" in text and "Expiring within 3 d" in text
    keyboard = views.progress_keyboard(t, 7, "paused")
    assert keyboard is not None and [b["callback_data"] for b in keyboard["inline_keyboard"][0]] == [
        "adm:br:7",
        "adm:bx:7",
    ]
    assert views.progress_keyboard(t, 7, "done") is None
    # Every admin callback fits Telegram's 64 bytes, even with the largest ids.
    big = 2**63 - 1
    for data in (
        Verb.BALANCE_CONFIRM.data(big, -(10**15), "ffffffff"),
        Verb.GRANT_CONFIRM.data(big, 3650, 1, "ffffffff"),
    ):
        assert len(data.encode()) <= 64
