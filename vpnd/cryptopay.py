"""Crypto Pay API client (https://help.crypt.bot/crypto-pay-api) and webhook verification.

The client is a thin async layer over httpx (it runs under Trio): one POST per API method to
``{base_url}/{method}`` with the app token in the ``Crypto-Pay-API-Token`` header and a JSON body.
Every answer is ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": {"code", "name"}}``;
the latter becomes a typed :class:`CryptoPayError`. Failures that are worth retrying (5xx, 429,
timeouts, network errors) are :class:`TransientCryptoPayError`; everything else is permanent.

The token never appears in logs, exception messages or reprs.

Webhooks: Crypto Pay signs the raw request body with HMAC-SHA-256 keyed by SHA-256(token) and
sends the hex digest in the ``crypto-pay-api-signature`` header. Verify the *raw* bytes before
parsing; a re-serialized body does not verify.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Final

import attrs
import httpx

logger = logging.getLogger(__name__)

DEFAULT_BASE_URL: Final = "https://pay.crypt.bot/api"
TOKEN_HEADER: Final = "Crypto-Pay-API-Token"
SIGNATURE_HEADER: Final = "crypto-pay-api-signature"

INVOICE_STATUSES: Final = frozenset({"active", "paid", "expired"})


# --------------------------------------------------------------------------- errors


class CryptoPayError(Exception):
    """An error answered by Crypto Pay (``code``/``name`` as in its error object) or met on the way."""

    def __init__(self, code: int, name: str, *, method: str | None = None) -> None:
        self.code = code
        self.name = name
        self.method = method
        where = f" in {method}" if method else ""
        super().__init__(f"Crypto Pay error {code} {name}{where}")


class UnauthorizedError(CryptoPayError):
    """401 UNAUTHORIZED: the app token is wrong or revoked. Not retryable."""


class MethodNotFoundError(CryptoPayError):
    """405 METHOD_NOT_FOUND: the API has no such method (wrong base URL or API version)."""


class MethodDisabledError(CryptoPayError):
    """403 METHOD_DISABLED: the method is switched off in the app's settings."""


class InvalidRequestError(CryptoPayError):
    """400: a parameter was refused (``name`` says which, e.g. AMOUNT_INVALID, EXPIRES_IN_INVALID)."""


class InvoiceNotFound(CryptoPayError):
    """The invoice does not exist (or belongs to another app)."""


class TransientCryptoPayError(CryptoPayError):
    """5xx, 429, timeout or network failure: the same request may succeed later (retry with backoff).

    ``code`` is the HTTP status, or 0 when no HTTP answer arrived (``name`` is then TIMEOUT or
    NETWORK_ERROR).
    """


class UnexpectedResponseError(CryptoPayError):
    """The answer was not a Crypto Pay response (not JSON, wrong shape, unparsable object)."""


class MalformedWebhook(ValueError):
    """A webhook body that is not valid JSON or lacks the fields of a Crypto Pay Update."""


_ERRORS_BY_NAME: Final[Mapping[str, type[CryptoPayError]]] = {
    "UNAUTHORIZED": UnauthorizedError,
    "METHOD_NOT_FOUND": MethodNotFoundError,
    "METHOD_DISABLED": MethodDisabledError,
    "INVOICE_NOT_FOUND": InvoiceNotFound,
}

_ERRORS_BY_CODE: Final[Mapping[int, type[CryptoPayError]]] = {
    400: InvalidRequestError,
    401: UnauthorizedError,
    403: MethodDisabledError,
    404: MethodNotFoundError,
    405: MethodNotFoundError,
    429: TransientCryptoPayError,
}


def error_for(code: int, name: str, *, method: str | None = None) -> CryptoPayError:
    """Build the most specific typed error for a Crypto Pay error object."""
    cls = _ERRORS_BY_NAME.get(name)
    if cls is None:
        cls = TransientCryptoPayError if code >= 500 else _ERRORS_BY_CODE.get(code, CryptoPayError)
    return cls(code, name, method=method)


# --------------------------------------------------------------------------- values


@attrs.frozen
class AppInfo:
    """Result of getMe."""

    app_id: int
    name: str
    payment_processing_bot_username: str


