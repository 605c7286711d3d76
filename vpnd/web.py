"""A deliberately small ASGI layer: requests, responses and a router, nothing more.

vpnd serves a handful of endpoints (health, readiness, metrics, the Crypto Pay webhook, subscription
URLs); a framework would add more surface than it saves. Bodies are read with a hard cap so a
client cannot make us buffer more than `max_body_bytes`, and within a deadline (`body_timeout`
seconds from the request's start) so a client sending a byte now and then cannot hold a connection.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qs

import attrs
import trio

log = logging.getLogger("vpnd.http")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class BodyTooLarge(Exception):
    pass


class BodyTimeout(Exception):
    """The request body did not arrive in full before the request's deadline, or the client went away
    first (answered 408)."""


@attrs.define(eq=False)
class Request:
    scope: Scope
    receive: Receive
    params: dict[str, str] = attrs.field(factory=dict)
    max_body_bytes: int = 65536
    #: Trio time by which the whole body must have arrived.
    body_deadline: float = float("inf")

    @property
    def method(self) -> str:
        return str(self.scope["method"])

    @property
    def path(self) -> str:
        return str(self.scope["path"])

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(self.scope.get("query_string", b"").decode("latin-1"))

    def header(self, name: str) -> str | None:
        wanted = name.lower().encode("latin-1")
        for key, value in self.scope.get("headers", []):
            if key.lower() == wanted:
                return bytes(value).decode("latin-1")
        return None

    @property
    def client_host(self) -> str:
        client = self.scope.get("client")
        return str(client[0]) if client else ""

    async def body(self) -> bytes:
        """The raw body; raises BodyTooLarge past `max_body_bytes` (checked before buffering) and
        BodyTimeout when it is not complete by `body_deadline`."""
        declared = self.header("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise BodyTooLarge
        chunks: list[bytes] = []
        size = 0
        with trio.move_on_at(self.body_deadline) as deadline:
            while True:
                message = await self.receive()
                if message["type"] == "http.disconnect":
                    # The body never completed: the client went away, or the server's read timeout cut
                    # it off. A partial body is never handled as if it were the request.
                    raise BodyTimeout
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.max_body_bytes:
                    raise BodyTooLarge
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
        if deadline.cancelled_caught:
            raise BodyTimeout
        return b"".join(chunks)


@attrs.frozen
class Response:
    status: int = 200
    body: bytes = b""
    headers: Sequence[tuple[str, str]] = ()
    content_type: str = "text/plain; charset=utf-8"

    @classmethod
    def text(cls, text: str, status: int = 200, headers: Sequence[tuple[str, str]] = ()) -> Response:
        return cls(status, text.encode(), headers)

    @classmethod
    def json(cls, value: object, status: int = 200, headers: Sequence[tuple[str, str]] = ()) -> Response:
        body = json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
        return cls(status, body, headers, "application/json")

    async def send(self, send: Send) -> None:
        headers = [(b"content-type", self.content_type.encode()), (b"content-length", str(len(self.body)).encode())]
        headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in self.headers]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": self.body})


Handler = Callable[[Request], Awaitable[Response]]


@attrs.define(eq=False)
class Router:
    """Routes `(method, path pattern)` to handlers; `{name}` in a pattern captures one segment."""

    max_body_bytes: int = 65536
    body_timeout: float = float("inf")
    routes: list[tuple[str, re.Pattern[str], Handler]] = attrs.field(factory=list)

    def add(self, method: str, pattern: str, handler: Handler) -> None:
        regex = "^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", pattern) + "$"
        self.routes.append((method.upper(), re.compile(regex), handler))

    def resolve(self, method: str, path: str) -> tuple[Handler | None, dict[str, str], bool]:
        """(handler, params, path_exists)."""
        path_exists = False
        for route_method, regex, handler in self.routes:
            match = regex.match(path)
            if match:
                path_exists = True
                if route_method == method or (route_method == "GET" and method == "HEAD"):
                    return handler, match.groupdict(), True
        return None, {}, path_exists

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        handler, params, path_exists = self.resolve(scope["method"], scope["path"])
        if handler is None:
            status = 405 if path_exists else 404
            await Response.text("method not allowed\n" if path_exists else "not found\n", status).send(send)
            return
        request = Request(scope, receive, params, self.max_body_bytes, trio.current_time() + self.body_timeout)
        try:
            response = await handler(request)
        except BodyTooLarge:
            response = Response.text("request body too large\n", 413)
        except BodyTimeout:
            log.info("event=http_body_timeout method=%s path=%s", scope["method"], scope["path"])
            response = Response.text("request body too slow\n", 408, [("connection", "close")])
        except Exception:  # trio.Cancelled is not an Exception: it passes
            log.exception("event=http_handler_failed method=%s path=%s", scope["method"], scope["path"])
            response = Response.text("internal error\n", 500)
        await response.send(send)


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def basic_auth_ok(request: Request, credentials: Mapping[str, str]) -> bool:
    """True when no credentials are configured, or the request carries the right ones."""
    import base64
    import hmac

    username, password = credentials.get("username", ""), credentials.get("password", "")
    if not username and not password:
        return True
    header = request.header("authorization") or ""
    if not header.lower().startswith("basic "):
        return False
    try:
        given = base64.b64decode(header[6:].strip(), validate=True).decode()
    except ValueError:
        return False
    return hmac.compare_digest(given.encode(), f"{username}:{password}".encode())


#: Headers a reverse proxy adds: a request carrying one came from elsewhere, whatever its socket says.
FORWARDING_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip")


def is_local_client(request: Request) -> bool:
    """True for a client on this host (loopback) that no reverse proxy forwarded."""
    import ipaddress

    try:
        address = ipaddress.ip_address(request.client_host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if not address.is_loopback:
        return False
    return not any(request.header(name) for name in FORWARDING_HEADERS)


def bearer_token_ok(request: Request, token: str) -> bool:
    """True when `token` is configured and the request carries `Authorization: Bearer <token>`."""
    import hmac

    if not token:
        return False
    scheme, _, given = (request.header("authorization") or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())
