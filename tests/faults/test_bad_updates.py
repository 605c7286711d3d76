"""Random and mutated Bot API updates through the fake Telegram: the loop never dies, nothing crashes.

One vpnd runs (in a background thread, see `live.py`) for the whole module; hypothesis injects raw
updates with `FakeTelegram.inject_update`, so vpnd receives them through getUpdates over HTTP like
any other. Each example then waits until every injected update is recorded *handled* in the inbox —
which proves the polling loop and the handler nursery are alive — and checks:

* well-formed updates (real users, any text up to and past Telegram's 4,096, commands with random
  arguments, forged callback data, unknown update kinds, membership changes, forged pre-checkout
  queries) are handled with outcome "ok": no error boundary, no apology, no traceback;
* mutated updates (fields deleted, values of the wrong type, absurd sizes) are handled "ok" or
  "error" — the boundary may catch them, but the daemon goes on;
* forged admin callbacks and states from non-admins change nothing (audited as "denied").

Two poison updates — a NUL character in a string, a chat id beyond 64 bits — once killed the polling
loop in a crash loop; the tests at the end keep them harmless.
"""

from __future__ import annotations

import collections
import copy
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.faults.live import ADMIN_ID, Live, open_live
from tests.faults.support import Supervisor, daemon_sections, until_sync
from tests.harness import config_text
from vpnd_sandbox.postgres import free_port

REAL_USERS = list(range(45_001, 45_021))
MENUS: dict[int, dict[str, Any]] = {}  # user → the bot's first message in their chat (Bot API JSON)
MAX_INT64 = 2**63 - 1
EXAMPLES = int(os.environ.get("VPND_FUZZ_EXAMPLES_UPDATES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def live(pg_server: Any, template_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    from tests.conftest import TEMPLATE_DB

    dsn = pg_server.create_database(f"fuzz_updates_{os.getpid()}", template=TEMPLATE_DB)
    with open_live(dsn, tmp_path_factory.mktemp("live-updates")) as running:

        def add_users() -> None:
            for uid in REAL_USERS:
                running.telegram.add_user(uid, f"User {uid}", username=f"user{uid}").started = True

        running.call(add_users)
        # Every user has the bot's menu message: forged callbacks point at it, as Telegram requires
        # a callback to come from a message that exists.
        for uid in REAL_USERS:
            running.call(running.telegram.user_sends, uid, "/start")
        assert until_sync(lambda: all(running.call(running.telegram.bot_messages, u) for u in REAL_USERS), 30)
        for uid in REAL_USERS:
            MENUS[uid] = running.call(lambda u=uid: running.telegram.bot_messages(u)[0].to_api())
        yield running


# --- strategies -----------------------------------------------------------------------------------

# Any text JSON can carry (NUL included: PostgreSQL's jsonb cannot store it; the poller must cope).
text = st.text(st.characters(exclude_categories=("Cs",)), max_size=300)
long_text = st.integers(4000, 20_000).map(lambda n: ("я" * n)[:n])
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), MAX_INT64),
    st.integers(),  # beyond 64 bits too: ids, amounts, dates
    st.floats(allow_nan=False, allow_infinity=False),
    text,
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(text, children, max_size=4),
    max_leaves=10,
)
VERBS = ["menu", "sub", "buy", "trial", "promo", "promo_cancel", "invite", "lang", "help", "qr", "reissue", "ar",
         "plan", "pay", "topup", "tu", "adm"]  # fmt: skip
ADMIN_ACTIONS = ["st", "hl", "x", "fu", "u", "g", "gc", "rv", "rvc", "rk", "rkc", "ar", "bal", "balc", "pr", "pn",
                 "pd", "ex", "bc", "bn", "bs", "bgo", "bl", "bp", "br", "bx", "rf", "rfc"]  # fmt: skip
ARGS = ["", "m1", "m3", "cryptopay", "stars", "balance", "on", "off", "en", "ru", "1", "-1", "0", "45001",
        str(MAX_INT64), "99999999999999999999", "x" * 20, "²", "٣"]  # fmt: skip
