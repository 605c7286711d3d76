"""From a raw update to a flow: parse, upsert the user, route by command, state or button.

`Routes` is the routing table: callback verbs, commands, conversation states, and hooks for updates
that are not from a person's message or button (pre-checkout queries, payments). Each flow module
adds its entries with a `register(routes)` function; `default_routes()` registers them all.
`make_update_handler(ctx, routes)` returns the function the dispatcher calls for each update (inside
the update limiter and the error boundary); `make_apology(ctx)` what the boundary calls when a
handler failed: a polite, localized "something went wrong" in the user's chat.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import attrs
import psycopg
import telegram

from vpnd.db import conversation, maintenance, subscriptions, terms, users
from vpnd.telegram import incoming as incoming_mod
from vpnd.telegram import keyboards as kb
from vpnd.telegram.dispatch import Apology, DropNotice, Handler, Payload, chat_key
from vpnd.telegram.flows import access, devices, menu
from vpnd.telegram.flows import maintenance as maintenance_flow
from vpnd.telegram.flows import terms as terms_flow
from vpnd.telegram.turn import BotContext, Turn

log = logging.getLogger("vpnd.updates")

#: A button press: handler(turn, args) for callback data "verb:arg1:arg2".
CallbackRoute = Callable[[Turn, list[str]], Awaitable[None]]
#: A command: handler(turn, argument) for "/command argument".
CommandRoute = Callable[[Turn, str], Awaitable[None]]
#: Text while in a conversation state: handler(turn, text).
StateRoute = Callable[[Turn, str], Awaitable[None]]
#: An update that is not a person's message/button (e.g. pre_checkout_query): return True if handled.
UpdateHook = Callable[[BotContext, int, telegram.Update], Awaitable[bool]]
#: A message carrying something other than text (e.g. successful_payment): return True if handled.
MessageHook = Callable[[Turn, telegram.Message], Awaitable[bool]]


@attrs.define(eq=False)
class Routes:
    callbacks: dict[str, CallbackRoute] = attrs.field(factory=dict)
    commands: dict[str, CommandRoute] = attrs.field(factory=dict)
    states: dict[str, StateRoute] = attrs.field(factory=dict)
    update_hooks: list[UpdateHook] = attrs.field(factory=list)
    message_hooks: list[MessageHook] = attrs.field(factory=list)
    #: Commands not shown in the menu and answered only for some users (e.g. /admin) say so here.
    hidden_commands: set[str] = attrs.field(factory=set)


def register(routes: Routes) -> None:
    """The core flows: menu, language, trial, subscription, invite, help."""

    async def menu_route(turn: Turn, args: list[str]) -> None:
        await menu.show_menu(turn)

    async def lang(turn: Turn, args: list[str]) -> None:
        if args:
            await menu.set_language(turn, args[0])
        else:
            await menu.choose_language(turn)

    async def auto_renew(turn: Turn, args: list[str]) -> None:
        await access.set_auto_renew(turn, args[:1] == ["on"])

    def no_args(flow: Callable[[Turn], Awaitable[None]]) -> CallbackRoute:
        async def route(turn: Turn, args: list[str]) -> None:
            await flow(turn)

        return route

    routes.callbacks.update(
        {
            "menu": menu_route,
            "sub": no_args(access.my_subscription),
            "trial": no_args(access.trial),
            "qr": no_args(access.send_qr),
            "reissue": no_args(access.reissue),
            "ar": auto_renew,
            "card": no_args(access.remove_saved_card),
            "dev": devices.route,
            "lang": lang,
            "invite": no_args(menu.invite),
            "help": no_args(menu.help_text),
        }
    )

    async def start(turn: Turn, argument: str) -> None:
        await menu.start(turn, argument, turn.user_created)

    def via_callback(verb: str) -> CommandRoute:
        async def route(turn: Turn, argument: str) -> None:
            await routes.callbacks[verb](turn, [])

        return route

    routes.commands["start"] = start
    for command, verb in {
        "menu": "menu",
        "help": "help",
        "language": "lang",
        "subscription": "sub",
        "trial": "trial",
        "invite": "invite",
    }.items():
        routes.commands[command] = via_callback(verb)


def default_routes() -> Routes:
    """Every flow vpnd has, registered in one table."""
    from vpnd.telegram.flows import referral, register_all

    routes = Routes()
    register(routes)
    register_all(routes)
    referral.register(routes)  # invite friends: levels, earnings, withdrawals
    terms_flow.register(routes)
    maintenance_flow.register(routes)  # last: it pauses purchase routes registered above
    return routes


def make_update_handler(ctx: BotContext, routes: Routes) -> Handler:
    async def handle(update_id: int, payload: Payload) -> None:
        incoming = incoming_mod.plain(payload)
        update: telegram.Update | None = None
        if incoming is None:  # not plain text or a button press: PTB parses it (and may refuse it)
            update = telegram.Update.de_json(payload, ctx.bot)
            if update.my_chat_member is not None:
                await _membership(ctx, update.my_chat_member)
                return
            for hook in routes.update_hooks:
                if await hook(ctx, update_id, update):
                    return
            incoming = _from_update(update)
            if incoming is None:
                return
        sender = incoming.sender
        if sender.is_bot or incoming.chat_type != "private":
            return  # vpnd talks to people in private chats only
        language = ctx.texts.language(sender.language_code, ctx.app.config.telegram.default_language)
        text = incoming.text
        command = _command_name(text) if text is not None else None
        plain_text = text is not None and command is None and bool(text.strip())
        terms_config = ctx.app.config.terms
        start = await ctx.app.db.run(
            begin_turn,
            sender.id,
            sender.username,
            sender.first_name or "",
            language,
            clear_state=command is not None and command in routes.commands,
            read_state=plain_text,
            terms_version=terms_config.version if terms_config.enabled else None,
        )
        user = start.result.user
        if user.banned_at is not None:  # banned by an admin: nothing from the bot (a press is acked, silently)
            log.info("event=banned_update update_id=%d user_id=%d", update_id, user.id)
            if incoming.press is not None:
                await ctx.sender.answer_callback(incoming.chat_id, incoming.press.id)
            return
        turn = Turn(ctx, update_id, payload, user, user.language, incoming.chat_id, parsed=update)
        turn.user_created = start.result.created
        turn.menu_facts = start.menu_facts
        turn.state = start.state
        turn.maintenance, turn.terms = start.maintenance, start.terms
        if incoming.press is not None:
            turn.callback = incoming.press
            try:
                if not await terms_flow.holds_press(turn, incoming.press.data):  # the terms come first
                    await _route_callback(turn, routes, incoming.press.data)
            finally:
                await turn.answer()
            return
        if update is not None and update.message is not None:  # a message with more than text
            for message_hook in routes.message_hooks:
                if await message_hook(turn, update.message):
                    return  # payments before the terms: money that arrived is never held back
        if await terms_flow.holds_message(turn, text or ""):
            return
        await _route_message(turn, routes, text or "")

    return handle


def _from_update(update: telegram.Update) -> incoming_mod.Incoming | None:
    """What routing needs, from a parsed update that was not plain text or a press."""
    sender, chat = update.effective_user, update.effective_chat
    if sender is None:
        return None
    person = incoming_mod.Person(
        sender.id, sender.is_bot, sender.first_name or "", sender.username, sender.language_code
    )
    chat_id, chat_type = (chat.id, chat.type) if chat is not None else (sender.id, "private")
    if update.callback_query is not None:
        return incoming_mod.Incoming(person, chat_id, chat_type, None, incoming_mod.from_ptb(update.callback_query))
    if update.message is not None:
        return incoming_mod.Incoming(person, chat_id, chat_type, update.message.text, None)
    return None


def _command_name(text: str) -> str | None:
    """ "start" for "/start@vpnd_bot ref_x"; None when the message is not a command."""
    text = text.strip()
    if not text.startswith("/"):
        return None
    return text.partition(" ")[0][1:].split("@", 1)[0].lower()


@attrs.frozen
class TurnStart:
    result: users.UpsertResult
    menu_facts: subscriptions.MenuFacts
    state: conversation.State | None
    maintenance: maintenance.Maintenance
    terms: terms.TermsStatus | None


def begin_turn(
    conn: psycopg.Connection[tuple[object, ...]],
    user_id: int,
    username: str | None,
    first_name: str,
    language: str,
    *,
    clear_state: bool,
    read_state: bool,
    terms_version: str | None = None,
) -> TurnStart:
    """The start of a person's turn, one transaction: upsert them; a known command also ends any
    conversation state (a command always starts over). It also reads what most turns need next — the
    menu facts, the conversation state for plain text, maintenance mode and (when `terms_version` is
    given) the user's acceptance of the terms — so a typical update makes one transaction."""
    result = users.upsert_user(conn, user_id, username, first_name, language)
    if clear_state:
        conversation.clear_state(conn, user_id)
    state = conversation.get_state(conn, user_id) if read_state else None
    accepted = terms.status(conn, user_id, terms_version) if terms_version is not None else None
    return TurnStart(result, subscriptions.menu_facts(conn, user_id), state, maintenance.read(conn), accepted)


