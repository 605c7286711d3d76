"""From a raw update to a flow: parse, upsert the user, route by command, state or button.

`make_update_handler(ctx)` returns the function the dispatcher calls for each update (inside the
update limiter and the error boundary). `make_apology(ctx)` returns what the boundary calls when a
handler failed: a polite, localized "something went wrong" in the user's chat.
"""

from __future__ import annotations

import logging
from typing import Any

import telegram

from vpnd.db import conversation, users
from vpnd.telegram import keyboards as kb
from vpnd.telegram.dispatch import Apology, Handler, Payload, chat_key
from vpnd.telegram.flows import access, menu
from vpnd.telegram.turn import BotContext, Turn

log = logging.getLogger("vpnd.updates")

#: Extra flows register here: verb -> handler(turn, args). Payments and admin add theirs.
CallbackRoute = Any


def make_update_handler(
    ctx: BotContext, extra_callbacks: dict[str, CallbackRoute] | None = None, extra_updates: Any = None
) -> Handler:
    callbacks: dict[str, CallbackRoute] = {**CALLBACKS, **(extra_callbacks or {})}

    async def handle(update_id: int, payload: Payload) -> None:
        update = telegram.Update.de_json(payload, ctx.bot)
        if update.my_chat_member is not None:
            await _membership(ctx, update.my_chat_member)
            return
        if extra_updates is not None and await extra_updates(ctx, update_id, update):
            return
        sender = update.effective_user
        chat = update.effective_chat
        if sender is None or sender.is_bot or (chat is not None and chat.type != "private"):
            return  # vpnd talks to people in private chats only
        language = ctx.texts.language(sender.language_code, ctx.app.config.telegram.default_language)
        result = await ctx.app.db.run(users.upsert_user, sender.id, sender.username, sender.first_name or "", language)
        user = result.user
        turn = Turn(ctx, update_id, update, user, user.language, chat.id if chat else sender.id)
        if update.callback_query is not None:
            turn.callback = update.callback_query
            try:
                await _route_callback(turn, callbacks, update.callback_query.data or "")
            finally:
                await turn.answer()
        elif update.message is not None:
            await _route_message(turn, update.message, result.created)

    return handle


async def _membership(ctx: BotContext, member: telegram.ChatMemberUpdated) -> None:
    """Blocked → unreachable (no more messages); unblocked → reachable again."""
    status = member.new_chat_member.status
    if status in ("kicked", "left"):
        await ctx.app.db.run(users.mark_unreachable, member.chat.id)
    elif status == "member":
        await ctx.app.db.run(
            lambda conn: conn.execute("UPDATE users SET reachable = true WHERE id = %s", (member.chat.id,))
        )


async def _route_message(turn: Turn, message: telegram.Message, created: bool) -> None:
    text = (message.text or "").strip()
    if text.startswith("/"):
        command, _, argument = text.partition(" ")
        command = command[1:].split("@", 1)[0].lower()
        await turn.app.db.run(conversation.clear_state, turn.user.id)
        if command == "start":
            await menu.start(turn, argument.strip(), created)
        elif command in ("menu", "help", "language", "subscription", "buy", "trial", "promo", "invite"):
            await _route_callback(turn, CALLBACKS, {"subscription": "sub", "language": "lang"}.get(command, command))
        else:
            await menu.show_menu(turn, turn.t("common.unknown"))
        return
    state = await turn.app.db.run(conversation.get_state, turn.user.id)
    if state is not None and text:
        handler = STATES.get(state.name)
        if handler is not None:
            await handler(turn, text)
            return
    await menu.show_menu(turn, turn.t("common.unknown"))


async def _route_callback(turn: Turn, callbacks: dict[str, CallbackRoute], data: str) -> None:
    verb, args = kb.parse_callback(data)
    route = callbacks.get(verb)
    if route is None:
        log.info("event=unknown_callback update_id=%d data=%s", turn.update_id, data[:64].encode().hex())
        await menu.show_menu(turn)
        return
    await route(turn, args)


async def _lang(turn: Turn, args: list[str]) -> None:
    if args:
        await menu.set_language(turn, args[0])
    else:
        await menu.choose_language(turn)


async def _auto_renew(turn: Turn, args: list[str]) -> None:
    await access.set_auto_renew(turn, args[:1] == ["on"])


CALLBACKS: dict[str, CallbackRoute] = {
    "menu": lambda turn, args: menu.show_menu(turn),
    "sub": lambda turn, args: access.my_subscription(turn),
    "trial": lambda turn, args: access.trial(turn),
    "qr": lambda turn, args: access.send_qr(turn),
    "reissue": lambda turn, args: access.reissue(turn),
    "ar": _auto_renew,
    "lang": _lang,
    "invite": lambda turn, args: menu.invite(turn),
    "help": lambda turn, args: menu.help_text(turn),
}

#: Conversation states -> handler(turn, text). The promo flow adds "promo".
STATES: dict[str, Any] = {}


def make_apology(ctx: BotContext) -> Apology:
    async def apologize(payload: Payload) -> None:
        chat_id = chat_key(payload)
        if chat_id is None or chat_id < 0:
            return
        body = payload.get("message") or payload.get("callback_query") or {}
        sender = body.get("from") if isinstance(body, dict) else None
        code = sender.get("language_code") if isinstance(sender, dict) else None
        lang = ctx.texts.language(code if isinstance(code, str) else None, ctx.app.config.telegram.default_language)
        query = payload.get("callback_query")
        if isinstance(query, dict) and isinstance(query.get("id"), str):
            await ctx.sender.answer_callback(chat_id, query["id"])
        await ctx.sender.send_message(chat_id, ctx.texts.get(lang, "common.error"))

    return apologize
