"""Bot API methods about the bot itself and its updates: getMe, getUpdates (long poll), webhooks,
commands, descriptions, getChat, getChatMember, sendChatAction."""

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


def get_chat_member(fake: FakeTelegram, params: Params) -> JSONDict:
    """A user's membership in a channel, as Telegram answers it: 400 "chat not found" for a chat the bot
    does not know, "member list is inaccessible" when the bot is not an administrator there, "user not
    found" for an unknown user; a user who never joined is "left"."""
    raw = params.raw("chat_id")
    if raw is None or raw == "":
        raise bad_request("chat_id is empty")
    channel = fake.find_channel(raw if isinstance(raw, str) and raw.startswith("@") else params.get_int("chat_id"))
    user_id = params.get_int("user_id")
    if user_id is None:
        raise bad_request("user_id is empty")
    if channel is None:
        raise bad_request("chat not found")
    if not channel.bot_is_admin:
        raise bad_request("member list is inaccessible")
    user = fake.users.get(user_id)
    if user is None:
        raise bad_request("user not found")
    status, is_member = channel.members.get(user_id, ("left", False))
    member: JSONDict = {"status": status, "user": user.to_api()}
    if status == "creator":
        member["is_anonymous"] = False
    elif status == "administrator":
        member.update(
            can_be_edited=False,
            is_anonymous=False,
            can_manage_chat=True,
            can_delete_messages=False,
            can_manage_video_chats=False,
            can_restrict_members=False,
            can_promote_members=False,
            can_change_info=False,
            can_invite_users=True,
            can_post_stories=False,
            can_edit_stories=False,
            can_delete_stories=False,
        )
    elif status == "restricted":
        member.update(
            is_member=is_member,
            until_date=0,
            can_send_messages=False,
            can_send_audios=False,
            can_send_documents=False,
            can_send_photos=False,
            can_send_videos=False,
            can_send_video_notes=False,
            can_send_voice_notes=False,
            can_send_polls=False,
            can_send_other_messages=False,
            can_add_web_page_previews=False,
            can_change_info=False,
            can_invite_users=False,
            can_pin_messages=False,
            can_manage_topics=False,
        )
    elif status == "kicked":
        member["until_date"] = 0
    return member
