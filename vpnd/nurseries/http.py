"""The HTTP nursery: hypercorn's HTTP/1.1 protocol serving health, readiness, metrics and webhooks.

Hypercorn's `serve()` accepts every connection it is offered and has no cap on how many it keeps:
thousands of slow clients cost memory and, at the descriptor limit, make `accept()` fail in a tight
loop (a traceback every 100 ms) while `/healthz` times out. So vpnd runs its own accept loop and
hands each connection to hypercorn's `TCPServer`:

- at most `[http].max_connections` connections at once, lowered to fit under the process's
  descriptor limit (RLIMIT_NOFILE, `LimitNOFILE=` in the unit); at the cap a new connection closes
  the *oldest* one (slow clients are the old ones: a normal request takes milliseconds), so a new
  client such as a `/healthz` probe is always served;
- `accept()` failing for lack of descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM) is logged
  at most once a minute, with a count, and also frees the oldest connection;
- timeouts: an idle or header-less connection is closed after `keep_alive_timeout_seconds`, a
  connection that sends nothing for `read_timeout_seconds` is closed, and a request body must be
  complete within `body_timeout_seconds` of the request's start (else 408, see `vpnd.web`).

On shutdown it stops accepting at once, closes idle keep-alive connections and gives requests in
flight until the root deadline (`[shutdown].grace_seconds`) to finish.

`/metrics` and the detailed `/readyz` are for operators: a loopback client that no reverse proxy
forwarded, or a request with `Authorization: Bearer <[metrics].token>` (or the basic-auth pair).
Anyone else gets 401 from `/metrics` (unless `[metrics].public = true`) and from `/readyz` only the
status code and one word.
"""

from __future__ import annotations

import errno
import itertools
import logging
import math
import os
import resource
import time

import attrs
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import repr_socket_addr, wrap_app
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from vpnd.app import App
from vpnd.metrics import Metrics
from vpnd.web import Request, Response, Router, basic_auth_ok, bearer_token_ok, is_local_client

log = logging.getLogger("vpnd.http")

#: Descriptors kept free for everything that is not an HTTP connection: the database pool and the
#: instance lock, the Telegram and Crypto Pay clients, Xray's API, the log, Python itself.
FD_RESERVE = 100
#: accept() errors that mean "out of descriptors or memory", not "broken listener".
ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
ACCEPT_RETRY_SECONDS = 0.1
#: Repeated warnings (connection cap reached, accept failing) are logged at most this often.
WARN_EVERY_SECONDS = 60.0
LISTEN_BACKLOG = 1024


def build_router(app: App) -> Router:
    """The routes every daemon serves; other services add theirs before the server starts."""
    http = app.config.http
    router = Router(max_body_bytes=http.max_body_bytes, body_timeout=http.body_timeout_seconds)
    started = time.monotonic()

    def operator(request: Request) -> bool:
        """An operator may see metrics and readiness details (see the module docstring)."""
        metrics = app.config.metrics
        if is_local_client(request) or bearer_token_ok(request, metrics.token):
            return True
        has_basic = bool(metrics.username or metrics.password)
        return has_basic and basic_auth_ok(request, {"username": metrics.username, "password": metrics.password})

    async def healthz(request: Request) -> Response:
        # Answering at all proves the process and its event loop are alive.
        return Response.json({"status": "ok", "uptime_seconds": round(time.monotonic() - started, 1)})

    async def readyz(request: Request) -> Response:
        if app.lifecycle.stopping.is_set():
            return Response.json({"status": "stopping"}, 503)
        results = await app.health.readiness()
        ready = all(r.ok for r in results.values())
        if not operator(request):
            # Paths, disk figures and error texts are for operators only.
            return Response.json({"status": "ready" if ready else "unavailable"}, 200 if ready else 503)
        body = {
            "status": "ready" if ready else "not ready",
            "checks": {name: {"ok": r.ok, "detail": r.detail} for name, r in sorted(results.items())},
        }
        return Response.json(body, 200 if ready else 503)

    async def metrics(request: Request) -> Response:
        if not (app.config.metrics.public or operator(request)):
            return Response.text(
                "unauthorized\n", 401, [("www-authenticate", 'Bearer realm="vpnd metrics", Basic realm="vpnd metrics"')]
            )
        body = await trio.to_thread.run_sync(generate_latest, app.metrics.registry)
        return Response(200, body, content_type=CONTENT_TYPE_LATEST)

    router.add("GET", "/healthz", healthz)
    router.add("GET", "/readyz", readyz)
    router.add("GET", "/metrics", metrics)
    return router


def connection_limit(configured: int, pool_max: int) -> int:
    """`configured`, lowered so that connections plus FD_RESERVE fit under RLIMIT_NOFILE."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    room = soft - FD_RESERVE - pool_max
    limit = max(16, min(configured, room))
    if limit < configured:
        log.warning(
            "event=http_connection_limit_lowered configured=%d limit=%d nofile=%d hint=%s",
            configured,
            limit,
            soft,
            "raise_LimitNOFILE_or_lower_[http].max_connections",
        )
    return limit


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


def hypercorn_config(app: App) -> HypercornConfig:
    http = app.config.http
    config = HypercornConfig()
    config.bind = [str(http.listen)]
    config.graceful_timeout = app.config.shutdown.grace_seconds
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.keep_alive_timeout = http.keep_alive_timeout_seconds
    config.read_timeout = http.read_timeout_seconds  # type: ignore[assignment]  # a float works
    config.h11_max_incomplete_size = 16 * 1024
    config.backlog = LISTEN_BACKLOG
    return config


async def run_http(app: App, router: Router, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve `router` on `[http].listen`; `task_status.started(url)` once the socket is bound."""
    config = hypercorn_config(app)
    sock = config.create_sockets().insecure_sockets[0]
    sock.listen(config.backlog)
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    url = f"http://{repr_socket_addr(sock.family, sock.getsockname())}"
    gate = ConnectionGate(connection_limit(app.config.http.max_connections, app.config.database.pool_max), app.metrics)
    log.info("event=http_listening url=%s max_connections=%d", url, gate.limit)
    task_status.started(url)
    await serve_connections(router, config, listener, gate, app.lifecycle.stopping, app.config.shutdown.grace_seconds)


async def serve_connections(
    router: Router,
    config: HypercornConfig,
    listener: trio.SocketListener,
    gate: ConnectionGate,
    stopping: trio.Event,
    grace: float,
) -> None:
    """Accept connections until `stopping`, each served by hypercorn's TCPServer under `gate`."""
    asgi = wrap_app(router, config.wsgi_max_body_size, "asgi")  # type: ignore[arg-type]
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
        connections.cancel_scope.deadline = trio.current_time() + grace
