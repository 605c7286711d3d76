"""BotWire, the h11 transport for the hot Bot API calls, against the fake Bot API and scripted servers.

The fake Bot API (a real HTTP server) answers like Telegram; where it cannot produce a condition
(an answer that never comes, a 502 HTML page, a socket closed while idle or right after a request),
a tiny scripted HTTP/1.1 server on 127.0.0.1 does. Errors are compared with what python-telegram-bot
raises for the same answer, since callers keep catching PTB's exception classes.
"""

from __future__ import annotations

import datetime as dt
import json
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Literal

import attrs
import h11
import pytest
import telegram
import telegram.error
import trio

from vpnd.telegram.wire import BotWire, Origin, open_bot_wire
from vpnd_sandbox.telegram_fake import FakeTelegram, FaultKind, serve_fake_telegram

# A connection BotWire forgets to close (instead of closing it on error or cancellation) fails the test.
pytestmark = [
    pytest.mark.filterwarnings("error::ResourceWarning"),
    pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning"),
]

IO_TIMEOUT = 10
ALICE = 1001
BOB = 1002
TOKEN = "123456:TestTokenThatMustNotLeak"


# ---------------------------------------------------------------------------------------- the fake


@attrs.define
class Api:
    fake: FakeTelegram
    base_url: str
    bot: telegram.Bot  # PTB, for comparisons


@pytest.fixture
async def api(nursery: trio.Nursery) -> AsyncIterator[Api]:
    fake = FakeTelegram()
    fake.chat_rate = fake.chat_burst = 1000.0  # the flood limits are not what these tests are about
    base_url = await nursery.start(serve_fake_telegram, fake)
    fake.add_user(ALICE, "Alice", username="alice", language_code="en")
    fake.add_user(BOB, "Bob", language_code="ru")
    fake.user_sends(ALICE, "/start")
    bot = telegram.Bot(fake.token, base_url=f"{base_url}/bot")
    yield Api(fake, base_url, bot)
    for request in bot._request:  # getUpdates has its own HTTP client
        await request.shutdown()


def retry_after_seconds(exc: telegram.error.RetryAfter) -> float:
    value = exc.retry_after
    return value.total_seconds() if isinstance(value, dt.timedelta) else float(value)


async def test_send_message_returns_the_result_json(api: Api) -> None:
    with trio.fail_after(IO_TIMEOUT):
        async with open_bot_wire(api.base_url, api.fake.token) as wire:
            result = await wire.call(
                "sendMessage", {"chat_id": ALICE, "text": "Привет, <b>мир</b> ✓", "parse_mode": "HTML"}
            )
    assert isinstance(result, dict)
    assert result["chat"]["id"] == ALICE and result["from"]["is_bot"] is True
    assert result["text"] == "Привет, мир ✓"
    assert result["entities"] == [{"offset": 8, "length": 3, "type": "bold"}]
    [message] = api.fake.bot_messages(ALICE)
    assert message.message_id == result["message_id"] and message.text == "Привет, мир ✓"


async def test_hot_calls_edit_answer_callback_and_get_updates(api: Api) -> None:
    with trio.fail_after(IO_TIMEOUT):
        async with open_bot_wire(api.base_url, api.fake.token) as wire:
            updates = await wire.call("getUpdates", {"timeout": 5, "allowed_updates": ["message", "callback_query"]})
            assert [u["message"]["text"] for u in updates] == ["/start"]
            keyboard = {"inline_keyboard": [[{"text": "Buy", "callback_data": "buy:1m"}]]}
            sent = await wire.call("sendMessage", {"chat_id": ALICE, "text": "Plans", "reply_markup": keyboard})
            api.fake.user_presses_button(ALICE, sent["message_id"], "buy:1m")
            updates = await wire.call("getUpdates", {"offset": updates[-1]["update_id"] + 1, "timeout": 5})
            query = updates[-1]["callback_query"]
            assert query["data"] == "buy:1m" and query["message"]["message_id"] == sent["message_id"]
            assert await wire.call("answerCallbackQuery", {"callback_query_id": query["id"], "text": "OK"}) is True
            edited = await wire.call(
                "editMessageText", {"chat_id": ALICE, "message_id": sent["message_id"], "text": "Paid ✓"}
            )
            assert edited["text"] == "Paid ✓" and "edit_date" in edited
    assert [n.text for n in api.fake.notices_for(ALICE)] == ["OK"]
    assert api.fake.bot_messages(ALICE)[-1].text == "Paid ✓"


