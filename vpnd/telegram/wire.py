"""A cheap Bot API transport for the hot calls: JSON over HTTP/1.1 keep-alive, on h11 and Trio streams.

Why it exists: under load, python-telegram-bot's `Bot._post` → `HTTPXRequest` → httpx/httpcore took about
half of vpnd's CPU, and parsing every sendMessage answer into PTB objects that nobody reads another eighth.
`BotWire.call(method, params)` POSTs a compact JSON body to ``{base}/bot{token}/{method}`` and returns the
answer's decoded ``result`` — plain JSON, no PTB objects. PTB's `telegram.Bot` stays for everything else.

Contract (callers swap PTB for this without changing their error handling):

* Errors are PTB's exception classes, mapped exactly as `telegram.request.BaseRequest._request_wrapper`
  and `BaseRequest.post` do: the body's ``description`` and ``parameters`` (``migrate_to_chat_id`` →
  `ChatMigrated`, ``retry_after`` → `RetryAfter`), 403 → `Forbidden`, 401/404 → `InvalidToken`,
  400 → `BadRequest`, 409 → `Conflict`, any other status → `NetworkError`; a 2xx body that is not JSON →
  `TelegramError("Invalid server response")`; a 2xx body without ``result`` → `KeyError` (as PTB, which
  does not look at ``ok``). Connection and protocol failures → `NetworkError`; a timeout in any phase
  (pool wait, connect + TLS handshake, write, read) → `TimedOut`.
* Keep-alive pool: idle connections are reused last-in first-out; at most ``max_connections`` are open
  (in use + idle); other calls wait up to ``pool_timeout``. A connection is discarded on any error, on
  cancellation, when the server says ``Connection: close``, and when it turns readable while idle (the
  server closed it). A call that fails on a *reused* connection before any byte of the answer arrived is
  retried once on a fresh connection (the server may have closed the idle socket just as we wrote —
  the keep-alive race); never after answer bytes were received. A connection idle for longer than
  ``keepalive_expiry`` is closed instead of reused.
* The read timeout bounds the whole answer (from the end of the write to the last byte), not each read.

The token is part of every request target; it never appears in reprs or exception messages.
"""

from __future__ import annotations

import json
import logging
import select
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from http import HTTPStatus
from typing import Any, Final
from urllib.parse import urlsplit

import attrs
import h11
import trio
from telegram.error import (
    BadRequest,
    ChatMigrated,
    Conflict,
    Forbidden,
    InvalidToken,
    NetworkError,
    RetryAfter,
    TelegramError,
    TimedOut,
)

__all__ = ["BotWire", "open_bot_wire"]

log = logging.getLogger("vpnd.telegram.wire")

RECEIVE_SIZE: Final = 65536
POOL_TIMEOUT_MESSAGE: Final = (
    "Pool timeout: All connections in the connection pool are occupied. "
    "Request was *not* sent to Telegram. Consider adjusting the connection pool size or the pool timeout."
)
# What a broken connection or a malformed answer raises on the way (ssl.SSLError is an OSError).
_CONNECTION_ERRORS: Final = (OSError, trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError)


@attrs.frozen
class Origin:
    """Where the Bot API is, parsed once: ``http(s)://host[:port][/prefix]``."""

    scheme: str
    host: str
    port: int
    host_header: bytes
    #: ``/prefix/bot<token>/`` as bytes: a method name is appended per call.
    target_prefix: bytes = attrs.field(repr=False)

    @classmethod
    def parse(cls, api_base_url: str, token: str) -> Origin:
        parts = urlsplit(api_base_url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"the Bot API base URL must be http(s)://host[:port][/path], not {api_base_url!r}")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError("the Bot API base URL must not carry a query, a fragment or credentials")
        default_port = 443 if scheme == "https" else 80
        port = parts.port or default_port
        host = parts.hostname
        bracketed = f"[{host}]" if ":" in host else host
        host_header = bracketed if port == default_port else f"{bracketed}:{port}"
        prefix = f"{parts.path.rstrip('/')}/bot{token}/"
        return cls(scheme, host, port, host_header.encode("ascii"), prefix.encode("ascii"))


@attrs.define(eq=False)
class _Connection:
    stream: trio.abc.Stream
    socket: trio.socket.SocketType
    protocol: h11.Connection = attrs.field(factory=lambda: h11.Connection(h11.CLIENT))
    #: How many requests were started on it: more than zero means a reused connection.
    used: int = 0
    #: Trio time at which it last went back to the pool.
    idle_since: float = 0.0

    def close(self) -> None:
        """Close at once, without a goodbye (no TLS close_notify): synchronous, so cancel-safe."""
        self.socket.close()

    def looks_closed(self) -> bool:
        """An idle HTTP/1.1 connection has nothing to read: readable means EOF (or junk) from the server."""
        fd = self.socket.fileno()
        if fd < 0:
            return True
        readable, _, _ = select.select([fd], [], [], 0)
        return bool(readable)


