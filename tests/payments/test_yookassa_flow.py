"""YooKassa end to end: purchase → payment at the fake (over HTTP) → notification / watcher → access.

The fake YooKassa is a real HTTP server; vpnd runs its listener and HTTP services (`start_vpnd`, which
wires the checkout client and the notification route from `[yookassa]`) on 127.0.0.1 as in production, and
`[yookassa].notify_networks` decides whether 127.0.0.1 may post.
"""

from __future__ import annotations

import collections
import datetime as dt
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
import trio.lowlevel

from tests.harness import start_vpnd
from tests.payments.conftest import ADMINS, IO_TIMEOUT, PaymentsEnv
from vpnd.compose import Services
from vpnd.config import load_config
from vpnd.payments import MethodUnavailable, ProviderUnavailable
from vpnd.payments.checkout import (
    YooKassaCheckout,
    start_checkout_purchase,
    watch_checkouts_once,
)
from vpnd.payments.checkout_webhook import NOTIFICATION_PATH
from vpnd_sandbox.yookassa import FakeYooKassa, serve_fake_yookassa

PLANS = """
[[plans]]
code = "r1"
title = "1 month"
days = 30
price = "299.00"
currency = "RUB"

[[plans]]
code = "u1"
title = "1 month (USD)"
days = 30
price = "4.99"
currency = "USD"
"""


@attrs.define(eq=False, kw_only=True)
class YkEnv(PaymentsEnv):
    fake: FakeYooKassa
    checkout: YooKassaCheckout

    @property
    def notification_url(self) -> str:
        return self.http_url + NOTIFICATION_PATH

    def snapshot(self) -> dict[str, Any]:
        return {
            "purchases": self.sql("SELECT id, status, paid_at, paid_late FROM purchases ORDER BY id"),
            "checkouts": self.sql("SELECT * FROM checkout_payments ORDER BY purchase_id"),
            "payments": self.sql("SELECT * FROM payments ORDER BY id"),
            "subscriptions": self.sql("SELECT user_id, expires_at, status FROM subscriptions ORDER BY user_id"),
            "ledger": self.sql("SELECT * FROM balance_ledger ORDER BY id"),
            "outbox": self.sql("SELECT id, chat_id, dedupe_key FROM outbox ORDER BY id"),
        }

    async def post(self, event: str, obj: dict[str, Any]) -> httpx.Response:
        async with httpx.AsyncClient() as http:
            body = {"type": "notification", "event": event, "object": obj}
            return await http.post(self.notification_url, json=body)

    def set_networks(self, *networks: str) -> None:
        config = self.app.config
        self.app.config = attrs.evolve(config, yookassa=attrs.evolve(config.yookassa, notify_networks=networks))


@pytest.fixture
async def yk(write_config: Callable[..., Path], db_dsn: str) -> AsyncIterator[YkEnv]:
    fake = FakeYooKassa(retry_delay=0.05)
    async with trio.open_nursery() as outer:
        with trio.fail_after(IO_TIMEOUT):
            await outer.start(serve_fake_yookassa, fake)
        path = write_config(
            "",
            database={"dsn": db_dsn, "pool_min": 2, "pool_max": 12},
            http={"listen": "127.0.0.1:0"},
            telegram={"admin_ids": list(ADMINS)},
            payments={"purchase_ttl_minutes": 30, "min_price": "0.50", "currency": "RUB"},
            cryptopay={"enabled": False},
            yookassa={
                "enabled": True,
                "shop_id": fake.shop_id,
                "secret_key": fake.secret_key,
                "api_base_url": f"{fake.base_url}/v3",
                "notify_networks": ["127.0.0.1/32"],
                "return_url": "https://t.me/vpnd_test_bot",
                "poll_interval": 0.5,
            },
            shutdown={"grace_seconds": 1},
        )
        path.write_text(path.read_text() + PLANS)
        config = load_config(path, environ={})
        with trio.fail_after(IO_TIMEOUT):
            vpnd = await start_vpnd(outer, config, Services.only("listener", "http"), single_instance=False)
        assert isinstance(vpnd.vpnd.ctx.checkout, YooKassaCheckout)  # compose wired it from [yookassa]
        env = YkEnv(
            app=vpnd.app, fake=fake, checkout=vpnd.vpnd.ctx.checkout, http_url=vpnd.http_url.rstrip("/"), dsn=db_dsn
        )
        fake.notification_url = env.notification_url
        yield env
        fake.notifications_enabled = False
        await vpnd.stop()
        outer.cancel_scope.cancel()