# Digits that str.isdigit() accepts and int() refuses (found by this fuzzer: "tu:²" broke the top-up flow).
NON_ASCII_DIGITS = ["tu:²", "plan:²", "pay:m1:²", "ar:²", "tu:٣"]
arg = st.sampled_from(ARGS) | text.map(lambda t: t[:12])


@st.composite
def callback_data(draw: st.DrawFn) -> str:
    """What a modified client may put in callback data: up to 64 bytes, any shape."""
    kind = draw(st.sampled_from(["verb", "admin", "random"]))
    if kind == "verb":
        data = ":".join([draw(st.sampled_from(VERBS)), *draw(st.lists(arg, max_size=4))])
    elif kind == "admin":
        data = ":".join(["adm", draw(st.sampled_from(ADMIN_ACTIONS)), *draw(st.lists(arg, max_size=5))])
    else:
        data = draw(text)
    return data.encode()[:64].decode(errors="ignore") or "x"


def user_json(uid: int, language: str | None = "en") -> dict[str, Any]:
    user: dict[str, Any] = {"id": uid, "is_bot": False, "first_name": f"User {uid}"}
    if language:
        user["language_code"] = language
    return user


def press_json(uid: int, data: str) -> dict[str, Any]:
    """A callback press by `uid` on a message of the bot's, with `data` as the button's callback data."""
    return {
        "callback_query": {
            "id": str(uid),
            "from": user_json(uid),
            "chat_instance": "1",
            "data": data,
            "message": message_json(uid, {"text": "menu"}, 999_999_999),
        }
    }


def message_json(uid: int, body: dict[str, Any], message_id: int) -> dict[str, Any]:
    return {
        "message_id": message_id,
        "from": user_json(uid),
        "chat": {"id": uid, "type": "private", "first_name": f"User {uid}"},
        "date": int(time.time()),
        **body,
    }


@st.composite
def well_formed(draw: st.DrawFn) -> dict[str, Any]:
    """An update Telegram could send (or a modified client could cause): well-formed, maybe hostile."""
    uid = draw(st.sampled_from(REAL_USERS))
    message_id = draw(st.integers(1, 10**6))
    kind = draw(st.sampled_from(["text", "long", "command", "callback", "unknown", "member", "edit"]))
    if kind in ("text", "long", "command"):
        if kind == "text":
            body = draw(text.filter(str.strip))
        elif kind == "long":
            body = draw(long_text)
        else:
            known = ["start", "menu", "help", "language", "subscription", "trial", "invite", "buy", "admin", "promo"]
            command = draw(st.sampled_from(known) | text.map(lambda t: t.replace(" ", "")))
            body = f"/{command} {draw(text | st.just('ref_') | text.map(lambda t: 'ref_' + t[:30]))}"
        return {"message": message_json(uid, {"text": body}, message_id)}
    if kind == "callback":
        query: dict[str, Any] = {
            "id": str(draw(st.integers(1, 10**18))),
            "from": user_json(uid, draw(st.sampled_from(["en", "ru", "de", None]))),
            "chat_instance": str(draw(st.integers(1, 10**9))),
            "data": draw(callback_data()),
        }
        if draw(st.booleans()):
            query["message"] = MENUS[uid]
        return {"callback_query": query}
    if kind == "unknown":
        # An update kind newer than our Bot API library (Telegram adds some every few months).
        name = draw(st.sampled_from(["future_kind", "message_v2", "paid_broadcast"]) | text.map(lambda t: "x_" + t))
        return {name: draw(json_values)}
    if kind == "member":
        old, new = (
            draw(st.sampled_from(["member", "kicked", "left"])),
            draw(st.sampled_from(["member", "kicked", "left"])),
        )
        bot = {"id": 7000000001, "is_bot": True, "first_name": "vpnd demo", "username": "vpnd_demo_bot"}
        return {
            "my_chat_member": {
                "chat": {"id": uid, "type": "private", "first_name": f"User {uid}"},
                "from": user_json(uid),
                "date": int(time.time()),
                "old_chat_member": {"status": old, "user": bot, **({"until_date": 0} if old == "kicked" else {})},
                "new_chat_member": {"status": new, "user": bot, **({"until_date": 0} if new == "kicked" else {})},
            }
        }
    body = draw(text.filter(str.strip))
    return {"edited_message": {**message_json(uid, {"text": body}, message_id), "edit_date": int(time.time())}}