@attrs.frozen
class Invoice:
    """The Crypto Pay Invoice object (the fields vpnd uses; the rest are ignored).

    Money is ``Decimal`` parsed from the API's strings; dates are timezone-aware.
    """

    invoice_id: int
    hash: str
    status: str  # "active" | "paid" | "expired"
    amount: Decimal
    currency_type: str  # "fiat" | "crypto"
    fiat: str | None
    asset: str | None
    payload: str | None
    bot_invoice_url: str
    created_at: datetime
    description: str | None = None
    accepted_assets: tuple[str, ...] = ()
    mini_app_invoice_url: str | None = None
    web_app_invoice_url: str | None = None
    expiration_date: datetime | None = None
    paid_at: datetime | None = None
    paid_asset: str | None = None
    paid_amount: Decimal | None = None
    paid_fiat_rate: Decimal | None = None
    paid_usd_rate: Decimal | None = None
    fee_asset: str | None = None
    fee_amount: Decimal | None = None
    paid_anonymously: bool | None = None
    comment: str | None = None

    @property
    def is_paid(self) -> bool:
        return self.status == "paid"


@attrs.frozen
class WebhookUpdate:
    """A Crypto Pay webhook Update. ``update_type`` is "invoice_paid" (the only type today).

    ``update_id`` is not unique across deliveries: a redelivered update keeps its id, so handlers
    must be idempotent on ``invoice.invoice_id``.
    """

    update_id: int
    update_type: str
    request_date: datetime
    invoice: Invoice


# --------------------------------------------------------------------------- parsing (pure)


def _req(obj: Mapping[str, Any], key: str) -> Any:
    if key not in obj or obj[key] is None:
        raise ValueError(f"missing field {key!r}")
    return obj[key]


def _str(obj: Mapping[str, Any], key: str) -> str:
    value = _req(obj, key)
    if not isinstance(value, str):
        raise ValueError(f"field {key!r} is not a string")
    return value


def _opt_str(obj: Mapping[str, Any], key: str) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"field {key!r} is not a string")
    return value


def _int(obj: Mapping[str, Any], key: str) -> int:
    value = _req(obj, key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"field {key!r} is not an integer")
    return value


def _decimal(value: Any, key: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"field {key!r} is not a number")
    try:
        result = Decimal(str(value))
    except InvalidOperation:
        raise ValueError(f"field {key!r} is not a number") from None
    if not result.is_finite():
        raise ValueError(f"field {key!r} is not a finite number")
    return result


def _opt_decimal(obj: Mapping[str, Any], key: str) -> Decimal | None:
    value = obj.get(key)
    return None if value is None else _decimal(value, key)


def _datetime(value: Any, key: str) -> datetime:
    if not isinstance(value, str):
        raise ValueError(f"field {key!r} is not a date string")
    try:
        result = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"field {key!r} is not an ISO 8601 date") from None
    if result.tzinfo is None:
        raise ValueError(f"field {key!r} has no time zone")
    return result


def _opt_datetime(obj: Mapping[str, Any], key: str) -> datetime | None:
    value = obj.get(key)
    return None if value is None else _datetime(value, key)


def parse_invoice(obj: Any) -> Invoice:
    """Invoice from its JSON object; ValueError when a required field is missing or mistyped."""
    if not isinstance(obj, Mapping):
        raise ValueError("invoice is not an object")
    status = _str(obj, "status")
    if status not in INVOICE_STATUSES:
        raise ValueError(f"unknown invoice status {status!r}")
    accepted = obj.get("accepted_assets") or ()
    if isinstance(accepted, str):
        accepted = accepted.split(",")
    if not isinstance(accepted, list | tuple) or not all(isinstance(a, str) for a in accepted):
        raise ValueError("field 'accepted_assets' is not a list of strings")
    paid_anonymously = obj.get("paid_anonymously")
    return Invoice(
        invoice_id=_int(obj, "invoice_id"),
        hash=_str(obj, "hash"),
        status=status,
        amount=_decimal(_req(obj, "amount"), "amount"),
        currency_type=_opt_str(obj, "currency_type") or "crypto",
        fiat=_opt_str(obj, "fiat"),
        asset=_opt_str(obj, "asset"),
        payload=_opt_str(obj, "payload"),
        bot_invoice_url=_opt_str(obj, "bot_invoice_url") or _str(obj, "pay_url"),
        created_at=_datetime(_req(obj, "created_at"), "created_at"),
        description=_opt_str(obj, "description"),
        accepted_assets=tuple(accepted),
        mini_app_invoice_url=_opt_str(obj, "mini_app_invoice_url"),
        web_app_invoice_url=_opt_str(obj, "web_app_invoice_url"),
        expiration_date=_opt_datetime(obj, "expiration_date"),
        paid_at=_opt_datetime(obj, "paid_at"),
        paid_asset=_opt_str(obj, "paid_asset"),
        paid_amount=_opt_decimal(obj, "paid_amount"),
        paid_fiat_rate=_opt_decimal(obj, "paid_fiat_rate"),
        paid_usd_rate=_opt_decimal(obj, "paid_usd_rate"),
        fee_asset=_opt_str(obj, "fee_asset"),
        fee_amount=_opt_decimal(obj, "fee_amount"),
        paid_anonymously=paid_anonymously if isinstance(paid_anonymously, bool) else None,
        comment=_opt_str(obj, "comment"),
    )


