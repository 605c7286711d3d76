"""Buying through the bot by card and by SBP: the method buttons, YooKassa's page, the notification, access.

The whole daemon (`start_vpnd`: `vpnd.compose` wires the YooKassa client, the notification route and the
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

ADMIN = 1  # bot_config's admin_ids


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
    shop.notification_url = f"{vpnd.http_url.rstrip('/')}/webhooks/yookassa"
    fake.add_user(ALICE, "Alice")
    with trio.fail_after(30):
        for code, method, days in (("yk", "bank_card", 30), ("ys", "sbp", 60)):
            plans = await open_buy(fake)
            methods = await press(fake, plans, "plan:m1", predicate=lambda m: "pay:m1:s" in m.callback_data)
            assert {"pay:m1:yk", "pay:m1:ys"} <= set(methods.callback_data)
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


async def test_admin_refunds_a_card_payment_once(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    """The admin refunds a YooKassa payment from the user's card: one refund at YooKassa, the days taken
    back once although YooKassa's refund.succeeded notification arrives too."""
    fake, base_url = fake_telegram
    shop = FakeYooKassa()
    shop_url = await nursery.start(serve_fake_yookassa, shop)
    config = bot_config(
        write_config, db_dsn, fake, base_url,
        yookassa={
            "enabled": True, "shop_id": shop.shop_id, "secret_key": shop.secret_key, "api_base_url": f"{shop_url}/v3",
            "notify_networks": ["127.0.0.1/32"], "currency": "USD", "methods": [],
        },
    )  # fmt: skip
    vpnd = await start_vpnd(nursery, config)
    shop.notification_url = f"{vpnd.http_url.rstrip('/')}/webhooks/yookassa"
    fake.add_user(ALICE, "Alice")
    fake.add_user(ADMIN, "Admin")
    with trio.fail_after(30):
        plans = await open_buy(fake)
        methods = await press(fake, plans, "plan:m1", predicate=lambda m: "pay:m1:s" in m.callback_data)
        assert "pay:m1:y" in methods.callback_data and "pay:m1:yk" not in methods.callback_data  # the page chooses
        await press(fake, methods, "pay:m1:y", predicate=lambda m: "YooKassa" in (m.text or ""))
        (payment_id,) = shop.payments
        shop.pay(payment_id)
        await shop.wait_until(lambda: len(shop.deliveries) == 1)
        purchase_id = scalar(db_dsn, "SELECT purchase_id FROM payments WHERE provider = 'yookassa'")

        fake.user_sends(ADMIN, "/admin")
        panel = await fake.wait_for_bot_message(ADMIN, lambda m: "adm:fu" in m.callback_data)
        fake.user_presses_button(ADMIN, panel.message_id, "adm:fu")
        await fake.wait_for_bot_message(ADMIN)
        fake.user_sends(ADMIN, str(ALICE))
        card = await fake.wait_for_bot_message(ADMIN, lambda m: f"adm:rf:{purchase_id}" in m.callback_data)
        fake.user_presses_button(ADMIN, card.message_id, f"adm:rf:{purchase_id}")
        confirm = await fake.wait_for_bot_message(ADMIN, lambda m: f"adm:rfc:{purchase_id}" in m.callback_data)
        fake.user_presses_button(ADMIN, confirm.message_id, f"adm:rfc:{purchase_id}")
        # Whichever records it first — this press or the refund.succeeded notification — takes the days back.
        await fake.wait_for_bot_message(ADMIN, lambda m: "refunded" in (m.text or ""))
        await shop.wait_until(lambda: len(shop.deliveries) == 2)  # refund.succeeded, answered
    assert [(r["payment_id"], r["amount"]) for r in shop.refunds.values()] == [
        (payment_id, {"value": "4.99", "currency": "USD"})
    ]
    assert scalar(db_dsn, "SELECT outcome FROM payments WHERE purchase_id = %s", purchase_id) == "refunded"
    assert scalar(db_dsn, "SELECT status FROM subscriptions WHERE user_id = %s", ALICE) == "expired"
    assert scalar(db_dsn, "SELECT count(*) FROM outbox WHERE dedupe_key = %s", f"refund:{purchase_id}") == 1
    await vpnd.stop()


async def test_card_with_auto_renewal_consent_saves_it_and_the_user_removes_it(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    """ "Card + auto-renewal" shows the consent text, asks YooKassa to save the card; My subscription
    then offers "Remove saved card", which unlinks it."""
    fake, base_url = fake_telegram
    shop = FakeYooKassa()
    shop_url = await nursery.start(serve_fake_yookassa, shop)
    config = bot_config(
        write_config, db_dsn, fake, base_url,
        yookassa={
            "enabled": True, "shop_id": shop.shop_id, "secret_key": shop.secret_key, "api_base_url": f"{shop_url}/v3",
            "notify_networks": ["127.0.0.1/32"], "currency": "USD",
        },
    )  # fmt: skip
    vpnd = await start_vpnd(nursery, config)
    shop.notification_url = f"{vpnd.http_url.rstrip('/')}/webhooks/yookassa"
    fake.add_user(ALICE, "Alice")
    with trio.fail_after(30):
        plans = await open_buy(fake)
        methods = await press(fake, plans, "plan:m1", predicate=lambda m: "pay:m1:s" in m.callback_data)
        page = await press(fake, methods, "pay:m1:ya", predicate=lambda m: "YooKassa" in (m.text or ""))
        assert "charged to it automatically" in (page.text or "") and "Remove saved card" in (page.text or "")
        (payment_id,) = shop.payments
        assert shop.payments[payment_id]["save_payment_method"] is True
        shop.pay(payment_id)
        await shop.wait_until(lambda: len(shop.deliveries) == 1)
        assert scalar(db_dsn, "SELECT title FROM saved_payment_methods WHERE user_id = %s", ALICE) == "MasterCard *4477"
        assert scalar(db_dsn, "SELECT auto_renew FROM subscriptions WHERE user_id = %s", ALICE) is True
        fake.user_sends(ALICE, "/subscription")
        sub = await fake.wait_for_bot_message(ALICE, lambda m: "card:rm" in m.callback_data)
        fake.user_presses_button(ALICE, sub.message_id, "card:rm")
        await fake.wait_for_bot_message(
            ALICE, lambda m: "card:rm" not in m.callback_data and "ar:off" in m.callback_data
        )
    assert scalar(db_dsn, "SELECT count(*) FROM saved_payment_methods") == 0
    await vpnd.stop()
