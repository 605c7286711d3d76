"""A test-only process running vpnd's outbox sender and workers (no polling, no HTTP).

    python tests/workers/runner.py CONFIG [WORKER ...]

Used by the SIGKILL tests until the root nursery starts these services itself. It builds what
`serve_app` builds (app, bot, Sender with the shared limiter), prints "ready" once the services
have started, and stops on SIGTERM like the daemon (in-flight sends finish).
"""

from __future__ import annotations

import signal
import sys
from functools import partial
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from vpnd.app import open_app
from vpnd.config import load_config
from vpnd.logs import setup_logging
from vpnd.nurseries.outbox import run_outbox
from vpnd.nurseries.workers import run_workers
from vpnd.telegram.client import Sender, open_bot
from vpnd.telegram.ratelimit import OutboundLimiter


async def main(config_path: str, workers: list[str]) -> None:
    config = load_config(config_path)
    setup_logging(config.log.level, config.log.format)
    async with open_app(config) as app, open_bot(config.telegram) as bot:
        sender = Sender(
            bot, OutboundLimiter(config.telegram.rate_per_second, config.telegram.per_chat_per_second), app.metrics
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(run_outbox, app, sender)
            await nursery.start(partial(run_workers, app, sender, only=workers))
            print("ready", flush=True)
            with trio.open_signal_receiver(signal.SIGTERM) as signals:
                async for _ in signals:
                    app.lifecycle.request_stop("SIGTERM")
                    nursery.cancel_scope.deadline = trio.current_time() + config.shutdown.grace_seconds
                    break


if __name__ == "__main__":
    trio.run(main, sys.argv[1], sys.argv[2:])
