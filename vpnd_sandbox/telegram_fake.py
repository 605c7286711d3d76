"""A fake Telegram Bot API server: in-memory Telegram for tests and for ``make demo``.

The daemon talks to it exactly as to api.telegram.org — python-telegram-bot's ``Bot(token,
base_url=f"{base_url}/bot")`` over HTTP — and the fake answers like Telegram does: the same result
shapes, the same error codes and descriptions, real long polling, per-chat message ids, and Telegram's
flood limits (429 + ``retry_after``). What it does not know, it refuses (unknown method → 404).

Three audiences use it:

* **Bot side** (the daemon under test): the HTTP Bot API under ``/bot<token>/<method>``.
* **Users** (tests, the web chat): :class:`FakeTelegram` methods ``add_user``, ``user_sends``,
  ``user_presses_button``, ``user_pays_invoice``, ``user_blocks_bot``…, mirrored as a JSON API under
  ``/sandbox/api/`` (see :mod:`vpnd_sandbox.telegram_asgi`) for subprocess tests and the web page at ``/``.
* **Fault injection** (tests): :meth:`FakeTelegram.inject_fault` makes chosen requests fail with 502, 429,
  409, a hung request or a dropped connection; :attr:`FakeTelegram.requests` counts calls per method so a
  test can spot a busy loop.

All timing (rate limits, long-poll timeouts, fault windows) uses ``trio.current_time()``, so in-process
tests can run under Trio's ``autojump_clock``; message ``date`` fields are wall-clock Unix time, as they are
shown to people. All state is in memory and lives as long as the :class:`FakeTelegram` object.
"""

from __future__ import annotations

import collections
import inspect
import math
import random
import re
import struct
import time
from collections.abc import Callable, Iterable
from typing import Any, Literal

import attrs
import trio

from vpnd_sandbox.telegram_html import (
    EntityParseError,
    ParsedText,
    detect_bot_commands,
    parse_html,
    plain_text,
    utf16_len,
)
from vpnd_sandbox.telegram_wire import (
    ApiError,
    JSONDict,
    Params,
    UploadedFile,
    bad_request,
    error_body,
    parse_request,
)

__all__ = [
    "BotReply",
    "CallbackQuery",
    "ChatMessage",
    "FakeTelegram",
    "FakeUser",
    "FaultKind",
    "FaultRule",
    "Invoice",
    "Notice",
    "PreCheckoutQuery",
    "SandboxError",
    "StarPayment",
    "StoredFile",
    "TokenBucket",
    "serve_fake_telegram",
]

FaultKind = Literal["5xx", "429", "409", "timeout", "drop"]

CONFLICT_OTHER_POLL = (
    "Conflict: terminated by other getUpdates request; make sure that only one bot instance is running"
)
CONFLICT_WEBHOOK = (
    "Conflict: can't use getUpdates method while webhook is active; use deleteWebhook to delete the webhook first"
)
QUERY_TOO_OLD = "query is too old and response timeout expired or query ID is invalid"
NOT_MODIFIED = (
    "message is not modified: specified new message content and reply markup are exactly the same as a "
    "current content and reply markup of the message"
)
MAX_TEXT = 4096
MAX_CAPTION = 1024
MAX_PHOTO_BYTES = 10 * 1024 * 1024
MAX_DOCUMENT_BYTES = 50 * 1024 * 1024
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
_COMMAND_NAME = re.compile(r"[a-z0-9_]{1,32}")
_MESSAGE_METHODS = frozenset({"sendmessage", "sendphoto", "senddocument", "sendinvoice", "editmessagetext"})


class SandboxError(ValueError):
    """A simulated *user* action that Telegram's client would not allow (unknown user, no such button…)."""


# --------------------------------------------------------------------------------------------------------
# Values and records


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


@attrs.define(eq=False)
class StoredFile:
    """A photo or document the bot sent: uploaded bytes, or only a URL the fake does not fetch."""

    file_id: str
    file_unique_id: str
    kind: Literal["photo", "document"]
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
    """An invoice message's content. Telegram Stars only (currency ``XTR``, one price)."""

    title: str
    description: str
    payload: str
    currency: str
    total_amount: int
    prices: list[JSONDict]
    start_parameter: str = ""
    paid_charge_id: str | None = None

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
    """The user confirmed a Stars payment; the bot must accept (ok=true) or refuse it, once."""

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
class TokenBucket:
    """Classic token bucket on Trio time: ``rate`` tokens per second, at most ``burst`` stored."""

    rate: float
    burst: float
    tokens: float
    stamp: float

    def _refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_time(self, now: float) -> float:
        """Seconds until one token is available (0 when one is available now)."""
        self._refill(now)
        if self.tokens >= 1:
            return 0.0
        return (1 - self.tokens) / self.rate

    def take(self, now: float) -> None:
        self._refill(now)
        self.tokens -= 1


@attrs.define(eq=False)
class FaultRule:
    """One injected fault. A request matches when ``methods`` is None or contains its method (lowercase).

    It fires for the next ``remaining`` matching requests (None: unlimited), each with ``probability``,
    until Trio time ``until`` (None: no end). Rules are tried in injection order; the first firing wins.
    """

    kind: FaultKind
    methods: frozenset[str] | None
    remaining: int | None
    probability: float
    until: float | None
    retry_after: int
    hold_seconds: float
    fired: int = 0

    def to_json(self) -> JSONDict:
        return {
            "kind": self.kind,
            "methods": sorted(self.methods) if self.methods is not None else None,
            "remaining": self.remaining,
            "probability": self.probability,
            "until": self.until,
            "retry_after": self.retry_after,
            "hold_seconds": self.hold_seconds,
            "fired": self.fired,
        }


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


#: How many requests :attr:`FakeTelegram.request_log` keeps (the oldest are dropped).
REQUEST_LOG_LIMIT = 100_000

#: The default bound of :meth:`FakeTelegram.wait_until` and :meth:`FakeTelegram.wait_for_bot_message`:
#: generous, because the thing waited for is usually vpnd answering through PostgreSQL on a machine that
#: may be busy; a test that expects nothing to come passes its own short timeout.
DEFAULT_WAIT_SECONDS = 30.0


@attrs.frozen
class BotReply:
    """What the HTTP layer sends for one Bot API call. ``body=None`` means: break the connection."""

    status: int
    body: JSONDict | None


def image_size(data: bytes) -> tuple[int, int] | None:
    """Width and height of a PNG, JPEG, GIF or WebP image; None when the bytes are not one of those."""
    if data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        return int(width), int(height)
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        width, height = struct.unpack("<HH", data[6:10])
        return int(width), int(height)
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return 512, 512  # dimensions do not matter to anyone here
    if data.startswith(b"\xff\xd8"):
        index = 2
        while index + 9 < len(data):
            if data[index] != 0xFF:
                index += 1
                continue
            marker = data[index + 1]
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7 or marker == 0xFF:
                index += 1 if marker == 0xFF else 2
                continue
            (segment_length,) = struct.unpack(">H", data[index + 2 : index + 4])
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                height, width = struct.unpack(">HH", data[index + 5 : index + 9])
                return int(width), int(height)
            index += 2 + segment_length
    return None


