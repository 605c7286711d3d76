"""Admin tests: vpnd's poller, broadcasts and HTTP in the test's Trio run (`tests.harness.start_vpnd`).

Helpers seed many users at once (set-wise in SQL, and in the fake Bot API) and drive the admin's
conversation.
"""

from __future__ import annotations

import psycopg
import trio

from tests.harness import Running, has_button, press, say, start_vpnd, text_has
from vpnd.compose import Services
from vpnd.config import Config
from vpnd_sandbox.telegram_fake import ChatMessage, FakeTelegram

ADMIN = 1
#: The admin's conversation and what it starts; no workers, no outbox sender (tests read the outbox).
ADMIN_SERVICES = Services.only("listener", "poller", "broadcasts", "http")


async def start_admin_vpnd(nursery: trio.Nursery, config: Config) -> Running:
    return await start_vpnd(nursery, config, ADMIN_SERVICES)


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


# --- the admin's conversation ------------------------------------------------------------------


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
