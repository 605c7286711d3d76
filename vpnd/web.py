"""A deliberately small ASGI layer: requests, responses, a router and a server, nothing more.

vpnd serves a handful of endpoints (health, readiness, metrics, the Crypto Pay webhook, subscription
URLs); a framework would add more surface than it saves. Bodies are read with a hard cap so a
client cannot make us buffer more than `max_body_bytes`, and within a deadline (`body_timeout`
seconds from the request's start) so a client sending a byte now and then cannot hold a connection.

The sandbox's fakes (fake Telegram, fake Crypto Pay) are written on the same layer, so what a slow or
oversized request gets from them is what it gets from the daemon; they pass their own `error_response`
to answer in the API's error format they play.

Serving: hypercorn's `serve()` accepts every connection it is offered and has no cap on how many it
keeps: thousands of slow clients cost memory and, at the descriptor limit, make `accept()` fail in a
tight loop (a traceback every 100 ms) while `/healthz` times out. So `serve` runs its own accept loop
and hands each connection to hypercorn's `TCPServer` under a `ConnectionGate`:

- at most `limit` connections at once; at the cap a new connection closes the *oldest* one (slow
  clients are the old ones: a normal request takes milliseconds), so a new client such as a
  `/healthz` probe is always served;
- `accept()` failing for lack of descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM) is logged
  at most once a minute, with a count, and also frees the oldest connection.

On `stopping` it stops accepting at once, closes idle keep-alive connections and gives requests in
flight `grace` seconds to finish.
"""

from __future__ import annotations

import errno
import itertools
import json
import logging
import math
import os
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qs

import attrs
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import repr_socket_addr, wrap_app

from vpnd.metrics import Metrics

log = logging.getLogger("vpnd.http")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: accept() errors that mean "out of descriptors or memory", not "broken listener".
ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
ACCEPT_RETRY_SECONDS = 0.1
#: Repeated warnings (connection cap reached, accept failing) are logged at most this often.
WARN_EVERY_SECONDS = 60.0
LISTEN_BACKLOG = 1024
#: The connection cap of a server started without a gate of its own (the sandbox's fakes).
DEFAULT_MAX_CONNECTIONS = 1000


class BodyTooLarge(Exception):
    pass


class BodyTimeout(Exception):
    """The request body did not arrive in full before the request's deadline, or the client went away
    first (answered 408)."""


class Hangup(Exception):
    """Raised by a handler to end the exchange without a complete answer.

    With a `status`, the status line goes out and the connection closes before the body (ASGI has no
    way to close a connection without any response; for a client the effect is the same: the request
    failed on a broken connection). Without one nothing is sent: the client is already gone.
    A test peer uses it to play a network fault.
    """

    def __init__(self, status: int | None = None) -> None:
        super().__init__(status)
        self.status = status


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
        if declared and declared.isascii() and declared.isdigit() and int(declared) > self.max_body_bytes:
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

    @classmethod
    def html(cls, page: str | bytes, status: int = 200, headers: Sequence[tuple[str, str]] = ()) -> Response:
        body = page.encode() if isinstance(page, str) else page
        return cls(status, body, headers, "text/html; charset=utf-8")

    async def send(self, send: Send) -> None:
        headers = [(b"content-type", self.content_type.encode()), (b"content-length", str(len(self.body)).encode())]
        headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in self.headers]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": self.body})


Handler = Callable[[Request], Awaitable[Response]]
ErrorResponse = Callable[[int, str], Response]

#: What the router says for the errors it answers itself, by status.
ERROR_TEXTS = {
    404: "not found",
    405: "method not allowed",
    408: "request body too slow",
    413: "request body too large",
    500: "internal error",
}


def text_error_response(status: int, text: str) -> Response:
    """The router's own error answers: one line of plain text."""
    return Response.text(text + "\n", status)


@attrs.define(eq=False)
class Router:
    """Routes `(method, path pattern)` to handlers.

    `{name}` in a pattern captures one path segment, `{name:path}` the rest of the path (slashes
    included, possibly empty). Method `*` matches any method. Errors the router answers itself (no
    route, wrong method, body too large or too slow, a handler crashing) are built by `error_response`
    from the status and a short text.
    """

    max_body_bytes: int = 65536
    body_timeout: float = float("inf")
    error_response: ErrorResponse = text_error_response
    routes: list[tuple[str, re.Pattern[str], Handler]] = attrs.field(factory=list)

    def add(self, method: str, pattern: str, handler: Handler) -> None:
        regex = re.sub(r"\{(\w+):path\}", r"(?P<\1>.*)", pattern)
        regex = "^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", regex) + "$"
        self.routes.append((method.upper(), re.compile(regex), handler))

    def resolve(self, method: str, path: str) -> tuple[Handler | None, dict[str, str], bool]:
        """(handler, params, path_exists)."""
        path_exists = False
        for route_method, regex, handler in self.routes:
            match = regex.match(path)
            if match:
                path_exists = True
                if route_method in (method, "*") or (route_method == "GET" and method == "HEAD"):
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
            await self.error(405 if path_exists else 404).send(send)
            return
        request = Request(scope, receive, params, self.max_body_bytes, trio.current_time() + self.body_timeout)
        try:
            response = await handler(request)
        except BodyTooLarge:
            response = self.error(413)
        except BodyTimeout:
            log.info("event=http_body_timeout method=%s path=%s", scope["method"], scope["path"])
            response = self.error(408)
            response = attrs.evolve(response, headers=[*response.headers, ("connection", "close")])
        except Hangup as hangup:
            if hangup.status is not None:
                await send({"type": "http.response.start", "status": hangup.status, "headers": []})
            return
        except Exception:  # trio.Cancelled is not an Exception: it passes
            log.exception("event=http_handler_failed method=%s path=%s", scope["method"], scope["path"])
            response = self.error(500)
        await response.send(send)

    def error(self, status: int) -> Response:
        return self.error_response(status, ERROR_TEXTS[status])


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