async def _membership(ctx: BotContext, member: telegram.ChatMemberUpdated) -> None:
    """Blocked → unreachable (no more messages); unblocked → reachable again."""
    status = member.new_chat_member.status
    if status in ("kicked", "left"):
        await ctx.app.db.run(users.mark_unreachable, member.chat.id)
    elif status == "member":
        await ctx.app.db.run(users.mark_reachable, member.chat.id)


async def _route_message(turn: Turn, routes: Routes, text: str) -> None:
    text = text.strip()
    if text.startswith("/"):
        command, _, argument = text.partition(" ")
        name = command[1:].split("@", 1)[0].lower()
        route = routes.commands.get(name)
        if route is not None:  # its conversation state was cleared in begin_turn
            await route(turn, argument.strip())
            return
        await menu.show_menu(turn, turn.t("common.unknown"))
        return
    state = turn.state
    if state is not None and text:
        state_route = routes.states.get(state.name)
        if state_route is not None:
            await state_route(turn, text)
            return
    await menu.show_menu(turn, turn.t("common.unknown"))


async def _route_callback(turn: Turn, routes: Routes, data: str) -> None:
    verb, args = kb.parse_callback(data)
    route = routes.callbacks.get(verb)
    if route is None:
        log.info("event=unknown_callback update_id=%d data_hex=%s", turn.update_id, data[:64].encode().hex())
        await menu.show_menu(turn)
        return
    await route(turn, args)