# --------------------------------------------------------------------------------------------------------
# The fake


@attrs.define(eq=False)
class FakeTelegram:
    """All of fake Telegram's state, in memory, and its behaviour.

    Configuration attributes may be changed at any time (limits take effect on the next send):
    ``global_rate``/``global_burst`` bound messages per second over all chats (Telegram: about 30/s),
    ``chat_rate``/``chat_burst`` per chat (Telegram: about 1/s with short bursts).
    ``strict_window`` counts the global limit as Telegram does — at most ``global_rate`` sends in *any*
    one second (a sliding window) — instead of a token bucket, whose burst lets ~2x through right after
    an idle moment. Sends with ``allow_paid_broadcast`` count in their own window of ``paid_rate``
    (Telegram: 1000/s) instead of the free one and cost 0.1 Star each from ``stars_balance`` (``None``:
    unlimited); without enough Stars they are refused (400). ``send_times`` keeps the time of every
    accepted free send and ``paid_send_times`` of every paid one, for tests to check any window.
    ``pre_checkout_timeout`` (seconds of Trio time, Telegram: 10) makes late pre-checkout answers fail;
    it is off by default because Trio's autojump clock may leap over it while the bot waits for a thread.
    """

    token: str = "7000000001:AAFakeTokenForTheVpndSandboxBot000000"
    bot_username: str = "vpnd_demo_bot"
    bot_first_name: str = "vpnd demo"
    global_rate: float = 30.0
    global_burst: float = 30.0
    chat_rate: float = 1.0
    chat_burst: float = 5.0
    strict_window: bool = False
    paid_rate: float = 1000.0
    stars_balance: float | None = None
    pre_checkout_timeout: float | None = None
    max_pending_updates: int = 100_000
    seed: int = 0

    users: dict[int, FakeUser] = attrs.field(factory=dict, init=False)
    messages: dict[int, list[ChatMessage]] = attrs.field(factory=dict, init=False)
    files: dict[str, StoredFile] = attrs.field(factory=dict, init=False)
    callback_queries: dict[str, CallbackQuery] = attrs.field(factory=dict, init=False)
    pre_checkout_queries: dict[str, PreCheckoutQuery] = attrs.field(factory=dict, init=False)
    payments: dict[str, StarPayment] = attrs.field(factory=dict, init=False)
    notices: list[Notice] = attrs.field(factory=list, init=False)
    commands: dict[tuple[str, str], list[JSONDict]] = attrs.field(factory=dict, init=False)
    reply_keyboards: dict[int, JSONDict] = attrs.field(factory=dict, init=False)
    webhook_url: str = attrs.field(default="", init=False)
    faults: list[FaultRule] = attrs.field(factory=list, init=False)
    # Observability for tests: requests per Bot API method (canonical name), responses per HTTP status.
    requests: collections.Counter[str] = attrs.field(factory=collections.Counter, init=False)
    responses: collections.Counter[int] = attrs.field(factory=collections.Counter, init=False)
    #: Every request in arrival order with its arrival and answer times (see :class:`RequestRecord`), so a
    #: test can check ordering ("no poll before retry_after had passed") on the fake's own clock.
    request_log: collections.deque[RequestRecord] = attrs.field(
        factory=lambda: collections.deque(maxlen=REQUEST_LOG_LIMIT), init=False
    )
    #: Where the flood limits read the time (Trio's clock by default). A test can hold it still so that a
    #: burst is judged as one instant however slow the machine is, and move it on by hand.
    flood_clock: Callable[[], float] = attrs.field(default=trio.current_time)
    too_many_requests_sent: int = attrs.field(default=0, init=False)  # every 429 sent, injected included
    rate_limited: int = attrs.field(default=0, init=False)  # 429s caused by the flood limits only
    change_seq: int = attrs.field(default=0, init=False)
    send_times: collections.deque[float] = attrs.field(factory=lambda: collections.deque(maxlen=1_000_000), init=False)
    paid_send_times: collections.deque[float] = attrs.field(
        factory=lambda: collections.deque(maxlen=1_000_000), init=False
    )
    paid_refused: int = attrs.field(default=0, init=False)
    _free_window: collections.deque[float] = attrs.field(factory=collections.deque, init=False)
    _paid_window: collections.deque[float] = attrs.field(factory=collections.deque, init=False)

    _pending: collections.deque[JSONDict] = attrs.field(factory=collections.deque, init=False)
    _next_update_id: int = attrs.field(default=700_000_001, init=False)
    _allowed_updates: frozenset[str] | None = attrs.field(default=None, init=False)
    _poll_generation: int = attrs.field(default=0, init=False)
    _polls_waiting: int = attrs.field(default=0, init=False)
    _updates_event: trio.Event = attrs.field(factory=trio.Event, init=False)
    _change_event: trio.Event = attrs.field(factory=trio.Event, init=False)
    _release_held: trio.Event = attrs.field(factory=trio.Event, init=False)
    _global_bucket: TokenBucket | None = attrs.field(default=None, init=False)
    _chat_buckets: dict[int, TokenBucket] = attrs.field(factory=dict, init=False)
    _random: random.Random = attrs.field(init=False)
    _id_counter: int = attrs.field(default=0, init=False)
    _methods: dict[str, tuple[str, Callable[[Params], Any]]] = attrs.field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        self._random = random.Random(self.seed)
        handlers: list[tuple[str, Callable[[Params], Any]]] = [
            ("getMe", self._get_me),
            ("getUpdates", self._get_updates),
            ("setWebhook", self._set_webhook),
            ("deleteWebhook", self._delete_webhook),
            ("getWebhookInfo", self._get_webhook_info),
            ("setMyCommands", self._set_my_commands),
            ("getMyCommands", self._get_my_commands),
            ("deleteMyCommands", self._delete_my_commands),
            ("setMyDescription", self._accept_bot_text),
            ("setMyShortDescription", self._accept_bot_text),
            ("getChat", self._get_chat),
            ("sendChatAction", self._send_chat_action),
            ("sendMessage", self._send_message),
            ("editMessageText", self._edit_message_text),
            ("editMessageCaption", self._edit_message_caption),
            ("editMessageReplyMarkup", self._edit_message_reply_markup),
            ("deleteMessage", self._delete_message),
            ("answerCallbackQuery", self._answer_callback_query),
            ("sendPhoto", self._send_photo),
            ("sendDocument", self._send_document),
            ("getFile", self._get_file),
            ("sendInvoice", self._send_invoice),
            ("answerPreCheckoutQuery", self._answer_pre_checkout_query),
            ("refundStarPayment", self._refund_star_payment),
        ]
        self._methods = {name.lower(): (name, handler) for name, handler in handlers}

    # ---------------------------------------------------------------------------------------- identity

    @property
    def bot_id(self) -> int:
        return int(self.token.split(":", 1)[0])

    def bot_user(self) -> JSONDict:
        return {
            "id": self.bot_id,
            "is_bot": True,
            "first_name": self.bot_first_name,
            "username": self.bot_username,
        }

    def _new_id(self, prefix: str = "") -> str:
        self._id_counter += 1
        return f"{prefix}{self._id_counter:x}{self._random.getrandbits(48):012x}"

    # ------------------------------------------------------------------------------------ change tracking

    def _changed(self) -> int:
        """Record a visible change (message, edit, notice): wakes every waiter, returns the new seq."""
        self.change_seq += 1
        self._wake_waiters()
        return self.change_seq

    def _wake_waiters(self) -> None:
        """Let :meth:`wait_until` conditions be re-checked (also after invisible changes: a request
        counted, a poll started or ended)."""
        self._change_event.set()
        self._change_event = trio.Event()

    def _wake_polls(self) -> None:
        self._updates_event.set()
        self._updates_event = trio.Event()

    def _queue_update(self, kind: str, payload: JSONDict) -> int | None:
        """Queue an update for getUpdates unless ``allowed_updates`` excludes its kind (then it is lost,
        as on Telegram). Returns its update_id."""
        if self._allowed_updates is not None and kind not in self._allowed_updates:
            return None
        return self._append_update({kind: payload})

    def _append_update(self, update: JSONDict) -> int:
        update_id = self._next_update_id
        self._next_update_id += 1
        self._pending.append({"update_id": update_id, **update})
        while len(self._pending) > self.max_pending_updates:
            self._pending.popleft()
        self._wake_polls()
        return update_id

    @property
    def pending_updates(self) -> list[JSONDict]:
        """Updates not yet confirmed by the bot (a getUpdates ``offset`` past them)."""
        return list(self._pending)

    # =================================================================================== Bot API (HTTP)

    async def handle_bot_request(
        self, token: str, method: str, content_type: str, body: bytes, query_string: bytes
    ) -> BotReply:
        """Run one Bot API call as received over HTTP; never raises for a bad request."""
        entry = self._methods.get(method.lower())
        record = RequestRecord(entry[0] if entry else method, trio.current_time())
        self.requests[record.method] += 1
        self.request_log.append(record)
        self._wake_waiters()
        reply = await self._dispatch(token, method, entry, content_type, body, query_string)
        if reply.body is not None:
            record.status, record.answered_at = reply.status, trio.current_time()
            self.responses[reply.status] += 1
            if reply.status == 429:
                self.too_many_requests_sent += 1
        self._wake_waiters()
        return reply

    async def _dispatch(
        self,
        token: str,
        method: str,
        entry: tuple[str, Callable[[Params], Any]] | None,
        content_type: str,
        body: bytes,
        query_string: bytes,
    ) -> BotReply:
        if token != self.token:
            return _error_reply(ApiError(401, "Unauthorized"))
        if entry is None:
            return _error_reply(ApiError(404, "Not Found"))
        fault = self._pick_fault(method.lower())
        if fault is not None:
            return await self._fault_reply(fault)
        try:
            params = parse_request(content_type, body, query_string)
            result = entry[1](params)
            if inspect.isawaitable(result):
                result = await result
        except ApiError as error:
            return _error_reply(error)
        return BotReply(200, {"ok": True, "result": result})

    # ------------------------------------------------------------------------------------------ faults

    def inject_fault(
        self,
        kind: FaultKind,
        *,
        count: int | None = None,
        probability: float | None = None,
        duration: float | None = None,
        methods: Iterable[str] | None = None,
        retry_after: int = 1,
        hold_seconds: float = 5.0,
    ) -> FaultRule:
        """Make upcoming Bot API requests fail.

        ``kind``: ``"5xx"`` → 502 Bad Gateway; ``"429"`` → Too Many Requests with ``retry_after``;
        ``"409"`` → getUpdates conflict; ``"timeout"`` → hold the request ``hold_seconds`` (Trio time) then
        break the connection without an answer; ``"drop"`` → break the connection at once.
        With neither ``count`` nor ``probability`` the fault hits the next matching request once.
        ``probability`` applies it at random (seeded) to each match, for ``duration`` seconds when given.
        ``methods`` restricts it to those Bot API methods (case-insensitive names).
        Must be called from within Trio (the window is measured on Trio's clock).
        """
        if kind not in ("5xx", "429", "409", "timeout", "drop"):
            raise ValueError(f"unknown fault kind {kind!r}")
        if count is None and probability is None:
            count = 1
        rule = FaultRule(
            kind=kind,
            methods=frozenset(m.lower() for m in methods) if methods is not None else None,
            remaining=count,
            probability=1.0 if probability is None else probability,
            until=trio.current_time() + duration if duration is not None else None,
            retry_after=retry_after,
            hold_seconds=hold_seconds,
        )
        self.faults.append(rule)
        return rule

    def clear_faults(self) -> None:
        self.faults.clear()

    def release_held_requests(self) -> None:
        """End every request a ``"timeout"`` fault is holding now, as if its ``hold_seconds`` were over
        (the connection breaks without an answer). Later matches are held again."""
        self._release_held.set()
        self._release_held = trio.Event()

    def _pick_fault(self, method: str) -> FaultRule | None:
        now = trio.current_time()
        self.faults[:] = [
            r for r in self.faults if (r.remaining is None or r.remaining > 0) and (r.until is None or now < r.until)
        ]
        for rule in self.faults:
            if rule.methods is not None and method not in rule.methods:
                continue
            if rule.probability < 1.0 and self._random.random() >= rule.probability:
                continue
            rule.fired += 1
            if rule.remaining is not None:
                rule.remaining -= 1
            return rule
        return None

    async def _fault_reply(self, rule: FaultRule) -> BotReply:
        if rule.kind == "5xx":
            return _error_reply(ApiError(502, "Bad Gateway"))
        if rule.kind == "429":
            return _error_reply(
                ApiError(
                    429,
                    f"Too Many Requests: retry after {rule.retry_after}",
                    {"retry_after": rule.retry_after},
                )
            )
        if rule.kind == "409":
            return _error_reply(ApiError(409, CONFLICT_OTHER_POLL))
        if rule.kind == "timeout":
            with trio.move_on_after(rule.hold_seconds):
                await self._release_held.wait()
        return BotReply(0, None)

    # ------------------------------------------------------------------------------------ flood limits

    def _bucket(self, existing: TokenBucket | None, rate: float, burst: float) -> TokenBucket:
        if existing is not None and existing.rate == rate and existing.burst == burst:
            return existing
        return TokenBucket(rate=rate, burst=burst, tokens=burst, stamp=self.flood_clock())

    @staticmethod
    def _window_wait(window: collections.deque[float], limit: float, now: float) -> float:
        """Seconds until `window` (send times) has room for one more in the last second (0: now)."""
        while window and window[0] <= now - 1.0:
            window.popleft()
        allowed = max(1, math.floor(limit))
        if len(window) < allowed:
            return 0.0
        return window[len(window) - allowed] + 1.0 - now

    def _take_send_slot(self, chat_id: int, *, paid: bool = False) -> None:
        """Charge one message to the global and the per-chat limits, or answer 429 with retry_after."""
        now = self.flood_clock()
        if paid and self.stars_balance is not None and self.stars_balance < 0.1 - 1e-9:
            self.paid_refused += 1
            raise bad_request("not enough Stars on the bot's balance for a paid broadcast")
        chat_bucket = self._bucket(self._chat_buckets.get(chat_id), self.chat_rate, self.chat_burst)
        self._chat_buckets[chat_id] = chat_bucket
        if paid:
            global_wait = self._window_wait(self._paid_window, self.paid_rate, now)
        elif self.strict_window:
            global_wait = self._window_wait(self._free_window, self.global_rate, now)
        else:
            self._global_bucket = self._bucket(self._global_bucket, self.global_rate, self.global_burst)
            global_wait = self._global_bucket.wait_time(now)
        wait = max(global_wait, chat_bucket.wait_time(now))
        if wait > 0:
            self.rate_limited += 1
            retry_after = max(1, math.ceil(wait))
            raise ApiError(429, f"Too Many Requests: retry after {retry_after}", {"retry_after": retry_after})
        chat_bucket.take(now)
        if paid:
            self._paid_window.append(now)
            self.paid_send_times.append(now)
            if self.stars_balance is not None:
                self.stars_balance -= 0.1
            return
        if self.strict_window:
            self._free_window.append(now)
        elif self._global_bucket is not None:
            self._global_bucket.take(now)
        self.send_times.append(now)

    # ------------------------------------------------------------------------------------- validation

    def _chat(self, params: Params, name: str = "chat_id") -> FakeUser:
        raw = params.raw(name)
        if raw is None or raw == "":
            raise bad_request(f"{name} is empty")
        if isinstance(raw, str) and raw.startswith("@"):
            raise bad_request("chat not found")
        chat_id = params.get_int(name)
        user = self.users.get(chat_id) if chat_id is not None else None
        if user is None or not user.started:
            raise bad_request("chat not found")
        if user.blocked:
            raise ApiError(403, "Forbidden: bot was blocked by the user")
        return user

    def _parse_text(self, text: str, parse_mode: str | None, entities: Any) -> ParsedText:
        if not parse_mode:
            if entities is not None and not isinstance(entities, list):
                raise bad_request("can't parse entities JSON object")
            return plain_text(text, entities)
        mode = parse_mode.lower()
        try:
            if mode == "html":
                return parse_html(text)
            if mode in ("markdownv2", "markdown"):
                return _parse_markdown_v2(text)
        except EntityParseError as error:
            raise bad_request(f"can't parse entities: {error}") from None
        raise bad_request(f"unsupported parse_mode {parse_mode!r}")

    def _check_reply_markup(self, params: Params) -> JSONDict | None:
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
                    _check_inline_button(button)
            return markup
        if "keyboard" in markup or "remove_keyboard" in markup or "force_reply" in markup:
            return markup
        raise bad_request("can't parse reply keyboard markup JSON object")

    def _find_message(self, chat_id: int, message_id: int | None) -> ChatMessage | None:
        if message_id is None:
            return None
        for message in self.messages.get(chat_id, []):
            if message.message_id == message_id:
                return None if message.deleted else message
        return None

    def _reply_target(self, user: FakeUser, params: Params) -> ChatMessage | None:
        reply_parameters = params.get_json("reply_parameters")
        allow_missing = params.get_bool("allow_sending_without_reply")
        if isinstance(reply_parameters, dict):
            target_id = reply_parameters.get("message_id")
            allow_missing = bool(reply_parameters.get("allow_sending_without_reply", allow_missing))
        else:
            target_id = params.get_int("reply_to_message_id")
        if target_id is None:
            return None
        target = self._find_message(user.id, target_id if isinstance(target_id, int) else None)
        if target is None and not allow_missing:
            raise bad_request("message to be replied not found")
        return target

    def _input_file(self, params: Params, field: str, kind: Literal["photo", "document"]) -> StoredFile:
        """Resolve a file parameter: an uploaded part, ``attach://name``, a known file_id or an HTTP URL."""
        upload: UploadedFile | None = params.files.get(field)
        if upload is None:
            value = params.get_str(field)
            if not value:
                raise bad_request(f"there is no {field} in the request")
            if value.startswith("attach://"):
                upload = params.files.get(value.removeprefix("attach://"))
                if upload is None:
                    raise bad_request(f"failed to get HTTP URL content of {field}")
            elif value.startswith(("http://", "https://")):
                stored = StoredFile(
                    file_id=self._new_id("AgACAgUAAxkBAA"),
                    file_unique_id=self._new_id("AQAD"),
                    kind=kind,
                    url=value,
                    width=640,
                    height=640,
                    file_name=value.rsplit("/", 1)[-1] or None,
                )
                self.files[stored.file_id] = stored
                return stored
            else:
                known = self.files.get(value)
                if known is None:
                    raise bad_request("wrong file identifier/HTTP URL specified")
                if known.kind != kind:
                    raise bad_request(f"can't use file of type {known.kind.title()} as {kind.title()}")
                return known
        if not upload.data:
            raise bad_request("file must be non-empty")
        width = height = 0
        if kind == "photo":
            if len(upload.data) > MAX_PHOTO_BYTES:
                raise bad_request("PHOTO_INVALID_DIMENSIONS")
            size = image_size(upload.data)
            if size is None:
                raise bad_request("IMAGE_PROCESS_FAILED")
            width, height = size
        elif len(upload.data) > MAX_DOCUMENT_BYTES:
            raise ApiError(413, "Request Entity Too Large")
        stored = StoredFile(
            file_id=self._new_id("AgACAgUAAxkBAA" if kind == "photo" else "BQACAgUAAxkBAA"),
            file_unique_id=self._new_id("AQAD"),
            kind=kind,
            data=upload.data,
            file_name=upload.filename if kind == "document" else None,
            mime_type=upload.content_type if kind == "document" else "image/jpeg",
            width=width,
            height=height,
        )
        self.files[stored.file_id] = stored
        return stored

    def _caption(self, params: Params) -> ParsedText | None:
        caption = params.get_str("caption")
        if not caption:
            return None
        parsed = self._parse_text(caption, params.get_str("parse_mode"), params.get_json("caption_entities"))
        if utf16_len(parsed.text) > MAX_CAPTION:
            raise bad_request("message caption is too long")
        return parsed

    # ------------------------------------------------------------------------------ message bookkeeping

    def _next_message_id(self, chat_id: int) -> int:
        chat = self.messages.setdefault(chat_id, [])
        return chat[-1].message_id + 1 if chat else 1

    def _add_message(self, user: FakeUser, *, from_bot: bool, **content: Any) -> ChatMessage:
        message = ChatMessage(
            chat_id=user.id,
            message_id=self._next_message_id(user.id),
            from_bot=from_bot,
            sender=self.bot_user() if from_bot else user.to_api(),
            chat=user.chat_api(),
            date=int(time.time()),
            **content,
        )
        self.messages[user.id].append(message)
        message.revision = self._changed()
        return message

    def _apply_chat_keyboard(self, user: FakeUser, markup: JSONDict | None) -> JSONDict | None:
        """Reply keyboards stay with the chat; only inline keyboards stay with the message."""
        if markup is None:
            return None
        if "keyboard" in markup:
            self.reply_keyboards[user.id] = markup
        elif markup.get("remove_keyboard"):
            self.reply_keyboards.pop(user.id, None)
        return markup if "inline_keyboard" in markup else None

    # --------------------------------------------------------------------------------- method handlers

    def _get_me(self, params: Params) -> JSONDict:
        return {
            **self.bot_user(),
            "can_join_groups": False,
            "can_read_all_group_messages": False,
            "supports_inline_queries": False,
            "can_connect_to_business": False,
            "has_main_web_app": False,
        }

    async def _get_updates(self, params: Params) -> list[JSONDict]:
        """Long poll. A newer poll ends an older waiting one with 409, as Telegram does."""
        if self.webhook_url:
            raise ApiError(409, CONFLICT_WEBHOOK)
        offset = params.get_int("offset", default=0) or 0
        limit = min(max(params.get_int("limit", default=100) or 100, 1), 100)
        timeout = max(params.get_float("timeout", default=0.0) or 0.0, 0.0)
        allowed = params.get_json("allowed_updates")
        if allowed is not None:
            if not isinstance(allowed, list) or not all(isinstance(kind, str) for kind in allowed):
                raise bad_request("can't parse allowed_updates JSON array")
            self._allowed_updates = frozenset(allowed) if allowed else None
        if offset > 0:
            while self._pending and self._pending[0]["update_id"] < offset:
                self._pending.popleft()
        elif offset < 0:
            while len(self._pending) > -offset:
                self._pending.popleft()
        self._poll_generation += 1
        generation = self._poll_generation
        self._wake_polls()  # an older waiting poll must notice it was superseded
        deadline = trio.current_time() + timeout
        self._polls_waiting += 1
        self._wake_waiters()
        try:
            while True:
                if generation != self._poll_generation:
                    raise ApiError(409, CONFLICT_OTHER_POLL)
                if self._pending or trio.current_time() >= deadline:
                    return [dict(update) for update in list(self._pending)[:limit]]
                event = self._updates_event
                with trio.move_on_at(deadline):
                    await event.wait()
        finally:
            self._polls_waiting -= 1
            self._wake_waiters()

    def _set_webhook(self, params: Params) -> bool:
        url = params.get_str("url") or ""
        if url and not url.startswith("https://"):
            raise bad_request("bad webhook: An HTTPS URL must be provided for webhook")
        self.webhook_url = url
        if params.get_bool("drop_pending_updates"):
            self._pending.clear()
        return True

    def _delete_webhook(self, params: Params) -> bool:
        self.webhook_url = ""
        if params.get_bool("drop_pending_updates"):
            self._pending.clear()
        return True

    def _get_webhook_info(self, params: Params) -> JSONDict:
        return {"url": self.webhook_url, "has_custom_certificate": False, "pending_update_count": len(self._pending)}

    @staticmethod
    def _commands_key(params: Params) -> tuple[str, str]:
        scope = params.get_json("scope")
        scope_type = scope.get("type", "default") if isinstance(scope, dict) else "default"
        return str(scope_type), params.get_str("language_code") or ""

    def _set_my_commands(self, params: Params) -> bool:
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
                raise bad_request(
                    "command description is empty" if not description else "BOT_COMMAND_DESCRIPTION_INVALID"
                )
        self.commands[self._commands_key(params)] = [
            {"command": c["command"], "description": c["description"]} for c in commands
        ]
        self._changed()
        return True

    def _get_my_commands(self, params: Params) -> list[JSONDict]:
        return list(self.commands.get(self._commands_key(params), []))

    def _delete_my_commands(self, params: Params) -> bool:
        self.commands.pop(self._commands_key(params), None)
        return True

    def _accept_bot_text(self, params: Params) -> bool:
        return True

    def _get_chat(self, params: Params) -> JSONDict:
        user = self._chat(params)
        return {**user.chat_api(), "accent_color_id": 0, "max_reaction_count": 11}

    def _send_chat_action(self, params: Params) -> bool:
        self._chat(params)
        if not params.get_str("action"):
            raise bad_request("action is empty")
        return True

    def _send_message(self, params: Params) -> JSONDict:
        user = self._chat(params)
        text = params.get_str("text")
        if not text:
            raise bad_request("message text is empty")
        parsed = self._parse_text(text, params.get_str("parse_mode"), params.get_json("entities"))
        if not parsed.text:
            raise bad_request("message text is empty")
        if utf16_len(parsed.text) > MAX_TEXT:
            raise bad_request("message is too long")
        markup = self._check_reply_markup(params)
        reply_to = self._reply_target(user, params)
        self._take_send_slot(user.id, paid=params.get_bool("allow_paid_broadcast"))
        message = self._add_message(
            user,
            from_bot=True,
            text=parsed.text,
            entities=list(parsed.entities),
            reply_markup=self._apply_chat_keyboard(user, markup),
            reply_to=reply_to,
        )
        return message.to_api()

    def _message_to_edit(self, params: Params) -> tuple[FakeUser, ChatMessage]:
        if params.has("inline_message_id"):
            raise bad_request("MESSAGE_ID_INVALID")
        user = self._chat(params)
        message = self._find_message(user.id, params.get_int("message_id"))
        if message is None:
            raise bad_request("message to edit not found")
        if not message.from_bot:
            raise bad_request("message can't be edited")
        return user, message

    def _edited(self, message: ChatMessage) -> JSONDict:
        message.edit_date = int(time.time())
        message.revision = self._changed()
        return message.to_api()

    def _edit_message_text(self, params: Params) -> JSONDict:
        user, message = self._message_to_edit(params)
        text = params.get_str("text")
        if not text:
            raise bad_request("message text is empty")
        parsed = self._parse_text(text, params.get_str("parse_mode"), params.get_json("entities"))
        if not parsed.text:
            raise bad_request("message text is empty")
        if utf16_len(parsed.text) > MAX_TEXT:
            raise bad_request("MESSAGE_TOO_LONG")
        if message.text is None:
            raise bad_request("there is no text in the message to edit")
        # Without reply_markup, editMessageText removes the inline keyboard (Telegram does the same).
        markup = self._check_reply_markup(params)
        if markup is not None and "inline_keyboard" not in markup:
            raise bad_request("inline keyboard expected")
        if message.text == parsed.text and message.entities == list(parsed.entities) and message.reply_markup == markup:
            raise bad_request(NOT_MODIFIED)
        self._take_send_slot(user.id)
        message.text = parsed.text
        message.entities = list(parsed.entities)
        message.reply_markup = markup
        return self._edited(message)

    def _edit_message_caption(self, params: Params) -> JSONDict:
        _, message = self._message_to_edit(params)
        if message.photo is None and message.document is None:
            raise bad_request("there is no caption in the message to edit")
        parsed = self._caption(params)
        markup = self._check_reply_markup(params)
        caption = parsed.text if parsed else None
        entities = list(parsed.entities) if parsed else []
        if message.caption == caption and message.caption_entities == entities and message.reply_markup == markup:
            raise bad_request(NOT_MODIFIED)
        message.caption, message.caption_entities, message.reply_markup = caption, entities, markup
        return self._edited(message)

    def _edit_message_reply_markup(self, params: Params) -> JSONDict:
        _, message = self._message_to_edit(params)
        markup = self._check_reply_markup(params)
        if markup is not None and "inline_keyboard" not in markup:
            raise bad_request("inline keyboard expected")
        if message.reply_markup == markup:
            raise bad_request(NOT_MODIFIED)
        message.reply_markup = markup
        return self._edited(message)

    def _delete_message(self, params: Params) -> bool:
        user = self._chat(params)
        message = self._find_message(user.id, params.get_int("message_id"))
        if message is None:
            raise bad_request("message to delete not found")
        message.deleted = True
        message.revision = self._changed()
        return True

    def _answer_callback_query(self, params: Params) -> bool:
        query = self.callback_queries.get(params.get_str("callback_query_id") or "")
        if query is None or query.answered:
            raise bad_request(QUERY_TOO_OLD)
        text = params.get_str("text")
        if text is not None and len(text) > 200:
            raise bad_request("MESSAGE_TOO_LONG")
        query.answered = True
        query.answer_text = text or None
        query.show_alert = params.get_bool("show_alert")
        query.answer_url = params.get_str("url")
        if text:
            self.notices.append(
                Notice(
                    seq=self.change_seq + 1,
                    chat_id=query.user_id,
                    kind="callback_answer",
                    text=text,
                    show_alert=query.show_alert,
                )
            )
        self._changed()
        return True

    def _send_media(self, params: Params, field: Literal["photo", "document"]) -> JSONDict:
        user = self._chat(params)
        stored = self._input_file(params, field, field)
        caption = self._caption(params)
        markup = self._check_reply_markup(params)
        reply_to = self._reply_target(user, params)
        self._take_send_slot(user.id)
        message = self._add_message(
            user,
            from_bot=True,
            photo=stored if field == "photo" else None,
            document=stored if field == "document" else None,
            caption=caption.text if caption else None,
            caption_entities=list(caption.entities) if caption else [],
            reply_markup=self._apply_chat_keyboard(user, markup),
            reply_to=reply_to,
        )
        return message.to_api()

    def _send_photo(self, params: Params) -> JSONDict:
        return self._send_media(params, "photo")

    def _send_document(self, params: Params) -> JSONDict:
        return self._send_media(params, "document")

    def _get_file(self, params: Params) -> JSONDict:
        stored = self.files.get(params.get_str("file_id") or "")
        if stored is None:
            raise bad_request("wrong file_id or the file is temporarily unavailable")
        return {
            "file_id": stored.file_id,
            "file_unique_id": stored.file_unique_id,
            "file_size": stored.size,
            "file_path": f"{stored.kind}s/{stored.file_id}",
        }

    def _send_invoice(self, params: Params) -> JSONDict:
        user = self._chat(params)
        fields: dict[str, str] = {}
        for name, max_length in (("title", 32), ("description", 255)):
            value = params.get_str(name) or ""
            if not value:
                raise bad_request(f"{name} is empty")
            if len(value) > max_length:
                raise bad_request(f"{name.upper()}_INVALID")
            fields[name] = value
        payload = params.get_str("payload") or ""
        if not 1 <= len(payload.encode()) <= 128:
            raise bad_request("INVOICE_PAYLOAD_INVALID")
        currency = params.get_str("currency") or ""
        if not currency:
            raise bad_request("currency is empty")
        if currency != "XTR" or params.get_str("provider_token"):
            # The fake knows no payment providers: only Telegram Stars, which take no provider token.
            raise bad_request("PAYMENT_PROVIDER_INVALID")
        prices = params.get_json("prices", error="can't parse prices JSON object")
        if not isinstance(prices, list) or len(prices) != 1:
            raise bad_request("prices must contain exactly one item for payments in Telegram Stars")
        price = prices[0]
        if (
            not isinstance(price, dict)
            or not isinstance(price.get("label"), str)
            or not isinstance(price.get("amount"), int)
            or isinstance(price.get("amount"), bool)
        ):
            raise bad_request("can't parse prices JSON object")
        if not 1 <= price["amount"] <= 100_000:
            raise bad_request("CURRENCY_TOTAL_AMOUNT_INVALID")
        markup = self._check_reply_markup(params)
        if markup is not None:
            first = (markup.get("inline_keyboard") or [[]])[0][:1]
            if not first or not first[0].get("pay"):
                raise bad_request("REPLY_MARKUP_BUY_EMPTY")
        self._take_send_slot(user.id)
        invoice = Invoice(
            title=fields["title"],
            description=fields["description"],
            payload=payload,
            currency=currency,
            total_amount=price["amount"],
            prices=[{"label": price["label"], "amount": price["amount"]}],
            start_parameter=params.get_str("start_parameter") or "",
        )
        message = self._add_message(user, from_bot=True, invoice=invoice, reply_markup=markup)
        return message.to_api()

    def _answer_pre_checkout_query(self, params: Params) -> bool:
        query = self.pre_checkout_queries.get(params.get_str("pre_checkout_query_id") or "")
        if query is None or query.answered:
            raise bad_request(QUERY_TOO_OLD)
        if self.pre_checkout_timeout is not None and trio.current_time() - query.created_at > self.pre_checkout_timeout:
            raise bad_request(QUERY_TOO_OLD)
        if not params.has("ok"):
            raise bad_request("ok is empty")
        ok = params.get_bool("ok")
        error_message = params.get_str("error_message")
        if not ok and not error_message:
            raise bad_request("ERROR_MESSAGE_EMPTY")
        query.answered = True
        query.ok = ok
        user = self.users[query.user_id]
        if not ok:
            query.error_message = error_message
            self.notices.append(
                Notice(seq=self.change_seq + 1, chat_id=user.id, kind="payment_error", text=error_message or "")
            )
            self._changed()
            return True
        charge_id = self._new_id("stxFAKE")
        query.charge_id = charge_id
        query.invoice.paid_charge_id = charge_id
        self.payments[charge_id] = StarPayment(
            charge_id=charge_id, user_id=user.id, amount=query.invoice.total_amount, payload=query.invoice.payload
        )
        paid = self._add_message(
            user,
            from_bot=False,
            successful_payment={
                "currency": query.invoice.currency,
                "total_amount": query.invoice.total_amount,
                "invoice_payload": query.invoice.payload,
                "telegram_payment_charge_id": charge_id,
                "provider_payment_charge_id": "",
            },
        )
        self._queue_update("message", paid.to_api())
        return True

    def _refund_star_payment(self, params: Params) -> bool:
        user_id = params.get_int("user_id")
        if user_id is None:
            raise bad_request("user_id is empty")
        payment = self.payments.get(params.get_str("telegram_payment_charge_id") or "")
        if payment is None:
            raise bad_request("CHARGE_NOT_FOUND")
        if payment.user_id != user_id:
            raise bad_request("USER_ID_INVALID")
        if payment.refunded:
            raise bad_request("CHARGE_ALREADY_REFUNDED")
        payment.refunded = True
        user = self.users[user_id]
        refund = self._add_message(
            user,
            from_bot=False,
            refunded_payment={
                "currency": "XTR",
                "total_amount": payment.amount,
                "invoice_payload": payment.payload,
                "telegram_payment_charge_id": payment.charge_id,
            },
        )
        self._queue_update("message", refund.to_api())
        return True

    # ====================================================================================== user side

    def add_user(
        self,
        user_id: int,
        first_name: str = "Test",
        *,
        last_name: str | None = None,
        username: str | None = None,
        language_code: str | None = "en",
    ) -> FakeUser:
        """Create (or update the profile of) a Telegram user. They have not started the bot yet."""
        if user_id <= 0 or user_id == self.bot_id:
            raise SandboxError("user ids are positive and differ from the bot's")
        if not first_name:
            raise SandboxError("first_name is required")
        user = self.users.get(user_id)
        if user is None:
            user = FakeUser(user_id, first_name, last_name, username, language_code)
            self.users[user_id] = user
        else:
            user.first_name, user.last_name = first_name, last_name
            user.username, user.language_code = username, language_code
        self._changed()
        return user

    def _user(self, user_id: int) -> FakeUser:
        user = self.users.get(user_id)
        if user is None:
            raise SandboxError(f"no user {user_id}; add_user() first")
        return user

    def _mark_action(self, user: FakeUser) -> None:
        user.last_action_seq = self.change_seq

    def user_sends(self, user_id: int, text: str, *, reply_to_message_id: int | None = None) -> ChatMessage:
        """The user writes ``text`` (``/command`` gets a bot_command entity) → a ``message`` update.

        A user who blocked the bot unblocks it first, like Telegram's "Restart" button.
        """
        user = self._user(user_id)
        if not text.strip():
            raise SandboxError("Telegram does not send empty messages")
        if utf16_len(text) > MAX_TEXT:
            raise SandboxError("text longer than 4096 characters")
        if user.blocked:
            self.user_unblocks_bot(user_id)
        self._mark_action(user)
        user.started = True
        reply_to = self._find_message(user.id, reply_to_message_id)
        message = self._add_message(
            user, from_bot=False, text=text, entities=detect_bot_commands(text), reply_to=reply_to
        )
        self._queue_update("message", message.to_api())
        return message

    def user_presses_button(
        self, user_id: int, message_id: int, data: str | None = None, *, text: str | None = None
    ) -> CallbackQuery:
        """Press an inline button (chosen by ``callback_data`` or by its label) → a ``callback_query``."""
        user = self._user(user_id)
        message = self._find_message(user.id, message_id)
        if message is None or not message.from_bot:
            raise SandboxError(f"no bot message {message_id} in chat {user_id}")
        for button in message.buttons:
            if "callback_data" in button and (
                (data is not None and button["callback_data"] == data) or (data is None and button["text"] == text)
            ):
                break
        else:
            raise SandboxError(f"message {message_id} has no callback button {data or text!r}")
        self._mark_action(user)
        query = CallbackQuery(
            id=str(int(self._new_id(), 16) % 10**19),
            user_id=user.id,
            message_id=message.message_id,
            data=button["callback_data"],
        )
        self.callback_queries[query.id] = query
        self._queue_update(
            "callback_query",
            {
                "id": query.id,
                "from": user.to_api(),
                "message": message.to_api(),
                "chat_instance": str((user.id * 2654435761 + self.bot_id) % 10**18),
                "data": query.data,
            },
        )
        self._changed()
        return query

    def user_pays_invoice(self, user_id: int, message_id: int) -> PreCheckoutQuery:
        """The user confirms payment of an invoice message → a ``pre_checkout_query`` update.

        When the bot answers ok=true, a ``message`` update with ``successful_payment`` follows;
        on ok=false the user sees the bot's error_message (a ``payment_error`` notice).
        """
        user = self._user(user_id)
        message = self._find_message(user.id, message_id)
        if message is None or message.invoice is None:
            raise SandboxError(f"message {message_id} in chat {user_id} is not an invoice")
        if message.invoice.paid_charge_id is not None:
            raise SandboxError("this invoice is already paid")
        self._mark_action(user)
        query = PreCheckoutQuery(
            id=str(int(self._new_id(), 16) % 10**19),
            user_id=user.id,
            message_id=message_id,
            invoice=message.invoice,
            created_at=trio.current_time(),
        )
        self.pre_checkout_queries[query.id] = query
        self._queue_update(
            "pre_checkout_query",
            {
                "id": query.id,
                "from": user.to_api(),
                "currency": message.invoice.currency,
                "total_amount": message.invoice.total_amount,
                "invoice_payload": message.invoice.payload,
            },
        )
        self._changed()
        return query

    def _membership_update(self, user: FakeUser, old: str, new: str) -> None:
        def member(status: str) -> JSONDict:
            result: JSONDict = {"status": status, "user": self.bot_user()}
            if status == "kicked":
                result["until_date"] = 0
            return result

        self._queue_update(
            "my_chat_member",
            {
                "chat": user.chat_api(),
                "from": user.to_api(),
                "date": int(time.time()),
                "old_chat_member": member(old),
                "new_chat_member": member(new),
            },
        )
        self._changed()

    def user_blocks_bot(self, user_id: int) -> None:
        """From now on the bot gets 403 "bot was blocked by the user"; the bot gets a my_chat_member."""
        user = self._user(user_id)
        if user.blocked:
            return
        user.blocked = True
        self._mark_action(user)
        self._membership_update(user, "member", "kicked")

    def user_unblocks_bot(self, user_id: int) -> None:
        user = self._user(user_id)
        if not user.blocked:
            return
        user.blocked = False
        self._mark_action(user)
        self._membership_update(user, "kicked", "member")

    def inject_update(self, update: JSONDict) -> int:
        """Queue an arbitrary raw update (fuzzing the bot's loop); its ``update_id`` is (re)assigned."""
        raw = {key: value for key, value in update.items() if key != "update_id"}
        return self._append_update(raw)

    # ================================================================================ reading results

    def transcript(self, chat_id: int, *, include_deleted: bool = False) -> list[ChatMessage]:
        """The chat as the user sees it: both sides, edits applied, deleted messages left out."""
        return [m for m in self.messages.get(chat_id, []) if include_deleted or not m.deleted]

    def bot_messages(self, chat_id: int) -> list[ChatMessage]:
        return [m for m in self.transcript(chat_id) if m.from_bot]

    def notices_for(self, chat_id: int) -> list[Notice]:
        return [n for n in self.notices if n.chat_id == chat_id]

    async def wait_until(self, condition: Callable[[], bool], timeout: float = DEFAULT_WAIT_SECONDS) -> None:
        """Wait (Trio time) until ``condition()`` holds; it is re-checked after every change."""
        with trio.fail_after(timeout):
            while not condition():
                await self._change_event.wait()

    async def wait_for_bot_message(
        self,
        chat_id: int,
        predicate: Callable[[ChatMessage], bool] | None = None,
        timeout: float = DEFAULT_WAIT_SECONDS,
        *,
        since: int | None = None,
    ) -> ChatMessage:
        """The first bot message in the chat sent or edited after ``since`` that satisfies ``predicate``.

        ``since`` is a :attr:`change_seq` value; by default the user's latest action in that chat, so
        ``fake.user_sends(u, "/start"); await fake.wait_for_bot_message(u)`` returns the reply to /start
        even if it was already sent. Raises ``trio.TooSlowError`` with the transcript when none comes.
        """
        user = self._user(chat_id)
        mark = user.last_action_seq if since is None else since
        found: list[ChatMessage] = []

        def check() -> bool:
            for message in self.transcript(chat_id):
                if message.from_bot and message.revision > mark and (predicate is None or predicate(message)):
                    found.append(message)
                    return True
            return False

        try:
            await self.wait_until(check, timeout)
        except trio.TooSlowError:
            lines = [
                f"  {'bot' if m.from_bot else 'user'} #{m.message_id}: {m.text or m.caption!r}"
                for m in self.transcript(chat_id)
            ]
            raise trio.TooSlowError(
                f"no matching bot message in chat {chat_id} within {timeout}s; transcript:\n" + "\n".join(lines)
            ) from None
        return found[0]

    def stats(self) -> JSONDict:
        """Counters for tests and the web page (JSON-ready)."""
        return {
            "requests": dict(self.requests),
            "responses": {str(status): count for status, count in self.responses.items()},
            "too_many_requests_sent": self.too_many_requests_sent,
            "rate_limited": self.rate_limited,
            "paid_messages": len(self.paid_send_times),
            "paid_refused": self.paid_refused,
            "pending_updates": len(self._pending),
            "polls_waiting": self._polls_waiting,
            "faults": [rule.to_json() for rule in self.faults],
        }