@attrs.define(eq=False)
class ConnectionGate:
    """Counts open connections, closes the oldest at the cap, rate-limits its own complaints."""

    limit: int
    metrics: Metrics | None = None
    open: dict[int, trio.CancelScope] = attrs.field(factory=dict)
    _ids: itertools.count[int] = attrs.field(factory=itertools.count)
    _evicted_unlogged: int = 0
    _next_cap_log: float = -math.inf
    _failures_unlogged: int = 0
    _next_failure_log: float = -math.inf

    def admit(self) -> tuple[int, trio.CancelScope]:
        """Register a new connection (closing the oldest ones first if at the cap)."""
        while len(self.open) >= self.limit:
            self._evict_oldest()
            self._evicted_unlogged += 1
            if trio.current_time() >= self._next_cap_log:
                self._next_cap_log = trio.current_time() + WARN_EVERY_SECONDS
                log.warning(
                    "event=http_connection_limit limit=%d closed_oldest=%d detail=%s",
                    self.limit,
                    self._evicted_unlogged,
                    "at the cap a new connection closes the oldest (count since the last such line)",
                )
                self._evicted_unlogged = 0
        key = next(self._ids)
        scope = self.open[key] = trio.CancelScope()
        self._gauge()
        return key, scope

    def release(self, key: int) -> None:
        self.open.pop(key, None)
        self._gauge()

    def accept_failed(self, exc: OSError) -> None:
        """accept() ran out of descriptors or memory: log (at most once a minute), free the oldest."""
        self._failures_unlogged += 1
        if trio.current_time() >= self._next_failure_log:
            self._next_failure_log = trio.current_time() + WARN_EVERY_SECONDS
            code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
            log.error(
                "event=http_accept_failed errno=%s failures=%d open_connections=%d detail=%s",
                code,
                self._failures_unlogged,
                len(self.open),
                os.strerror(exc.errno or 0).replace(" ", "_"),
            )
            self._failures_unlogged = 0
        if self.open:
            self._evict_oldest()

    def _evict_oldest(self) -> None:
        key = next(iter(self.open))
        self.open.pop(key).cancel()
        if self.metrics is not None:
            self.metrics.http_connections_closed_oldest.inc()

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.http_connections_open.set(len(self.open))


def server_config(host: str, port: int, *, graceful_timeout: float = 1.0) -> HypercornConfig:
    """Hypercorn's settings for a server on `host:port` (0: any free port), its other defaults kept."""
    config = HypercornConfig()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = graceful_timeout
    config.backlog = LISTEN_BACKLOG
    return config


async def serve(
    app: ASGIApp,
    config: HypercornConfig,
    *,
    gate: ConnectionGate | None = None,
    stopping: trio.Event | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `app` on `config.bind[0]` until `stopping` is set (until cancelled without one).

    `task_status.started(url)` once the socket is bound, e.g. ``"http://127.0.0.1:41234"``. Requests in
    flight when `stopping` is set get `config.graceful_timeout` seconds.
    """
    sock = config.create_sockets().insecure_sockets[0]
    sock.listen(config.backlog)
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    url = f"http://{repr_socket_addr(sock.family, sock.getsockname())}"
    gate = gate if gate is not None else ConnectionGate(DEFAULT_MAX_CONNECTIONS)
    log.info("event=http_listening url=%s max_connections=%d", url, gate.limit)
    task_status.started(url)
    await _serve_connections(app, config, listener, gate, stopping if stopping is not None else trio.Event())


async def _serve_connections(
    app: ASGIApp, config: HypercornConfig, listener: trio.SocketListener, gate: ConnectionGate, stopping: trio.Event
) -> None:
    """Accept connections until `stopping`, each served by hypercorn's TCPServer under `gate`."""
    asgi = wrap_app(app, config.wsgi_max_body_size, "asgi")  # type: ignore[arg-type]
    context = WorkerContext(None)

    async def serve_one(stream: trio.SocketStream, key: int, scope: trio.CancelScope) -> None:
        try:
            with scope:
                await TCPServer(asgi, config, context, ConnectionState({}), stream).run()  # type: ignore[arg-type]
        finally:
            gate.release(key)
            await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as connections:
        async with listener:
            with trio.CancelScope() as accepting:

                async def stop_accepting() -> None:
                    await stopping.wait()
                    accepting.cancel()

                connections.start_soon(stop_accepting)
                while True:
                    try:
                        stream = await listener.accept()
                    except OSError as exc:
                        if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                            raise
                        gate.accept_failed(exc)
                        await trio.sleep(ACCEPT_RETRY_SECONDS)
                        continue
                    key, scope = gate.admit()
                    connections.start_soon(serve_one, stream, key, scope)
        # Stopped accepting: idle keep-alive connections close now, requests in flight get the grace.
        await context.terminated.set()
        connections.cancel_scope.deadline = trio.current_time() + config.graceful_timeout
