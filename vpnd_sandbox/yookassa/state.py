"""The fake YooKassa's state: payments, refunds, idempotence keys, notification delivery and its switches."""

from __future__ import annotations

import base64
import logging
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import attrs
import httpx
import trio

logger = logging.getLogger("vpnd_sandbox.yookassa")

RECORD_LIMIT = 10_000
CURRENCIES = frozenset({"RUB", "USD", "EUR"})
METHOD_TYPES = frozenset({"bank_card", "sbp"})


class FakeApiError(Exception):
    """An error answered in YooKassa's format: ``{"type": "error", "code", "description", "parameter"}``."""

    def __init__(self, status: int, code: str, description: str, parameter: str | None = None) -> None:
        super().__init__(f"{status} {code}: {description}")
        self.status, self.code, self.description, self.parameter = status, code, description, parameter

    def body(self) -> dict[str, Any]:
        body = {"type": "error", "id": str(uuid.uuid4()), "code": self.code, "description": self.description}
        if self.parameter:
            body["parameter"] = self.parameter
        return body


@attrs.frozen
class Delivery:
    """One notification attempt: the event, the object id, the daemon's answer (None: no answer)."""

    event: str
    object_id: str
    status_code: int | None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _amount(value: object, parameter: str) -> dict[str, str]:
    if not isinstance(value, Mapping) or not isinstance(value.get("value"), str):
        raise FakeApiError(400, "invalid_request", f"{parameter} is missing or malformed", parameter)
    try:
        amount = Decimal(value["value"])
    except InvalidOperation:
        raise FakeApiError(400, "invalid_request", f"{parameter}.value is not a number", f"{parameter}.value") from None
    if not amount.is_finite() or amount <= 0 or amount != amount.quantize(Decimal("0.01")) or amount > 10**9:
        raise FakeApiError(400, "invalid_request", f"{parameter}.value is out of range", f"{parameter}.value")
    currency = value.get("currency")
    if currency not in CURRENCIES:
        raise FakeApiError(400, "invalid_request", "unsupported currency", f"{parameter}.currency")
    return {"value": format(amount, "f"), "currency": str(currency)}