async def wait_for(env: YkEnv, query: str, expected: object, params: object = None) -> None:
    while env.scalar(query, params) != expected:
        await trio.sleep(0.02)


def payment_id_of(env: YkEnv, purchase_id: int) -> str:
    return str(env.scalar("SELECT payment_id FROM checkout_payments WHERE purchase_id = %s", (purchase_id,)))


async def test_card_payment_through_the_notification(yk: YkEnv) -> None:
    await yk.add_users(5001)
    with trio.fail_after(IO_TIMEOUT):
        purchase, url = await start_checkout_purchase(yk.app, yk.checkout, 5001, "r1", method="bank_card")
        payment_id = payment_id_of(yk, purchase.id)
        asked = yk.fake.payments[payment_id]
        assert url == asked["confirmation"]["confirmation_url"] and url.startswith(yk.fake.base_url or "")
        assert asked["amount"] == {"value": "299.00", "currency": "RUB"}
        assert asked["capture"] is True and asked["metadata"] == {"purchase_id": str(purchase.id)}
        assert asked["payment_method"]["type"] == "bank_card"
        assert asked["confirmation"]["return_url"] == "https://t.me/vpnd_test_bot"
        async with httpx.AsyncClient() as http:  # the payer presses "Pay" on the page
            page = await http.get(url)
            assert page.status_code == 200 and 'id="pay"' in page.text and 'id="fail"' in page.text
            assert (await http.post(url + "/pay")).status_code == 303
        await yk.fake.wait_until(lambda: len(yk.fake.deliveries) == 1)  # answered after the commit
    assert [d.status_code for d in yk.fake.deliveries] == [200]
    assert yk.sql("SELECT provider, provider_payment_id, amount_minor, currency, outcome FROM payments") == [
        ("yookassa", payment_id, 29900, "RUB", "granted")
    ]
    assert yk.sql("SELECT status FROM purchases") == [("paid",)]
    assert yk.sql("SELECT status FROM checkout_payments") == [("succeeded",)]
    expires = yk.scalar("SELECT expires_at - now() FROM subscriptions WHERE user_id = 5001")
    assert dt.timedelta(days=29, hours=23) < expires <= dt.timedelta(days=30)
    assert yk.sql("SELECT chat_id, dedupe_key FROM outbox") == [(5001, f"payment:{purchase.id}")]


async def test_sbp_payment_with_duplicate_notifications_grants_once(yk: YkEnv) -> None:
    await yk.add_users(5002)
    yk.fake.notification_copies = 4
    with trio.fail_after(IO_TIMEOUT):
        purchase, _ = await start_checkout_purchase(yk.app, yk.checkout, 5002, "r1", method="sbp")
        payment_id = payment_id_of(yk, purchase.id)
        assert yk.fake.payments[payment_id]["payment_method"]["type"] == "sbp"
        yk.fake.pay(payment_id)
        await yk.fake.wait_until(lambda: len(yk.fake.deliveries) == 4)
    assert [d.status_code for d in yk.fake.deliveries] == [200] * 4
    assert yk.scalar("SELECT count(*) FROM payments") == 1
    assert yk.scalar("SELECT count(*) FROM outbox WHERE chat_id = 5002") == 1
    assert yk.scalar("SELECT expires_at - now() FROM subscriptions WHERE user_id = 5002") <= dt.timedelta(days=30)


