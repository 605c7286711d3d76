"""The key-rotation worker: one batch of the running rotation every `[xray] rotate_interval_seconds`.

The pace is the batch size over the interval (both read live: a reload retimes it). With no rotation
running a round is one indexed read of a tiny table. What a batch does, and why a restart or a kill -9
neither skips nor repeats anyone: `vpnd.services.key_rotation`.
"""

from __future__ import annotations

import logging

from vpnd.app import App
from vpnd.services import key_rotation

log = logging.getLogger("vpnd.workers.key_rotation")

WORKER_NAME = "key_rotation"


async def rotation_round(app: App) -> int:
    """Rotate the next batch, if a rotation is running; returns how many keys were replaced."""
    messages = key_rotation.Messages(app.texts, app.config.http.public_base_url, app.config.telegram.default_language)
    done = await app.db.run(key_rotation.rotate_next_batch, messages)
    if done is None:
        return 0
    r = done.rotation
    log.info(
        "event=key_rotation_batch rotation=%d rotated=%d notified=%d progress=%d/%d status=%s",
        r.id, done.rotated, done.notified, r.rotated + r.skipped, r.total, r.status,
    )  # fmt: skip
    return done.rotated
