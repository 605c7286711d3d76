"""Fake Telegram's state and the behaviour that is not one Bot API method: the update queue and
long-poll wake-ups, dispatching a Bot API request (faults first), simulated users, and waits for tests.

See :mod:`vpnd_sandbox.telegram` for the whole picture.
"""

from __future__ import annotations

import collections
import inspect
import random
import time
from collections.abc import Callable, Iterable
from typing import Any, Literal

import attrs
import trio

from vpnd_sandbox.telegram.faults import FaultKind, FaultRule, fault_reply, pick_fault
from vpnd_sandbox.telegram.formatting import detect_bot_commands, utf16_len
from vpnd_sandbox.telegram.limits import MAX_CAPTION, MAX_TEXT, TokenBucket
from vpnd_sandbox.telegram.methods import Method, bot_methods
from vpnd_sandbox.telegram.records import (
    CallbackQuery,
    ChatMessage,
    FakeChannel,
    FakeUser,
    MemberStatus,
    Notice,
    PreCheckoutQuery,
    RequestRecord,
    SandboxError,
    StarPayment,
    StoredFile,
)
from vpnd_sandbox.telegram.wire import ApiError, BotReply, JSONDict, error_reply, parse_request

#: How many requests :attr:`FakeTelegram.request_log` keeps (the oldest are dropped).
REQUEST_LOG_LIMIT = 100_000

#: The default bound of :meth:`FakeTelegram.wait_until` and :meth:`FakeTelegram.wait_for_bot_message`:
#: generous, because the thing waited for is usually vpnd answering through PostgreSQL on a machine that
#: may be busy; a test that expects nothing to come passes its own short timeout.
DEFAULT_WAIT_SECONDS = 30.0


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
    #: The card provider BotFather "connected" (Telegram Payments): fiat invoices must carry this token.
    payment_provider_token: str = "284685063:TEST:vpndSandboxCardProvider"
    max_pending_updates: int = 100_000
    seed: int = 0

    users: dict[int, FakeUser] = attrs.field(factory=dict, init=False)
    channels: dict[int, FakeChannel] = attrs.field(factory=dict, init=False)
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
    _methods: dict[str, tuple[str, Method]] = attrs.field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        self._random = random.Random(self.seed)
        self._methods = bot_methods(self)

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
        entry: tuple[str, Method] | None,
        content_type: str,
        body: bytes,
        query_string: bytes,
    ) -> BotReply:
        if token != self.token:
            return error_reply(ApiError(401, "Unauthorized"))
        if entry is None:
            return error_reply(ApiError(404, "Not Found"))
        fault = pick_fault(self, method.lower())
        if fault is not None:
            return await fault_reply(self, fault)
        try:
            params = parse_request(content_type, body, query_string)
            result = entry[1](params)
            if inspect.isawaitable(result):
                result = await result
        except ApiError as error:
            return error_reply(error)
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

    # ------------------------------------------------------------------------------ message bookkeeping

    def _find_message(self, chat_id: int, message_id: int | None) -> ChatMessage | None:
        if message_id is None:
            return None
        for message in self.messages.get(chat_id, []):
            if message.message_id == message_id:
                return None if message.deleted else message
        return None

    def _next_message_id(self, chat_id: int) -> int:
        chat = self.messages.setdefault(chat_id, [])
        return chat[-1].message_id + 1 if chat else 1

    def _edited(self, message: ChatMessage) -> JSONDict:
        """A bot's edit took effect (subclasses count it: the benchmarks' timed fake)."""
        message.edit_date = int(time.time())
        message.revision = self._changed()
        return message.to_api()

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

    def add_channel(
        self, chat_id: int, title: str = "Channel", *, username: str | None = None, bot_is_admin: bool = True
    ) -> FakeChannel:
        """Create a channel (ids are negative, "-100…") the bot can look members up in (``getChatMember``)."""
        if chat_id >= 0:
            raise SandboxError("channel ids are negative")
        channel = FakeChannel(chat_id, title, username, bot_is_admin)
        self.channels[chat_id] = channel
        return channel

    def set_member(self, chat_id: int, user_id: int, status: MemberStatus, *, is_member: bool = True) -> None:
        """The user joins, leaves, is banned from or restricted in the channel."""
        self._user(user_id)
        self.channels[chat_id].members[user_id] = (status, is_member)

    def find_channel(self, key: object) -> FakeChannel | None:
        """A channel by numeric id or "@username" (case-insensitive, as Telegram)."""
        if isinstance(key, str):
            name = key.removeprefix("@").lower()
            return next((c for c in self.channels.values() if (c.username or "").lower() == name), None)
        return self.channels.get(key) if isinstance(key, int) else None

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

    def user_sends_media(
        self, user_id: int, kind: Literal["photo", "document", "video", "animation"], *, caption: str | None = None
    ) -> ChatMessage:
        """The user sends a photo, video, document or animation (with an optional caption): the bot gets its
        file_id and may send it on by that id, as with Telegram."""
        user = self._user(user_id)
        if caption is not None and utf16_len(caption) > MAX_CAPTION:
            raise SandboxError("caption longer than 1024 characters")
        if user.blocked:
            self.user_unblocks_bot(user_id)
        self._mark_action(user)
        user.started = True
        prefix = {"photo": "AgAC", "document": "BQAC", "video": "BAAC", "animation": "CgAC"}[kind]
        stored = StoredFile(
            file_id=self._new_id(prefix + "AgUAAxkBAA"),
            file_unique_id=self._new_id("AQAD"),
            kind=kind,
            data=b"\x89PNG\r\n\x1a\n" + b"\x00" * 8 + b"\x00\x00\x02\x80\x00\x00\x02\x80",
            file_name=None
            if kind == "photo"
            else f"file.{ {'document': 'pdf', 'video': 'mp4', 'animation': 'mp4'}[kind] }",
            mime_type="image/jpeg" if kind == "photo" else ("application/pdf" if kind == "document" else "video/mp4"),
            width=640,
            height=640,
        )
        self.files[stored.file_id] = stored
        content: dict[str, Any] = {kind: stored}
        if kind == "animation":
            content["document"] = None
        message = self._add_message(user, from_bot=False, caption=caption, **content)
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
        checkout = {
            "id": query.id,
            "from": user.to_api(),
            "currency": message.invoice.currency,
            "total_amount": message.invoice.total_amount,
            "invoice_payload": message.invoice.payload,
        }
        if message.invoice.need_email:
            checkout["order_info"] = {"email": f"user{user.id}@example.test"}
        self._queue_update("pre_checkout_query", checkout)
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
