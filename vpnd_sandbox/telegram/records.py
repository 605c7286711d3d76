"""Fake Telegram's records: users, messages, files' metadata, queries, payments, notices, requests.

Plain attrs classes with the Bot API shapes they render to (``to_api``); the behaviour lives in
:mod:`vpnd_sandbox.telegram.state` and the method modules.
"""

from __future__ import annotations

from typing import Literal

import attrs

from vpnd_sandbox.telegram.wire import JSONDict


class SandboxError(ValueError):
    """A simulated *user* action that Telegram's client would not allow (unknown user, no such button…)."""


@attrs.define(eq=False)
class FakeUser:
    """A Telegram user. Their private chat with the bot has ``chat_id == id``.

    ``started`` becomes true with the user's first message: before that the bot gets "chat not found".
    """

    id: int
    first_name: str
    last_name: str | None = None
    username: str | None = None
    language_code: str | None = "en"
    started: bool = False
    blocked: bool = False
    last_action_seq: int = 0  # change_seq of the user's latest action, the default mark for waits

    def to_api(self) -> JSONDict:
        user: JSONDict = {"id": self.id, "is_bot": False, "first_name": self.first_name}
        if self.last_name:
            user["last_name"] = self.last_name
        if self.username:
            user["username"] = self.username
        if self.language_code:
            user["language_code"] = self.language_code
        return user

    def chat_api(self) -> JSONDict:
        chat: JSONDict = {"id": self.id, "type": "private", "first_name": self.first_name}
        if self.last_name:
            chat["last_name"] = self.last_name
        if self.username:
            chat["username"] = self.username
        return chat


#: getChatMember statuses (Bot API `ChatMember`).
MemberStatus = Literal["creator", "administrator", "member", "restricted", "left", "kicked"]


@attrs.define(eq=False)
class FakeChannel:
    """A channel (or supergroup) whose members the bot may look up with ``getChatMember``.

    Telegram lets only an administrator bot read a channel's members; otherwise it answers 400 "member list
    is inaccessible". A user with no entry in ``members`` has left (or never joined): status "left".
    """

    id: int
    title: str
    username: str | None = None
    bot_is_admin: bool = True
    #: user id → (status, is_member); is_member only matters for "restricted".
    members: dict[int, tuple[MemberStatus, bool]] = attrs.field(factory=dict)


@attrs.define(eq=False)
class StoredFile:
    """A photo or document the bot sent: uploaded bytes, or only a URL the fake does not fetch."""

    file_id: str
    file_unique_id: str
    kind: Literal["photo", "document", "video", "animation"]
    data: bytes | None = attrs.field(default=None, repr=lambda d: "None" if d is None else f"<{len(d)} bytes>")
    url: str | None = None
    file_name: str | None = None
    mime_type: str | None = None
    width: int = 0
    height: int = 0

    @property
    def size(self) -> int:
        return len(self.data) if self.data is not None else 0

    def photo_sizes(self) -> list[JSONDict]:
        return [
            {
                "file_id": self.file_id,
                "file_unique_id": self.file_unique_id,
                "width": self.width,
                "height": self.height,
                "file_size": self.size,
            }
        ]

    def document_api(self) -> JSONDict:
        doc: JSONDict = {"file_id": self.file_id, "file_unique_id": self.file_unique_id, "file_size": self.size}
        if self.file_name:
            doc["file_name"] = self.file_name
        if self.mime_type:
            doc["mime_type"] = self.mime_type
        return doc


@attrs.define(eq=False)
class Invoice:
    """An invoice message's content: Telegram Stars (``XTR``, one price) or a fiat card invoice of a provider."""

    title: str
    description: str
    payload: str
    currency: str
    total_amount: int
    prices: list[JSONDict]
    start_parameter: str = ""
    paid_charge_id: str | None = None
    need_email: bool = False
    send_email_to_provider: bool = False
    provider_data: str | None = None

    def to_api(self) -> JSONDict:
        return {
            "title": self.title,
            "description": self.description,
            "start_parameter": self.start_parameter,
            "currency": self.currency,
            "total_amount": self.total_amount,
        }


