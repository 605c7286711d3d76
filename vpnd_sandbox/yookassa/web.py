"""Fake YooKassa's HTTP face on the daemon's own ASGI layer (:mod:`vpnd.web`): the API, the payment page."""

from __future__ import annotations

import html
import json
from functools import partial
from typing import Any

import httpx
import trio

from vpnd.web import Request, Response, Router, serve, server_config
from vpnd_sandbox.yookassa.state import FakeYooKassa

MAX_BODY_BYTES = 1 << 20

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>YooKassa (sandbox)</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font-family: system-ui, sans-serif; background: #f2f4f7; margin: 0; }}
main {{ max-width: 420px; margin: 48px auto; background: #fff; border-radius: 14px; padding: 28px; }}
.amount {{ font-size: 34px; font-weight: 700; margin: 8px 0; }}
button {{ width: 100%; padding: 14px; font-size: 17px; border: 0; border-radius: 10px; margin-top: 10px;
          cursor: pointer; color: #fff; }}
#pay {{ background: #0070f0; }} #fail {{ background: #b0413e; }}
</style></head>
<body><main>
<h1>YooKassa sandbox · {method}</h1>
<div class="amount">{amount}</div>
<p>{description}</p><p>Status: <b id="status">{status}</b></p>
{actions}
<p><small>This is a fake payment page for testing. No money moves.</small></p>
</main></body></html>
"""


def payment_page(payment: dict[str, Any]) -> str:
    method = (payment.get("payment_method") or {}).get("type") or "card or SBP"
    amount = f"{payment['amount']['value']} {payment['amount']['currency']}"
    if payment["status"] == "pending":
        actions = (
            f'<form method="post" action="/checkout/{payment["id"]}/pay"><button id="pay">Pay {amount}</button></form>'
            f'<form method="post" action="/checkout/{payment["id"]}/fail"><button id="fail">Fail</button></form>'
        )
    else:
        back = payment["confirmation"].get("return_url")
        actions = f'<p><a href="{html.escape(back)}">Back to the bot</a></p>' if back else ""
    return _PAGE.format(
        method=html.escape(method.replace("_", " ")),
        amount=html.escape(amount),
        description=html.escape(payment.get("description", "")),
        status=html.escape(payment["status"]),
        actions=actions,
    )


def yookassa_router(fake: FakeYooKassa) -> Router:
    router = Router(max_body_bytes=MAX_BODY_BYTES)
    router.add("*", "/v3/{resource}", partial(_api, fake))
    router.add("*", "/v3/{resource}/{id}", partial(_api, fake))
    router.add("GET", "/checkout/{id}", partial(_page, fake))
    router.add("POST", "/checkout/{id}/{action}", partial(_act, fake))
    return router


async def _api(fake: FakeYooKassa, request: Request) -> Response:
    raw = await request.body()
    try:
        body = json.loads(raw) if raw.strip() else None
    except ValueError:
        body = None
    path = request.path.removeprefix("/v3")
    status, answer = fake.handle(
        request.method, path, body, request.header("authorization"), request.header("idempotence-key")
    )
    fake.api_calls.append((request.method, path, status))
    if isinstance(body, dict) and "payment_method_id" in body:
        await fake.release_saved_charge()
    return Response.json(answer, status)


async def _page(fake: FakeYooKassa, request: Request) -> Response:
    payment = fake.payments.get(request.params["id"])
    if payment is None:
        return Response.html("<html><body>Payment not found</body></html>", 404)
    return Response.html(payment_page(payment))


async def _act(fake: FakeYooKassa, request: Request) -> Response:
    payment_id, action = request.params["id"], request.params["action"]
    if payment_id not in fake.payments or action not in ("pay", "fail"):
        return Response.html("<html><body>Payment not found</body></html>", 404)
    (fake.pay if action == "pay" else fake.fail)(payment_id)
    return Response(303, b"", [("location", f"/checkout/{payment_id}")])


async def serve_fake_yookassa(
    fake: FakeYooKassa,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``fake`` until cancelled; ``task_status.started(base_url)`` once listening (API at ``/v3``).

    Notification deliveries run in this function's nursery and end with it.
    """
    async with httpx.AsyncClient(follow_redirects=False) as http, trio.open_nursery() as nursery:
        fake._http = http
        fake._nursery = nursery
        try:
            fake.base_url = await nursery.start(partial(serve, yookassa_router(fake), server_config(host, port)))
            task_status.started(fake.base_url)
            await trio.sleep_forever()
        finally:
            fake._nursery = None
            fake._http = None
            nursery.cancel_scope.cancel()