@attrs.define
class FakeYooKassa:
    """State and switches of the fake service; tests flip the public fields freely.

    Serve it with :func:`vpnd_sandbox.yookassa.serve_fake_yookassa`; ``base_url`` is set once it listens
    (the API is under ``{base_url}/v3``).
    """

    shop_id: str = "424242"
    secret_key: str = "test_FakeYooKassaSecretKeyForTests"
    notification_url: str | None = None
    #: Where payment pages point; defaults to the URL the fake listens on.
    public_base_url: str | None = None

    # Notification switches.
    notifications_enabled: bool = True  # False: "none" (the watcher must find the payment)
    notification_copies: int = 1  # deliver each this many times (duplicates)
    notification_delay: float = 0.0  # seconds before delivery (late)
    notification_attempts: int = 3  # per copy; any answer but 200 is retried
    retry_delay: float = 0.2
    #: False: a charge of a saved method (``payment_method_id``) is declined (canceled).
    saved_charges_succeed: bool = True
    #: True: a charge of a saved method is made, but its answer is withheld until this is False again
    #: (the caller hangs between the charge and its record: a test kills it there).
    hold_saved_charges: bool = False

    base_url: str | None = None
    payments: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    refunds: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    #: Payment methods saved with the payer's consent (``save_payment_method``): id → the method.
    saved_methods: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    deliveries: deque[Delivery] = attrs.field(factory=lambda: deque(maxlen=RECORD_LIMIT))
    #: (method, path, HTTP status) of every API call.
    api_calls: deque[tuple[str, str, int]] = attrs.field(factory=lambda: deque(maxlen=RECORD_LIMIT))
    #: Idempotence-Key → the first answer, as YooKassa keeps them (24 h there; forever here).
    _answers: dict[str, tuple[int, dict[str, Any]]] = attrs.field(factory=dict)
    _nursery: trio.Nursery | None = None
    _http: httpx.AsyncClient | None = None
    _changed: trio.Event = attrs.field(factory=trio.Event)

    # ------------------------------------------------------------------ API

    def authorized(self, header: str | None) -> bool:
        expected = base64.b64encode(f"{self.shop_id}:{self.secret_key}".encode()).decode()
        return header == f"Basic {expected}"

    def handle(self, method: str, path: str, body: Any, auth: str | None, key: str | None) -> tuple[int, Any]:
        """One API call: (HTTP status, JSON answer)."""
        try:
            if not self.authorized(auth):
                raise FakeApiError(401, "invalid_credentials", "Login or password is wrong")
            parts = path.strip("/").split("/")
            if method == "POST" and parts in (["payments"], ["refunds"]):
                if not key:
                    raise FakeApiError(400, "invalid_request", "Idempotence-Key header is required", "Idempotence-Key")
                if key in self._answers:
                    return self._answers[key]
                if not isinstance(body, Mapping):
                    raise FakeApiError(400, "invalid_request", "the body is not a JSON object")
                result = (200, self._create_payment(body) if parts == ["payments"] else self._create_refund(body))
                self._answers[key] = result
                return result
            if method == "GET" and len(parts) == 2 and parts[0] in ("payments", "refunds"):
                found = (self.payments if parts[0] == "payments" else self.refunds).get(parts[1])
                if found is None:
                    raise FakeApiError(404, "not_found", f"{parts[0][:-1]} not found")
                return 200, found
            raise FakeApiError(404, "not_found", "no such method")
        except FakeApiError as exc:
            return exc.status, exc.body()
        finally:
            self._notify()

    def _create_payment(self, body: Mapping[str, Any]) -> dict[str, Any]:
        amount = _amount(body.get("amount"), "amount")
        if "payment_method_id" in body:
            return self._charge_saved(body, amount)
        confirmation = body.get("confirmation")
        if not isinstance(confirmation, Mapping) or confirmation.get("type") != "redirect":
            raise FakeApiError(400, "invalid_request", "confirmation.type must be redirect here", "confirmation")
        method_data = body.get("payment_method_data")
        method_type = method_data.get("type") if isinstance(method_data, Mapping) else None
        if method_data is not None and method_type not in METHOD_TYPES:
            raise FakeApiError(400, "invalid_request", "unsupported payment method", "payment_method_data.type")
        payment_id = str(uuid.uuid4())
        page = f"{self.public_base_url or self.base_url}/checkout/{payment_id}"
        payment: dict[str, Any] = {
            "id": payment_id,
            "status": "pending",
            "paid": False,
            "amount": amount,
            "confirmation": {"type": "redirect", "confirmation_url": page,
                             "return_url": confirmation.get("return_url") or ""},
            "created_at": _now(),
            "description": str(body.get("description") or ""),
            "metadata": dict(body.get("metadata") or {}),
            "recipient": {"account_id": self.shop_id, "gateway_id": "1"},
            "refundable": False,
            "test": True,
            "capture": bool(body.get("capture")),
            "save_payment_method": body.get("save_payment_method") is True,
        }  # fmt: skip
        if method_type is not None:
            payment["payment_method"] = {"type": method_type, "id": str(uuid.uuid4()), "saved": False}
        self.payments[payment_id] = payment
        return payment

    def _charge_saved(self, body: Mapping[str, Any], amount: dict[str, str]) -> dict[str, Any]:
        """A payment by a saved method: no page, settled at once (``saved_charges_succeed``), notified."""
        method = self.saved_methods.get(str(body.get("payment_method_id")))
        if method is None:
            raise FakeApiError(400, "invalid_request", "unknown payment method", "payment_method_id")
        payment_id = str(uuid.uuid4())
        succeeded = self.saved_charges_succeed
        payment: dict[str, Any] = {
            "id": payment_id, "status": "succeeded" if succeeded else "canceled", "paid": succeeded,
            "amount": amount, "created_at": _now(), "description": str(body.get("description") or ""),
            "metadata": dict(body.get("metadata") or {}), "recipient": {"account_id": self.shop_id, "gateway_id": "1"},
            "refundable": succeeded, "test": True, "capture": True, "payment_method": dict(method),
        }  # fmt: skip
        if not succeeded:
            payment["cancellation_details"] = {"party": "payment_network", "reason": "insufficient_funds"}
        self.payments[payment_id] = payment
        self._post("payment.succeeded" if succeeded else "payment.canceled", payment)
        return payment

    def saved_charges(self) -> list[dict[str, Any]]:
        """The succeeded payments made by a saved method (what the payers were charged without them)."""
        saved = self.saved_methods
        return [
            p for p in self.payments.values()
            if p["status"] == "succeeded" and "confirmation" not in p and p["payment_method"]["id"] in saved
        ]  # fmt: skip

    def _create_refund(self, body: Mapping[str, Any]) -> dict[str, Any]:
        payment = self.payments.get(str(body.get("payment_id")))
        if payment is None or payment["status"] != "succeeded":
            raise FakeApiError(400, "invalid_request", "the payment cannot be refunded", "payment_id")
        amount = _amount(body.get("amount"), "amount")
        refunded = sum(Decimal(r["amount"]["value"]) for r in self.refunds.values() if r["payment_id"] == payment["id"])
        if Decimal(amount["value"]) + refunded > Decimal(payment["amount"]["value"]):
            raise FakeApiError(400, "invalid_request", "the refund exceeds the payment", "amount.value")
        refund = {"id": str(uuid.uuid4()), "payment_id": payment["id"], "status": "succeeded", "amount": amount,
                  "created_at": _now()}  # fmt: skip
        self.refunds[refund["id"]] = refund
        self._post("refund.succeeded", refund)
        return refund

    # ------------------------------------------------------------------ the payer

    def pay(self, payment_id: str, *, value: str | None = None, currency: str | None = None) -> dict[str, Any]:
        """The payer paid on the page: succeeded (``value``/``currency`` override what was asked), notified."""
        payment = self.payments[payment_id]
        if payment["status"] != "pending":
            return payment
        if value is not None or currency is not None:
            payment["amount"] = {"value": value or payment["amount"]["value"],
                                 "currency": currency or payment["amount"]["currency"]}  # fmt: skip
        method = payment.setdefault("payment_method", {"type": "bank_card", "id": str(uuid.uuid4()), "saved": False})
        if method["type"] == "bank_card":
            method["card"] = {"first6": "555555", "last4": "4477", "card_type": "MasterCard"}
            if payment.get("save_payment_method"):
                method["saved"] = True
                self.saved_methods[method["id"]] = dict(method)
        payment.update(status="succeeded", paid=True, refundable=True, captured_at=_now())
        payment["income_amount"] = dict(payment["amount"])
        self._post("payment.succeeded", payment)
        return payment

    def fail(self, payment_id: str) -> dict[str, Any]:
        """The payer gave up (or the bank refused): canceled, notified."""
        payment = self.payments[payment_id]
        if payment["status"] == "pending":
            payment.update(
                status="canceled", cancellation_details={"party": "yoo_money", "reason": "canceled_by_payer"}
            )
            self._post("payment.canceled", payment)
        return payment

    # ------------------------------------------------------------------ notifications

    def _post(self, event: str, obj: Mapping[str, Any]) -> None:
        self._notify()
        if not self.notifications_enabled or self.notification_url is None or self._nursery is None:
            return
        body = {"type": "notification", "event": event, "object": dict(obj)}
        self._nursery.start_soon(self._deliver, event, str(obj["id"]), body, self.notification_url)

    async def _deliver(self, event: str, object_id: str, body: dict[str, Any], url: str) -> None:
        assert self._http is not None
        if self.notification_delay > 0:
            await trio.sleep(self.notification_delay)
        for _copy in range(max(1, self.notification_copies)):
            for attempt in range(1, self.notification_attempts + 1):
                status: int | None = None
                try:
                    status = (await self._http.post(url, json=body, timeout=10)).status_code
                except httpx.HTTPError:
                    pass
                self.deliveries.append(Delivery(event, object_id, status))
                self._notify()
                if status == 200:
                    break
                if attempt < self.notification_attempts:
                    await trio.sleep(self.retry_delay * 2 ** (attempt - 1))

    # ------------------------------------------------------------------ waiting

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def release_saved_charge(self) -> None:
        """Wait while saved charges are held (the web layer calls it before answering one)."""
        await self.wait_until(lambda: not self.hold_saved_charges)

    def release(self) -> None:
        self.hold_saved_charges = False
        self._notify()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds (re-checked after every change); bound it with ``fail_after``."""
        while not predicate():
            await self._changed.wait()
