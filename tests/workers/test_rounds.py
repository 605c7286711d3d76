"""Reminders, trial notices, expiry and housekeeping rounds against a real PostgreSQL."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio

from tests.harness import open_app, sql
from tests.workers.conftest import seed_subscriptions, seed_users
from vpnd.app import App
from vpnd.config import Config
from vpnd.db import conversation, outbox
from vpnd.db.subscriptions import grant_days
from vpnd.nurseries.listener import run_listener
from vpnd.telegram.texts import Texts
from vpnd.workers.expiry import expiry_round
from vpnd.workers.housekeeping import housekeeping_round
from vpnd.workers.reminders import reminders_round
from vpnd.workers.trials import trials_round

H = dt.timedelta(hours=1)
D = dt.timedelta(days=1)
TEXTS = Texts.load()


@asynccontextmanager
async def opened(config: Config) -> AsyncIterator[App]:
    with trio.fail_after(60):
        async with open_app(config, single_instance=False) as app, trio.open_nursery() as nursery:
            await nursery.start(run_listener, app)  # commits wake their owners, as in the daemon
            yield app
            nursery.cancel_scope.cancel()


def messages(dsn: str) -> dict[str, tuple[int, str, Any]]:
    """dedupe_key → (chat_id, text, reply_markup) of every queued message."""
    rows = sql(dsn, "SELECT dedupe_key, chat_id, payload FROM outbox ORDER BY id")
    return {key: (chat, payload["text"], payload.get("reply_markup")) for key, chat, payload in rows}


def seed_trial(dsn: str, user_id: int, granted_ago: dt.timedelta, length: dt.timedelta, *, paid: bool = False) -> None:
    sql(
        dsn,
        "INSERT INTO trials (user_id, granted_at, ends_at) VALUES (%s, now() - %s, now() - %s + %s)",
        user_id,
        granted_ago,
        granted_ago,
        length,
    )
    sql(
        dsn,
        "INSERT INTO subscriptions (user_id, kind, status, uuid, sub_token, starts_at, expires_at) "
        "VALUES (%s, %s, 'active', gen_random_uuid(), 'tok' || %s, now() - %s, now() - %s + %s)",
        user_id,
        "paid" if paid else "trial",
        user_id,
        granted_ago,
        granted_ago,
        length,
    )


async def test_reminders_one_per_stage_per_expiry_and_renewal_rearms(
    db_dsn: str, make_config: Callable[..., Config]
) -> None:
    seed_users(db_dsn, [1, 2, 3, 4, 5, 6])
    seed_users(db_dsn, [7], language="ru")
    seed_users(db_dsn, [8])
    sql(db_dsn, "UPDATE users SET reachable = false WHERE id = 8")
    seed_subscriptions(db_dsn, [1], 2 * D + 12 * H)  # 3-day stage
    seed_subscriptions(db_dsn, [2], 20 * H)  # 1-day stage
    seed_subscriptions(db_dsn, [3], 2 * H)  # 3-hour stage
    seed_subscriptions(db_dsn, [4], 5 * D)  # too far out
    seed_subscriptions(db_dsn, [5], -H)  # over already
    seed_subscriptions(db_dsn, [6], 2 * D, kind="trial", plan_code=None)  # trials have their own notices
    seed_subscriptions(db_dsn, [7], 2 * D, auto_renew=True)
    seed_subscriptions(db_dsn, [8], 2 * D)  # blocked the bot
    async with opened(make_config()) as app:
        assert await reminders_round(app, TEXTS, batch_size=2) == 4
        assert await reminders_round(app, TEXTS, batch_size=2) == 0  # nothing twice
        queued = messages(db_dsn)
        assert sorted((chat, key.rsplit(":", 1)[1]) for key, (chat, _, _) in queued.items()) == [
            (1, "3d"),
            (2, "1d"),
            (3, "3h"),
            (7, "3d"),
        ]
        by_chat = {chat: (text, markup) for chat, text, markup in queued.values()}
        assert "ends in 3 days" in by_chat[1][0]
        assert by_chat[1][1] == {"inline_keyboard": [[{"text": "💳 Renew", "callback_data": "buy"}]]}
        assert "закончится через 3 дня" in by_chat[7][0] and "Автопродление включено" in by_chat[7][0]

        # Renewal moves expires_at: the reminders are armed again for the new date.
        sql(db_dsn, "UPDATE subscriptions SET expires_at = expires_at + interval '1 hour' WHERE user_id = 1")
        assert await reminders_round(app, TEXTS, batch_size=100) == 1
        assert [chat for chat, _, _ in messages(db_dsn).values()].count(1) == 2
        # A renewal far into the future: nothing new.
        await app.db.run(lambda conn: grant_days(conn, 2, 30, kind="paid", plan_code="m1"))
        assert await reminders_round(app, TEXTS, batch_size=100) == 0


async def test_trial_notices_once_each_and_never_after_paying(db_dsn: str, make_config: Callable[..., Config]) -> None:
    seed_users(db_dsn, [1, 2, 3, 4, 5])
    seed_trial(db_dsn, 1, granted_ago=D + 12 * H, length=3 * D)  # check-in
    seed_trial(db_dsn, 2, granted_ago=2 * D + 12 * H, length=3 * D)  # ends soon
    seed_trial(db_dsn, 3, granted_ago=3 * D + H, length=3 * D)  # ended an hour ago
    seed_trial(db_dsn, 4, granted_ago=2 * D + 12 * H, length=3 * D, paid=True)  # has paid meanwhile
    seed_trial(db_dsn, 5, granted_ago=H, length=3 * D)  # nothing yet
    async with opened(make_config()) as app:
        assert await trials_round(app, TEXTS, batch_size=2) == 3
        assert await trials_round(app, TEXTS, batch_size=2) == 0
        queued = messages(db_dsn)
        assert set(queued) == {"trial:1:checkin", "trial:2:ends_soon", "trial:3:ended"}
        assert "@support" in queued["trial:1:checkin"][1]
        assert queued["trial:3:ended"][2] == {"inline_keyboard": [[{"text": "💳 Buy", "callback_data": "buy"}]]}

        # The expiry of user 3's trial subscription does not tell them a second time.
        assert await expiry_round(app, TEXTS, batch_size=10) == 1
        assert set(messages(db_dsn)) == {"trial:1:checkin", "trial:2:ends_soon", "trial:3:ended"}


async def test_expiry_rechecks_expires_at_nudges_xray_and_tells_the_user(
    db_dsn: str, make_config: Callable[..., Config]
) -> None:
    users = list(range(1, 8))
    seed_users(db_dsn, users)
    seed_users(db_dsn, [9], balance_minor=10_000)
    seed_users(db_dsn, [10], balance_minor=100)
    sql(db_dsn, "UPDATE users SET reachable = false WHERE id = 7")
    seed_subscriptions(db_dsn, [1, 2, 3, 4, 5], [-H * (n + 1) for n in range(5)])
    seed_subscriptions(db_dsn, [6], H)  # not yet
    seed_subscriptions(db_dsn, [7], -H)  # unreachable: expired, not told
    seed_subscriptions(db_dsn, [9], -H, auto_renew=True)  # renewal owed: left to the renewal worker
    seed_subscriptions(db_dsn, [10], -H, auto_renew=True)  # renewal refused for lack of money: expires
    sql(
        db_dsn,
        "INSERT INTO auto_renewals (user_id, period_end, outcome) "
        "SELECT user_id, expires_at, 'insufficient_balance' FROM subscriptions WHERE user_id = 10",
    )
    async with opened(make_config()) as app:
        nudges = app.xray_changed.count
        assert await expiry_round(app, TEXTS, batch_size=2) == 7
        with trio.fail_after(10):  # the commits' notifications reach the listener a moment later
            while app.xray_changed.count == nudges:
                await trio.sleep(0.01)
        assert app.xray_changed.count > nudges
        assert await expiry_round(app, TEXTS, batch_size=2) == 0
    status = dict(sql(db_dsn, "SELECT user_id, status FROM subscriptions"))
    assert {u for u, s in status.items() if s == "expired"} == {1, 2, 3, 4, 5, 7, 10}
    assert status[6] == status[9] == "active"
    queued = messages(db_dsn)
    assert sorted(chat for chat, _, _ in queued.values()) == [1, 2, 3, 4, 5, 10]
    text, markup = next((t, m) for c, t, m in queued.values() if c == 1)
    assert "ended on" in text and markup["inline_keyboard"][0][0]["callback_data"] == "buy"


async def test_housekeeping_deletes_old_rows_in_batches(db_dsn: str, make_config: Callable[..., Config]) -> None:
    seed_users(db_dsn, list(range(1, 6)))
    async with opened(make_config(workers={"retention_days": 7})) as app:

        def seed(conn: Any) -> None:
            for uid in range(1, 6):
                conversation.set_state(conn, uid, "promo", ttl_seconds=-10 if uid <= 3 else 600)
            for n in range(5):
                conn.execute(
                    "INSERT INTO telegram_inbox (update_id, chat_id, payload, received_at, handled_at, outcome) "
                    "VALUES (%s, 1, '{}', now() - %s * interval '1 day', now() - %s * interval '1 day', 'ok')",
                    (n, 10 - n * 2, 10 - n * 2),
                )
                outbox.enqueue(conn, 1, f"old {n}", dedupe_key=f"old:{n}")
                outbox.enqueue(conn, 1, f"new {n}", dedupe_key=f"new:{n}")
            conn.execute("UPDATE outbox SET created_at = now() - interval '30 days' WHERE dedupe_key LIKE 'old:%'")
            conn.execute("UPDATE outbox SET status = 'sent' WHERE dedupe_key IN ('old:0', 'old:1', 'old:2', 'new:0')")
            conn.execute("UPDATE outbox SET status = 'failed' WHERE dedupe_key = 'old:3'")

        await app.db.run(seed)
        # 3 states, inbox rows 10 and 8 days old, outbox old:0..3 (old:4 is still pending).
        assert await housekeeping_round(app, batch_size=2) == 3 + 2 + 4
        assert await housekeeping_round(app, batch_size=2) == 0
    assert [r[0] for r in sql(db_dsn, "SELECT user_id FROM conversation_states ORDER BY 1")] == [4, 5]
    assert [r[0] for r in sql(db_dsn, "SELECT update_id FROM telegram_inbox ORDER BY 1")] == [2, 3, 4]
    assert sorted(r[0] for r in sql(db_dsn, "SELECT dedupe_key FROM outbox")) == [
        "new:0",
        "new:1",
        "new:2",
        "new:3",
        "new:4",
        "old:4",
    ]
