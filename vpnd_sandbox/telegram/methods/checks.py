"""Checks of Bot API parameters shared by the methods, with Telegram's own error texts."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from vpnd_sandbox.telegram.formatting import (
    EntityParseError,
    ParsedText,
    parse_html,
    parse_markdown_v2,
    plain_text,
    utf16_len,
)
from vpnd_sandbox.telegram.limits import MAX_CAPTION
from vpnd_sandbox.telegram.records import ChatMessage, FakeUser
from vpnd_sandbox.telegram.wire import ApiError, JSONDict, Params, bad_request

if TYPE_CHECKING:
    from vpnd_sandbox.telegram.state import FakeTelegram

_INLINE_BUTTON_KINDS = (
    "url",
    "callback_data",
    "web_app",
    "login_url",
    "switch_inline_query",
    "switch_inline_query_current_chat",
    "switch_inline_query_chosen_chat",
    "copy_text",
    "callback_game",
    "pay",
)


def chat_of(fake: FakeTelegram, params: Params, name: str = "chat_id") -> FakeUser:
    raw = params.raw(name)
    if raw is None or raw == "":
        raise bad_request(f"{name} is empty")
    if isinstance(raw, str) and raw.startswith("@"):
        raise bad_request("chat not found")
    chat_id = params.get_int(name)
    user = fake.users.get(chat_id) if chat_id is not None else None
    if user is None or not user.started:
        raise bad_request("chat not found")
    if user.blocked:
        raise ApiError(403, "Forbidden: bot was blocked by the user")
    return user


def parse_text(text: str, parse_mode: str | None, entities: Any) -> ParsedText:
    if not parse_mode:
        if entities is not None and not isinstance(entities, list):
            raise bad_request("can't parse entities JSON object")
        return plain_text(text, entities)
    mode = parse_mode.lower()
    try:
        if mode == "html":
            return parse_html(text)
        if mode in ("markdownv2", "markdown"):
            return parse_markdown_v2(text)
    except EntityParseError as error:
        raise bad_request(f"can't parse entities: {error}") from None
    raise bad_request(f"unsupported parse_mode {parse_mode!r}")


def reply_markup(params: Params) -> JSONDict | None:
    """Validate ``reply_markup`` like Telegram; returns it (None when absent)."""
    markup = params.get_json("reply_markup", error="can't parse reply keyboard markup JSON object")
    if markup is None:
        return None
    if not isinstance(markup, dict):
        raise bad_request("can't parse reply keyboard markup JSON object")
    if "inline_keyboard" in markup:
        rows = markup["inline_keyboard"]
        if not isinstance(rows, list) or not all(isinstance(row, list) for row in rows):
            raise bad_request('can\'t parse inline keyboard button: Field "inline_keyboard" must be of type Array')
        if sum(len(row) for row in rows) > 100:
            raise bad_request("reply markup is too long")
        for row in rows:
            for button in row:
                check_inline_button(button)
        return markup
    if "keyboard" in markup or "remove_keyboard" in markup or "force_reply" in markup:
        return markup
    raise bad_request("can't parse reply keyboard markup JSON object")


def reply_target(fake: FakeTelegram, user: FakeUser, params: Params) -> ChatMessage | None:
    reply_parameters = params.get_json("reply_parameters")
    allow_missing = params.get_bool("allow_sending_without_reply")
    if isinstance(reply_parameters, dict):
        target_id = reply_parameters.get("message_id")
        allow_missing = bool(reply_parameters.get("allow_sending_without_reply", allow_missing))
    else:
        target_id = params.get_int("reply_to_message_id")
    if target_id is None:
        return None
    target = fake._find_message(user.id, target_id if isinstance(target_id, int) else None)
    if target is None and not allow_missing:
        raise bad_request("message to be replied not found")
    return target


def caption_of(params: Params) -> ParsedText | None:
    caption = params.get_str("caption")
    if not caption:
        return None
    parsed = parse_text(caption, params.get_str("parse_mode"), params.get_json("caption_entities"))
    if utf16_len(parsed.text) > MAX_CAPTION:
        raise bad_request("message caption is too long")
    return parsed


def check_inline_button(button: Any) -> None:
    if not isinstance(button, dict):
        raise bad_request("can't parse inline keyboard button: InlineKeyboardButton must be an Object")
    if not isinstance(button.get("text"), str):
        raise bad_request('can\'t parse inline keyboard button: Field "text" must be of type String')
    kinds = [kind for kind in _INLINE_BUTTON_KINDS if kind in button]
    if not kinds:
        raise bad_request("can't parse inline keyboard button: Text buttons are unallowed in the inline keyboard")
    if "callback_data" in button:
        data = button["callback_data"]
        if not isinstance(data, str) or not 1 <= len(data.encode("utf-8")) <= 64:
            raise bad_request("BUTTON_DATA_INVALID")
    if "url" in button:
        url = button["url"]
        if not isinstance(url, str) or not re.match(r"(https?|tg)://[^\s]+$", url):
            raise bad_request(f"inline keyboard button URL {url!r} is invalid: Unsupported URL protocol")
