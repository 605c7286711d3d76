"""YooKassa API v3 client (https://yookassa.ru/developers/api): payments, refunds, notifications.

A thin async layer over httpx (it runs under Trio), in the shape of `vpnd.cryptopay`: Basic auth
with the shop id and the secret key, JSON bodies, an ``Idempotence-Key`` on every POST (YooKassa
answers a repeated key with the first answer, so a retried create never makes a second payment).
Errors are ``{"type": "error", "code": ..., "description": ...}`` with the HTTP status; they become
a typed :class:`YooKassaError`; 5xx, 429, timeouts and network failures are
:class:`TransientYooKassaError` (retry later), everything else is permanent.

The secret key never appears in logs, exception messages or reprs.

Notifications are *not signed*: a body only says "look at payment X". Trust comes from the sender's
address (`DEFAULT_NOTIFY_NETWORKS`, YooKassa's published ranges) and from fetching the object from
the API before acting on it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from decimal import Decimal, InvalidOperation
from typing import Any, Final, TypeVar

import attrs
import httpx

logger = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_BASE_URL: Final = "https://api.yookassa.ru/v3"
#: The addresses YooKassa sends notifications from (its documentation, "Notifications" → "Authenticity").
DEFAULT_NOTIFY_NETWORKS: Final = (
    "185.71.76.0/27",
    "185.71.77.0/27",
    "77.75.153.0/25",
    "77.75.156.11/32",
    "77.75.156.35/32",
    "77.75.154.128/25",
    "2a02:5180::/32",
)
PAYMENT_STATUSES: Final = frozenset({"pending", "waiting_for_capture", "succeeded", "canceled"})
#: The methods vpnd offers: a card, or the Faster Payments System (SBP). None leaves the choice to the page.
METHODS: Final = ("bank_card", "sbp")


class YooKassaError(Exception):
    """An error answered by YooKassa (its ``code``, e.g. invalid_request, not_found) or met on the way."""

    def __init__(self, status: int, code: str, *, what: str | None = None) -> None:
        self.status = status
        self.code = code
        where = f" in {what}" if what else ""
        super().__init__(f"YooKassa error {status} {code}{where}")


class TransientYooKassaError(YooKassaError):
    """5xx, 429, timeout or network failure (``status`` 0 when no HTTP answer came): retry later."""


class PaymentNotFound(YooKassaError):
    """404: YooKassa does not know this payment (or refund) in this shop."""


class MalformedNotification(ValueError):
    """A notification body that is not JSON or lacks ``event`` and ``object.id``."""


@attrs.frozen
class Payment:
    """The Payment object (the fields vpnd uses). ``amount`` is the amount asked (and, once succeeded, paid)."""

    id: str
    status: str
    amount: Decimal
    currency: str
    paid: bool
    metadata: Mapping[str, str]
    confirmation_url: str | None = None
    method_type: str | None = None
    #: The payment method's id when YooKassa saved it (``payment_method.saved``), for charging it later.
    saved_method_id: str | None = None
    #: What to call the saved method to its owner ("MasterCard *4477").
    method_title: str = ""

    @property
    def purchase_id(self) -> str | None:
        return self.metadata.get("purchase_id")


@attrs.frozen
class Refund:
    id: str
    payment_id: str
    status: str  # "pending" | "succeeded" | "canceled"
    amount: Decimal
    currency: str


@attrs.frozen
class Notification:
    """``{"type": "notification", "event": "payment.succeeded", "object": {...}}``: only the event and the id count."""

    event: str
    object_id: str
    #: For refund events: the payment refunded (as the body says; verified by fetching).
    payment_id: str | None = None


def _amount(obj: Any) -> tuple[Decimal, str]:
    if (
        not isinstance(obj, Mapping)
        or not isinstance(obj.get("value"), str)
        or not isinstance(obj.get("currency"), str)
    ):
        raise ValueError("amount is not {value, currency}")
    try:
        value = Decimal(obj["value"])
    except InvalidOperation:
        raise ValueError("amount.value is not a number") from None
    if not value.is_finite():
        raise ValueError("amount.value is not finite")
    return value, obj["currency"]


def _id(obj: Mapping[str, Any], key: str = "id") -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value:
        raise ValueError(f"field {key!r} is not a string")
    return value


def parse_payment(obj: Any) -> Payment:
    """Payment from its JSON object; ValueError when a field vpnd relies on is missing or mistyped."""
    if not isinstance(obj, Mapping):
        raise ValueError("payment is not an object")
    status = obj.get("status")
    if status not in PAYMENT_STATUSES:
        raise ValueError(f"unknown payment status {status!r}")
    amount, currency = _amount(obj.get("amount"))
    metadata = obj.get("metadata") or {}
    if not isinstance(metadata, Mapping):
        raise ValueError("metadata is not an object")
    confirmation = obj.get("confirmation") or {}
    method = obj.get("payment_method") or {}
    return Payment(
        id=_id(obj),
        status=str(status),
        amount=amount,
        currency=currency,
        paid=obj.get("paid") is True,
        metadata={str(k): str(v) for k, v in metadata.items()},
        confirmation_url=confirmation.get("confirmation_url") if isinstance(confirmation, Mapping) else None,
        method_type=method.get("type") if isinstance(method, Mapping) else None,
        saved_method_id=_saved_id(method),
        method_title=_method_title(method),
    )


def _saved_id(method: Any) -> str | None:
    if not isinstance(method, Mapping) or method.get("saved") is not True:
        return None
    value = method.get("id")
    return value if isinstance(value, str) and value else None


def _method_title(method: Any) -> str:
    if not isinstance(method, Mapping):
        return ""
    card = method.get("card")
    if isinstance(card, Mapping) and isinstance(card.get("last4"), str):
        return f"{card.get('card_type') or 'Card'} *{card['last4']}"[:64]
    title = method.get("title")
    return title[:64] if isinstance(title, str) else ""


def parse_refund(obj: Any) -> Refund:
    if not isinstance(obj, Mapping):
        raise ValueError("refund is not an object")
    amount, currency = _amount(obj.get("amount"))
    return Refund(_id(obj), _id(obj, "payment_id"), str(obj.get("status")), amount, currency)


def parse_notification(raw_body: bytes) -> Notification:
    """The event and object id of a notification body. Raises :class:`MalformedNotification`."""
    try:
        obj = json.loads(raw_body)
        if not isinstance(obj, dict) or not isinstance(obj.get("event"), str):
            raise ValueError("no event")
        inner = obj.get("object")
        if not isinstance(inner, dict):
            raise ValueError("no object")
        payment_id = inner.get("payment_id")
        return Notification(obj["event"], _id(inner), payment_id if isinstance(payment_id, str) else None)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise MalformedNotification(f"notification is malformed: {exc}") from None


def format_amount(value: Decimal, currency: str) -> dict[str, str]:
    """``{"value": "299.00", "currency": "RUB"}``: YooKassa wants the value as a string with two decimals."""
    if not value.is_finite() or value <= 0:
        raise ValueError("amount must be a positive finite decimal")
    return {"value": format(value.quantize(Decimal("0.01")), "f"), "currency": currency}


@attrs.define
class YooKassaClient:
    """YooKassa calls over an httpx client that carries the Basic auth. Use :func:`open_yookassa_client`."""

    http: httpx.AsyncClient = attrs.field(repr=False)

    async def request(self, method: str, path: str, body: Mapping[str, Any] | None = None, *, key: str = "") -> Any:
        """One API call; the JSON answer, or a typed error. POSTs carry ``key`` as the Idempotence-Key."""
        headers = {"Idempotence-Key": key} if method == "POST" else {}
        try:
            response = await self.http.request(method, path, json=body, headers=headers)
        except httpx.TimeoutException:
            logger.warning("YooKassa %s %s timed out", method, path)
            raise TransientYooKassaError(0, "timeout", what=path) from None
        except httpx.TransportError as exc:
            logger.warning("YooKassa %s %s network error: %s", method, path, type(exc).__name__)
            raise TransientYooKassaError(0, "network_error", what=path) from None
        try:
            answer = response.json()
        except ValueError:
            answer = None
        status = response.status_code
        if status == 200 and isinstance(answer, dict):
            return answer
        found = answer.get("code") if isinstance(answer, dict) else None
        code = found if isinstance(found, str) else f"http_{status}"
        logger.warning("YooKassa %s %s failed: %s %s", method, path, status, code)
        if status >= 500 or status == 429:
            raise TransientYooKassaError(status, code, what=path)
        if status == 404:
            raise PaymentNotFound(status, code, what=path)
        raise YooKassaError(status, code, what=path)

    async def create_payment(
        self,
        *,
        amount: Decimal,
        currency: str,
        purchase_id: int,
        description: str,
        return_url: str,
        method: str | None,
        idempotence_key: str,
        save_method: bool = False,
        saved_method_id: str | None = None,
    ) -> Payment:
        """Create a payment captured at once, confirmed on YooKassa's page (``redirect``).

        ``save_method``: the payer consented to keep the method for auto-renewal. ``saved_method_id``:
        charge a saved method without the payer (no confirmation; the answer is final or pending).
        """
        body: dict[str, Any] = {
            "amount": format_amount(amount, currency),
            "capture": True,
            "description": description[:128],
            "metadata": {"purchase_id": str(purchase_id)},
        }
        if saved_method_id is not None:
            body["payment_method_id"] = saved_method_id
        else:
            body["confirmation"] = {"type": "redirect", "return_url": return_url}
        if method is not None and saved_method_id is None:
            body["payment_method_data"] = {"type": method}
        if save_method:
            body["save_payment_method"] = True
        return self._parsed(parse_payment, await self.request("POST", "payments", body, key=idempotence_key))

    async def get_payment(self, payment_id: str) -> Payment:
        return self._parsed(parse_payment, await self.request("GET", f"payments/{_path_id(payment_id)}"))

    async def create_refund(self, *, payment_id: str, amount: Decimal, currency: str, idempotence_key: str) -> Refund:
        body = {"payment_id": payment_id, "amount": format_amount(amount, currency)}
        return self._parsed(parse_refund, await self.request("POST", "refunds", body, key=idempotence_key))

    async def get_refund(self, refund_id: str) -> Refund:
        return self._parsed(parse_refund, await self.request("GET", f"refunds/{_path_id(refund_id)}"))

    @staticmethod
    def _parsed(parse: Callable[[Any], T], obj: Any) -> T:
        try:
            return parse(obj)
        except ValueError as exc:
            raise YooKassaError(200, f"bad_result: {exc}") from None


def _path_id(value: str) -> str:
    """An id from a notification goes into a URL path: only the characters YooKassa's ids have."""
    if not value or len(value) > 64 or not all(c.isascii() and (c.isalnum() or c in "-_") for c in value):
        raise PaymentNotFound(404, "not_found", what="id")
    return value


@asynccontextmanager
async def open_yookassa_client(
    shop_id: str, secret_key: str, base_url: str = DEFAULT_BASE_URL, *, timeout: float = 10
) -> AsyncIterator[YooKassaClient]:
    """A :class:`YooKassaClient` for ``base_url``; every request is bounded by ``timeout`` seconds."""
    async with httpx.AsyncClient(
        base_url=base_url.rstrip("/") + "/",
        auth=httpx.BasicAuth(shop_id, secret_key),
        timeout=httpx.Timeout(timeout),
        follow_redirects=False,
    ) as http:
        yield YooKassaClient(http)
