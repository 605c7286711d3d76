"""Buying through the bot by card and by SBP: the method buttons, YooKassa's page, the notification, access.

The whole daemon (`start_vpnd`: the root wires the YooKassa client, the notification route and the
watcher from `[yookassa]`) against the fake Bot API and the fake YooKassa, both real HTTP servers.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import trio

from tests.harness import bot_config, start_vpnd
from tests.telegram.test_buy import ALICE, open_buy, press, scalar
from vpnd_sandbox.telegram_fake import FakeTelegram
from vpnd_sandbox.yookassa import FakeYooKassa, serve_fake_yookassa


async def test_buy_by_card_and_by_sbp_on_the_hosted_page(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    shop = FakeYooKassa(notification_copies=2)
    shop_url = await nursery.start(serve_fake_yookassa, shop)
    config = bot_config(
        write_config, db_dsn, fake, base_url,
        yookassa={
            "enabled": True, "shop_id": shop.shop_id, "secret_key": shop.secret_key, "api_base_url": f"{shop_url}/v3",
            "notify_networks": ["127.0.0.1/32"], "currency": "USD", "return_url": "https://t.me/vpnd_test_bot",
        },
    )  # fmt: skip
    vpnd = await start_vpnd(nursery, config)
    shop.notification_url = f"{vpnd.app.http_url}/webhooks/yookassa"
    fake.add_user(ALICE, "Alice")
    with trio.fail_after(30):
        for code, method, days in (("k", "bank_card", 30), ("q", "sbp", 60)):
            plans = await open_buy(fake)
            methods = await press(fake, plans, "plan:m1")
            assert {"pay:m1:k", "pay:m1:q"} <= set(methods.callback_data)
            page_message = await press(
                fake, methods, f"pay:m1:{code}", predicate=lambda m: "YooKassa" in (m.text or "")
            )
            url = next(b["url"] for b in page_message.buttons if "url" in b)
            payment = next(p for p in shop.payments.values() if p["confirmation"]["confirmation_url"] == url)
            assert payment["payment_method"]["type"] == method
            assert payment["amount"] == {"value": "4.99", "currency": "USD"}
            async with httpx.AsyncClient() as http:
                assert (await http.post(url + "/pay")).status_code == 303  # the payer presses "Pay"
            paid_id = payment["id"]
            await shop.wait_until(lambda pid=paid_id: sum(d.object_id == pid for d in shop.deliveries) == 2)
            left = scalar(db_dsn, "SELECT round(extract(epoch FROM expires_at - now()) / 86400) FROM subscriptions")
            assert left == days  # each payment granted once, however many notifications came
    assert scalar(db_dsn, "SELECT count(*) FROM payments WHERE provider = 'yookassa' AND outcome = 'granted'") == 2
    await vpnd.stop()
