"""The HTTP nursery: hypercorn's HTTP/1.1 protocol serving health, readiness, metrics and webhooks.

It serves with `vpnd.web.serve` (its own accept loop under a `ConnectionGate`, see there), with:

- at most `[http].max_connections` connections at once, lowered to fit under the process's
  descriptor limit (RLIMIT_NOFILE, `LimitNOFILE=` in the unit);
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

import logging
import resource
import time

import trio
from hypercorn.config import Config as HypercornConfig
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from vpnd.app import App
from vpnd.config import Config
from vpnd.web import (
    LISTEN_BACKLOG,
    ConnectionGate,
    Request,
    Response,
    Router,
    basic_auth_ok,
    bearer_token_ok,
    is_local_client,
    serve,
)

log = logging.getLogger("vpnd.http")

#: Descriptors kept free for everything that is not an HTTP connection: the database pool and the
#: instance lock, the Telegram and Crypto Pay clients, Xray's API, the log, Python itself.
FD_RESERVE = 100


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
        ready = all(r.ok for r in results.values() if r.required)
        degraded = ready and not all(r.ok for r in results.values())
        if not operator(request):
            # Paths, disk figures and error texts are for operators only.
            word = "degraded" if degraded else "ready" if ready else "unavailable"
            return Response.json({"status": word}, 200 if ready else 503)
        body = {
            "status": "degraded" if degraded else "ready" if ready else "not ready",
            "checks": {
                name: {"ok": r.ok, "detail": r.detail, **({} if r.required else {"required": False})}
                for name, r in sorted(results.items())
            },
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


def hypercorn_config(vpnd_config: Config) -> HypercornConfig:
    http = vpnd_config.http
    config = HypercornConfig()
    config.bind = [str(http.listen)]
    config.graceful_timeout = vpnd_config.shutdown.grace_seconds
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.keep_alive_timeout = http.keep_alive_timeout_seconds
    config.read_timeout = http.read_timeout_seconds  # type: ignore[assignment]  # a float works
    config.h11_max_incomplete_size = 16 * 1024
    config.backlog = LISTEN_BACKLOG
    return config


async def run_http(app: App, router: Router, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve `router` on `[http].listen`; `task_status.started(url)` once the socket is bound."""
    gate = ConnectionGate(connection_limit(app.config.http.max_connections, app.config.database.pool_max), app.metrics)
    config = hypercorn_config(app.config)
    await serve(router, config, gate=gate, stopping=app.lifecycle.stopping, task_status=task_status)