@attrs.define(eq=False)
class ChatMessage:
    """One message of a private chat, from the user or from the bot, with edits applied in place.

    ``revision`` is the fake's ``change_seq`` when the message was created or last edited; waits use it to
    tell new bot output from old.
    """

    chat_id: int
    message_id: int
    from_bot: bool
    sender: JSONDict
    chat: JSONDict
    date: int
    revision: int = 0
    text: str | None = None
    entities: list[JSONDict] = attrs.Factory(list)
    caption: str | None = None
    caption_entities: list[JSONDict] = attrs.Factory(list)
    reply_markup: JSONDict | None = None  # inline keyboards only; other markups belong to the chat
    photo: StoredFile | None = None
    document: StoredFile | None = None
    video: StoredFile | None = None
    animation: StoredFile | None = None
    invoice: Invoice | None = None
    successful_payment: JSONDict | None = None
    refunded_payment: JSONDict | None = None
    reply_to: ChatMessage | None = None
    edit_date: int | None = None
    deleted: bool = False

    @property
    def buttons(self) -> list[JSONDict]:
        """The inline keyboard's buttons, row by row, flattened."""
        if not self.reply_markup:
            return []
        return [button for row in self.reply_markup.get("inline_keyboard", []) for button in row]

    @property
    def callback_data(self) -> list[str]:
        return [b["callback_data"] for b in self.buttons if "callback_data" in b]

    def to_api(self, *, with_reply: bool = True) -> JSONDict:
        """The Bot API ``Message`` object, as the bot receives or gets it back."""
        message: JSONDict = {
            "message_id": self.message_id,
            "from": self.sender,
            "chat": self.chat,
            "date": self.date,
        }
        if self.edit_date is not None:
            message["edit_date"] = self.edit_date
        if self.reply_to is not None and with_reply:
            message["reply_to_message"] = self.reply_to.to_api(with_reply=False)
        if self.text is not None:
            message["text"] = self.text
            if self.entities:
                message["entities"] = self.entities
        if self.photo is not None:
            message["photo"] = self.photo.photo_sizes()
        if self.document is not None:
            message["document"] = self.document.document_api()
        if self.video is not None:
            message["video"] = {**self.video.document_api(), "width": 640, "height": 360, "duration": 1}
        if self.animation is not None:  # Telegram sends an animation as "document" too, for old clients
            message["animation"] = {**self.animation.document_api(), "width": 320, "height": 240, "duration": 1}
            message["document"] = self.animation.document_api()
        if self.caption is not None:
            message["caption"] = self.caption
            if self.caption_entities:
                message["caption_entities"] = self.caption_entities
        if self.invoice is not None:
            message["invoice"] = self.invoice.to_api()
        if self.successful_payment is not None:
            message["successful_payment"] = self.successful_payment
        if self.refunded_payment is not None:
            message["refunded_payment"] = self.refunded_payment
        if self.reply_markup is not None:
            message["reply_markup"] = self.reply_markup
        return message


@attrs.define(eq=False)
class CallbackQuery:
    """A button press; the bot may answer it once (``answerCallbackQuery``)."""

    id: str
    user_id: int
    message_id: int
    data: str
    answered: bool = False
    answer_text: str | None = None
    show_alert: bool = False
    answer_url: str | None = None


@attrs.define(eq=False)
class PreCheckoutQuery:
    """The user confirmed a payment (Stars or card); the bot must accept (ok=true) or refuse it, once."""

    id: str
    user_id: int
    message_id: int
    invoice: Invoice
    created_at: float  # trio time
    answered: bool = False
    ok: bool | None = None
    error_message: str | None = None
    charge_id: str | None = None


@attrs.define(eq=False)
class StarPayment:
    charge_id: str
    user_id: int
    amount: int
    payload: str
    refunded: bool = False


@attrs.frozen
class Notice:
    """Something the user sees outside the message list: a callback-answer toast, a payment error."""

    seq: int
    chat_id: int
    kind: str
    text: str
    show_alert: bool = False


@attrs.define
class RequestRecord:
    """One Bot API request as the fake saw it (Trio time): when it arrived and, once answered, how.

    ``status`` and ``answered_at`` stay None while the request is in progress (a long poll, a held
    fault) and for a request whose connection was broken or dropped without an answer.
    """

    method: str
    arrived_at: float
    status: int | None = None
    answered_at: float | None = None
