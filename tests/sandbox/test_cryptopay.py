"""Crypto Pay client, webhook signatures and the fake Crypto Pay server, over loopback HTTP."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from decimal import Decimal
from functools import partial
from typing import Any

import attrs
import httpx
import hypercorn.config
import hypercorn.trio
import pytest
import trio
import trio.testing

from vpnd.cryptopay import (
    CryptoPayClient,
    InvalidRequestError,
    Invoice,
    InvoiceNotFound,
    MalformedWebhook,
    MethodNotFoundError,
    TransientCryptoPayError,
    UnauthorizedError,
    open_cryptopay_client,
    parse_webhook_update,
    sign_webhook_body,
    verify_webhook_signature,
)
from vpnd_sandbox.cryptopay_fake import FakeCryptoPay, serve_fake_cryptopay

IO_TIMEOUT = 10


# ----------------------------------------------------------------------------- helpers


@attrs.define
class WebhookReceiver:
    """A tiny webhook endpoint: records what arrives and answers planned statuses, then 200."""

    planned: list[int] = attrs.field(factory=list)
    received: list[tuple[bytes, str | None]] = attrs.field(factory=list)
    changed: trio.Event = attrs.field(factory=trio.Event)

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        self.received.append((body, headers.get("crypto-pay-api-signature")))
        status = self.planned.pop(0) if self.planned else 200
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
        self.changed.set()
        self.changed = trio.Event()

    async def wait_for(self, count: int) -> None:
        while len(self.received) < count:
            await self.changed.wait()


async def serve_receiver(
    receiver: WebhookReceiver, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
) -> None:
    config = hypercorn.config.Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(hypercorn.trio.serve, receiver.app, config))
        task_status.started(binds[0] + "/cryptopay/webhook")


@pytest.fixture
async def fake(nursery: trio.Nursery) -> FakeCryptoPay:
    fake = FakeCryptoPay(webhook_retry_delay=0.05)
    with trio.fail_after(IO_TIMEOUT):
        await nursery.start(serve_fake_cryptopay, fake)
    return fake


@pytest.fixture
async def receiver(nursery: trio.Nursery, fake: FakeCryptoPay) -> WebhookReceiver:
    receiver = WebhookReceiver()
    with trio.fail_after(IO_TIMEOUT):
        fake.webhook_url = await nursery.start(serve_receiver, receiver)
    return receiver


@pytest.fixture
async def client(fake: FakeCryptoPay) -> AsyncIterator[CryptoPayClient]:
    async with open_cryptopay_client(fake.token, f"{fake.base_url}/api", timeout=5) as client:
        yield client


async def create(client: CryptoPayClient, amount: str = "4.99", payload: str = "purchase:17") -> Invoice:
    return await client.create_invoice(
        amount=Decimal(amount),
        fiat="USD",
        payload=payload,
        description="VPN, 1 month",
        expires_in=900,
        paid_btn_name="openBot",
        paid_btn_url="https://t.me/vpnd_test_bot",
    )


async def pay_over_http(fake: FakeCryptoPay, invoice_id: int, **options: Any) -> httpx.Response:
    async with httpx.AsyncClient() as http:
        return await http.post(f"{fake.base_url}/sandbox/pay/{invoice_id}", json=options)


# ----------------------------------------------------------------------------- client ↔ fake


async def test_invoice_lifecycle_create_get_pay(fake: FakeCryptoPay, client: CryptoPayClient) -> None:
    with trio.fail_after(IO_TIMEOUT):
        me = await client.get_me()
        assert me.app_id == fake.app_id and me.name == fake.app_name

        invoice = await create(client)
        assert invoice.status == "active" and not invoice.is_paid
        assert invoice.amount == Decimal("4.99")
        assert (invoice.currency_type, invoice.fiat, invoice.asset) == ("fiat", "USD", None)
        assert invoice.payload == "purchase:17"
        assert invoice.bot_invoice_url.startswith(f"{fake.base_url}/invoice/")
        assert invoice.expiration_date is not None and invoice.paid_at is None

        (fetched,) = await client.get_invoices(invoice_ids=[invoice.invoice_id])
        assert fetched == invoice

        response = await pay_over_http(fake, invoice.invoice_id, paid_asset="TON")
        assert response.status_code == 200 and response.json()["ok"] is True

        paid = await client.get_invoice(invoice.invoice_id)
        assert paid.status == "paid" and paid.is_paid
        assert paid.paid_at is not None and paid.paid_at >= paid.created_at
        assert paid.paid_asset == "TON" and paid.paid_amount is not None and paid.paid_amount > 0
        assert paid.paid_fiat_rate is not None
        assert abs(paid.paid_amount * paid.paid_fiat_rate - Decimal("4.99")) < Decimal("0.0001")

        again = await pay_over_http(fake, invoice.invoice_id)
        assert again.status_code == 400
        assert again.json() == {"ok": False, "error": {"code": 400, "name": "INVOICE_ALREADY_PAID"}}


async def test_get_invoices_filters(fake: FakeCryptoPay, client: CryptoPayClient) -> None:
    with trio.fail_after(IO_TIMEOUT):
        invoices = [await create(client, payload=f"p{i}") for i in range(3)]
        ids = [inv.invoice_id for inv in invoices]
        fake.pay(ids[1])

        got = await client.get_invoices(invoice_ids=ids)
        assert sorted(inv.invoice_id for inv in got) == sorted(ids)
        assert [inv.invoice_id for inv in await client.get_invoices(invoice_ids=ids, status="paid")] == [ids[1]]
        active = await client.get_invoices(invoice_ids=ids, status="active")
        assert sorted(inv.invoice_id for inv in active) == [ids[0], ids[2]]
        assert await client.get_invoices(invoice_ids=[]) == []
        with pytest.raises(InvoiceNotFound):
            await client.get_invoice(999_999_999)


async def test_api_errors_are_typed(fake: FakeCryptoPay, client: CryptoPayClient) -> None:
    with trio.fail_after(IO_TIMEOUT):
        with pytest.raises(InvalidRequestError) as bad_fiat:
            await client.create_invoice(amount=Decimal("1"), fiat="XXX", payload="p", description="d", expires_in=60)
        assert (bad_fiat.value.code, bad_fiat.value.name) == (400, "FIAT_INVALID")

        with pytest.raises(InvalidRequestError) as bad_expiry:
            await client.create_invoice(amount=Decimal("1"), fiat="USD", payload="p", description="d", expires_in=0)
        assert bad_expiry.value.name == "EXPIRES_IN_INVALID"

        with pytest.raises(InvalidRequestError) as bad_button:
            await client.create_invoice(
                amount=Decimal("1"), fiat="USD", payload="p", description="d", expires_in=60,
                paid_btn_name="openBot",
            )  # fmt: skip
        assert bad_button.value.name == "PAID_BTN_URL_INVALID"

        with pytest.raises(InvalidRequestError) as too_long:
            await client.create_invoice(
                amount=Decimal("1"), fiat="USD", payload="x" * 5000, description="d", expires_in=60
            )
        assert too_long.value.name == "PAYLOAD_TOO_LONG"

        with pytest.raises(MethodNotFoundError) as no_method:
            await client.call("sendCoinsToEveryone")
        assert (no_method.value.code, no_method.value.name) == (405, "METHOD_NOT_FOUND")

        with pytest.raises(ValueError):
            await client.create_invoice(amount=Decimal("-1"), fiat="USD", payload="p", description="d", expires_in=60)
    assert fake.invoices == {}


async def test_bad_token_is_unauthorized_and_token_is_never_shown(fake: FakeCryptoPay) -> None:
    secret = "9999:AAThisTokenIsWrongAndSecret"
    with trio.fail_after(IO_TIMEOUT):
        async with open_cryptopay_client(secret, f"{fake.base_url}/api") as client:
            with pytest.raises(UnauthorizedError) as exc_info:
                await client.get_me()
            with pytest.raises(UnauthorizedError):
                await create(client)
    err = exc_info.value
    assert (err.code, err.name) == (401, "UNAUTHORIZED")
    assert secret not in str(err) and secret not in repr(err) and secret not in repr(client)
    assert fake.invoices == {}


async def test_transient_faults(fake: FakeCryptoPay, client: CryptoPayClient) -> None:
    with trio.fail_after(IO_TIMEOUT):
        fake.fail_api("http_502")
        with pytest.raises(TransientCryptoPayError) as bad_gateway:
            await client.get_me()
        assert bad_gateway.value.code == 502
        assert (await client.get_me()).app_id == fake.app_id  # one-shot fault

        fake.fail_api("http_500", times=2)
        for _ in range(2):
            with pytest.raises(TransientCryptoPayError) as internal:
                await create(client)
            assert (internal.value.code, internal.value.name) == (500, "INTERNAL_ERROR")
        await create(client)

        # The server hangs longer than this whole block may take (IO_TIMEOUT): only the client's own
        # timeout can end the call in time, and it says so (a late 504 would be code 504, not TIMEOUT).
        fake.api_hang_seconds = 60
        fake.fail_api("timeout")
        async with open_cryptopay_client(fake.token, f"{fake.base_url}/api", timeout=0.3) as impatient:
            with pytest.raises(TransientCryptoPayError) as timed_out:
                await impatient.get_me()
        assert (timed_out.value.code, timed_out.value.name) == (0, "TIMEOUT")

    async with open_cryptopay_client(fake.token, "http://127.0.0.1:9/api", timeout=2) as nowhere:
        with trio.fail_after(IO_TIMEOUT), pytest.raises(TransientCryptoPayError) as refused:
            await nowhere.get_me()
    assert refused.value.name == "NETWORK_ERROR"


async def test_raw_wire_shapes(fake: FakeCryptoPay) -> None:
    api = f"{fake.base_url}/api"
    auth = {"Crypto-Pay-API-Token": fake.token}
    with trio.fail_after(IO_TIMEOUT):
        async with httpx.AsyncClient() as http:
            # GET with a query string, like the real API accepts.
            r = await http.get(
                f"{api}/createInvoice",
                params={"asset": "TON", "amount": "1.5", "expires_in": "60"},
                headers=auth,
            )
            assert r.status_code == 200
            created = r.json()["result"]
            assert created["currency_type"] == "crypto" and created["asset"] == "TON"
            assert created["amount"] == "1.5" and created["status"] == "active"
            for key in ("invoice_id", "hash", "bot_invoice_url", "mini_app_invoice_url", "created_at"):
                assert key in created

            # Form body.
            r = await http.post(
                f"{api}/createInvoice",
                data={"currency_type": "fiat", "fiat": "EUR", "amount": "3", "accepted_assets": "USDT,TON"},
                headers=auth,
            )
            assert r.status_code == 200 and r.json()["result"]["accepted_assets"] == ["USDT", "TON"]
            second = r.json()["result"]

            # getInvoices: invoice_ids as a JSON list, result wrapped in items.
            r = await http.post(
                f"{api}/getInvoices",
                json={"invoice_ids": [created["invoice_id"], second["invoice_id"]]},
                headers=auth,
            )
            body = r.json()
            assert body["ok"] is True and set(body["result"]) == {"items"}
            assert {i["invoice_id"] for i in body["result"]["items"]} == {
                created["invoice_id"],
                second["invoice_id"],
            }
            r = await http.get(f"{api}/getInvoices", params={"count": 1, "offset": 1}, headers=auth)
            assert [i["invoice_id"] for i in r.json()["result"]["items"]] == [created["invoice_id"]]

            r = await http.post(f"{api}/createInvoice", json={"asset": "TON", "amount": "abc"}, headers=auth)
            assert (r.status_code, r.json()) == (400, {"ok": False, "error": {"code": 400, "name": "AMOUNT_INVALID"}})
            r = await http.get(f"{api}/getInvoices", params={"count": 5000}, headers=auth)
            assert (r.status_code, r.json()["error"]["name"]) == (400, "COUNT_INVALID")
            r = await http.get(f"{api}/getMe")
            assert (r.status_code, r.json()) == (401, {"ok": False, "error": {"code": 401, "name": "UNAUTHORIZED"}})
            r = await http.get(f"{api}/getBalanceOfTheMoon", headers=auth)
            assert (r.status_code, r.json()["error"]) == (405, {"code": 405, "name": "METHOD_NOT_FOUND"})


async def test_invoice_expires_with_trio_time(
    fake: FakeCryptoPay, client: CryptoPayClient, mock_clock: trio.testing.MockClock
) -> None:
    mock_clock.rate = 1.0  # real time still flows for sockets and timeouts; jumps happen between I/O
    with trio.fail_after(IO_TIMEOUT):
        invoice = await client.create_invoice(
            amount=Decimal("2"), fiat="USD", payload="p", description="d", expires_in=60
        )
    assert invoice.expiration_date is not None
    assert abs((invoice.expiration_date - invoice.created_at).total_seconds() - 60) < 1
    mock_clock.jump(30)
    with trio.fail_after(IO_TIMEOUT):
        assert (await client.get_invoice(invoice.invoice_id)).status == "active"
    mock_clock.jump(31)
    with trio.fail_after(IO_TIMEOUT):
        assert (await client.get_invoice(invoice.invoice_id)).status == "expired"
        expired = await client.get_invoices(invoice_ids=[invoice.invoice_id], status="expired")
        assert [i.invoice_id for i in expired] == [invoice.invoice_id]
        response = await pay_over_http(fake, invoice.invoice_id)
        assert response.json()["error"] == {"code": 400, "name": "INVOICE_EXPIRED"}


async def test_pay_page_for_the_demo(fake: FakeCryptoPay, client: CryptoPayClient, receiver: WebhookReceiver) -> None:
    with trio.fail_after(IO_TIMEOUT):
        invoice = await create(client)
        async with httpx.AsyncClient() as http:
            page = await http.get(invoice.bot_invoice_url)
            assert page.status_code == 200 and "text/html" in page.headers["content-type"]
            assert "VPN, 1 month" in page.text and "4.99 USD" in page.text and 'id="pay"' in page.text
            submitted = await http.post(f"{invoice.bot_invoice_url}/pay", data={"paid_asset": "USDT"})
            assert submitted.status_code == 303
            after = await http.get(invoice.bot_invoice_url)
            assert "paid" in after.text and "https://t.me/vpnd_test_bot" in after.text
        assert (await client.get_invoice(invoice.invoice_id)).status == "paid"
        await receiver.wait_for(1)


# ----------------------------------------------------------------------------- signatures


def test_signature_is_hmac_sha256_keyed_by_sha256_of_token() -> None:
    token, body = "1234:AAabc", b'{"update_id":1}'
    expected = hmac.new(hashlib.sha256(token.encode()).digest(), body, hashlib.sha256).hexdigest()
    assert sign_webhook_body(token, body) == expected
    assert verify_webhook_signature(token, body, expected)
    assert verify_webhook_signature(token, body, expected.upper())
    assert not verify_webhook_signature("1234:AAother", body, expected)
    for bad in (None, "", "zz", expected[:-1], expected + "0", "é" * 64, " " * 64):
        assert not verify_webhook_signature(token, body, bad)


async def test_webhook_signature_from_the_fake(
    fake: FakeCryptoPay, client: CryptoPayClient, receiver: WebhookReceiver
) -> None:
    with trio.fail_after(IO_TIMEOUT):
        invoice = await create(client, payload="purchase:\u2603")  # non-ASCII payload on the wire
        fake.pay(invoice.invoice_id)
        await receiver.wait_for(1)
    body, signature = receiver.received[0]
    assert verify_webhook_signature(fake.token, body, signature)

    update = parse_webhook_update(body)
    assert update.update_type == "invoice_paid"
    assert update.invoice.invoice_id == invoice.invoice_id and update.invoice.status == "paid"
    assert update.invoice.payload == "purchase:\u2603"
    assert update.invoice.paid_at is not None

    forged = bytes.fromhex(signature)
    forged = (bytes([forged[0] ^ 1]) + forged[1:]).hex()
    assert not verify_webhook_signature(fake.token, body, forged)
    assert not verify_webhook_signature(fake.token, body, None)
    assert not verify_webhook_signature("4242:AAsomeoneElsesToken", body, signature)
    same_json = json.loads(body)
    for respaced in (
        json.dumps(same_json).encode(),
        json.dumps(same_json, indent=2, ensure_ascii=False).encode(),
        json.dumps(same_json, separators=(",", ":")).encode(),  # \u-escaped non-ASCII
    ):
        assert json.loads(respaced) == same_json
        assert not verify_webhook_signature(fake.token, respaced, signature)
    tampered = body.replace(b'"status":"paid"', b'"status":"paid" ')
    assert not verify_webhook_signature(fake.token, tampered, signature)


def test_parse_webhook_update_rejects_malformed_bodies() -> None:
    for body in (
        b"not json",
        b"\xff\xfe",
        b"[]",
        b'{"update_id":1}',
        b'{"update_id":1,"update_type":"invoice_paid","request_date":"2024-01-01T00:00:00.000Z","payload":{}}',
        b'{"update_id":"1","update_type":"invoice_paid","request_date":"x","payload":{}}',
    ):
        with pytest.raises(MalformedWebhook):
            parse_webhook_update(body)


# ----------------------------------------------------------------------------- webhook delivery


async def test_webhook_retried_until_receiver_answers_200(
    fake: FakeCryptoPay, client: CryptoPayClient, receiver: WebhookReceiver
) -> None:
    receiver.planned = [500, 503]
    with trio.fail_after(IO_TIMEOUT):
        invoice = await create(client)
        fake.pay(invoice.invoice_id)
        await fake.wait_until(lambda: bool(fake.successful_deliveries()))
    assert [(d.attempt, d.status_code) for d in fake.deliveries] == [(1, 500), (2, 503), (3, 200)]
    assert len({body for body, _ in receiver.received}) == 1  # the same bytes every time
    assert fake.deliveries[2].at - fake.deliveries[0].at >= 0.05 + 0.1  # backoff doubled


async def test_webhook_gives_up_after_max_attempts(
    fake: FakeCryptoPay, client: CryptoPayClient, receiver: WebhookReceiver
) -> None:
    receiver.planned = [500] * 10
    fake.webhook_max_attempts = 3
    with trio.fail_after(IO_TIMEOUT):
        invoice = await create(client)
        fake.pay(invoice.invoice_id)
        await fake.wait_until(lambda: bool(fake.given_up))  # the delivery task ended: no attempt follows
    assert list(fake.given_up) == [parse_webhook_update(receiver.received[0][0]).update_id]
    assert [d.status_code for d in fake.deliveries] == [500, 500, 500]
    assert len(receiver.received) == 3


async def test_webhook_duplicates(fake: FakeCryptoPay, client: CryptoPayClient, receiver: WebhookReceiver) -> None:
    fake.webhook_copies = 3
    with trio.fail_after(IO_TIMEOUT):
        invoice = await create(client)
        fake.pay(invoice.invoice_id)
        await receiver.wait_for(3)
    updates = [parse_webhook_update(body) for body, _ in receiver.received]
    assert {u.update_id for u in updates} == {updates[0].update_id}
    assert {u.invoice.invoice_id for u in updates} == {invoice.invoice_id}
    assert all(verify_webhook_signature(fake.token, body, sig) for body, sig in receiver.received)
    assert [d.copy for d in fake.deliveries] == [1, 2, 3]


async def test_webhook_not_delivered_when_switched_off(
    fake: FakeCryptoPay, client: CryptoPayClient, receiver: WebhookReceiver
) -> None:
    fake.webhooks_enabled = False
    with trio.fail_after(IO_TIMEOUT):
        invoice = await create(client)
        fake.pay(invoice.invoice_id)  # the update is suppressed at once: no delivery task is started
        # The payment is real even though no webhook came: polling finds it.
        assert (await client.get_invoice(invoice.invoice_id)).status == "paid"
    assert receiver.received == [] and list(fake.deliveries) == []
    assert [u.invoice_id for u in fake.suppressed_updates] == [invoice.invoice_id]


async def test_webhook_out_of_order(fake: FakeCryptoPay, client: CryptoPayClient, receiver: WebhookReceiver) -> None:
    fake.hold_next_webhook = True
    with trio.fail_after(IO_TIMEOUT):
        first = await create(client, payload="first")
        second = await create(client, payload="second")
        fake.pay(first.invoice_id)  # held at once: no delivery task is started for it
        assert receiver.received == [] and len(fake.held_updates) == 1 and not fake.deliveries
        fake.pay(second.invoice_id)
        await receiver.wait_for(2)
    order = [parse_webhook_update(body).invoice.payload for body, _ in receiver.received]
    assert order == ["second", "first"]


async def test_webhook_late(fake: FakeCryptoPay, client: CryptoPayClient, receiver: WebhookReceiver) -> None:
    fake.webhook_delay = 0.5
    with trio.fail_after(IO_TIMEOUT):
        invoice = await create(client)
        paid_at = trio.current_time()
        fake.pay(invoice.invoice_id)
        await receiver.wait_for(1)
        assert trio.current_time() - paid_at >= 0.5