def _error_reply(error: ApiError) -> BotReply:
    return BotReply(error.error_code, error_body(error))


def _check_inline_button(button: Any) -> None:
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


_MD_SPECIAL = "_*[]()~`>#+-=|{}.!"


def _parse_markdown_v2(text: str) -> ParsedText:
    """A small MarkdownV2 subset: ``*bold* _italic_ __underline__ ~strike~ ||spoiler|| `code` [t](url)``
    and backslash escapes; an unescaped reserved character is an error, as on Telegram."""
    chunks: list[str] = []
    entities: list[JSONDict] = []
    open_marks: list[tuple[str, int]] = []
    position = 0
    index = 0
    marks = {"*": "bold", "_": "italic", "__": "underline", "~": "strikethrough", "||": "spoiler"}

    def emit(piece: str) -> None:
        nonlocal position
        chunks.append(piece)
        position += utf16_len(piece)

    while index < len(text):
        char = text[index]
        if char == "\\" and index + 1 < len(text):
            emit(text[index + 1])
            index += 2
            continue
        mark = text[index : index + 2] if text[index : index + 2] in ("__", "||") else char
        if mark in marks:
            if open_marks and open_marks[-1][0] == mark:
                _, start = open_marks.pop()
                if position > start:
                    entities.append({"type": marks[mark], "offset": start, "length": position - start})
            else:
                open_marks.append((mark, position))
            index += len(mark)
            continue
        if char == "`":
            end = text.find("`", index + 1)
            if end < 0:
                raise EntityParseError(f"Can't find end of Code entity at byte offset {len(text[:index].encode())}")
            start = position
            emit(text[index + 1 : end])
            entities.append({"type": "code", "offset": start, "length": position - start})
            index = end + 1
            continue
        if char == "[":
            match = re.match(r"\[((?:[^\]\\]|\\.)*)\]\(((?:[^)\\]|\\.)*)\)", text[index:])
            if match is None:
                raise EntityParseError("Character '[' is reserved and must be escaped with the preceding '\\'")
            start = position
            emit(re.sub(r"\\(.)", r"\1", match.group(1)))
            entities.append(
                {
                    "type": "text_link",
                    "offset": start,
                    "length": position - start,
                    "url": re.sub(r"\\(.)", r"\1", match.group(2)),
                }
            )
            index += match.end()
            continue
        if char in _MD_SPECIAL:
            raise EntityParseError(f"Character '{char}' is reserved and must be escaped with the preceding '\\'")
        emit(char)
        index += 1
    if open_marks:
        mark, _ = open_marks[-1]
        raise EntityParseError(f"Can't find end of {marks[mark].title()} entity")
    return plain_text("".join(chunks), entities)


