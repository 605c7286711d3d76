"""What the router needs from an update, read straight from its JSON.

Building python-telegram-bot's object tree for every update (`telegram.Update.de_json`) was an
eighth of the CPU an update cost, and routing needs five fields of it. `plain(payload)` reads them
for the two updates people send all the time — a text message and a button press — and checks their
types on the way; anything else (payments, membership changes, media, a field of the wrong type) is
`None`, and the router parses it with PTB as before (a malformed update then fails there, inside the
error boundary). A flow that wants the full object still has it: `Turn.update` parses on first use.
"""

from __future__ import annotations

from typing import Any

import attrs
import telegram

#: The keys of a message that carries text and nothing else.
_TEXT_MESSAGE_KEYS = frozenset(
    {"message_id", "from", "chat", "date", "text", "entities", "link_preview_options", "message_thread_id"}
)


@attrs.frozen
class Person:
    id: int
    is_bot: bool
    first_name: str
    username: str | None
    language_code: str | None


@attrs.frozen
class PressedOn:
    """The message a pressed button was on."""

    message_id: int
    has_text: bool


@attrs.frozen
class ButtonPress:
    id: str
    data: str
    message: PressedOn | None


@attrs.frozen
class Incoming:
    sender: Person
    chat_id: int
    chat_type: str
    #: The message's text (None for a button press).
    text: str | None
    press: ButtonPress | None


def plain(payload: dict[str, Any]) -> Incoming | None:
    """A text message or a button press with every field the router reads well-typed, else None."""
    if len(payload) != 2:
        return None
    message = payload.get("message")
    if isinstance(message, dict):
        if not message.keys() <= _TEXT_MESSAGE_KEYS or not isinstance(message.get("text"), str):
            return None
        sender, chat = _person(message.get("from")), message.get("chat")
        if sender is None or not isinstance(chat, dict):
            return None
        chat_id, chat_type = chat.get("id"), chat.get("type")
        if not _is_int(chat_id) or not isinstance(chat_type, str) or not _is_int(message.get("message_id")):
            return None
        return Incoming(sender, chat["id"], chat_type, message["text"], None)
    query = payload.get("callback_query")
    if isinstance(query, dict):
        sender = _person(query.get("from"))
        query_id, data, on = query.get("id"), query.get("data"), query.get("message")
        if sender is None or not isinstance(query_id, str) or not isinstance(data, str):
            return None
        pressed_on = None
        if on is not None:
            if not isinstance(on, dict) or not _is_int(on.get("message_id")):
                return None
            chat = on.get("chat")
            if not isinstance(chat, dict) or not _is_int(chat.get("id")) or not isinstance(chat.get("type"), str):
                return None
            text = on.get("text")
            if text is not None and not isinstance(text, str):
                return None
            pressed_on = PressedOn(on["message_id"], text is not None)
            return Incoming(sender, chat["id"], chat["type"], None, ButtonPress(query_id, data, pressed_on))
        return Incoming(sender, sender.id, "private", None, ButtonPress(query_id, data, None))
    return None


def from_ptb(query: telegram.CallbackQuery) -> ButtonPress:
    """The same press, from a parsed update."""
    message = query.message
    on = None
    if message is not None:
        has_text = isinstance(message, telegram.Message) and message.text is not None
        on = PressedOn(message.message_id, has_text)
    return ButtonPress(query.id, query.data or "", on)


def _person(value: object) -> Person | None:
    if not isinstance(value, dict):
        return None
    user_id, is_bot, first_name = value.get("id"), value.get("is_bot"), value.get("first_name")
    username, language = value.get("username"), value.get("language_code")
    if not _is_int(user_id) or not isinstance(is_bot, bool) or not isinstance(first_name, str):
        return None
    if (username is not None and not isinstance(username, str)) or (
        language is not None and not isinstance(language, str)
    ):
        return None
    return Person(value["id"], is_bot, first_name, username, language)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