async def test_messages_match_ptbs_in_sequence_and_shape(api: Api) -> None:
    """The same chat, BotWire and PTB alternating: one message_id sequence, the same Message once parsed."""
    wire_results: list[dict[str, Any]] = []
    ptb_messages: list[telegram.Message] = []
    with trio.fail_after(IO_TIMEOUT):
        async with open_bot_wire(api.base_url, api.fake.token) as wire:
            for index in range(4):
                wire_results.append(await wire.call("sendMessage", {"chat_id": ALICE, "text": f"n{index}"}))
                ptb_messages.append(await api.bot.send_message(ALICE, f"n{index}"))
    ids = [
        m for pair in zip(wire_results, ptb_messages, strict=True) for m in (pair[0]["message_id"], pair[1].message_id)
    ]
    assert ids == list(range(ids[0], ids[0] + 8))

    def shape(message: telegram.Message) -> dict[str, Any]:
        data = message.to_dict()
        del data["message_id"], data["date"]
        return data

    for raw, ptb in zip(wire_results, ptb_messages, strict=True):
        assert shape(telegram.Message.de_json(raw, api.bot)) == shape(ptb)
        assert set(raw) == {"message_id", "from", "chat", "date", "text"}


async def test_bot_api_errors_are_the_exceptions_ptb_raises(api: Api) -> None:
    """400/401/403/404/409/429/502 from the fake: the same class and text as PTB's, retry_after kept."""
    api.fake.user_blocks_bot(ALICE)
    wrong_token_bot = telegram.Bot("123:nope", base_url=f"{api.base_url}/bot")

    async def ptb_error(call: Callable[[], Awaitable[Any]]) -> telegram.error.TelegramError:
        with pytest.raises(telegram.error.TelegramError) as caught:
            await call()
        return caught.value

    async def wire_error(wire: BotWire, method: str, params: dict[str, Any]) -> telegram.error.TelegramError:
        with pytest.raises(telegram.error.TelegramError) as caught:
            await wire.call(method, params)
        return caught.value

    with trio.fail_after(IO_TIMEOUT):
        async with (
            open_bot_wire(api.base_url, api.fake.token) as wire,
            open_bot_wire(api.base_url, "123:nope") as wrong_token,
        ):
            cases: list[tuple[type[telegram.error.TelegramError], telegram.error.TelegramError, Any]] = []

            async def both(kind: type[telegram.error.TelegramError], method: str, params: dict[str, Any]) -> None:
                ptb = await ptb_error(lambda: api.bot._post(method, dict(params)))
                cases.append((kind, ptb, await wire_error(wire, method, params)))

            await both(telegram.error.BadRequest, "sendMessage", {"chat_id": BOB, "text": "x"})  # never started
            await both(telegram.error.Forbidden, "sendMessage", {"chat_id": ALICE, "text": "x"})  # blocked
            await both(telegram.error.InvalidToken, "sendTelepathy", {})  # 404
            cases.append(
                (
                    telegram.error.InvalidToken,  # 401
                    await ptb_error(wrong_token_bot.get_me),
                    await wire_error(wrong_token, "getMe", {}),
                )
            )
            faults: list[tuple[FaultKind, type[telegram.error.TelegramError]]] = [
                ("409", telegram.error.Conflict),
                ("5xx", telegram.error.NetworkError),
                ("429", telegram.error.RetryAfter),
            ]
            for fault, kind in faults:
                for _ in range(2):  # once for PTB, once for BotWire
                    api.fake.inject_fault(fault, retry_after=7, methods=["getUpdates"])
                await both(kind, "getUpdates", {"timeout": 0})
    await wrong_token_bot.request.shutdown()

    for kind, ptb, ours in cases:
        assert type(ptb) is kind and type(ours) is kind, (kind, ptb, ours)
        assert str(ours) == str(ptb)
    assert str(cases[0][2]) == "Chat not found"
    network = next(ours for kind, _, ours in cases if kind is telegram.error.NetworkError)
    assert "Bad Gateway" in str(network)
    retry = next(ours for kind, _, ours in cases if kind is telegram.error.RetryAfter)
    assert isinstance(retry, telegram.error.RetryAfter) and retry_after_seconds(retry) == 7