def parse_webhook_update(raw_body: bytes) -> WebhookUpdate:
    """Parse a webhook body (verify its signature first). Raises :class:`MalformedWebhook`."""
    try:
        obj = json.loads(raw_body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise MalformedWebhook(f"webhook body is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise MalformedWebhook("webhook body is not a JSON object")
    try:
        return WebhookUpdate(
            update_id=_int(obj, "update_id"),
            update_type=_str(obj, "update_type"),
            request_date=_datetime(_req(obj, "request_date"), "request_date"),
            invoice=parse_invoice(_req(obj, "payload")),
        )
    except ValueError as exc:
        raise MalformedWebhook(f"webhook update is malformed: {exc}") from None


# --------------------------------------------------------------------------- signatures (pure)


def sign_webhook_body(token: str, raw_body: bytes) -> str:
    """The ``crypto-pay-api-signature`` value Crypto Pay sends for ``raw_body``."""
    secret = hashlib.sha256(token.encode("utf-8")).digest()
    return hmac.new(secret, raw_body, hashlib.sha256).hexdigest()


def verify_webhook_signature(token: str, raw_body: bytes, signature_header: str | None) -> bool:
    """True only if ``signature_header`` is the signature of exactly these bytes.

    An absent, empty or malformed header (not 64 hex digits) is refused, never an error.
    """
    if not signature_header:
        return False
    candidate = signature_header.strip().lower()
    if len(candidate) != 64 or any(c not in "0123456789abcdef" for c in candidate):
        return False
    expected = sign_webhook_body(token, raw_body)
    return hmac.compare_digest(expected.encode("ascii"), candidate.encode("ascii"))


# --------------------------------------------------------------------------- client


def _format_amount(amount: Decimal) -> str:
    if not amount.is_finite() or amount <= 0:
        raise ValueError("amount must be a positive finite decimal")
    return format(amount.normalize(), "f")


@attrs.define
class CryptoPayClient:
    """Crypto Pay API calls over an httpx client that already carries the token header.

    Use :func:`open_cryptopay_client`; constructing one directly is for callers that manage the
    httpx client themselves.
    """

    http: httpx.AsyncClient = attrs.field(repr=False)

    async def call(self, method: str, params: Mapping[str, Any] | None = None) -> Any:
        """Call one API method and return its ``result``; typed errors otherwise."""
        try:
            response = await self.http.post(method, json=dict(params or {}))
        except httpx.TimeoutException:
            logger.warning("Crypto Pay %s timed out", method)
            raise TransientCryptoPayError(0, "TIMEOUT", method=method) from None
        except httpx.TransportError as exc:
            logger.warning("Crypto Pay %s network error: %s", method, type(exc).__name__)
            raise TransientCryptoPayError(0, "NETWORK_ERROR", method=method) from None
        return self._result(method, response)

    @staticmethod
    def _result(method: str, response: httpx.Response) -> Any:
        status = response.status_code
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and body.get("ok") is True and "result" in body:
            return body["result"]
        if isinstance(body, dict) and body.get("ok") is False and isinstance(body.get("error"), dict):
            error = body["error"]
            code = error.get("code")
            name = error.get("name")
            err = error_for(
                code if isinstance(code, int) and not isinstance(code, bool) else status,
                name if isinstance(name, str) else f"HTTP_{status}",
                method=method,
            )
            logger.warning("Crypto Pay %s failed: %s %s", method, err.code, err.name)
            raise err
        if status >= 500 or status == 429:
            logger.warning("Crypto Pay %s failed: HTTP %s", method, status)
            raise TransientCryptoPayError(status, f"HTTP_{status}", method=method)
        logger.warning("Crypto Pay %s gave an unexpected answer: HTTP %s", method, status)
        if status == 401:
            raise UnauthorizedError(status, "UNAUTHORIZED", method=method)
        raise UnexpectedResponseError(status, f"HTTP_{status}", method=method)

    async def get_me(self) -> AppInfo:
        result = await self.call("getMe")
        try:
            if not isinstance(result, Mapping):
                raise ValueError("result is not an object")
            return AppInfo(
                app_id=_int(result, "app_id"),
                name=_str(result, "name"),
                payment_processing_bot_username=_opt_str(result, "payment_processing_bot_username") or "",
            )
        except ValueError as exc:
            raise UnexpectedResponseError(200, f"BAD_RESULT: {exc}", method="getMe") from None

    async def create_invoice(
        self,
        *,
        amount: Decimal,
        fiat: str,
        payload: str,
        description: str,
        expires_in: int,
        paid_btn_name: str | None = None,
        paid_btn_url: str | None = None,
        accepted_assets: Sequence[str] | None = None,
        allow_comments: bool = False,
        allow_anonymous: bool = True,
    ) -> Invoice:
        """Create a fiat-priced invoice (``currency_type="fiat"``); the amount travels as a string."""
        params: dict[str, Any] = {
            "currency_type": "fiat",
            "fiat": fiat,
            "amount": _format_amount(amount),
            "payload": payload,
            "description": description,
            "expires_in": expires_in,
            "allow_comments": allow_comments,
            "allow_anonymous": allow_anonymous,
        }
        if paid_btn_name is not None:
            params["paid_btn_name"] = paid_btn_name
        if paid_btn_url is not None:
            params["paid_btn_url"] = paid_btn_url
        if accepted_assets:
            params["accepted_assets"] = ",".join(accepted_assets)
        result = await self.call("createInvoice", params)
        return self._invoice(result, "createInvoice")

    async def get_invoices(
        self, *, invoice_ids: Sequence[int], status: str | None = None, count: int = 100
    ) -> list[Invoice]:
        """The invoices among ``invoice_ids`` (optionally only with ``status``).

        An empty ``invoice_ids`` returns [] without a request: the API would list *all* invoices.
        """
        if not invoice_ids:
            return []
        params: dict[str, Any] = {
            "invoice_ids": ",".join(str(int(i)) for i in invoice_ids),
            "count": count,
        }
        if status is not None:
            params["status"] = status
        result = await self.call("getInvoices", params)
        items = result.get("items") if isinstance(result, Mapping) else None
        if not isinstance(items, list):
            raise UnexpectedResponseError(200, "BAD_RESULT: no items", method="getInvoices")
        return [self._invoice(item, "getInvoices") for item in items]

    async def get_invoice(self, invoice_id: int) -> Invoice:
        """One invoice by id; :class:`InvoiceNotFound` if Crypto Pay does not know it."""
        for invoice in await self.get_invoices(invoice_ids=[invoice_id], count=1):
            if invoice.invoice_id == invoice_id:
                return invoice
        raise InvoiceNotFound(404, "INVOICE_NOT_FOUND", method="getInvoices")

    async def delete_invoice(self, invoice_id: int) -> None:
        """Delete an invoice so that it can no longer be paid (``deleteInvoice``; the API answers True).

        Crypto Pay refuses to delete a paid invoice — and an unknown one — with 400 INVOICE_NOT_FOUND
        (:class:`InvoiceNotFound`): a caller must then expect the payment to arrive.
        """
        result = await self.call("deleteInvoice", {"invoice_id": int(invoice_id)})
        if result is not True:
            raise UnexpectedResponseError(200, "BAD_RESULT: not true", method="deleteInvoice")

    @staticmethod
    def _invoice(obj: Any, method: str) -> Invoice:
        try:
            return parse_invoice(obj)
        except ValueError as exc:
            raise UnexpectedResponseError(200, f"BAD_RESULT: {exc}", method=method) from None


@asynccontextmanager
async def open_cryptopay_client(
    token: str,
    base_url: str = DEFAULT_BASE_URL,
    *,
    timeout: float = 10,
) -> AsyncIterator[CryptoPayClient]:
    """A :class:`CryptoPayClient` for ``base_url`` (e.g. ``https://pay.crypt.bot/api``).

    Every request (connect, read, write, pool) is bounded by ``timeout`` seconds.
    """
    async with httpx.AsyncClient(
        base_url=base_url.rstrip("/") + "/",
        headers={TOKEN_HEADER: token},
        timeout=httpx.Timeout(timeout),
        follow_redirects=False,
    ) as http:
        yield CryptoPayClient(http)
