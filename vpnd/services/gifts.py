"""Gifts for the Telegram flows: redeem a code, list a buyer's gifts (rules in `vpnd.db.gifts`)."""

from __future__ import annotations

import logging

from vpnd.app import App
from vpnd.db import gifts
from vpnd.db.gifts import Gift, Redemption

log = logging.getLogger("vpnd.gifts")


async def redeem_gift(app: App, user_id: int, text: str) -> Redemption:
    """Redeem the code in `text` for `user_id` (one transaction; wrong codes limited like promo codes:
    `[payments] promo_max_wrong_attempts` per `promo_wrong_window_minutes`, one allowance for both)."""
    payments = app.config.payments
    outcome = await app.db.run(
        gifts.redeem,
        user_id,
        text,
        max_wrong=payments.promo_max_wrong_attempts,
        window_minutes=payments.promo_wrong_window_minutes,
        texts=app.texts,
        default_language=app.config.telegram.default_language,
    )
    if outcome.ok and outcome.gift is not None:
        log.info(
            "event=gift_redeemed gift_id=%s user_id=%s buyer_id=%s days=%s",
            outcome.gift.id, user_id, outcome.gift.buyer_id, outcome.gift.days,
        )  # fmt: skip
    elif outcome.reason == "gifts.too_many":
        log.warning("event=gift_code_limited user_id=%d retry_after=%.0f", user_id, outcome.retry_after_seconds)
    else:
        log.info("event=gift_refused user_id=%d reason=%s", user_id, outcome.reason)
    return outcome


async def gifts_of(app: App, buyer_id: int, *, limit: int = 20) -> list[Gift]:
    """The buyer's newest gifts (at most `limit`)."""
    return await app.db.run(gifts.gifts_of, buyer_id, limit=limit)
