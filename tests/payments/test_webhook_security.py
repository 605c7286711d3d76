"""The webhook refuses anything not signed by Crypto Pay over exactly these bytes, and changes nothing."""

from __future__ import annotations

import json

import httpx
import trio

from tests.payments.conftest import IO_TIMEOUT, Env
from vpnd.cryptopay import SIGNATURE_HEADER, sign_webhook_body
from vpnd.payments.service import start_cryptopay_purchase


async def genuine_update(env: Env) -> tuple[bytes, str, int]:
    """A real paid-invoice update body and signature from the fake, captured but not delivered."""
    user = await env.add_user(3001)
    purchase, _ = await start_cryptopay_purchase(env.app, env.client, user, plan_code="m1")
    assert purchase.invoice_id is not None
    env.fake.webhooks_enabled = False
    env.fake.pay(purchase.invoice_id)
    (update,) = env.fake.suppressed_updates
    return update.body, update.signature, purchase.id


async def post(env: Env, body: bytes, headers: dict[str, str]) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as http:
        return await http.post(env.webhook_url, content=body, headers={"content-type": "application/json", **headers})


async def test_refused_requests_change_nothing(env: Env) -> None:
    with trio.fail_after(IO_TIMEOUT):
        body, signature, purchase_id = await genuine_update(env)
        before = env.snapshot()
        forged = format(int(signature, 16) ^ 1, "064x")
        respaced = json.dumps(json.loads(body), indent=1).encode()
        reordered = json.dumps(dict(reversed(list(json.loads(body).items())))).encode()
        huge = body[:-1] + b',"pad":"' + b"x" * (1 << 20) + b'"}'
        cases = [
            ("forged signature", body, {SIGNATURE_HEADER: forged}, 401),
            ("other app's token", body, {SIGNATURE_HEADER: sign_webhook_body("1:other", body)}, 401),
            ("missing header", body, {}, 401),
            ("empty header", body, {SIGNATURE_HEADER: ""}, 401),
            ("re-serialized with other spacing", respaced, {SIGNATURE_HEADER: signature}, 401),
            ("re-ordered keys", reordered, {SIGNATURE_HEADER: signature}, 401),
            ("malformed JSON, unsigned", b'{"update_id": 1,', {SIGNATURE_HEADER: signature}, 401),
            ("malformed JSON, signed", b'{"update_id": 1,', {SIGNATURE_HEADER: sign_webhook_body(env.fake.token,
                                                                                       b'{"update_id": 1,')}, 400),
            ("signed, not an update", b"[1,2]", {SIGNATURE_HEADER: sign_webhook_body(env.fake.token, b"[1,2]")}, 400),
            ("1 MiB body", huge, {SIGNATURE_HEADER: sign_webhook_body(env.fake.token, huge)}, 413),
        ]  # fmt: skip
        for name, payload, headers, status in cases:
            response = await post(env, payload, headers)
            assert response.status_code == status, name
            assert env.snapshot() == before, name
        # A 1 MiB body sent chunked (no content-length) is cut off too.

        async def chunks():  # type: ignore[no-untyped-def]
            for _ in range(16):
                yield b"x" * 65536

        async with httpx.AsyncClient(timeout=10) as http:
            response = await http.post(env.webhook_url, content=chunks(), headers={SIGNATURE_HEADER: signature})
        assert response.status_code == 413
        assert env.snapshot() == before
        assert env.scalar("SELECT status FROM purchases WHERE id = %s", (purchase_id,)) == "pending"

        # The genuine bytes with their signature are accepted, exactly once.
        for _ in range(2):
            response = await post(env, body, {SIGNATURE_HEADER: signature})
            assert response.status_code == 200
        assert env.scalar("SELECT status FROM purchases WHERE id = %s", (purchase_id,)) == "paid"
        assert env.scalar("SELECT count(*) FROM payments") == 1


async def test_verified_outcomes_all_answer_200(env: Env) -> None:
    """Unknown purchase, another update type, an unpaid invoice: 200 so Crypto Pay stops retrying."""
    with trio.fail_after(IO_TIMEOUT):
        body, _, purchase_id = await genuine_update(env)
        update = json.loads(body)

        unknown = json.loads(body)
        unknown["payload"]["payload"] = "987654321"
        unknown["payload"]["invoice_id"] = 55555
        other_type = dict(update, update_type="invoice_refunded")
        for obj in (unknown, other_type):
            raw = json.dumps(obj).encode()
            response = await post(env, raw, {SIGNATURE_HEADER: sign_webhook_body(env.fake.token, raw)})
            assert response.status_code == 200
        assert env.scalar("SELECT count(*) FROM payments") == 0
        assert env.scalar("SELECT status FROM purchases WHERE id = %s", (purchase_id,)) == "pending"
        # The unknown purchase was alerted to the admins.
        assert env.scalar("SELECT count(*) FROM outbox WHERE dedupe_key LIKE 'alert:payment_unknown:%%'") == 2
