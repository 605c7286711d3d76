"""The Telegram Bot API client: python-telegram-bot's `Bot`, made safe for Trio, plus sending rules.

PTB's API calls run on httpx, which works under Trio; only `Bot.initialize()`/`shutdown()` use
`asyncio.gather`, so `TrioBot` overrides them with sequential awaits (tests/telegram/test_client.py
keeps PTB's minor version honest). `telegram.ext` is asyncio-only and is not used. The hot calls
(getUpdates, sendMessage, editMessageText, answerCallbackQuery) bypass PTB's request layer through
`TrioBot.wire` (`vpnd.telegram.wire`), set up by `open_bot`.

`Sender` is how vpnd sends: every message goes through the shared `OutboundLimiter`, a 429 pauses
all sending for `retry_after`, and transient failures (network, timeouts, 5xx) are retried with
backoff a bounded number of times. Permanent failures surface as typed errors.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import attrs
import telegram
import trio
from telegram.error import BadRequest, Forbidden, NetworkError, RetryAfter, TelegramError, TimedOut
from telegram.request import HTTPXRequest

from vpnd.config import TelegramConfig
from vpnd.metrics import Metrics
from vpnd.telegram.ratelimit import OutboundLimiter, Priority
from vpnd.telegram.wire import BotWire, open_bot_wire

log = logging.getLogger("vpnd.telegram")

T = TypeVar("T")


class TrioBot(telegram.Bot):
    """`telegram.Bot` whose initialize/shutdown don't use asyncio.gather.

    `wire` (set by `open_bot`) carries the hot calls — getUpdates, sendMessage, editMessageText,
    answerCallbackQuery — as plain JSON over h11: PTB's request layer and its parsing of every answer
    into objects were about half of the CPU an update cost (bench/README.md). Everything else goes
    through PTB."""

    wire: BotWire | None = None

    def set_wire(self, wire: BotWire | None) -> None:
        with self._unfrozen():
            self.wire = wire

    async def initialize(self) -> None:
        if self._requests_initialized and self._bot_initialized:
            return
        if not self._requests_initialized:
            for request in self._request:
                await request.initialize()
            self._requests_initialized = True
        await self.get_me()
        self._bot_initialized = True

    async def get_raw_updates(
        self, *, offset: int | None, timeout: int, limit: int, allowed_updates: list[str]
    ) -> list[dict[str, Any]]:
        """getUpdates returning the raw JSON, so one malformed update cannot break a whole batch
        (PTB's `get_updates` parses them all and would raise)."""
        data: dict[str, Any] = {"timeout": timeout, "limit": limit, "allowed_updates": allowed_updates}
        if offset is not None:
            data["offset"] = offset
        if self.wire is not None:
            result = await self.wire.call("getUpdates", data, read_timeout=timeout + 10.0)
        else:
            result = await self._post("getUpdates", data, read_timeout=timeout + 10.0)
        if not isinstance(result, list):
            raise NetworkError(f"getUpdates returned {type(result).__name__}, expected a list")
        return [u for u in result if isinstance(u, dict)]

    async def shutdown(self) -> None:
        if not self._requests_initialized:
            return
        for request in self._request:
            await request.shutdown()
        self._requests_initialized = False
        self._bot_initialized = False


def retry_after_seconds(exc: RetryAfter) -> float:
    value = exc.retry_after
    return value.total_seconds() if isinstance(value, dt.timedelta) else float(value)


class ChatUnreachable(Exception):
    """403: the user blocked the bot or deleted their account."""


class ChatNotFound(Exception):
    """400 chat not found: the chat never talked to us (or is gone)."""


class SendFailed(Exception):
    """Transient failures persisted past the retry limit."""


def build_bot(config: TelegramConfig, *, pool_size: int = 64) -> TrioBot:
    base = config.api_base_url.rstrip("/")
    request = HTTPXRequest(
        connection_pool_size=pool_size, read_timeout=15.0, write_timeout=15.0, connect_timeout=5.0, pool_timeout=10.0
    )
    # getUpdates gets its own connection and a read timeout above the long-poll timeout.
    updates_request = HTTPXRequest(
        connection_pool_size=1, read_timeout=config.poll_timeout + 10.0, connect_timeout=5.0, pool_timeout=5.0
    )
    return TrioBot(
        config.token,
        base_url=f"{base}/bot",
        base_file_url=f"{base}/file/bot",
        request=request,
        get_updates_request=updates_request,
    )


@asynccontextmanager
async def open_bot(config: TelegramConfig, *, pool_size: int = 64) -> AsyncIterator[TrioBot]:
    """A bot whose HTTP clients are open; `getMe` is not called here (`vpnd.compose` does, before polling)."""
    bot = build_bot(config, pool_size=pool_size)
    for request in bot._request:
        await request.initialize()
    bot._requests_initialized = True
    try:
        async with open_bot_wire(config.api_base_url, config.token, max_connections=pool_size) as wire:
            bot.set_wire(wire)
            yield bot
    finally:
        bot.set_wire(None)
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            await bot.shutdown()


@attrs.define(eq=False)
class Sender:
    bot: TrioBot
    limiter: OutboundLimiter
    metrics: Metrics | None = None
    max_attempts: int = 5
    max_backoff: float = 30.0

    async def call(
        self,
        chat_id: int,
        fn: Callable[[], Awaitable[T]],
        *,
        priority: Priority = Priority.REPLY,
        counts_as_message: bool = True,
        paid: bool = False,
        before_send: Callable[[], Awaitable[None]] | None = None,
    ) -> T:
        """Run one Bot API call to `chat_id` under the rate limits, with retries.

        `paid`: a broadcast message sent with `allow_paid_broadcast` (the limiter's paid lane).
        `before_send`: awaited after the limiter let this call through and just before each attempt goes
        on the wire (a broadcast records the attempt there); an exception from it aborts the call."""
        attempt = 0
        while True:
            attempt += 1
            if counts_as_message:
                await self.limiter.acquire(chat_id, priority, paid=paid)
            if before_send is not None:
                await before_send()
            try:
                return await fn()
            except RetryAfter as exc:
                seconds = retry_after_seconds(exc)
                self.limiter.pause(seconds)
                if self.metrics is not None:
                    self.metrics.telegram_429.inc()
                log.warning(
                    "event=telegram_429 chat_id=%s retry_after=%g priority=%s paid=%s",
                    chat_id,
                    seconds,
                    priority.value,
                    paid,
                )
                if attempt >= self.max_attempts:
                    raise SendFailed(f"still rate limited after {attempt} attempts") from exc
                await trio.sleep(seconds)
            except Forbidden as exc:
                raise ChatUnreachable(str(exc)) from exc
            except BadRequest as exc:
                if "chat not found" in str(exc).lower():
                    raise ChatNotFound(str(exc)) from exc
                raise
            except (TimedOut, NetworkError) as exc:  # includes 5xx and dropped connections
                if attempt >= self.max_attempts:
                    raise SendFailed(f"{type(exc).__name__}: {exc}") from exc
                delay = backoff(attempt, self.max_backoff)
                log.info(
                    "event=telegram_retry chat_id=%s attempt=%d delay=%.2f error=%s",
                    chat_id,
                    attempt,
                    delay,
                    type(exc).__name__,
                )
                await trio.sleep(delay)

    async def send_message(
        self,
        chat_id: int,
        text: str,
        *,
        priority: Priority = Priority.REPLY,
        paid: bool = False,
        before_send: Callable[[], Awaitable[None]] | None = None,
        **kwargs: Any,
    ) -> SentMessage:
        """`paid`: send with `allow_paid_broadcast` in the limiter's paid lane (broadcasts only);
        `before_send` as for `call`."""
        if paid:
            kwargs["allow_paid_broadcast"] = True
        wire = self.bot.wire
        if wire is not None:
            params = {"chat_id": chat_id, "text": text, "parse_mode": "HTML", **_json_params(kwargs)}
            result = await self.call(
                chat_id,
                lambda: wire.call("sendMessage", params),
                priority=priority,
                paid=paid,
                before_send=before_send,
            )
            return SentMessage(chat_id, int(result["message_id"]))
        message = await self.call(
            chat_id,
            lambda: self.bot.send_message(chat_id, text, parse_mode="HTML", **_ptb_params(kwargs)),
            priority=priority,
            paid=paid,
            before_send=before_send,
        )
        return SentMessage(chat_id, message.message_id)

    async def send_media(
        self,
        chat_id: int,
        kind: str,
        file_id: str,
        caption: str,
        *,
        priority: Priority = Priority.REPLY,
        paid: bool = False,
        before_send: Callable[[], Awaitable[None]] | None = None,
        **kwargs: Any,
    ) -> SentMessage:
        """sendPhoto / sendVideo / sendDocument / sendAnimation of a file Telegram already has (`file_id`),
        with an HTML caption; `paid` and `before_send` as for `send_message`."""
        if kind not in ("photo", "video", "document", "animation"):
            raise ValueError(f"unknown media kind {kind!r}")
        if paid:
            kwargs["allow_paid_broadcast"] = True
        method = "send" + kind.title()
        wire = self.bot.wire
        if wire is not None:
            params = {
                "chat_id": chat_id,
                kind: file_id,
                "caption": caption,
                "parse_mode": "HTML",
                **_json_params(kwargs),
            }
            result = await self.call(
                chat_id, lambda: wire.call(method, params), priority=priority, paid=paid, before_send=before_send
            )
            return SentMessage(chat_id, int(result["message_id"]))
        send = getattr(self.bot, f"send_{kind}")
        message = await self.call(
            chat_id,
            lambda: send(chat_id, file_id, caption=caption, parse_mode="HTML", **_ptb_params(kwargs)),
            priority=priority,
            paid=paid,
            before_send=before_send,
        )
        return SentMessage(chat_id, message.message_id)

    async def send_photo(
        self, chat_id: int, photo: bytes, *, caption: str | None = None, **kwargs: Any
    ) -> telegram.Message:
        return await self.call(
            chat_id,
            lambda: self.bot.send_photo(chat_id, photo, caption=caption, parse_mode="HTML", **_ptb_params(kwargs)),
        )

    async def edit_text(
        self, chat_id: int, message_id: int, text: str, *, priority: Priority = Priority.REPLY, **kwargs: Any
    ) -> None:
        """Edit a message; an edit counts against the chat's limit like a new message."""
        wire = self.bot.wire

        async def edit() -> None:
            try:
                if wire is not None:
                    params = {
                        "chat_id": chat_id,
                        "message_id": message_id,
                        "text": text,
                        "parse_mode": "HTML",
                        **_json_params(kwargs),
                    }
                    await wire.call("editMessageText", params)
                else:
                    await self.bot.edit_message_text(
                        text, chat_id=chat_id, message_id=message_id, parse_mode="HTML", **_ptb_params(kwargs)
                    )
            except BadRequest as exc:
                if "message is not modified" not in str(exc).lower():
                    raise

        await self.call(chat_id, edit, priority=priority)

    async def answer_callback(
        self, chat_id: int, callback_query_id: str, text: str | None = None, show_alert: bool = False
    ) -> None:
        wire = self.bot.wire

        async def answer() -> None:
            try:
                if wire is not None:
                    params: dict[str, Any] = {"callback_query_id": callback_query_id}
                    if text is not None:
                        params["text"] = text
                    if show_alert:
                        params["show_alert"] = True
                    await wire.call("answerCallbackQuery", params)
                else:
                    await self.bot.answer_callback_query(callback_query_id, text=text, show_alert=show_alert)
            except BadRequest as exc:  # too old or already answered: nothing left to do
                log.info("event=callback_answer_failed error=%s", str(exc)[:120])

        await self.call(chat_id, answer, counts_as_message=False)

    async def get_chat_member(self, chat: int | str, user_id: int) -> dict[str, Any]:
        """`getChatMember` as Bot API JSON (``status``, ``is_member`` for "restricted", ...).

        It shows nothing in any chat, so it takes no message slot (like a callback answer); it still
        waits out a 429 pause — Telegram's flood control is per bot, not per method — and gets the same
        retries. Errors are the typed ones of `call` ("chat not found" → `ChatNotFound`)."""
        paused = self.limiter.paused_for
        if paused > 0:
            await trio.sleep(paused)
        wire = self.bot.wire
        if wire is not None:
            params = {"chat_id": chat, "user_id": user_id}
            result = await self.call(user_id, lambda: wire.call("getChatMember", params), counts_as_message=False)
            return dict(result) if isinstance(result, dict) else {}
        member = await self.call(user_id, lambda: self.bot.get_chat_member(chat, user_id), counts_as_message=False)
        return member.to_dict()


@attrs.frozen
class SentMessage:
    chat_id: int
    message_id: int


def _json_params(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments as Bot API JSON: PTB objects as their dicts, None left out."""
    return {
        key: value.to_dict() if isinstance(value, telegram.TelegramObject) else value
        for key, value in kwargs.items()
        if value is not None
    }


def _ptb_params(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments for PTB's methods: a keyboard given as Bot API JSON becomes PTB's object."""
    converted = dict(kwargs)
    if isinstance(kwargs.get("reply_markup"), dict):
        converted["reply_markup"] = telegram.InlineKeyboardMarkup.de_json(kwargs["reply_markup"], None)
    if isinstance(kwargs.get("link_preview_options"), dict):
        converted["link_preview_options"] = telegram.LinkPreviewOptions(**kwargs["link_preview_options"])
    return converted


def backoff(attempt: int, cap: float) -> float:
    """Exponential backoff with full jitter: uniform(0, min(cap, 0.5 * 2**attempt))."""
    return random.uniform(0.05, min(cap, 0.5 * 2**attempt))


def describe_telegram_error(exc: TelegramError) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]