KNOWN_KINDS = ["poll", "poll_answer", "chat_join_request", "message_reaction", "chat_boost", "business_message",
               "channel_post", "inline_query", "shipping_query", "purchased_paid_media", "chat_member"]  # fmt: skip


@st.composite
def impossible(draw: st.DrawFn) -> dict[str, Any]:
    """JSON that Telegram would not send: queries it never issued, messages that don't exist, kinds we
    don't subscribe to with bodies of any shape."""
    uid = draw(st.sampled_from(REAL_USERS))
    choice = draw(st.sampled_from(["precheckout", "callback", "kind"]))
    if choice == "kind":
        return {draw(st.sampled_from(KNOWN_KINDS)): draw(json_values)}
    if choice == "precheckout":
        return {
            "pre_checkout_query": {
                "id": str(draw(st.integers(1, 10**18))),
                "from": user_json(uid),
                "currency": draw(st.sampled_from(["XTR", "USD", ""]) | text),
                "total_amount": draw(st.integers(-(2**31), 2**31)),
                "invoice_payload": draw(st.sampled_from(["1", "0", "-1", str(MAX_INT64), ""]) | text),
            }
        }
    return {
        "callback_query": {
            "id": str(draw(st.integers(1, 10**18))),
            "from": user_json(uid),
            "chat_instance": "1",
            "data": draw(callback_data()),
            "message": message_json(uid, {"text": draw(text)}, draw(st.integers(-(2**31), 2**31))),
        }
    }


@st.composite
def mutated(draw: st.DrawFn) -> dict[str, Any]:
    """A well-formed update with fields deleted or replaced by values of any type and size."""
    update = copy.deepcopy(draw(well_formed() | impossible()))
    for _ in range(draw(st.integers(1, 4))):
        path: list[Any] = []
        node: Any = update
        while isinstance(node, dict) and node and draw(st.booleans()):
            key = draw(st.sampled_from(sorted(node)))
            path.append(key)
            node = node[key]
        if not path:
            continue
        parent = update
        for key in path[:-1]:
            parent = parent[key]
        if draw(st.booleans()):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(json_values | long_text)
    return update


# --- helpers --------------------------------------------------------------------------------------


def wait_handled(live: Live, update_ids: list[int], timeout: float = 30.0) -> dict[int, str]:
    """Wait until every update is in the inbox and handled; return update_id → outcome."""
    found: dict[int, str] = {}

    def done() -> bool:
        rows = live.sql(
            "SELECT update_id, outcome FROM telegram_inbox WHERE update_id = ANY(%s) AND handled_at IS NOT NULL",
            (update_ids,),
        )
        found.update({row[0]: row[1] for row in rows})
        return len(found) == len(update_ids)

    if not until_sync(done, timeout):
        raise AssertionError(
            f"updates not handled within {timeout}s (loop dead?): missing {sorted(set(update_ids) - set(found))}; "
            f"daemon alive: {live.alive()}; errors: {live.error_lines()[-5:]}"
        )
    return found


def inject(live: Live, updates: list[dict[str, Any]]) -> list[int]:
    return [live.call(live.telegram.inject_update, update) for update in updates]


def assert_still_serving(live: Live) -> None:
    """A real user's /help is answered: polling, the handler nursery and sending all work."""
    before = live.call(lambda: len(live.telegram.bot_messages(REAL_USERS[0])))
    live.call(live.telegram.user_sends, REAL_USERS[0], "/help")
    assert until_sync(lambda: live.call(lambda: len(live.telegram.bot_messages(REAL_USERS[0]))) > before, 15), (
        live.error_lines()[-5:]
    )


# --- properties -----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(300)
@FUZZ
@given(st.lists(well_formed(), min_size=1, max_size=4))
@example([press_json(REAL_USERS[1], data) for data in NON_ASCII_DIGITS])
def test_well_formed_hostile_updates_are_handled_ok(live: Live, updates: list[dict[str, Any]]) -> None:
    errors_before = len(live.errors)
    ids = inject(live, updates)
    outcomes = wait_handled(live, ids)
    # "coalesced": the same message or press was still waiting in its chat (handled once, on purpose).
    failed = [
        update
        for update_id, update in zip(ids, updates, strict=True)
        if outcomes[update_id] not in ("ok", "coalesced")
    ]
    assert not failed, (failed[:1], live.error_lines(errors_before)[:3])
    assert live.alive()


