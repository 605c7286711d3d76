"""A broadcast's message as Telegram gets it: text or media with a caption, and its buttons. Shared by
the broadcasts nursery (every recipient) and the admin's preview and test send (the same message)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import telegram

from vpnd.telegram.client import Sender, SentMessage
from vpnd.telegram.ratelimit import Priority


def markup_of(
    button_text: str | None, button_url: str | None, buttons: list[dict[str, str]]
) -> telegram.InlineKeyboardMarkup | None:
    """The broadcast's keyboard: the old single URL button, then one row per button (URL, or a plan's buy
    screen: the shop's own `plan:<code>` callback)."""
    rows: list[list[telegram.InlineKeyboardButton]] = []
    if button_text and button_url:
        rows.append([telegram.InlineKeyboardButton(button_text, url=button_url)])
    for b in buttons:
        if "plan" in b:
            rows.append([telegram.InlineKeyboardButton(b["text"], callback_data=f"plan:{b['plan']}")])
        else:
            rows.append([telegram.InlineKeyboardButton(b["text"], url=b["url"])])
    return telegram.InlineKeyboardMarkup(rows) if rows else None


async def send_content(
    sender: Sender,
    chat_id: int,
    text: str,
    markup: Any,
    *,
    media_kind: str | None = None,
    media_file_id: str | None = None,
    priority: Priority = Priority.REPLY,
    paid: bool = False,
    before_send: Callable[[], Awaitable[None]] | None = None,
) -> SentMessage:
    """One broadcast message: the media (by file_id) with `text` as its HTML caption, or `text` alone
    (`before_send`: see `Sender.call`)."""
    if media_kind and media_file_id:
        return await sender.send_media(
            chat_id,
            media_kind,
            media_file_id,
            text,
            priority=priority,
            paid=paid,
            before_send=before_send,
            reply_markup=markup,
        )
    return await sender.send_message(
        chat_id, text, priority=priority, paid=paid, before_send=before_send, reply_markup=markup
    )