def _sender_language(ctx: BotContext, payload: Payload) -> str:
    body = payload.get("message") or payload.get("callback_query") or {}
    sender = body.get("from") if isinstance(body, dict) else None
    code = sender.get("language_code") if isinstance(sender, dict) else None
    return ctx.texts.language(code if isinstance(code, str) else None, ctx.app.config.telegram.default_language)


def make_apology(ctx: BotContext) -> Apology:
    async def apologize(payload: Payload) -> None:
        chat_id = chat_key(payload)
        if chat_id is None or chat_id < 0:
            return
        lang = _sender_language(ctx, payload)
        query = payload.get("callback_query")
        if isinstance(query, dict) and isinstance(query.get("id"), str):
            await ctx.sender.answer_callback(chat_id, query["id"])
        await ctx.sender.send_message(chat_id, ctx.texts.get(lang, "common.error"))

    return apologize


def make_drop_notice(ctx: BotContext) -> DropNotice:
    """What a flooding user sees for an update dropped on purpose: the button press is answered with a
    short "please wait" (so the client stops spinning; also when it was coalesced with the same press
    still waiting), and, when the chat's backlog overflowed, at most once a minute a "slow down" message."""

    async def notify(outcome: str, payload: Payload, notice_due: bool) -> None:
        chat_id = chat_key(payload)
        if chat_id is None or chat_id < 0:
            return
        lang = _sender_language(ctx, payload)
        query = payload.get("callback_query")
        if isinstance(query, dict) and isinstance(query.get("id"), str):
            await ctx.sender.answer_callback(chat_id, query["id"], ctx.texts.get(lang, "common.slow_down_toast"))
        if notice_due:
            await ctx.sender.send_message(chat_id, ctx.texts.get(lang, "common.slow_down"))

    return notify