async def test_answer_cut_after_its_first_bytes_is_not_retried(api: Api) -> None:
    """The fake's "drop" sends the answer's head, then breaks: never retried, even on a reused connection."""
    with trio.fail_after(IO_TIMEOUT):
        async with open_bot_wire(api.base_url, api.fake.token) as wire:
            assert (await wire.call("getMe", {}))["is_bot"] is True
            api.fake.inject_fault("drop", methods=["getMe"])
            with pytest.raises(telegram.error.NetworkError):
                await wire.call("getMe", {})
            assert (await wire.call("getMe", {}))["is_bot"] is True
    assert api.fake.requests["getMe"] == 3


async def test_fake_timeout_fault_times_out_then_recovers(api: Api) -> None:
    api.fake.inject_fault("timeout", hold_seconds=5, methods=["getMe"])
    with trio.fail_after(IO_TIMEOUT):
        async with open_bot_wire(api.base_url, api.fake.token, read_timeout=60) as wire:
            with pytest.raises(telegram.error.TimedOut):
                await wire.call("getMe", {}, read_timeout=0.3)  # the per-call read timeout wins
            assert (await wire.call("getMe", {}))["is_bot"] is True


def test_base_url_is_parsed_once_into_host_port_and_target_prefix() -> None:
    plain = Origin.parse("http://127.0.0.1:8081", TOKEN)
    assert (plain.host, plain.port, plain.host_header) == ("127.0.0.1", 8081, b"127.0.0.1:8081")
    assert plain.target_prefix == f"/bot{TOKEN}/".encode()
    official = Origin.parse("https://api.telegram.org/", TOKEN)
    assert (official.scheme, official.port, official.host_header) == ("https", 443, b"api.telegram.org")
    proxied = Origin.parse("https://[::1]:8443/telegram/", TOKEN)
    assert (proxied.host, proxied.host_header) == ("::1", b"[::1]:8443")
    assert proxied.target_prefix == f"/telegram/bot{TOKEN}/".encode()
    assert TOKEN not in repr(proxied)
    for wrong in ("api.telegram.org", "ftp://host", "https://user:pw@host", "http://host/?q=1"):
        with pytest.raises(ValueError):
            Origin.parse(wrong, TOKEN)


# ----------------------------------------------------------------------------- a scripted server


@attrs.frozen
class Act:
    """What the scripted server does with one request."""

    kind: Literal["answer", "hang", "close", "raw", "stall"] = "answer"
    status: int = 200
    body: bytes = b'{"ok":true,"result":true}'
    content_type: bytes = b"application/json"
    close: bool = False  # send `Connection: close` and close
    close_when_idle: bool = False  # answer with keep-alive, then close the idle socket
    raw: bytes = b""  # kind="raw": these bytes, then close
    gate: Callable[[], bool] | None = None  # answer only once this holds