async def test_create_is_idempotent_and_errors_are_typed(yk: YkEnv) -> None:
    await yk.add_users(5003)
    with trio.fail_after(IO_TIMEOUT):
        purchase, _ = await start_checkout_purchase(yk.app, yk.checkout, 5003, "r1")
        again = await yk.checkout.create(purchase, method=None, description="again", return_url="")
        assert again.payment_id == payment_id_of(yk, purchase.id)  # the same Idempotence-Key: no second payment
        assert len(yk.fake.payments) == 1 and "payment_method" not in yk.fake.payments[again.payment_id]

        async with httpx.AsyncClient(base_url=f"{yk.fake.base_url}/v3") as http:
            body = {"amount": {"value": "0.001", "currency": "RUB"}, "confirmation": {"type": "redirect"}}
            good = (yk.fake.shop_id, yk.fake.secret_key)
            bad_amount = await http.post("/payments", json=body, auth=good, headers={"Idempotence-Key": "k1"})
            assert bad_amount.status_code == 400
            assert bad_amount.json()["code"] == "invalid_request" and bad_amount.json()["parameter"] == "amount.value"
            bad_auth = await http.post("/payments", json=body, auth=("1", "x"), headers={"Idempotence-Key": "k2"})
            assert (bad_auth.status_code, bad_auth.json()["code"]) == (401, "invalid_credentials")

        yk.fake.secret_key = "rotated"  # our key is now wrong: 401, the purchase is cancelled
        with pytest.raises(ProviderUnavailable):
            await start_checkout_purchase(yk.app, yk.checkout, 5003, "r1")
    assert yk.sql("SELECT status FROM purchases ORDER BY id") == [("expired",), ("cancelled",)]
    with pytest.raises(MethodUnavailable):  # a USD plan cannot go to a RUB shop
        await start_checkout_purchase(yk.app, yk.checkout, 5003, "u1")


@pytest.mark.timeout(300)
async def test_notifications_and_watcher_race_on_200_payments(yk: YkEnv) -> None:
    """200 payments, each granted exactly once, whichever of the notification and two watchers comes first.

    Every notification is delivered twice while two watchers poll non-stop; the first 50 payments are
    paid with notifications off (only the watchers can find them), then the notifications for the
    rest race the watchers.
    """
    users = list(range(30_001, 30_201))
    await yk.add_users(*users)
    with trio.fail_after(120):
        ids = []
        for user in users:
            purchase, _ = await start_checkout_purchase(yk.app, yk.checkout, user, "r1")
            ids.append(payment_id_of(yk, purchase.id))
        yk.fake.notification_copies = 2
        yk.fake.notifications_enabled = False
        for payment_id in ids[:50]:
            yk.fake.pay(payment_id)
        stop = trio.Event()
        finds = 0

        async def watcher() -> None:
            nonlocal finds
            while not stop.is_set():
                found = await watch_checkouts_once(yk.app, yk.checkout, batch_size=37)
                finds += found  # not `finds += await ...`: that reads `finds` before the other watcher adds
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watcher)
            nursery.start_soon(watcher)
            await wait_for(yk, "SELECT count(*) FROM payments", 50)
            yk.fake.notifications_enabled = True
            for payment_id in ids[50:]:
                yk.fake.pay(payment_id)
                await trio.lowlevel.checkpoint()
            await wait_for(yk, "SELECT count(*) FROM payments", 200)
            await yk.fake.wait_until(lambda: sum(d.status_code == 200 for d in yk.fake.deliveries) >= 300)
            stop.set()
    # Every notification was acknowledged (a 503 — YooKassa's API slow under this load — is repeated).
    acknowledged = {d.object_id for d in yk.fake.deliveries if d.status_code == 200}
    assert acknowledged == set(ids[50:]), collections.Counter(d.status_code for d in yk.fake.deliveries)
    assert yk.scalar("SELECT count(DISTINCT purchase_id) FROM payments WHERE outcome = 'granted'") == 200
    assert yk.scalar("SELECT count(*) FROM checkout_payments WHERE status = 'succeeded'") == 200
    assert yk.scalar("SELECT count(*) FROM outbox WHERE dedupe_key LIKE 'payment:%%'") == 200
    lengths = yk.sql("SELECT expires_at - now() FROM subscriptions")
    assert len(lengths) == 200 and all(dt.timedelta(days=29) < length <= dt.timedelta(days=30) for (length,) in lengths)
    assert finds >= 50  # the watchers granted at least the 50 whose notifications never came


