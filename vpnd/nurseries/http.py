"""The HTTP nursery: hypercorn's Trio worker serving health, readiness, metrics and webhooks.

On shutdown it stops accepting connections at once and gives requests in flight until the root
deadline (`[shutdown].grace_seconds`) to finish.
"""

from __future__ import annotations

import logging
import time

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from vpnd.app import App
from vpnd.web import Request, Response, Router, basic_auth_ok

log = logging.getLogger("vpnd.http")


def build_router(app: App) -> Router:
    """The routes every daemon serves; other services add theirs before the server starts."""
    router = Router(max_body_bytes=app.config.http.max_body_bytes)
    started = time.monotonic()

    async def healthz(request: Request) -> Response:
        # Answering at all proves the process and its event loop are alive.
        return Response.json({"status": "ok", "uptime_seconds": round(time.monotonic() - started, 1)})

    async def readyz(request: Request) -> Response:
        if app.lifecycle.stopping.is_set():
            return Response.json({"status": "stopping"}, 503)
        results = await app.health.readiness()
        ready = all(r.ok for r in results.values())
        body = {
            "status": "ready" if ready else "not ready",
            "checks": {name: {"ok": r.ok, "detail": r.detail} for name, r in sorted(results.items())},
        }
        return Response.json(body, 200 if ready else 503)

    async def metrics(request: Request) -> Response:
        creds = {"username": app.config.metrics.username, "password": app.config.metrics.password}
        if not basic_auth_ok(request, creds):
            return Response.text("unauthorized\n", 401, [("www-authenticate", 'Basic realm="vpnd metrics"')])
        body = await trio.to_thread.run_sync(generate_latest, app.metrics.registry)
        return Response(200, body, content_type=CONTENT_TYPE_LATEST)

    router.add("GET", "/healthz", healthz)
    router.add("GET", "/readyz", readyz)
    router.add("GET", "/metrics", metrics)
    return router


async def run_http(app: App, router: Router, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve `router` on `[http].listen`; `task_status.started(url)` once the socket is bound."""
    config = HypercornConfig()
    config.bind = [str(app.config.http.listen)]
    config.graceful_timeout = app.config.shutdown.grace_seconds
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.keep_alive_timeout = 5
    config.h11_max_incomplete_size = 16 * 1024

    async def shutdown_trigger() -> None:
        await app.lifecycle.stopping.wait()

    class _Started:
        def started(self, binds: list[str] | None = None) -> None:
            url = binds[0] if binds else str(app.config.http.listen)
            log.info("event=http_listening url=%s", url)
            task_status.started(url)

    await serve(router, config, shutdown_trigger=shutdown_trigger, task_status=_Started())  # type: ignore[arg-type]
