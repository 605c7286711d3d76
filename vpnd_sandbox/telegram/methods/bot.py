"""Bot API methods about the bot itself and its updates: getMe, getUpdates (long poll), webhooks,
commands, descriptions, getChat, sendChatAction."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import trio

from vpnd_sandbox.telegram.faults import CONFLICT_OTHER_POLL
from vpnd_sandbox.telegram.methods.checks import chat_of
from vpnd_sandbox.telegram.wire import ApiError, JSONDict, Params, bad_request

if TYPE_CHECKING:
    from vpnd_sandbox.telegram.state import FakeTelegram

CONFLICT_WEBHOOK = (
    "Conflict: can't use getUpdates method while webhook is active; use deleteWebhook to delete the webhook first"
)
_COMMAND_NAME = re.compile(r"[a-z0-9_]{1,32}")


def get_me(fake: FakeTelegram, params: Params) -> JSONDict:
    return {
        **fake.bot_user(),
        "can_join_groups": False,
        "can_read_all_group_messages": False,
        "supports_inline_queries": False,
        "can_connect_to_business": False,
        "has_main_web_app": False,
    }


async def get_updates(fake: FakeTelegram, params: Params) -> list[JSONDict]:
    """Long poll. A newer poll ends an older waiting one with 409, as Telegram does."""
    if fake.webhook_url:
        raise ApiError(409, CONFLICT_WEBHOOK)
    offset = params.get_int("offset", default=0) or 0
    limit = min(max(params.get_int("limit", default=100) or 100, 1), 100)
    timeout = max(params.get_float("timeout", default=0.0) or 0.0, 0.0)
    allowed = params.get_json("allowed_updates")
    if allowed is not None:
        if not isinstance(allowed, list) or not all(isinstance(kind, str) for kind in allowed):
            raise bad_request("can't parse allowed_updates JSON array")
        fake._allowed_updates = frozenset(allowed) if allowed else None
    if offset > 0:
        while fake._pending and fake._pending[0]["update_id"] < offset:
            fake._pending.popleft()
    elif offset < 0:
        while len(fake._pending) > -offset:
            fake._pending.popleft()
    fake._poll_generation += 1
    generation = fake._poll_generation
    fake._wake_polls()  # an older waiting poll must notice it was superseded
    deadline = trio.current_time() + timeout
    fake._polls_waiting += 1
    fake._wake_waiters()
    try:
        while True:
            if generation != fake._poll_generation:
                raise ApiError(409, CONFLICT_OTHER_POLL)
            if fake._pending or trio.current_time() >= deadline:
                return [dict(update) for update in list(fake._pending)[:limit]]
            event = fake._updates_event
            with trio.move_on_at(deadline):
                await event.wait()
    finally:
        fake._polls_waiting -= 1
        fake._wake_waiters()


def set_webhook(fake: FakeTelegram, params: Params) -> bool:
    url = params.get_str("url") or ""
    if url and not url.startswith("https://"):
        raise bad_request("bad webhook: An HTTPS URL must be provided for webhook")
    fake.webhook_url = url
    if params.get_bool("drop_pending_updates"):
        fake._pending.clear()
    return True


def delete_webhook(fake: FakeTelegram, params: Params) -> bool:
    fake.webhook_url = ""
    if params.get_bool("drop_pending_updates"):
        fake._pending.clear()
    return True


def get_webhook_info(fake: FakeTelegram, params: Params) -> JSONDict:
    return {"url": fake.webhook_url, "has_custom_certificate": False, "pending_update_count": len(fake._pending)}


def commands_key(params: Params) -> tuple[str, str]:
    scope = params.get_json("scope")
    scope_type = scope.get("type", "default") if isinstance(scope, dict) else "default"
    return str(scope_type), params.get_str("language_code") or ""


def set_my_commands(fake: FakeTelegram, params: Params) -> bool:
    commands = params.get_json("commands")
    if not isinstance(commands, list):
        raise bad_request("commands is empty" if commands is None else "can't parse commands JSON array")
    if len(commands) > 100:
        raise bad_request("too many commands")
    for command in commands:
        if not isinstance(command, dict):
            raise bad_request("can't parse BotCommand JSON object")
        name, description = command.get("command"), command.get("description")
        if not isinstance(name, str) or not _COMMAND_NAME.fullmatch(name):
            raise bad_request("BOT_COMMAND_INVALID")
        if not isinstance(description, str) or not 1 <= len(description) <= 256:
            raise bad_request("command description is empty" if not description else "BOT_COMMAND_DESCRIPTION_INVALID")
    fake.commands[commands_key(params)] = [{"command": c["command"], "description": c["description"]} for c in commands]
    fake._changed()
    return True


def get_my_commands(fake: FakeTelegram, params: Params) -> list[JSONDict]:
    return list(fake.commands.get(commands_key(params), []))


def delete_my_commands(fake: FakeTelegram, params: Params) -> bool:
    fake.commands.pop(commands_key(params), None)
    return True


def accept_bot_text(fake: FakeTelegram, params: Params) -> bool:
    return True


def get_chat(fake: FakeTelegram, params: Params) -> JSONDict:
    user = chat_of(fake, params)
    return {**user.chat_api(), "accent_color_id": 0, "max_reaction_count": 11}


def send_chat_action(fake: FakeTelegram, params: Params) -> bool:
    chat_of(fake, params)
    if not params.get_str("action"):
        raise bad_request("action is empty")
    return True