class _Stale(Exception):
    """A reused connection failed before any byte of the answer: the request may be sent again."""


@attrs.define(eq=False)
class BotWire:
    """The pool and the call; open it with :func:`open_bot_wire`."""

    origin: Origin
    max_connections: int
    connect_timeout: float
    read_timeout: float
    write_timeout: float
    pool_timeout: float
    keepalive_expiry: float
    ssl_context: ssl.SSLContext | None = attrs.field(repr=False)
    _slots: trio.Semaphore = attrs.field(init=False, repr=False)
    _idle: list[_Connection] = attrs.field(factory=list, init=False, repr=False)
    _closed: bool = attrs.field(default=False, init=False)
    _static_headers: list[tuple[bytes, bytes]] = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        if self.max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self._slots = trio.Semaphore(self.max_connections)
        self._static_headers = [
            (b"Host", self.origin.host_header),
            (b"User-Agent", b"vpnd"),
            (b"Content-Type", b"application/json"),
            (b"Accept", b"application/json"),
        ]

    async def call(self, method: str, params: dict[str, Any], *, read_timeout: float | None = None) -> Any:
        """POST ``params`` as JSON to the Bot API ``method``; the answer's ``result`` (see the module doc)."""
        if self._closed:
            raise RuntimeError("this BotWire is closed")
        body = json.dumps(params, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        target = self.origin.target_prefix + method.encode("ascii")
        status, payload = await self._request(target, body, self.read_timeout if read_timeout is None else read_timeout)
        return decode_answer(status, payload)

    def close(self) -> None:
        """Close the idle connections; connections in use are closed when their call ends."""
        self._closed = True
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()

    async def _request(self, target: bytes, body: bytes, read_timeout: float) -> tuple[int, bytes]:
        """Wait for one of the ``max_connections`` slots, then use a pooled connection or a new one."""
        try:
            self._slots.acquire_nowait()  # the usual case, without a cancel scope (the I/O below checkpoints)
        except trio.WouldBlock:
            acquired = False
            with trio.move_on_after(self.pool_timeout):
                await self._slots.acquire()
                acquired = True
            if not acquired:
                raise TimedOut(POOL_TIMEOUT_MESSAGE) from None
        try:
            connection = self._take_idle()
            if connection is not None:
                try:
                    return await self._exchange(connection, target, body, read_timeout)
                except _Stale as exc:
                    # A kept-alive connection the server had closed (its idle timeout): the request went
                    # nowhere, so it goes again on a new connection. Logged, since a send repeated here is
                    # what a duplicate would come from if the server had acted on it after all.
                    log.info("event=telegram_stale_connection error=%s", _describe(exc.__cause__ or exc))
            connection = await self._connect()
            return await self._exchange(connection, target, body, read_timeout)
        finally:
            self._slots.release()

    def _take_idle(self) -> _Connection | None:
        idle = self._idle
        if not idle:
            return None
        expired_before = trio.current_time() - self.keepalive_expiry
        while idle and idle[0].idle_since < expired_before:  # the oldest are at the bottom
            idle.pop(0).close()
        while idle:
            connection = idle.pop()
            if not connection.looks_closed():
                return connection
            connection.close()
        return None

    def _give_back(self, connection: _Connection) -> None:
        protocol = connection.protocol
        if self._closed or protocol.our_state is not h11.DONE or protocol.their_state is not h11.DONE:
            connection.close()  # Connection: close, or an answer we did not read to its end
            return
        protocol.start_next_cycle()
        connection.idle_since = trio.current_time()
        self._idle.append(connection)

    async def _connect(self) -> _Connection:
        with trio.move_on_after(self.connect_timeout):
            try:
                tcp = await trio.open_tcp_stream(self.origin.host, self.origin.port)
            except _CONNECTION_ERRORS as exc:
                raise NetworkError(f"BotWire: connecting failed: {_describe(exc)}") from exc
            stream: trio.abc.Stream = tcp
            if self.ssl_context is not None:
                tls = trio.SSLStream(tcp, self.ssl_context, server_hostname=self.origin.host, https_compatible=True)
                try:
                    await tls.do_handshake()
                except BaseException as exc:
                    tcp.socket.close()
                    if isinstance(exc, _CONNECTION_ERRORS):
                        raise NetworkError(f"BotWire: TLS handshake failed: {_describe(exc)}") from exc
                    raise
                stream = tls
            return _Connection(stream, tcp.socket)
        raise TimedOut("Timed out while connecting")

    async def _exchange(
        self, connection: _Connection, target: bytes, body: bytes, read_timeout: float
    ) -> tuple[int, bytes]:
        """One request/answer on `connection`; it goes back to the pool only if all went well."""
        reused = connection.used > 0
        connection.used += 1
        protocol = connection.protocol
        received = False
        reading = False
        done = False
        try:
            with trio.move_on_after(self.write_timeout) as phase:
                headers = [*self._static_headers, (b"Content-Length", str(len(body)).encode("ascii"))]
                data = protocol.send(h11.Request(method=b"POST", target=target, headers=headers))
                data += protocol.send(h11.Data(data=body)) or b""
                data += protocol.send(h11.EndOfMessage()) or b""
                await connection.stream.send_all(data)
                reading = True
                phase.deadline = trio.current_time() + read_timeout
                status = 0
                chunks: list[bytes] = []
                while True:
                    event = protocol.next_event()
                    if event is h11.NEED_DATA:
                        received_now = await connection.stream.receive_some(RECEIVE_SIZE)
                        received = received or bool(received_now)
                        protocol.receive_data(bytes(received_now))
                    elif type(event) is h11.Data:
                        chunks.append(bytes(event.data))
                    elif type(event) is h11.Response:
                        status = event.status_code
                    elif type(event) is h11.EndOfMessage:
                        break
                    elif type(event) is h11.ConnectionClosed or event is h11.PAUSED:
                        raise h11.RemoteProtocolError("the server closed the connection without an answer")
                    # An InformationalResponse (1xx) is not the answer: read on.
                done = True
            if not done:
                raise TimedOut("Timed out while reading the answer" if reading else "Timed out while sending")
        except _CONNECTION_ERRORS as exc:
            connection.close()
            if reused and not received:
                raise _Stale from exc
            raise NetworkError(f"BotWire: {_describe(exc)}") from exc
        except BaseException:
            connection.close()  # cancelled or timed out mid-exchange: the connection's state is unknown
            raise
        self._give_back(connection)
        return status, b"".join(chunks)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def decode_answer(status: int, payload: bytes) -> Any:
    """The ``result`` of a Bot API answer, or PTB's exception for it (`BaseRequest._request_wrapper` + `post`)."""
    if HTTPStatus.OK <= status <= 299:
        return _parse_json(payload)["result"]
    try:
        message = f"{HTTPStatus(status).phrase} ({status})"
    except ValueError:
        message = f"Unknown HTTPError ({status})"
    parsing_exception: TelegramError | None = None
    try:
        answer = _parse_json(payload)
    except TelegramError as exc:
        message += f". Parsing the server response {payload!r} failed"
        parsing_exception = exc
    else:
        message = answer.get("description") or message
        parameters = answer.get("parameters")
        if parameters:
            migrate_to_chat_id = parameters.get("migrate_to_chat_id")
            if migrate_to_chat_id:
                raise ChatMigrated(migrate_to_chat_id)
            retry_after = parameters.get("retry_after")
            if retry_after:
                raise RetryAfter(retry_after)
            message += f". The server response contained unknown parameters: {parameters}"
    exception: TelegramError
    if status == HTTPStatus.FORBIDDEN:
        exception = Forbidden(message)
    elif status in (HTTPStatus.NOT_FOUND, HTTPStatus.UNAUTHORIZED):
        exception = InvalidToken(message)
    elif status == HTTPStatus.BAD_REQUEST:
        exception = BadRequest(message)
    elif status == HTTPStatus.CONFLICT:
        exception = Conflict(message)
    else:
        exception = NetworkError(message)  # 502 "Bad Gateway" and everything else
    if parsing_exception is not None:
        raise exception from parsing_exception
    raise exception


def _parse_json(payload: bytes) -> Any:
    try:
        return json.loads(payload.decode("utf-8", "replace"))
    except ValueError as exc:
        raise TelegramError("Invalid server response") from exc


@asynccontextmanager
async def open_bot_wire(
    api_base_url: str,
    token: str,
    *,
    max_connections: int = 32,
    connect_timeout: float = 5.0,
    read_timeout: float = 15.0,
    write_timeout: float = 15.0,
    pool_timeout: float = 10.0,
    keepalive_expiry: float = 30.0,
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[BotWire]:
    """A `BotWire` for ``{api_base_url}/bot{token}/``; idle connections are closed on exit.

    It starts no tasks. A connection idle for more than ``keepalive_expiry`` seconds is not reused (a
    middlebox may have dropped it without a word; the server's own close is seen as it happens).
    For https, ``ssl_context`` defaults to `ssl.create_default_context()` (a test may pass one that trusts
    its own certificate authority).
    """
    origin = Origin.parse(api_base_url, token)
    if origin.scheme == "https" and ssl_context is None:
        ssl_context = ssl.create_default_context()
    wire = BotWire(
        origin,
        max_connections=max_connections,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        write_timeout=write_timeout,
        pool_timeout=pool_timeout,
        keepalive_expiry=keepalive_expiry,
        ssl_context=ssl_context if origin.scheme == "https" else None,
    )
    try:
        yield wire
    finally:
        wire.close()