async def test_forged_notifications_change_nothing(yk: YkEnv) -> None:
    await yk.add_users(5004, 5005)
    with trio.fail_after(IO_TIMEOUT):
        yk.fake.notifications_enabled = False
        paid, _ = await start_checkout_purchase(yk.app, yk.checkout, 5004, "r1")
        pending, _ = await start_checkout_purchase(yk.app, yk.checkout, 5005, "r1")
        paid_id, pending_id = payment_id_of(yk, paid.id), payment_id_of(yk, pending.id)
        yk.fake.pay(paid_id)
        before = yk.snapshot()

        yk.set_networks("185.71.76.0/27")  # a genuine notification, from outside the configured networks
        response = await yk.post("payment.succeeded", yk.fake.payments[paid_id])
        assert response.status_code == 403
        assert yk.snapshot() == before
        yk.set_networks("127.0.0.1/32")

        unknown = await yk.post("payment.succeeded", {"id": "2419a771-000f-5000-9000-1edaf29243f2"})
        assert (unknown.status_code, unknown.text.strip()) == (200, "unknown")
        claimed = await yk.post("payment.succeeded", {**yk.fake.payments[pending_id], "status": "succeeded"})
        assert (claimed.status_code, claimed.text.strip()) == (200, "pending")  # the API says: not paid
        bad_id = await yk.post("payment.succeeded", {"id": "../../refunds"})
        assert (bad_id.status_code, bad_id.text.strip()) == (200, "unknown")
        assert (await yk.post("payment.succeeded", {"no": "id"})).status_code == 400
        # A real payment of ours whose metadata names another purchase (someone else's) grants nothing.
        yk.fake.payments[paid_id]["metadata"] = {"purchase_id": str(pending.id)}
        forged = await yk.post("payment.succeeded", {"id": paid_id})
        assert (forged.status_code, forged.text.strip()) == (200, "forged")
    assert yk.snapshot() == before


async def test_amount_or_currency_mismatch_grants_nothing_and_alerts(yk: YkEnv) -> None:
    await yk.add_users(5006, 5007)
    with trio.fail_after(IO_TIMEOUT):
        short, _ = await start_checkout_purchase(yk.app, yk.checkout, 5006, "r1")
        other, _ = await start_checkout_purchase(yk.app, yk.checkout, 5007, "r1")
        yk.fake.pay(payment_id_of(yk, short.id), value="2.99")
        yk.fake.pay(payment_id_of(yk, other.id), currency="USD")
        await wait_for(yk, "SELECT count(*) FROM payments", 2)
    assert yk.sql("SELECT purchase_id, amount_minor, currency, outcome FROM payments ORDER BY purchase_id") == [
        (short.id, 299, "RUB", "amount_mismatch"),
        (other.id, 29900, "USD", "amount_mismatch"),
    ]
    assert yk.scalar("SELECT count(*) FROM subscriptions") == 0
    alerts = yk.sql("SELECT chat_id FROM outbox WHERE dedupe_key LIKE 'alert:payment_mismatch%%' ORDER BY id")
    assert sorted(chat for (chat,) in alerts) == sorted([*ADMINS, *ADMINS])


