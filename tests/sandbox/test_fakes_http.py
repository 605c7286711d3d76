"""The fakes are served by the daemon's own HTTP layer (vpnd.web): an oversized body is refused before it is
read, a body that does not arrive in time gets 408 and a closed connection, and unknown paths or methods are
answered by the router, each in the error format of the API the fake plays."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from functools import partial

import pytest
import trio

from vpnd_sandbox.cryptopay import FakeCryptoPay, serve_fake_cryptopay
from vpnd_sandbox.cryptopay.web import MAX_BODY_BYTES
from vpnd_sandbox.telegram import FakeTelegram, serve_fake_telegram
from vpnd_sandbox.telegram.web import MAX_BODY

IO_TIMEOUT = 10
BODY_TIMEOUT = 0.5
POST = "POST {} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n"

Server = Callable[..., Awaitable[None]]

#: (how to serve a fresh fake, a path that takes a POST body, the cap, the 413 body).
FAKES = {
    "telegram": (
        lambda: partial(serve_fake_telegram, FakeTelegram()),
        f"/bot{FakeTelegram().token}/sendMessage",
        MAX_BODY,
        {"ok": False, "error_code": 413, "description": "Request Entity Too Large"},
    ),
    "cryptopay": (
        lambda: partial(serve_fake_cryptopay, FakeCryptoPay()),
        "/api/createInvoice",
        MAX_BODY_BYTES,
        {"ok": False, "error": {"code": 413, "name": "REQUEST_TOO_LARGE"}},
    ),
}


async def exchange(base_url: str, request: bytes, *, then_wait: bool = False) -> bytes:
    """Send raw bytes and read until the server closes the connection (or a whole answer came)."""
    host, port = base_url.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(request)
        answer = b""
        while True:
            chunk = await stream.receive_some()
            if not chunk:
                return answer
            answer += chunk
            if b"\r\n\r\n" in answer and not then_wait:
                _, headers, body = parse(answer)
                if len(body) >= int(headers.get("content-length", "0")):
                    return answer


def parse(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in header_lines)}
    return int(status_line.split()[1]), headers, body


@pytest.mark.parametrize("name", FAKES)
async def test_oversized_body_is_refused_before_it_is_read(name: str, nursery: trio.Nursery) -> None:
    serve, path, cap, refused = FAKES[name]
    with trio.fail_after(IO_TIMEOUT):
        base_url = await nursery.start(serve())
        # Only the headers go out: the declared length alone gets the 413 (nothing is buffered).
        status, headers, body = parse(await exchange(base_url, POST.format(path, cap + 1).encode()))
    assert status == 413 and headers["content-type"] == "application/json"
    assert json.loads(body) == refused


@pytest.mark.parametrize("name", FAKES)
async def test_slow_body_gets_408_and_the_connection_closes(name: str, nursery: trio.Nursery) -> None:
    serve, path, _, _ = FAKES[name]
    with trio.fail_after(IO_TIMEOUT):
        base_url = await nursery.start(partial(serve(), body_timeout=BODY_TIMEOUT))
        started = trio.current_time()
        status, headers, _ = parse(await exchange(base_url, POST.format(path, 100).encode() + b"{", then_wait=True))
    assert status == 408 and headers["connection"] == "close"
    assert trio.current_time() - started >= BODY_TIMEOUT


async def test_router_errors_speak_each_api(nursery: trio.Nursery) -> None:
    with trio.fail_after(IO_TIMEOUT):
        telegram_url = await nursery.start(serve_fake_telegram, FakeTelegram())
        cryptopay_url = await nursery.start(serve_fake_cryptopay, FakeCryptoPay())
        get = "GET {} HTTP/1.1\r\nhost: x\r\n\r\n"
        missing = parse(await exchange(telegram_url, get.format("/nowhere").encode()))
        assert (missing[0], missing[2]) == (404, b"Not Found")
        missing = parse(await exchange(cryptopay_url, get.format("/nowhere").encode()))
        assert (missing[0], json.loads(missing[2])["error"]) == (404, {"code": 404, "name": "NOT_FOUND"})
        wrong = parse(await exchange(cryptopay_url, get.format("/sandbox/pay/1").encode()))
        assert (wrong[0], json.loads(wrong[2])["error"]) == (405, {"code": 405, "name": "METHOD_NOT_FOUND"})
