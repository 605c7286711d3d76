"""The Bot API methods the fake knows, by family; anything else is answered 404 as on Telegram."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vpnd_sandbox.telegram.methods import bot, messages, payments
from vpnd_sandbox.telegram.wire import Params

if TYPE_CHECKING:
    from vpnd_sandbox.telegram.state import FakeTelegram

Method = Callable[[Params], Any]

#: Bot API method name → the function that runs it on a fake.
METHODS: dict[str, Callable[..., Any]] = {
    "getMe": bot.get_me,
    "getUpdates": bot.get_updates,
    "setWebhook": bot.set_webhook,
    "deleteWebhook": bot.delete_webhook,
    "getWebhookInfo": bot.get_webhook_info,
    "setMyCommands": bot.set_my_commands,
    "getMyCommands": bot.get_my_commands,
    "deleteMyCommands": bot.delete_my_commands,
    "setMyDescription": bot.accept_bot_text,
    "setMyShortDescription": bot.accept_bot_text,
    "getChat": bot.get_chat,
    "getChatMember": bot.get_chat_member,
    "sendChatAction": bot.send_chat_action,
    "sendMessage": messages.send_message,
    "editMessageText": messages.edit_message_text,
    "editMessageCaption": messages.edit_message_caption,
    "editMessageReplyMarkup": messages.edit_message_reply_markup,
    "deleteMessage": messages.delete_message,
    "answerCallbackQuery": messages.answer_callback_query,
    "sendPhoto": messages.send_photo,
    "sendDocument": messages.send_document,
    "sendVideo": messages.send_video,
    "sendAnimation": messages.send_animation,
    "getFile": messages.get_file,
    "sendInvoice": payments.send_invoice,
    "answerPreCheckoutQuery": payments.answer_pre_checkout_query,
    "refundStarPayment": payments.refund_star_payment,
}


def bot_methods(fake: FakeTelegram) -> dict[str, tuple[str, Method]]:
    """Lower-case method name → (canonical name, the method bound to `fake`): Telegram's names are
    case-insensitive."""
    return {name.lower(): (name, functools.partial(run, fake)) for name, run in METHODS.items()}