@pytest.mark.slow
@pytest.mark.timeout(300)
@FUZZ
@given(st.lists(mutated() | impossible() | well_formed(), min_size=1, max_size=4))
def test_mutated_updates_never_kill_the_loop(live: Live, updates: list[dict[str, Any]]) -> None:
    ids = inject(live, updates)
    outcomes = wait_handled(live, ids)
    # Dropped on purpose (a flooding chat, a repeat, a quarantined update) or handled; never stuck.
    assert set(outcomes.values()) <= {"ok", "error", "coalesced", "dropped", "quarantined"}
    assert live.alive()


def test_after_fuzzing_the_bot_still_serves_and_non_admins_changed_nothing(live: Live) -> None:
    assert_still_serving(live)
    assert live.alive()
    # Forged admin callbacks and states were refused and audited as such; no admin action ran.
    results = dict(
        live.sql("SELECT result, count(*) FROM admin_audit WHERE admin_id <> %s GROUP BY result", (ADMIN_ID,))
    )
    assert set(results) <= {"denied"}, results
    assert live.scalar("SELECT count(*) FROM broadcasts") == 0
    assert live.scalar("SELECT count(*) FROM promo_codes") == 0
    assert live.scalar("SELECT count(*) FROM subscriptions WHERE kind = 'paid'") == 0
    assert live.scalar("SELECT count(*) FROM balance_ledger") == 0
    outcomes = dict(live.sql("SELECT outcome, count(*) FROM telegram_inbox GROUP BY outcome"))
    update_failed = collections.Counter(
        r.getMessage().split('error="', 1)[-1].split(":", 1)[0]
        for r in live.errors
        if "update_failed" in r.getMessage()
    )
    other_errors = [line for line in live.error_lines() if "update_failed" not in line]
    print(
        f"\nbad updates: inbox outcomes {outcomes}; error-boundary catches by type: {dict(update_failed)}; "
        f"other ERROR records: {len(other_errors)} {other_errors[:3]}; admin refusals {results}"
    )


# --- poison updates -------------------------------------------------------------------------------


async def assert_survives(update: dict[str, Any], fake: Any, base_url: str, db_dsn: str, tmp_path: Path) -> None:
    uid = REAL_USERS[0]
    fake.add_user(uid, "User")
    port = free_port()
    config_path = tmp_path / "config.toml"
    config_path.write_text(config_text(daemon_sections(token=fake.token, telegram_url=base_url, dsn=db_dsn, port=port)))
    async with trio.open_nursery() as nursery:
        supervisor = Supervisor(nursery, config_path, tmp_path, port)
        await supervisor.start()
        with trio.fail_after(30):
            fake.inject_update(update)
            fake.user_sends(uid, "/help")
            try:
                await fake.wait_for_bot_message(uid, timeout=10)
            except trio.TooSlowError:
                raise AssertionError(f"the bot stopped answering; log:\n{supervisor.tail(1500)}") from None
            assert supervisor.alive()
            assert await supervisor.stop() == 0
        nursery.cancel_scope.cancel()


@pytest.mark.timeout(60)
async def test_nul_in_update_text_does_not_kill_polling(
    fake_telegram: tuple[Any, str], db_dsn: str, tmp_path: Path
) -> None:
    fake, base_url = fake_telegram
    update = {"message": message_json(REAL_USERS[1], {"text": "hello\x00world"}, 1)}
    await assert_survives(update, fake, base_url, db_dsn, tmp_path)


@pytest.mark.timeout(60)
async def test_chat_id_beyond_int64_does_not_kill_polling(
    fake_telegram: tuple[Any, str], db_dsn: str, tmp_path: Path
) -> None:
    fake, base_url = fake_telegram
    message = message_json(REAL_USERS[1], {"text": "hello"}, 1)
    message["chat"]["id"] = 2**64
    await assert_survives({"message": message}, fake, base_url, db_dsn, tmp_path)
