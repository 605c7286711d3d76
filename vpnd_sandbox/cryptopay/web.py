"""Fake Crypto Pay's HTTP face on the daemon's own ASGI layer (:mod:`vpnd.web`), and its server."""

from __future__ import annotations

import json
import logging
import urllib.parse
from collections.abc import Mapping
from functools import partial
from typing import Any, Final

import httpx
import trio

from vpnd.web import Handler, Request, Response, Router, serve, server_config
from vpnd_sandbox.cryptopay.page import invoice_page
from vpnd_sandbox.cryptopay.params import param_bool, param_str
from vpnd_sandbox.cryptopay.records import ApiCall, FakeApiError, compact_json
from vpnd_sandbox.cryptopay.state import FakeCryptoPay

logger = logging.getLogger("vpnd_sandbox.cryptopay")

MAX_BODY_BYTES: Final = 1 << 20


def request_params(request: Request, body: bytes) -> dict[str, Any]:
    """An API call's parameters: the query string's, then a JSON or form body's over them."""
    params: dict[str, Any] = dict(urllib.parse.parse_qsl(bytes(request.scope.get("query_string", b"")).decode()))
    if not body.strip():
        return params
    content_type = (request.header("content-type") or "").split(";")[0].strip().lower()
    if content_type == "application/json":
        try:
            data = json.loads(body)
        except ValueError:
            raise FakeApiError(400, "JSON_INVALID") from None
        if not isinstance(data, dict):
            raise FakeApiError(400, "JSON_INVALID")
        params.update(data)
    elif content_type == "application/x-www-form-urlencoded":
        params.update(urllib.parse.parse_qsl(body.decode("utf-8", "replace")))
    else:
        raise FakeApiError(400, "CONTENT_TYPE_INVALID")
    return params


#: The names the router's own errors get, in Crypto Pay's format.
_ERROR_NAMES: Final[Mapping[int, str]] = {
    404: "NOT_FOUND",
    405: "METHOD_NOT_FOUND",
    408: "REQUEST_TIMEOUT",
    413: "REQUEST_TOO_LARGE",
    500: "INTERNAL_ERROR",
}


def _error_response(status: int, text: str) -> Response:
    return _api_error(FakeApiError(status, _ERROR_NAMES.get(status, "INTERNAL_ERROR")))


def _api_error(exc: FakeApiError) -> Response:
    return Response.json({"ok": False, "error": {"code": exc.code, "name": exc.name}}, exc.code)


def _api_errors(handler: Handler) -> Handler:
    """A handler whose :class:`FakeApiError` is answered in Crypto Pay's error format."""

    async def handle(request: Request) -> Response:
        try:
            return await handler(request)
        except FakeApiError as exc:
            return _api_error(exc)

    return handle


def cryptopay_router(fake: FakeCryptoPay, *, body_timeout: float = float("inf")) -> Router:
    """The fake's routes on a :class:`vpnd.web.Router` (bodies capped at ``MAX_BODY_BYTES``)."""
    router = Router(max_body_bytes=MAX_BODY_BYTES, body_timeout=body_timeout, error_response=_error_response)
    router.add("*", "/api/{method}", _api_errors(partial(_api, fake)))
    router.add("POST", "/sandbox/pay/{invoice_id}", _api_errors(partial(_sandbox_pay, fake)))
    router.add("GET", "/invoice/{hash}", partial(_invoice, fake))
    router.add("POST", "/invoice/{hash}/pay", partial(_invoice_pay, fake))
    return router


async def _api(fake: FakeCryptoPay, request: Request) -> Response:
    method, http_method = request.params["method"], request.method
    body = await request.body()
    fault = fake.take_api_fault(method)
    if fault == "timeout":
        await trio.sleep(fake.api_hang_seconds)
        fake.api_calls.append(ApiCall(method, http_method, 504))
        return Response.html("<html><body>504 Gateway Time-out</body></html>", 504)
    if fault == "http_500":
        fake.api_calls.append(ApiCall(method, http_method, 500))
        return _api_error(FakeApiError(500, "INTERNAL_ERROR"))
    if fault in ("http_502", "http_503"):
        code = 502 if fault == "http_502" else 503
        fake.api_calls.append(ApiCall(method, http_method, code))
        return Response.html(f"<html><body>{code}</body></html>", code)
    if http_method not in ("GET", "POST"):
        status, obj = 405, {"ok": False, "error": {"code": 405, "name": "METHOD_NOT_FOUND"}}
    else:
        status, obj = fake.handle_api(method, request_params(request, body), request.header("crypto-pay-api-token"))
    fake.api_calls.append(ApiCall(method, http_method, status))
    return Response(status, compact_json(obj), content_type="application/json")


async def _sandbox_pay(fake: FakeCryptoPay, request: Request) -> Response:
    options = request_params(request, await request.body())
    if not request.params["invoice_id"].isdigit():
        raise FakeApiError(404, "INVOICE_NOT_FOUND")
    invoice = fake.pay(
        int(request.params["invoice_id"]),
        paid_asset=param_str(options, "paid_asset"),
        comment=param_str(options, "comment"),
        paid_anonymously=param_bool(options, "paid_anonymously", False),
    )
    return Response(200, compact_json({"ok": True, "result": invoice}), content_type="application/json")


async def _invoice(fake: FakeCryptoPay, request: Request) -> Response:
    inv = fake.invoice_by_hash(request.params["hash"])
    if inv is None:
        return Response.html("<html><body>Invoice not found</body></html>", 404)
    return Response.html(invoice_page(inv))


async def _invoice_pay(fake: FakeCryptoPay, request: Request) -> Response:
    inv = fake.invoice_by_hash(request.params["hash"])
    if inv is None:
        return Response.html("<html><body>Invoice not found</body></html>", 404)
    form = request_params(request, await request.body())
    try:
        fake.pay(inv.invoice_id, paid_asset=param_str(form, "paid_asset"))
    except FakeApiError as exc:
        logger.info("sandbox pay page: %s", exc)
    return Response(303, b"", [("location", f"/invoice/{inv.hash}")])


async def serve_fake_cryptopay(
    fake: FakeCryptoPay,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    body_timeout: float = float("inf"),
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``fake`` over HTTP until cancelled; ``task_status.started(base_url)`` once listening.

    Served by the daemon's own HTTP layer (:mod:`vpnd.web`): bodies over ``MAX_BODY_BYTES`` get 413, a
    body not complete within ``body_timeout`` seconds 408, both in Crypto Pay's error format.
    The API is at ``f"{base_url}/api/{method}"``. Webhook deliveries run in this function's
    nursery and end with it.
    """
    async with httpx.AsyncClient(follow_redirects=False) as http, trio.open_nursery() as nursery:
        fake._http = http
        fake._nursery = nursery
        try:
            router = cryptopay_router(fake, body_timeout=body_timeout)
            fake.base_url = await nursery.start(partial(serve, router, server_config(host, port)))
            task_status.started(fake.base_url)
            await trio.sleep_forever()
        finally:
            fake._nursery = None
            fake._http = None
            nursery.cancel_scope.cancel()