async def serve_fake_telegram(
    fake: FakeTelegram,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    body_timeout: float = float("inf"),
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``fake`` over HTTP with the daemon's server (:func:`vpnd.web.serve`) until cancelled.

    ``task_status.started(base_url)`` once the socket is bound, e.g. ``"http://127.0.0.1:41234"``:
    the Bot API is at ``f"{base_url}/bot{token}/{method}"`` (python-telegram-bot:
    ``Bot(token, base_url=f"{base_url}/bot")``), the web chat at ``base_url + "/"``, the sandbox JSON API
    under ``/sandbox/api/``. A request body must arrive within ``body_timeout`` seconds (else 408).
    """
    from vpnd.web import serve, server_config
    from vpnd_sandbox.telegram_asgi import telegram_router

    await serve(telegram_router(fake, body_timeout=body_timeout), server_config(host, port), task_status=task_status)


def main(argv: list[str] | None = None) -> None:
    """``python -m vpnd_sandbox.telegram_fake [--host H] [--port P] [--token T]``: serve a fresh fake.

    Prints the base URL as the first line of stdout (subprocess tests read it), then serves until killed.
    """
    import argparse
    import functools

    parser = argparse.ArgumentParser(description="Fake Telegram Bot API + web chat (vpnd sandbox)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--token", default=FakeTelegram.__attrs_attrs__.token.default)
    parser.add_argument("--bot-username", default="vpnd_demo_bot")
    args = parser.parse_args(argv)
    fake = FakeTelegram(token=args.token, bot_username=args.bot_username)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            base_url = await nursery.start(functools.partial(serve_fake_telegram, fake, host=args.host, port=args.port))
            print(base_url, flush=True)
            print(f"web chat: {base_url}/   bot API: {base_url}/bot{fake.token}/getMe", flush=True)

    try:
        trio.run(run)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