async def test_canceled_payment_expires_the_purchase_and_the_watcher_finds_lost_ones(yk: YkEnv) -> None:
    await yk.add_users(5008, 5009)
    with trio.fail_after(IO_TIMEOUT):
        failed, url = await start_checkout_purchase(yk.app, yk.checkout, 5008, "r1")
        async with httpx.AsyncClient() as http:  # the payer presses "Fail"
            assert (await http.post(url + "/fail")).status_code == 303
        await wait_for(yk, "SELECT status FROM purchases WHERE id = %s", "expired", (failed.id,))
        assert yk.sql("SELECT status FROM checkout_payments WHERE purchase_id = %s", (failed.id,)) == [("canceled",)]

        yk.fake.notifications_enabled = False  # "none": only the watcher can see this payment
        lost, _ = await start_checkout_purchase(yk.app, yk.checkout, 5009, "r1")
        yk.fake.pay(payment_id_of(yk, lost.id))
        assert await watch_checkouts_once(yk.app, yk.checkout) == 1
        assert await watch_checkouts_once(yk.app, yk.checkout) == 0  # settled: no longer polled
    assert yk.sql("SELECT outcome FROM payments WHERE purchase_id = %s", (lost.id,)) == [("granted",)]
    assert yk.scalar("SELECT count(*) FROM payments") == 1


async def test_refund_succeeded_reverses_the_grant_once(yk: YkEnv) -> None:
    await yk.add_users(5010)
    with trio.fail_after(IO_TIMEOUT):
        purchase, _ = await start_checkout_purchase(yk.app, yk.checkout, 5010, "r1")
        payment_id = payment_id_of(yk, purchase.id)
        yk.fake.pay(payment_id)
        await wait_for(yk, "SELECT count(*) FROM payments", 1)
        yk.fake.notification_copies = 2
        refund = await yk.checkout.refund(payment_id, 29900, "RUB", key=f"refund-{purchase.id}")
        assert refund.succeeded and refund.payment_id == payment_id
        again = await yk.checkout.refund(payment_id, 29900, "RUB", key=f"refund-{purchase.id}")
        assert again == refund and len(yk.fake.refunds) == 1  # the same key: no second refund
        await wait_for(yk, "SELECT outcome FROM payments", "refunded")
        await yk.fake.wait_until(lambda: len(yk.fake.deliveries) == 3)
    assert [d.status_code for d in yk.fake.deliveries] == [200, 200, 200]
    assert yk.scalar("SELECT status FROM subscriptions WHERE user_id = 5010") == "expired"
    assert yk.scalar("SELECT count(*) FROM outbox WHERE dedupe_key = %s", (f"refund:{purchase.id}",)) == 1


async def test_payment_created_just_before_a_crash_is_recognised_once(yk: YkEnv) -> None:
    """The daemon created the payment at YooKassa and died before recording it: the payment still names
    the purchase (metadata, set by us, read back from the API), so its notification grants, once."""
    from vpnd.payments.service import _create_purchase
    from vpnd.pricing import plan_offer

    await yk.add_users(5011)
    plan = yk.app.config.plan("r1")
    assert plan is not None
    with trio.fail_after(IO_TIMEOUT):
        purchase = await _create_purchase(yk.app, 5011, plan_offer(plan), "yookassa")
        made = await yk.checkout.create(purchase, method="sbp", description="x", return_url="")  # then: crash
        assert yk.scalar("SELECT count(*) FROM checkout_payments") == 0
        yk.fake.notification_copies = 2
        yk.fake.pay(made.payment_id)
        await yk.fake.wait_until(lambda: len(yk.fake.deliveries) == 2)
    assert yk.sql("SELECT purchase_id, provider_payment_id, outcome FROM payments") == [
        (purchase.id, made.payment_id, "granted")
    ]
    assert yk.sql("SELECT purchase_id, status FROM checkout_payments") == [(purchase.id, "succeeded")]
