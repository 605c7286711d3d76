"""Admin tests: vpnd's services in the test's Trio run, with the admin routes and the broadcasts nursery.

`start_admin_vpnd` builds the same tree as `serve_app` (telegram, broadcasts, http) but registers the
admin flows itself, so these tests do not depend on the root wiring. Helpers seed many users at
once (set-wise in SQL, and in the fake Bot API) and drive the admin's conversation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import psycopg
import trio

from vpnd.app import App, open_app
from vpnd.config import Config
from vpnd.nurseries.broadcasts import Broadcasts, run_broadcasts
from vpnd.nurseries.http import build_router, run_http
from vpnd.nurseries.telegram import run_telegram
from vpnd.telegram import admin
from vpnd.telegram.client import Sender, open_bot
from vpnd.telegram.flows import register_all
from vpnd.telegram.ratelimit import OutboundLimiter
from vpnd.telegram.router import Routes, make_apology, make_update_handler, register
from vpnd.telegram.texts import Texts
from vpnd.telegram.turn import BotContext
from vpnd_sandbox.telegram_fake import ChatMessage, FakeTelegram

ADMIN = 1


def admin_routes() -> Routes:
    routes = Routes()
    register(routes)
    register_all(routes)
    if "admin" not in routes.commands:  # until the lead wires admin.register into register_all
        admin.register(routes)
    return routes


@attrs.define(eq=False)
class AdminRunning:
    app: App
    broadcasts: Broadcasts
    sender: Sender
    done: trio.Event

    async def stop(self, timeout: float = 15) -> None:
        self.app.lifecycle.request_stop("test")
        with trio.fail_after(timeout):
            await self.done.wait()


async def start_admin_vpnd(nursery: trio.Nursery, config: Config) -> AdminRunning:
    done = trio.Event()

    async def run(task_status: trio.TaskStatus[AdminRunning] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with open_app(config) as app, open_bot(app.config.telegram) as bot:
                limiter = OutboundLimiter.from_config(app.config)
                sender = Sender(bot, limiter, app.metrics)
                ctx = BotContext(app, bot, sender, Texts.load())
                async with trio.open_nursery() as root:
                    handler = make_update_handler(ctx, admin_routes())
                    await root.start(run_telegram, app, bot, handler, make_apology(ctx))
                    broadcasts = await root.start(run_broadcasts, app, sender)
                    app.http_url = await root.start(run_http, app, build_router(app))
                    task_status.started(AdminRunning(app, broadcasts, sender, done))
                    await app.lifecycle.stopping.wait()
                    root.cancel_scope.deadline = trio.current_time() + app.config.shutdown.grace_seconds
        finally:
            done.set()

    running: AdminRunning = await nursery.start(run)
    return running


# --- seeding ----------------------------------------------------------------------------------


def seed_users(dsn: str, fake: FakeTelegram | None, first: int, count: int, *, started: bool = True) -> list[int]:
    """`count` users with ids first..first+count-1 in the database (and in the fake, having started the bot)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO users (id, first_name, referral_code) "
            "SELECT g, 'User ' || g, 'ref' || g FROM generate_series(%s::bigint, %s::bigint) g",
            (first, first + count - 1),
        )
    ids = list(range(first, first + count))
    if fake is not None:
        for user_id in ids:
            user = fake.add_user(user_id, f"User {user_id}")
            user.started = started
    return ids


def give_subscription(dsn: str, user_ids: list[int], *, kind: str, days: int = 30) -> None:
    from vpnd.db.subscriptions import grant_days, grant_trial

    with psycopg.connect(dsn) as conn:
        for user_id in user_ids:
            if kind == "trial":
                grant_trial(conn, user_id, days)
            else:
                grant_days(conn, user_id, days, kind=kind)


def sql(dsn: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(query, params or None)
        return cur.fetchall() if cur.description else []


# --- the admin's conversation ------------------------------------------------------------------


def button_data(message: ChatMessage, prefix: str) -> str:
    """The button whose data is `prefix`, else the first whose data starts with it."""
    if prefix in message.callback_data:
        return prefix
    for data in message.callback_data:
        if data.startswith(prefix):
            return data
    raise AssertionError(f"no button {prefix!r} on message {message.message_id}: {message.callback_data}")


def has_button(prefix: str) -> Callable[[ChatMessage], bool]:
    return lambda m: any(d.startswith(prefix) for d in m.callback_data)


def text_has(fragment: str) -> Callable[[ChatMessage], bool]:
    return lambda m: fragment in (m.text or "")


async def press(fake: FakeTelegram, user_id: int, message: ChatMessage, prefix: str, **wait: Any) -> ChatMessage:
    fake.user_presses_button(user_id, message.message_id, button_data(message, prefix))
    return await fake.wait_for_bot_message(user_id, **wait)


async def say(fake: FakeTelegram, user_id: int, text: str, **wait: Any) -> ChatMessage:
    fake.user_sends(user_id, text)
    return await fake.wait_for_bot_message(user_id, **wait)


async def start_broadcast(
    fake: FakeTelegram, text: str, segment: str, *, button: str | None = None, admin_id: int = ADMIN
) -> ChatMessage:
    """Compose and start a broadcast as the admin; returns the progress message."""
    menu = await say(fake, admin_id, "/admin", predicate=has_button("adm:bc"))
    await press(fake, admin_id, menu, "adm:bc", predicate=text_has("broadcast text"))
    ask_button = await say(fake, admin_id, text, predicate=has_button("adm:bn"))
    if button is None:
        segments = await press(fake, admin_id, ask_button, "adm:bn", predicate=has_button("adm:bs:"))
    else:
        segments = await say(fake, admin_id, button, predicate=has_button("adm:bs:"))
    confirm = await press(fake, admin_id, segments, f"adm:bs:{segment}", predicate=has_button("adm:bgo:"))
    return await press(fake, admin_id, confirm, "adm:bgo:", predicate=has_button("adm:bp:"))


def bot_message_counts(fake: FakeTelegram, user_ids: list[int], fragment: str) -> dict[int, int]:
    return {uid: sum(1 for m in fake.bot_messages(uid) if fragment in (m.text or "")) for uid in user_ids}