@attrs.define(eq=False)
class Scripted:
    """A tiny HTTP/1.1 server on 127.0.0.1: ``script(connection_number, request_number_on_it) -> Act``.

    kind "hang" reads on without answering until the client closes; "stall" never reads at all;
    "close" closes without answering; "raw" writes bytes then closes.
    """

    script: Callable[[int, int], Act]
    port: int = 0
    connections: int = 0
    closed: int = 0
    open_now: int = 0
    max_open: int = 0
    requests: list[tuple[h11.Request, bytes]] = attrs.field(factory=list)
    served_on: list[int] = attrs.field(factory=list)  # the connection number of each request
    _changed: trio.Event = attrs.field(factory=trio.Event)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _touch(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            await self._changed.wait()

    async def serve(self, stream: trio.abc.Stream) -> None:
        number = self.connections
        self.connections += 1
        self.open_now += 1
        self.max_open = max(self.max_open, self.open_now)
        self._touch()
        try:
            await self._serve_requests(number, stream, h11.Connection(h11.SERVER))
        finally:
            self.open_now -= 1
            self.closed += 1
            self._touch()
            await trio.aclose_forcefully(stream)

    async def _serve_requests(self, number: int, stream: trio.abc.Stream, protocol: h11.Connection) -> None:
        on_connection = 0
        while True:
            request: h11.Request | None = None
            body = b""
            while True:
                event = protocol.next_event()
                if event is h11.NEED_DATA:
                    protocol.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:
                    return  # the client closed the connection
            assert request is not None
            on_connection += 1
            self.requests.append((request, body))
            self.served_on.append(number)
            self._touch()
            act = self.script(number, on_connection)
            if act.gate is not None:
                await self.wait_until(act.gate)
            if act.kind == "hang":
                while await stream.receive_some(65536):
                    pass
                return
            if act.kind == "stall":
                await trio.sleep_forever()
            if act.kind == "close":
                return
            if act.kind == "raw":
                await stream.send_all(act.raw)
                return
            headers = [(b"Content-Type", act.content_type), (b"Content-Length", str(len(act.body)).encode())]
            if act.close:
                headers.append((b"Connection", b"close"))
            await stream.send_all(
                protocol.send(h11.Response(status_code=act.status, headers=headers))
                + (protocol.send(h11.Data(data=act.body)) or b"")
                + (protocol.send(h11.EndOfMessage()) or b"")
            )
            if act.close or act.close_when_idle:
                return
            protocol.start_next_cycle()


async def start_scripted(nursery: trio.Nursery, script: Callable[[int, int], Act], **tls: Any) -> Scripted:
    server = Scripted(script)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    server.port = listeners[0].socket.getsockname()[1]
    if tls:
        listeners = [trio.SSLListener(listener, tls["context"], https_compatible=True) for listener in listeners]
    await nursery.start(trio.serve_listeners, server.serve, listeners)
    return server


def always(act: Act) -> Callable[[int, int], Act]:
    return lambda connection, request: act


async def test_request_is_compact_json_with_host_and_user_agent(nursery: trio.Nursery) -> None:
    server = await start_scripted(nursery, always(Act(body=b'{"ok":true,"result":{"message_id":1}}')))
    params = {"chat_id": 5, "text": "Привет ✓", "reply_markup": {"inline_keyboard": []}}
    with trio.fail_after(IO_TIMEOUT):
        async with open_bot_wire(f"{server.base_url}/tg/", TOKEN) as wire:
            assert TOKEN not in repr(wire)
            assert await wire.call("sendMessage", params) == {"message_id": 1}
            assert await wire.call("getMe", {}) == {"message_id": 1}
        await server.wait_until(lambda: server.closed == 1)  # exit closed the idle connection
    [(request, body), (second, _)] = server.requests
    assert request.method == b"POST" and request.target == f"/tg/bot{TOKEN}/sendMessage".encode()
    assert second.target == f"/tg/bot{TOKEN}/getMe".encode()
    headers = dict(request.headers)
    assert headers[b"host"] == f"127.0.0.1:{server.port}".encode()
    assert headers[b"user-agent"] == b"vpnd"
    assert headers[b"content-type"] == b"application/json"
    assert body == json.dumps(params, separators=(",", ":"), ensure_ascii=False).encode()
    assert server.connections == 1  # keep-alive


ANSWERS = {
    "502 html page": Act(status=502, body=b"<html><body>502 Bad Gateway</body></html>", content_type=b"text/html"),
    "unknown status": Act(status=599, body=b"oops"),
    "500 json": Act(status=500, body=b'{"ok":false,"error_code":500,"description":"Internal Server Error"}'),
    "400 unknown parameters": Act(
        status=400, body=b'{"ok":false,"error_code":400,"description":"Bad Request: x","parameters":{"z":1}}'
    ),
    "400 migrate": Act(
        status=400,
        body=b'{"ok":false,"error_code":400,"description":"Bad Request: group upgraded",'
        b'"parameters":{"migrate_to_chat_id":-1001234}}',
    ),
    "429 retry_after": Act(
        status=429,
        body=b'{"ok":false,"error_code":429,"description":"Too Many Requests","parameters":{"retry_after":3}}',
    ),
    "200 not json": Act(status=200, body=b"<html>captive portal</html>"),
    "200 ok false": Act(status=200, body=b'{"ok":false,"description":"odd"}'),
    "200 ok false with result": Act(status=200, body=b'{"ok":false,"result":[1,2]}'),
}


@pytest.mark.parametrize("name", list(ANSWERS))
async def test_answers_map_to_what_ptb_does_with_them(nursery: trio.Nursery, name: str) -> None:
    server = await start_scripted(nursery, always(ANSWERS[name]))
    bot = telegram.Bot(TOKEN, base_url=f"{server.base_url}/bot")
    with trio.fail_after(IO_TIMEOUT):
        async with open_bot_wire(server.base_url, TOKEN) as wire:
            ptb: Any
            ours: Any
            try:
                ptb = await bot._post("getMe", {})
            except Exception as exc:
                ptb = exc
            try:
                ours = await wire.call("getMe", {})
            except Exception as exc:
                ours = exc
    for request in bot._request:
        await request.shutdown()
    if isinstance(ptb, Exception):
        assert type(ours) is type(ptb), (ours, ptb)
        assert str(ours) == str(ptb)
        assert type(ours.__cause__) is type(ptb.__cause__)
    else:
        assert ours == ptb
    if name == "502 html page":
        assert isinstance(ours, telegram.error.NetworkError) and str(ours).startswith("Bad Gateway (502). Parsing")
    if name == "429 retry_after":
        assert isinstance(ours, telegram.error.RetryAfter) and retry_after_seconds(ours) == 3
    if name == "400 migrate":
        assert isinstance(ours, telegram.error.ChatMigrated) and ours.new_chat_id == -1001234


async def test_server_that_never_answers_times_out_and_the_pool_recovers(nursery: trio.Nursery) -> None:
    server = await start_scripted(nursery, lambda connection, request: Act("hang") if connection == 0 else Act())
    with trio.fail_after(IO_TIMEOUT):
        async with open_bot_wire(server.base_url, TOKEN, read_timeout=0.3) as wire:
            with pytest.raises(telegram.error.TimedOut):
                await wire.call("getMe", {})
            await server.wait_until(lambda: server.closed == 1)  # the timed-out connection was discarded
            assert await wire.call("getMe", {}) is True
    assert server.connections == 2


async def test_write_that_cannot_finish_times_out(nursery: trio.Nursery) -> None:
    server = await start_scripted(nursery, always(Act("stall")))
    big = {"chat_id": 1, "text": "x" * (32 * 2**20)}  # more than loopback's socket buffers hold
    with trio.fail_after(IO_TIMEOUT):
        async with open_bot_wire(server.base_url, TOKEN, write_timeout=0.3, read_timeout=60) as wire:
            with pytest.raises(telegram.error.TimedOut, match="sending"):
                await wire.call("sendMessage", big)


async def test_idle_connection_closed_by_the_server_is_replaced(nursery: trio.Nursery) -> None:
    server = await start_scripted(nursery, always(Act(close_when_idle=True)))
    with trio.fail_after(IO_TIMEOUT):
        async with open_bot_wire(server.base_url, TOKEN) as wire:
            assert await wire.call("getMe", {}) is True
            await server.wait_until(lambda: server.closed == 1)  # keep-alive timeout on the server's side
            assert await wire.call("getMe", {}) is True
            await server.wait_until(lambda: server.closed == 2)
            assert await wire.call("getMe", {}) is True
    assert server.connections == 3 and len(server.requests) == 3


async def test_connection_idle_past_keepalive_expiry_is_not_reused(nursery: trio.Nursery) -> None:
    server = await start_scripted(nursery, always(Act()))
    with trio.fail_after(IO_TIMEOUT):
        async with open_bot_wire(server.base_url, TOKEN, keepalive_expiry=0.05) as wire:
            assert await wire.call("getMe", {}) is True
            assert await wire.call("getMe", {}) is True  # at once: reused
            assert server.connections == 1
            await trio.sleep(0.1)  # idle past the expiry (the condition itself, on the clock BotWire reads)
            assert await wire.call("getMe", {}) is True
            await server.wait_until(lambda: server.closed == 1)  # the expired one was closed, not leaked
    assert server.connections == 2


async def test_connection_close_header_is_respected(nursery: trio.Nursery) -> None:
    server = await start_scripted(nursery, always(Act(close=True)))
    with trio.fail_after(IO_TIMEOUT):
        async with open_bot_wire(server.base_url, TOKEN) as wire:
            for _ in range(3):
                assert await wire.call("getMe", {}) is True
    assert server.connections == 3


async def test_request_lost_on_a_reused_connection_is_sent_again_once(nursery: trio.Nursery) -> None:
    """The keep-alive race: the server drops a reused socket as the request arrives, before answering."""

    def script(connection: int, request: int) -> Act:
        return Act("close") if (connection, request) in ((0, 2), (1, 2), (2, 1)) else Act()

    server = await start_scripted(nursery, script)
    with trio.fail_after(IO_TIMEOUT):
        async with open_bot_wire(server.base_url, TOKEN) as wire:
            assert await wire.call("getMe", {}) is True  # connection 0
            assert await wire.call("getMe", {}) is True  # lost on 0, sent again on connection 1
            assert (len(server.requests), server.connections) == (3, 2)
            with pytest.raises(telegram.error.NetworkError):
                await wire.call("getMe", {})  # lost on 1, then lost on the fresh connection 2: no third try
            assert (len(server.requests), server.connections) == (5, 3)


async def test_request_lost_on_a_fresh_connection_is_not_sent_again(nursery: trio.Nursery) -> None:
    server = await start_scripted(nursery, always(Act("close")))
    with trio.fail_after(IO_TIMEOUT):
        async with open_bot_wire(server.base_url, TOKEN) as wire:
            with pytest.raises(telegram.error.NetworkError):
                await wire.call("sendMessage", {"chat_id": 1, "text": "once"})
    assert len(server.requests) == 1


async def test_partial_answer_on_a_reused_connection_is_not_sent_again(nursery: trio.Nursery) -> None:
    partial = Act("raw", raw=b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"ok":')
    server = await start_scripted(nursery, lambda connection, request: partial if request == 2 else Act())
    with trio.fail_after(IO_TIMEOUT):
        async with open_bot_wire(server.base_url, TOKEN) as wire:
            assert await wire.call("getMe", {}) is True
            with pytest.raises(telegram.error.NetworkError):
                await wire.call("sendMessage", {"chat_id": 1, "text": "once"})
            assert await wire.call("getMe", {}) is True
    assert len(server.requests) == 3 and server.connections == 2


async def test_pool_opens_at_most_max_connections(nursery: trio.Nursery) -> None:
    server: Scripted

    def script(connection: int, request: int) -> Act:
        # The first answers wait until two requests are in flight: the pool must really use both slots.
        return Act(body=b'{"ok":true,"result":"done"}', gate=lambda: server.open_now >= 2)

    server = await start_scripted(nursery, script)
    results: list[Any] = []
    with trio.fail_after(IO_TIMEOUT):
        async with open_bot_wire(server.base_url, TOKEN, max_connections=2) as wire:

            async def one() -> None:
                results.append(await wire.call("sendMessage", {"chat_id": 1, "text": "hi"}))

            async with trio.open_nursery() as calls:
                for _ in range(12):
                    calls.start_soon(one)
            # One at a time now: the connection given back last is taken first (LIFO), so the other one
            # stays idle and can age out on the server instead of every connection being kept warm.
            for _ in range(4):
                assert await wire.call("getMe", {}) == "done"
    assert results == ["done"] * 12
    assert server.max_open == 2 and server.connections == 2 and len(server.requests) == 16
    assert len(set(server.served_on[-4:])) == 1


async def test_pool_wait_is_bounded_by_pool_timeout(nursery: trio.Nursery) -> None:
    server = await start_scripted(nursery, lambda connection, request: Act("hang") if connection == 0 else Act())
    with trio.fail_after(IO_TIMEOUT):
        async with open_bot_wire(server.base_url, TOKEN, max_connections=1, pool_timeout=0.2) as wire:
            async with trio.open_nursery() as calls:
                calls.start_soon(wire.call, "getUpdates", {"timeout": 50})
                await server.wait_until(lambda: len(server.requests) == 1)
                with pytest.raises(telegram.error.TimedOut, match="Pool timeout"):
                    await wire.call("getMe", {})
                calls.cancel_scope.cancel()
            assert await wire.call("getMe", {}) is True
    assert len(server.requests) == 2


async def test_cancelled_call_discards_its_connection_and_frees_its_slot(nursery: trio.Nursery) -> None:
    server = await start_scripted(nursery, lambda connection, request: Act("hang") if connection == 0 else Act())
    with trio.fail_after(IO_TIMEOUT):
        async with open_bot_wire(server.base_url, TOKEN, max_connections=1) as wire:
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as calls:
                    calls.start_soon(wire.call, "sendMessage", {"chat_id": 1, "text": "slow"})
                    await server.wait_until(lambda: len(server.requests) == 1)
                    scope.cancel()
            await server.wait_until(lambda: server.closed == 1)  # the client closed it
            assert await wire.call("getMe", {}) is True
            assert await wire.call("getMe", {}) is True
    assert server.connections == 2


async def test_connection_refused_is_a_network_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with trio.fail_after(IO_TIMEOUT):
        async with open_bot_wire(f"http://127.0.0.1:{port}", TOKEN) as wire:
            with pytest.raises(telegram.error.NetworkError, match="connecting failed"):
                await wire.call("getMe", {})


async def test_connect_that_never_completes_times_out() -> None:
    """A listener whose accept queue is full (Linux drops further SYNs): connecting hangs until connect_timeout."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = [socket.socket() for _ in range(3)]
        try:
            for filler in fillers:
                filler.setblocking(False)
                filler.connect_ex(("127.0.0.1", port))
            with trio.fail_after(IO_TIMEOUT):
                async with open_bot_wire(f"http://127.0.0.1:{port}", TOKEN, connect_timeout=0.3) as wire:
                    with pytest.raises(telegram.error.TimedOut, match="connecting"):
                        await wire.call("getMe", {})
        finally:
            for filler in fillers:
                filler.close()


def make_certificate(directory: Path) -> tuple[Path, Path]:
    key, cert = directory / "key.pem", directory / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return key, cert


async def test_https_verifies_the_server_and_keeps_the_connection(nursery: trio.Nursery, tmp_path: Path) -> None:
    try:
        key, cert = make_certificate(tmp_path)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"openssl could not make a test certificate: {exc}")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    server = await start_scripted(nursery, always(Act()), context=server_context)
    trusting = ssl.create_default_context()
    trusting.load_verify_locations(cert)
    base_url = f"https://127.0.0.1:{server.port}"
    with trio.fail_after(IO_TIMEOUT):
        async with open_bot_wire(base_url, TOKEN, ssl_context=trusting) as wire:
            assert await wire.call("getMe", {}) is True
            assert await wire.call("getMe", {}) is True
        assert server.connections == 1
        async with open_bot_wire(base_url, TOKEN) as untrusting:  # the system's CAs don't know this certificate
            with pytest.raises(telegram.error.NetworkError, match="TLS handshake failed"):
                await untrusting.call("getMe", {})
    [(request, _), _] = server.requests
    assert dict(request.headers)[b"host"] == f"127.0.0.1:{server.port}".encode()
