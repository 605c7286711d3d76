"""Support: the operator's contact, and (with `[support] relay_chat`) tickets relayed to the admins.

"Write to support" puts the user in the durable "support" state; their next *text* message (photos and
other media are not relayed — a text is enough to start a conversation, and the admin can ask for more)
is stored and copied to the relay chat through the outbox (`vpnd.db.support.submit`), at most
`[support] messages_per_hour` per user. An admin answers by replying to the copy in the relay chat: the
reply is stored and queued to the user (`answer_hook`). Only a reply *in the relay chat* counts — in a
group relay chat only from `[telegram] admin_ids` — so nobody else can write to a user in the operator's
name, and a reply to anything but a relayed ticket is left to the usual routing.
"""

from __future__ import annotations

import html
import logging
import math
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import telegram

from vpnd.db import conversation
from vpnd.db import support as support_db
from vpnd.support_text import contact_url, fit_html
from vpnd.telegram import keyboards as kb
from vpnd.telegram.turn import BotContext, Turn
from vpnd.texts import Html, Texts

if TYPE_CHECKING:
    from vpnd.telegram.router import Routes

log = logging.getLogger("vpnd.telegram.support")

STATE = "support"
STATE_TTL_SECONDS = 900


def _relay_on(turn: Turn) -> bool:
    return turn.app.config.support.relay_chat != 0


async def show(turn: Turn) -> None:
    contact = turn.app.config.telegram.support_contact
    url = contact_url(contact)
    rows = []
    if url is not None:
        rows.append([kb.url_button(turn.t("support.contact_button"), url)])
    if _relay_on(turn):
        rows.append([kb.button(turn.t("support.write_button"), "support:write")])
    rows.append([kb.button(turn.t("common.menu"), "menu")])
    await turn.show(turn.t("support.text", contact=contact), kb.keyboard(*rows))


async def ask(turn: Turn) -> None:
    if not _relay_on(turn):
        await show(turn)
        return
    await turn.app.db.run(conversation.set_state, turn.user.id, STATE, STATE_TTL_SECONDS)
    await turn.show(turn.t("support.ask"), kb.keyboard([kb.button(turn.t("support.cancel"), "support:cancel")]))


async def cancel(turn: Turn) -> None:
    from vpnd.telegram.flows.menu import show_menu

    await turn.app.db.run(conversation.clear_state, turn.user.id)
    await show_menu(turn, turn.t("support.cancelled"))


def relay_text(
    texts: Texts, lang: str, user_id: int, first_name: str, username: str | None, body: str
) -> Callable[[int], str]:
    """The copy in the relay chat: who wrote (a link to their profile), their id, and their text (escaped)."""

    def render(ticket_id: int, escaped: str) -> str:
        return texts.get(
            lang,
            "support.relay",
            ref=ticket_id,
            name=Html(f'<a href="tg://user?id={user_id}">{html.escape(first_name or str(user_id))}</a>'),
            username=f"@{username}" if username else "—",
            user_id=user_id,
            text=Html(escaped),
        )

    return lambda ticket_id: fit_html(partial(render, ticket_id), body, texts.get(lang, "support.truncated"))


async def receive(turn: Turn, text: str) -> None:
    config = turn.app.config
    relay_chat = config.support.relay_chat
    if relay_chat == 0:  # the relay was switched off while they were writing
        await turn.app.db.run(conversation.clear_state, turn.user.id)
        await show(turn)
        return
    render = relay_text(
        turn.ctx.texts, config.telegram.default_language, turn.user.id, turn.user.first_name, turn.user.username, text
    )
    outcome = await turn.app.db.run(
        support_db.submit,
        turn.user.id,
        text,
        relay_chat=relay_chat,
        per_hour=config.support.messages_per_hour,
        relay_text=render,
    )
    if outcome.ticket_id is None:
        minutes = max(1, math.ceil(outcome.retry_after_seconds / 60))
        await turn.reply(
            turn.t("support.rate_limited", limit=config.support.messages_per_hour, minutes=minutes),
            kb.back_to_menu(turn.t),
        )
        return
    log.info("event=support_message user_id=%d ticket=%d", turn.user.id, outcome.ticket_id)
    await turn.reply(turn.t("support.sent", ref=outcome.ticket_id), kb.back_to_menu(turn.t))


def _answer_text(texts: Texts, body: str, lang: str, ticket_id: int) -> str:
    def render(escaped: str) -> str:
        return texts.get(lang, "support.reply", ref=ticket_id, text=Html(escaped))

    return fit_html(render, body, texts.get(lang, "support.truncated"))


async def answer_hook(ctx: BotContext, update_id: int, update: telegram.Update) -> bool:
    """An admin's reply to a relayed ticket in the relay chat → sent to the ticket's user. Anything else
    (another chat, a reply to a message that is not a ticket, a command) is not handled here."""
    relay_chat = ctx.app.config.support.relay_chat
    message = update.message
    if relay_chat == 0 or message is None or message.reply_to_message is None or message.chat.id != relay_chat:
        return False
    sender = message.from_user
    if sender is None or sender.is_bot:
        return False
    if relay_chat < 0 and sender.id not in ctx.app.config.telegram.admin_ids:
        return False  # a group relay chat: only the configured admins answer in the operator's name
    text = message.text
    if text is not None and text.startswith("/"):
        return False
    lang = ctx.app.config.telegram.default_language
    if not text or not text.strip():
        replied = message.reply_to_message
        is_ticket = await ctx.app.db.run(support_db.answer_target, relay_chat, replied.message_id)
        if is_ticket:
            await ctx.sender.send_message(relay_chat, ctx.texts.get(lang, "support.reply_text_only"))
        return is_ticket
    answered = await ctx.app.db.run(
        support_db.answer,
        relay_chat,
        message.reply_to_message.message_id,
        message.message_id,
        sender.id,
        text,
        partial(_answer_text, ctx.texts, text),
        lambda ticket_id: ctx.texts.get(lang, "support.reply_sent", ref=ticket_id),
    )
    if answered is None:
        return False
    if answered.queued:
        log.info("event=support_answer ticket=%d admin_id=%d", answered.ticket_id, sender.id)
    return True


async def media_while_writing(turn: Turn, message: telegram.Message) -> bool:
    """A photo, file or sticker while "writing to support": only text is relayed, so say so again (and
    stay in the state) instead of the menu's "I did not understand"."""
    if message.text is not None or message.successful_payment is not None:
        return False
    state = await turn.app.db.run(conversation.get_state, turn.user.id)
    if state is None or state.name != STATE:
        return False
    await turn.reply(turn.t("support.ask"), kb.keyboard([kb.button(turn.t("support.cancel"), "support:cancel")]))
    return True


def register(routes: Routes) -> None:
    async def support_route(turn: Turn, args: list[str]) -> None:
        if args == ["write"]:
            await ask(turn)
        elif args == ["cancel"]:
            await cancel(turn)
        else:
            await show(turn)

    routes.callbacks["support"] = support_route
    routes.states[STATE] = receive
    routes.update_hooks.append(answer_hook)
    routes.message_hooks.append(media_while_writing)
