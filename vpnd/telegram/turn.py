"""What a handler works with: the shared bot context and one update's "turn".

`BotContext` is built once (app, bot, sender, texts). A `Turn` is one update from one user: their
row, their language, and reply helpers that go through the shared outbound limiter with reply
priority. A button press edits the message it was on (no chat spam); everything else replies.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import attrs
import telegram

from vpnd.app import App
from vpnd.cryptopay import CryptoPayClient
from vpnd.db.conversation import State
from vpnd.db.maintenance import OFF, Maintenance
from vpnd.db.pool import calls_in_update
from vpnd.db.subscriptions import MenuFacts
from vpnd.db.terms import TermsStatus
from vpnd.db.users import User
from vpnd.payments.checkout import HostedCheckout
from vpnd.telegram.client import Sender, SentMessage, TrioBot
from vpnd.telegram.incoming import ButtonPress
from vpnd.telegram.keyboards import Keyboard
from vpnd.telegram.membership import MembershipCache
from vpnd.texts import Texts

#: Menus carry links (subscription URLs, invites) that should not unfold into previews.
NO_PREVIEW = {"is_disabled": True}


@attrs.define(eq=False)
class BotContext:
    app: App
    bot: TrioBot
    sender: Sender
    texts: Texts
    #: The Crypto Pay client when `[cryptopay] enabled`, else None (the method is not offered).
    cryptopay: CryptoPayClient | None = None
    #: The hosted checkout (YooKassa) when `[yookassa] enabled`, else None (its methods are not offered).
    checkout: HostedCheckout | None = None
    #: Users recently confirmed as members of `[trial] required_channel`.
    membership: MembershipCache = attrs.field(factory=MembershipCache)

    @property
    def bot_username(self) -> str:
        """The bot's @username from getMe at start (links such as t.me/<bot>?start=ref_...): `App.bot_username`."""
        return self.app.bot_username


@attrs.define(eq=False)
class Turn:
    ctx: BotContext
    update_id: int
    #: The update's Bot API JSON; `update` is the parsed object, built on first use.
    payload: dict[str, Any]
    user: User
    lang: str
    chat_id: int
    parsed: telegram.Update | None = None
    callback: ButtonPress | None = None
    answered: bool = False
    #: True when this update created the user's row (their first contact).
    user_created: bool = False
    #: The menu facts read with the user's row at the start of the turn (see `prefetched_menu_facts`).
    menu_facts: MenuFacts | None = None
    #: The conversation state read at the start of the turn, when the update is plain text.
    state: State | None = None
    #: Maintenance mode as read at the start of the turn (`flows.maintenance`).
    maintenance: Maintenance = OFF
    #: The user's acceptance of the current terms when `[terms]` is enabled, else None (`flows.terms`).
    terms: TermsStatus | None = None

    @property
    def update(self) -> telegram.Update:
        if self.parsed is None:
            self.parsed = telegram.Update.de_json(self.payload, self.ctx.bot)
        return self.parsed

    def prefetched_menu_facts(self) -> MenuFacts | None:
        """The menu facts read at the start of the turn, if this handler has written nothing since (its
        only database call so far was that first one); None means: read them again."""
        return self.menu_facts if calls_in_update() == 1 else None

    @property
    def app(self) -> App:
        return self.ctx.app

    def t(self, key: str, **values: object) -> str:
        return self.ctx.texts.get(self.lang, key, **values)

    async def reply(self, text: str, keyboard: Keyboard | None = None, **kwargs: Any) -> SentMessage:
        return await self.ctx.sender.send_message(self.chat_id, text, reply_markup=keyboard, **kwargs)

    async def show(self, text: str, keyboard: Keyboard | None = None) -> None:
        """Edit the message the pressed button was on, or send a new one.

        A message that is gone or too old to edit (Telegram refuses edits after 48 hours) gets the
        answer as a new message: the user pressed a button and expects to see something.
        """
        message = self.callback.message if self.callback else None
        if message is not None and message.has_text:
            try:
                await self.ctx.sender.edit_text(
                    self.chat_id,
                    message.message_id,
                    text,
                    reply_markup=keyboard,
                    link_preview_options=NO_PREVIEW,
                )
                return
            except telegram.error.BadRequest as exc:
                if not _uneditable(exc):
                    raise
        await self.reply(text, keyboard, link_preview_options=NO_PREVIEW)

    async def answer(self, text: str | None = None, *, alert: bool = False) -> None:
        """Answer the callback query (every callback query is answered, once)."""
        if self.callback is not None and not self.answered:
            self.answered = True
            await self.ctx.sender.answer_callback(self.chat_id, self.callback.id, text, alert)

    def format_date(self, when: dt.datetime) -> str:
        return when.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _uneditable(error: telegram.error.BadRequest) -> bool:
    """Telegram's answer to an edit of a message that was deleted or is too old to edit."""
    message = str(error).lower()
    return "message to edit not found" in message or "message can't be edited" in message
