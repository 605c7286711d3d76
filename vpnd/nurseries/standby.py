"""What a standby serves while it waits for the instance lock (`vpnd run --standby`).

`/healthz` answers 200 `{"status": "standby", ...}`: the process is alive and will take over.
`/readyz` answers 503 `{"status": "standby"}`: a load balancer that health-checks it sends webhooks
only to the primary. systemd hears READY=1 with STATUS=standby, so its start does not time out while
the primary lives (WATCHDOG=1 is `vpnd.nurseries.root`'s). Leaving the block stops the server at once,
freeing the address for the full daemon that starts next on the same `[http].listen`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import trio

from vpnd.config import Config
from vpnd.nurseries.http import hypercorn_config
from vpnd.sdnotify import Notifier
from vpnd.web import Request, Response, Router, serve

log = logging.getLogger("vpnd.standby")


def standby_router(config: Config) -> Router:
    router = Router(max_body_bytes=config.http.max_body_bytes, body_timeout=config.http.body_timeout_seconds)
    since = time.monotonic()

    async def healthz(request: Request) -> Response:
        return Response.json({"status": "standby", "waiting_seconds": round(time.monotonic() - since, 1)})

    async def readyz(request: Request) -> Response:
        return Response.json({"status": "standby"}, 503)

    router.add("GET", "/healthz", healthz)
    router.add("GET", "/readyz", readyz)
    return router


@asynccontextmanager
async def serving_standby(config: Config, notifier: Notifier) -> AsyncIterator[str]:
    """Serve the standby's `/healthz` and `/readyz` on `[http].listen` and say READY=1 (standby); yield the URL."""
    async with trio.open_nursery() as nursery:
        url = await nursery.start(partial(serve, standby_router(config), hypercorn_config(config)))
        await notifier.notify("READY=1", "STATUS=standby: waiting for the instance lock (another vpnd is primary)")
        log.info("event=standby_waiting http=%s", url)
        yield url
        nursery.cancel_scope.cancel()
    await notifier.notify("STATUS=taking over: starting")
