"""A fake Crypto Pay server on loopback, for tests and the demo.

It speaks the real wire protocol closely enough that vpnd's client (and third-party clients such
as aiosend) cannot tell the difference for the methods it implements: ``getMe``,
``createInvoice``, ``getInvoices`` and ``deleteInvoice`` under ``{base_url}/api/{method}``, by GET or POST, with
parameters in the query string, a JSON body or a form body, the token in the
``Crypto-Pay-API-Token`` header, and answers shaped ``{"ok": true, "result": ...}`` or
``{"ok": false, "error": {"code": ..., "name": ...}}`` with the HTTP status equal to the code.

What the real service does and a test needs to control:

* Paying: :meth:`FakeCryptoPay.pay` from Python, ``POST /sandbox/pay/{invoice_id}`` (JSON) from
  a test over HTTP, or the "Pay" button on the page at the invoice's ``bot_invoice_url``
  (``{base_url}/invoice/{hash}``), for the demo. Paying marks the invoice paid and posts the
  signed ``invoice_paid`` webhook update to :attr:`FakeCryptoPay.webhook_url`.
* Expiry: an invoice created with ``expires_in`` is "expired" once that many seconds of Trio
  time have passed (so ``MockClock.jump`` expires it).
* Webhook delivery: retried with backoff on any answer but 200; switches for duplicates
  (``webhook_copies``), lateness (``webhook_delay``), reordering (``hold_next_webhook``) and no
  delivery at all (``webhooks_enabled = False``). Every attempt is recorded in
  :attr:`FakeCryptoPay.deliveries` with the receiver's status code.
* API faults: :meth:`FakeCryptoPay.fail_api` makes the next calls (of one method, if given) answer
  500/502/503 or hang.
* Deleting: ``deleteInvoice`` removes an active or expired invoice (it can no longer be paid or
  listed; the answer is ``true``); a paid or unknown invoice is refused with 400 INVOICE_NOT_FOUND,
  as the real service does. :attr:`FakeCryptoPay.deleted` records the ids deleted.

Delivery tasks live in the nursery that :func:`serve_fake_cryptopay` owns; nothing runs after it
returns.
"""

from __future__ import annotations

import html
import json
import logging
import secrets
import urllib.parse
from collections import deque
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from functools import partial
from typing import Any, Final, Literal

import attrs
import httpx
import trio

from vpnd.cryptopay import SIGNATURE_HEADER, sign_webhook_body
from vpnd.web import Handler, Request, Response, Router, serve, server_config

logger = logging.getLogger(__name__)

ASSETS: Final = ("USDT", "TON", "BTC", "ETH", "LTC", "BNB", "TRX", "USDC")
FIATS: Final = (
    "USD", "EUR", "RUB", "BYN", "UAH", "GBP", "CNY", "KZT", "UZS", "GEL",
    "TRY", "AMD", "THB", "INR", "BRL", "IDR", "AZN", "AED", "PLN", "ILS",
)  # fmt: skip
PAID_BTN_LABELS: Final[Mapping[str, str]] = {
    "viewItem": "View Item",
    "openChannel": "Open Channel",
    "openBot": "Open Bot",
    "callback": "Return",
}
PAID_BTN_NAMES: Final = frozenset(PAID_BTN_LABELS)

# Rough, fixed exchange rates: enough to fill paid_amount / paid_fiat_rate plausibly.
ASSET_USD_RATES: Final[Mapping[str, Decimal]] = {
    "USDT": Decimal("1"), "USDC": Decimal("1"), "TON": Decimal("5.5"), "BTC": Decimal("65000"),
    "ETH": Decimal("3200"), "LTC": Decimal("80"), "BNB": Decimal("580"), "TRX": Decimal("0.12"),
}  # fmt: skip
FIAT_PER_USD: Final[Mapping[str, Decimal]] = {
    "USD": Decimal("1"), "EUR": Decimal("0.92"), "RUB": Decimal("90"), "BYN": Decimal("3.3"),
    "UAH": Decimal("41"), "GBP": Decimal("0.79"), "CNY": Decimal("7.2"), "KZT": Decimal("480"),
    "UZS": Decimal("12600"), "GEL": Decimal("2.7"), "TRY": Decimal("33"), "AMD": Decimal("390"),
    "THB": Decimal("36"), "INR": Decimal("83"), "BRL": Decimal("5.4"), "IDR": Decimal("16000"),
    "AZN": Decimal("1.7"), "AED": Decimal("3.67"), "PLN": Decimal("4"), "ILS": Decimal("3.7"),
}  # fmt: skip
SERVICE_FEE: Final = Decimal("0.03")

MAX_EXPIRES_IN: Final = 2_678_400
MAX_BODY_BYTES: Final = 1 << 20
RECORD_LIMIT: Final = 10_000

ApiFault = Literal["http_500", "http_502", "http_503", "timeout"]



class FakeApiError(Exception):
    """An error the fake answers as ``{"ok": false, "error": {"code", "name"}}``."""

    def __init__(self, code: int, name: str) -> None:
        super().__init__(f"{code} {name}")
        self.code = code
        self.name = name


@attrs.frozen
class PendingUpdate:
    """A webhook update as it goes on the wire (the same bytes for every retry and copy)."""

    update_id: int
    invoice_id: int
    body: bytes
    signature: str


@attrs.frozen
class WebhookDelivery:
    """One POST of an update to the webhook URL and how the receiver answered.

    ``status_code`` is None when no HTTP answer came back (``error`` names the failure).
    ``copy`` counts duplicates from 1; ``attempt`` counts retries of that copy from 1.
    """

    update_id: int
    invoice_id: int
    copy: int
    attempt: int
    status_code: int | None
    error: str | None
    body: bytes
    signature: str
    at: float  # trio.current_time()


@attrs.frozen
class ApiCall:
    method: str
    http_method: str
    status: int


@attrs.define
class _StoredInvoice:
    invoice_id: int
    hash: str
    currency_type: str
    asset: str | None
    fiat: str | None
    amount: Decimal
    accepted_assets: tuple[str, ...]
    description: str | None
    hidden_message: str | None
    payload: str | None
    paid_btn_name: str | None
    paid_btn_url: str | None
    allow_comments: bool
    allow_anonymous: bool
    created_at: datetime
    expiration_date: datetime | None
    expires_at: float | None  # Trio time
    bot_invoice_url: str
    status: str = "active"
    paid_at: datetime | None = None
    paid_asset: str | None = None
    paid_amount: Decimal | None = None
    paid_fiat_rate: Decimal | None = None
    paid_usd_rate: Decimal | None = None
    fee_amount: Decimal | None = None
    paid_anonymously: bool | None = None
    comment: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The Invoice object as the real API renders it (absent optionals are omitted)."""
        obj: dict[str, Any] = {"invoice_id": self.invoice_id, "hash": self.hash}
        obj["currency_type"] = self.currency_type
        if self.currency_type == "crypto":
            obj["asset"] = self.asset
        else:
            obj["fiat"] = self.fiat
        obj["amount"] = _fmt(self.amount)
        if self.status == "paid":
            obj["paid_asset"] = self.paid_asset
            obj["paid_amount"] = _fmt(self.paid_amount)
            if self.currency_type == "fiat":
                obj["paid_fiat_rate"] = _fmt(self.paid_fiat_rate)
        if self.accepted_assets:
            obj["accepted_assets"] = list(self.accepted_assets)
        if self.status == "paid":
            obj["fee_asset"] = self.paid_asset
            obj["fee_amount"] = _fmt(self.fee_amount)
            obj["fee_in_usd"] = _fmt(_q(_dec(self.fee_amount) * _dec(self.paid_usd_rate)))
        obj["pay_url"] = self.bot_invoice_url
        obj["bot_invoice_url"] = self.bot_invoice_url
        obj["mini_app_invoice_url"] = f"{self.bot_invoice_url}?via=mini_app"
        obj["web_app_invoice_url"] = f"{self.bot_invoice_url}?via=web_app"
        if self.description is not None:
            obj["description"] = self.description
        obj["status"] = self.status
        obj["created_at"] = _iso(self.created_at)
        if self.status == "paid":
            obj["paid_usd_rate"] = _fmt(self.paid_usd_rate)
        obj["allow_comments"] = self.allow_comments
        obj["allow_anonymous"] = self.allow_anonymous
        if self.expiration_date is not None:
            obj["expiration_date"] = _iso(self.expiration_date)
        if self.status == "paid":
            obj["paid_at"] = _iso(self.paid_at)
            obj["paid_anonymously"] = bool(self.paid_anonymously)
            if self.comment is not None:
                obj["comment"] = self.comment
        if self.hidden_message is not None:
            obj["hidden_message"] = self.hidden_message
        if self.payload is not None:
            obj["payload"] = self.payload
        if self.paid_btn_name is not None:
            obj["paid_btn_name"] = self.paid_btn_name
            obj["paid_btn_url"] = self.paid_btn_url
        return obj


def _dec(value: Decimal | None) -> Decimal:
    assert value is not None
    return value


def _q(value: Decimal, places: str = "0.00000001") -> Decimal:
    return value.quantize(Decimal(places), rounding=ROUND_HALF_UP)


def _fmt(value: Decimal | None) -> str:
    text = format(_dec(value).normalize(), "f")
    return text


def _iso(value: datetime | None) -> str:
    assert value is not None
    value = value.astimezone(UTC)
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


def _compact_json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


# ----------------------------------------------------------------------- parameter coercion


def _param_str(params: Mapping[str, Any], key: str, *, max_len: int | None = None) -> str | None:
    value = params.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise FakeApiError(400, f"{key.upper()}_INVALID")
    text = str(value)
    if max_len is not None and len(text.encode("utf-8") if key == "payload" else text) > max_len:
        raise FakeApiError(400, f"{key.upper()}_TOO_LONG")
    return text


def _param_int(params: Mapping[str, Any], key: str) -> int | None:
    value = params.get(key)
    if value is None:
        return None
    if isinstance(value, bool):
        raise FakeApiError(400, f"{key.upper()}_INVALID")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    raise FakeApiError(400, f"{key.upper()}_INVALID")


def _param_bool(params: Mapping[str, Any], key: str, default: bool) -> bool:
    value = params.get(key)
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in {"true", "1"}:
        return True
    if isinstance(value, str) and value.lower() in {"false", "0"}:
        return False
    raise FakeApiError(400, f"{key.upper()}_INVALID")


def _param_list(params: Mapping[str, Any], key: str) -> list[str] | None:
    value = params.get(key)
    if value is None:
        return None
    if isinstance(value, str):
        items = [item.strip() for item in value.split(",")]
    elif isinstance(value, list):
        items = [str(item).strip() for item in value if not isinstance(item, bool | dict | list)]
        if len(items) != len(value):
            raise FakeApiError(400, f"{key.upper()}_INVALID")
    else:
        raise FakeApiError(400, f"{key.upper()}_INVALID")
    if not items or any(not item for item in items):
        raise FakeApiError(400, f"{key.upper()}_INVALID")
    return items


def _param_amount(params: Mapping[str, Any]) -> Decimal:
    value = params.get("amount")
    if value is None or isinstance(value, bool) or not isinstance(value, str | int | float):
        raise FakeApiError(400, "AMOUNT_INVALID")
    try:
        amount = Decimal(str(value).strip())
    except InvalidOperation:
        raise FakeApiError(400, "AMOUNT_INVALID") from None
    if not amount.is_finite() or amount <= 0:
        raise FakeApiError(400, "AMOUNT_INVALID")
    return amount


# ----------------------------------------------------------------------- the fake


@attrs.define
class FakeCryptoPay:
    """State and switches of the fake service. Tests flip the public fields freely.

    Serve it with :func:`serve_fake_cryptopay`; ``base_url`` is set once it listens.
    """

    token: str = "4242:AAFakeCryptoPayTokenForTests"
    app_id: int = 4242
    app_name: str = "vpnd sandbox"
    payment_processing_bot_username: str = "CryptoTestnetBot"
    webhook_url: str | None = None
    # Where invoice links point; defaults to the URL the fake listens on.
    public_base_url: str | None = None

    # Webhook delivery switches.
    webhooks_enabled: bool = True
    webhook_copies: int = 1  # deliver every update this many times (duplicates)
    webhook_delay: float = 0.0  # seconds before the first attempt (late delivery)
    hold_next_webhook: bool = False  # hold the next update until the one after it is delivered
    webhook_max_attempts: int = 4  # per copy; any answer but 200 is retried
    webhook_retry_delay: float = 0.2  # before the 2nd attempt; doubles each retry
    webhook_timeout: float = 5.0  # per attempt
    # How long a "timeout" API fault keeps the request hanging.
    api_hang_seconds: float = 60.0

    base_url: str | None = None
    invoices: dict[int, _StoredInvoice] = attrs.field(factory=dict)
    deliveries: deque[WebhookDelivery] = attrs.field(factory=lambda: deque(maxlen=RECORD_LIMIT))
    suppressed_updates: deque[PendingUpdate] = attrs.field(factory=lambda: deque(maxlen=RECORD_LIMIT))
    api_calls: deque[ApiCall] = attrs.field(factory=lambda: deque(maxlen=RECORD_LIMIT))
    #: Update ids whose delivery ended without a 200 after ``webhook_max_attempts`` (no retry follows).
    given_up: deque[int] = attrs.field(factory=lambda: deque(maxlen=RECORD_LIMIT))

    _held: list[PendingUpdate] = attrs.field(factory=list)
    deleted: deque[int] = attrs.field(factory=lambda: deque(maxlen=RECORD_LIMIT))

    _fault: ApiFault | None = None
    _fault_remaining: int | None = None
    _fault_method: str | None = None
    _next_invoice_id: int = 100_001
    _next_update_id: int = 1
    _nursery: trio.Nursery | None = None
    _http: httpx.AsyncClient | None = None
    _delivery_limit: trio.CapacityLimiter = attrs.field(factory=lambda: trio.CapacityLimiter(8))
    _changed: trio.Event = attrs.field(factory=trio.Event)
    _anchor: tuple[datetime, float] | None = None

    # ------------------------------------------------------------------ time

    def now(self) -> datetime:
        """Wall-clock time that follows Trio's clock (a ``MockClock.jump`` moves dates too)."""
        trio_now = trio.current_time()
        if self._anchor is None:
            self._anchor = (datetime.now(UTC), trio_now)
        wall, at = self._anchor
        return wall + timedelta(seconds=trio_now - at)

    # ------------------------------------------------------------------ faults

    def fail_api(self, fault: ApiFault, times: int | None = 1, *, method: str | None = None) -> None:
        """Make the next ``times`` API calls (all of them if None) fail with ``fault``.

        With ``method`` (e.g. "deleteInvoice") only calls of that method fail; the others pass.
        """
        self._fault = fault
        self._fault_remaining = times
        self._fault_method = method

    def clear_api_faults(self) -> None:
        self._fault = None
        self._fault_remaining = None
        self._fault_method = None

    def _take_fault(self, method: str | None = None) -> ApiFault | None:
        fault = self._fault
        if fault is None:
            return None
        if self._fault_method is not None and method != self._fault_method:
            return None
        if self._fault_remaining is not None:
            self._fault_remaining -= 1
            if self._fault_remaining <= 0:
                self.clear_api_faults()
        return fault

    # ------------------------------------------------------------------ invoices

    def _refresh(self, inv: _StoredInvoice) -> _StoredInvoice:
        if inv.status == "active" and inv.expires_at is not None and trio.current_time() >= inv.expires_at:
            inv.status = "expired"
        return inv

    def invoice(self, invoice_id: int) -> dict[str, Any]:
        """The invoice as the API would return it now; FakeApiError 404 if unknown."""
        inv = self.invoices.get(invoice_id)
        if inv is None:
            raise FakeApiError(404, "INVOICE_NOT_FOUND")
        return self._refresh(inv).to_json()

    def invoice_by_hash(self, invoice_hash: str) -> _StoredInvoice | None:
        for inv in self.invoices.values():
            if inv.hash == invoice_hash:
                return self._refresh(inv)
        return None

    def create_invoice(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """createInvoice with the real API's validation; returns the Invoice JSON object."""
        currency_type = _param_str(params, "currency_type") or "crypto"
        if currency_type not in ("crypto", "fiat"):
            raise FakeApiError(400, "CURRENCY_TYPE_INVALID")
        asset = fiat = None
        accepted: tuple[str, ...] = ()
        if currency_type == "crypto":
            asset = _param_str(params, "asset")
            if asset not in ASSETS:
                raise FakeApiError(400, "ASSET_INVALID")
        else:
            fiat = _param_str(params, "fiat")
            if fiat not in FIATS:
                raise FakeApiError(400, "FIAT_INVALID")
            accepted_list = _param_list(params, "accepted_assets")
            if accepted_list is not None:
                if any(a not in ASSETS for a in accepted_list):
                    raise FakeApiError(400, "ACCEPTED_ASSETS_INVALID")
                accepted = tuple(dict.fromkeys(accepted_list))
        amount = _param_amount(params)
        description = _param_str(params, "description", max_len=1024)
        hidden_message = _param_str(params, "hidden_message", max_len=2048)
        payload = _param_str(params, "payload", max_len=4096)
        paid_btn_name = _param_str(params, "paid_btn_name")
        paid_btn_url = _param_str(params, "paid_btn_url")
        if paid_btn_name is not None:
            if paid_btn_name not in PAID_BTN_NAMES:
                raise FakeApiError(400, "PAID_BTN_NAME_INVALID")
            if not paid_btn_url or not paid_btn_url.startswith(("http://", "https://")):
                raise FakeApiError(400, "PAID_BTN_URL_INVALID")
        elif paid_btn_url is not None:
            raise FakeApiError(400, "PAID_BTN_NAME_REQUIRED")
        expires_in = _param_int(params, "expires_in")
        if expires_in is not None and not 1 <= expires_in <= MAX_EXPIRES_IN:
            raise FakeApiError(400, "EXPIRES_IN_INVALID")
        allow_comments = _param_bool(params, "allow_comments", True)
        allow_anonymous = _param_bool(params, "allow_anonymous", True)

        base = self.public_base_url or self.base_url or "http://fake-cryptopay.invalid"
        invoice_hash = "IV" + secrets.token_hex(6).upper()
        created_at = self.now()
        inv = _StoredInvoice(
            invoice_id=self._next_invoice_id,
            hash=invoice_hash,
            currency_type=currency_type,
            asset=asset,
            fiat=fiat,
            amount=amount,
            accepted_assets=accepted,
            description=description,
            hidden_message=hidden_message,
            payload=payload,
            paid_btn_name=paid_btn_name,
            paid_btn_url=paid_btn_url,
            allow_comments=allow_comments,
            allow_anonymous=allow_anonymous,
            created_at=created_at,
            expiration_date=None if expires_in is None else created_at + timedelta(seconds=expires_in),
            expires_at=None if expires_in is None else trio.current_time() + expires_in,
            bot_invoice_url=f"{base.rstrip('/')}/invoice/{invoice_hash}",
        )
        self._next_invoice_id += 1
        self.invoices[inv.invoice_id] = inv
        self._notify()
        return inv.to_json()

    def get_invoices(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """getInvoices: filters asset, fiat, invoice_ids, status; offset/count; newest first."""
        asset = _param_str(params, "asset")
        if asset is not None and asset not in ASSETS:
            raise FakeApiError(400, "ASSET_INVALID")
        fiat = _param_str(params, "fiat")
        if fiat is not None and fiat not in FIATS:
            raise FakeApiError(400, "FIAT_INVALID")
        ids_raw = _param_list(params, "invoice_ids")
        ids: set[int] | None = None
        if ids_raw is not None:
            if not all(i.isdigit() for i in ids_raw):
                raise FakeApiError(400, "INVOICE_IDS_INVALID")
            ids = {int(i) for i in ids_raw}
        status = _param_str(params, "status")
        if status is not None and status not in ("active", "paid", "expired"):
            raise FakeApiError(400, "STATUS_INVALID")
        offset = _param_int(params, "offset") or 0
        if offset < 0:
            raise FakeApiError(400, "OFFSET_INVALID")
        count = _param_int(params, "count")
        count = 100 if count is None else count
        if not 1 <= count <= 1000:
            raise FakeApiError(400, "COUNT_INVALID")
        matching = [
            inv
            for inv in (self._refresh(i) for i in reversed(self.invoices.values()))
            if (ids is None or inv.invoice_id in ids)
            and (asset is None or inv.asset == asset)
            and (fiat is None or inv.fiat == fiat)
            and (status is None or inv.status == status)
        ]
        return {"items": [inv.to_json() for inv in matching[offset : offset + count]]}

    def delete_invoice(self, params: Mapping[str, Any]) -> bool:
        """deleteInvoice: an active or expired invoice is removed; paid or unknown → 400 INVOICE_NOT_FOUND."""
        invoice_id = _param_int(params, "invoice_id")
        if invoice_id is None:
            raise FakeApiError(400, "INVOICE_ID_REQUIRED")
        inv = self.invoices.get(invoice_id)
        if inv is None or self._refresh(inv).status == "paid":
            raise FakeApiError(400, "INVOICE_NOT_FOUND")
        del self.invoices[invoice_id]
        self.deleted.append(invoice_id)
        self._notify()
        return True

    def get_me(self) -> dict[str, Any]:
        return {
            "app_id": self.app_id,
            "name": self.app_name,
            "payment_processing_bot_username": self.payment_processing_bot_username,
        }

    def pay(
        self,
        invoice_id: int,
        *,
        paid_asset: str | None = None,
        comment: str | None = None,
        paid_anonymously: bool = False,
    ) -> dict[str, Any]:
        """Pay an active invoice as a user would; the webhook update is sent in the background.

        FakeApiError: 404 INVOICE_NOT_FOUND, 400 INVOICE_EXPIRED / INVOICE_ALREADY_PAID /
        ASSET_INVALID. Must be called inside Trio (it reads Trio's clock).
        """
        inv = self.invoices.get(invoice_id)
        if inv is None:
            raise FakeApiError(404, "INVOICE_NOT_FOUND")
        self._refresh(inv)
        if inv.status == "expired":
            raise FakeApiError(400, "INVOICE_EXPIRED")
        if inv.status == "paid":
            raise FakeApiError(400, "INVOICE_ALREADY_PAID")
        if inv.currency_type == "crypto":
            asset = inv.asset
        else:
            asset = paid_asset or (inv.accepted_assets[0] if inv.accepted_assets else "USDT")
            if inv.accepted_assets and asset not in inv.accepted_assets:
                raise FakeApiError(400, "ASSET_INVALID")
        if asset is None or asset not in ASSET_USD_RATES:
            raise FakeApiError(400, "ASSET_INVALID")
        usd_rate = ASSET_USD_RATES[asset]
        if inv.currency_type == "crypto":
            paid_amount = inv.amount
            fiat_rate = None
        else:
            fiat_rate = _q(usd_rate * FIAT_PER_USD[_dec_str(inv.fiat)])
            paid_amount = _q(inv.amount / fiat_rate)
        inv.status = "paid"
        inv.paid_at = self.now()
        inv.paid_asset = asset
        inv.paid_amount = paid_amount
        inv.paid_fiat_rate = fiat_rate
        inv.paid_usd_rate = usd_rate
        inv.fee_amount = _q(paid_amount * SERVICE_FEE)
        inv.paid_anonymously = paid_anonymously
        inv.comment = comment if inv.allow_comments else None
        self._dispatch(self._make_update(inv))
        self._notify()
        return inv.to_json()

    def expire(self, invoice_id: int) -> None:
        """Expire an active invoice now, whatever its ``expires_in``."""
        inv = self.invoices.get(invoice_id)
        if inv is None:
            raise FakeApiError(404, "INVOICE_NOT_FOUND")
        if inv.status == "active":
            inv.status = "expired"
            self._notify()

    # ------------------------------------------------------------------ webhooks

    def _make_update(self, inv: _StoredInvoice) -> PendingUpdate:
        payload = inv.to_json()
        # Deprecated fields the real service still puts in webhook payloads only.
        payload["fee"] = payload.get("fee_amount")
        payload["usd_rate"] = payload.get("paid_usd_rate")
        update_id = self._next_update_id
        update = {
            "update_id": update_id,
            "update_type": "invoice_paid",
            "request_date": _iso(self.now()),
            "payload": payload,
        }
        self._next_update_id += 1
        body = _compact_json(update)
        return PendingUpdate(
            update_id=update_id,
            invoice_id=inv.invoice_id,
            body=body,
            signature=sign_webhook_body(self.token, body),
        )

    def _dispatch(self, update: PendingUpdate) -> None:
        if not self.webhooks_enabled or self.webhook_url is None or self._nursery is None:
            self.suppressed_updates.append(update)
            return
        if self.hold_next_webhook:
            self.hold_next_webhook = False
            self._held.append(update)
            return
        batch = [update, *self._held]
        self._held.clear()
        self._nursery.start_soon(self._deliver_batch, batch, self.webhook_url)

    def release_held_webhooks(self) -> None:
        """Deliver held updates now (without waiting for a later update to overtake them)."""
        if self._held and self._nursery is not None and self.webhook_url is not None:
            batch = list(self._held)
            self._held.clear()
            self._nursery.start_soon(self._deliver_batch, batch, self.webhook_url)

    def deliver_suppressed(self) -> int:
        """Deliver, late, every update recorded while webhooks were off (as a delayed Crypto Pay retry would);
        returns how many. Copies follow ``webhook_copies``."""
        if self.webhook_url is None or self._nursery is None:
            raise RuntimeError("the fake is not serving or has no webhook URL")
        batch = list(self.suppressed_updates)
        self.suppressed_updates.clear()
        if batch:
            self._nursery.start_soon(self._deliver_batch, batch, self.webhook_url)
        return len(batch)

    @property
    def held_updates(self) -> tuple[PendingUpdate, ...]:
        return tuple(self._held)

    async def _deliver_batch(self, batch: list[PendingUpdate], url: str) -> None:
        async with self._delivery_limit:
            if self.webhook_delay > 0:
                await trio.sleep(self.webhook_delay)
            for update in batch:
                for copy in range(1, max(1, self.webhook_copies) + 1):
                    await self._deliver_copy(update, url, copy)

    async def _deliver_copy(self, update: PendingUpdate, url: str, copy: int) -> None:
        assert self._http is not None
        for attempt in range(1, max(1, self.webhook_max_attempts) + 1):
            status: int | None = None
            error: str | None = None
            try:
                response = await self._http.post(
                    url,
                    content=update.body,
                    headers={"Content-Type": "application/json", SIGNATURE_HEADER: update.signature},
                    timeout=self.webhook_timeout,
                )
                status = response.status_code
            except httpx.HTTPError as exc:
                error = type(exc).__name__
            self.deliveries.append(
                WebhookDelivery(
                    update_id=update.update_id,
                    invoice_id=update.invoice_id,
                    copy=copy,
                    attempt=attempt,
                    status_code=status,
                    error=error,
                    body=update.body,
                    signature=update.signature,
                    at=trio.current_time(),
                )
            )
            self._notify()
            if status == 200:
                return
            if attempt < self.webhook_max_attempts:
                await trio.sleep(min(self.webhook_retry_delay * 2 ** (attempt - 1), 60.0))
        logger.info("fake Crypto Pay gave up delivering update %s", update.update_id)
        self.given_up.append(update.update_id)
        self._notify()

    def successful_deliveries(self) -> list[WebhookDelivery]:
        return [d for d in self.deliveries if d.status_code == 200]

    # ------------------------------------------------------------------ waiting

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds; re-checked after every change. Bound it by the caller's
        ``trio.fail_after``."""
        while not predicate():
            await self._changed.wait()

    async def wait_for_deliveries(self, count: int) -> list[WebhookDelivery]:
        """Wait until at least ``count`` delivery attempts are recorded; returns them all."""
        await self.wait_until(lambda: len(self.deliveries) >= count)
        return list(self.deliveries)

    # ------------------------------------------------------------------ HTTP API

    def handle_api(self, method: str, params: Mapping[str, Any], token: str | None) -> tuple[int, Any]:
        """One API call: (HTTP status, response JSON)."""
        handlers: dict[str, Callable[[Mapping[str, Any]], Any]] = {
            "getMe": lambda _params: self.get_me(),
            "createInvoice": self.create_invoice,
            "getInvoices": self.get_invoices,
            "deleteInvoice": self.delete_invoice,
        }
        try:
            handler = handlers.get(method)
            if handler is None:
                raise FakeApiError(405, "METHOD_NOT_FOUND")
            if token is None or not secrets.compare_digest(token.encode(), self.token.encode()):
                raise FakeApiError(401, "UNAUTHORIZED")
            return 200, {"ok": True, "result": handler(params)}
        except FakeApiError as exc:
            return exc.code, {"ok": False, "error": {"code": exc.code, "name": exc.name}}


def _dec_str(value: str | None) -> str:
    assert value is not None
    return value


# ----------------------------------------------------------------------- ASGI app


def _params(request: Request, body: bytes) -> dict[str, Any]:
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


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Crypto Pay (sandbox) — {title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font-family: system-ui, sans-serif; background: #f2f4f7; margin: 0; }}
main {{ max-width: 420px; margin: 48px auto; background: #fff; border-radius: 14px; padding: 28px;
        box-shadow: 0 2px 12px rgba(0,0,0,.08); }}
h1 {{ font-size: 18px; margin: 0 0 4px; color: #667; font-weight: 500; }}
.amount {{ font-size: 34px; font-weight: 700; margin: 8px 0 4px; }}
.desc {{ color: #333; margin: 12px 0 20px; white-space: pre-wrap; }}
.status {{ display: inline-block; padding: 3px 10px; border-radius: 10px; font-size: 13px; }}
.active {{ background: #e3f0ff; color: #1565c0; }} .paid {{ background: #e3f7e8; color: #1b7a36; }}
.expired {{ background: #f3e3e3; color: #9a1c1c; }}
button {{ width: 100%; padding: 14px; font-size: 17px; border: 0; border-radius: 10px;
          background: #1f8ef1; color: #fff; cursor: pointer; }}
select {{ width: 100%; padding: 10px; margin-bottom: 12px; font-size: 15px; }}
a.btn {{ display: block; text-align: center; padding: 12px; border-radius: 10px; background: #eef;
         text-decoration: none; margin-top: 12px; }}
small {{ color: #889; }}
</style></head>
<body><main>
<h1>Crypto Pay sandbox · invoice #{invoice_id}</h1>
<div class="amount">{amount}</div>
<span class="status {status}">{status}</span>
<div class="desc">{description}</div>
{action}
<p><small>This is a fake payment page for testing. No money moves.</small></p>
</main></body></html>
"""


def _invoice_page(inv: _StoredInvoice) -> bytes:
    currency = inv.fiat if inv.currency_type == "fiat" else inv.asset
    if inv.status == "active":
        assets = inv.accepted_assets or (("USDT", "TON") if inv.currency_type == "fiat" else ())
        options = "".join(f'<option value="{html.escape(a)}">{html.escape(a)}</option>' for a in assets)
        chooser = f'<select name="paid_asset">{options}</select>' if options else ""
        action = (
            f'<form method="post" action="/invoice/{html.escape(inv.hash)}/pay">{chooser}'
            f'<button type="submit" id="pay">Pay {html.escape(_fmt(inv.amount))} '
            f"{html.escape(str(currency))}</button></form>"
        )
    elif inv.status == "paid":
        action = f"<p>Paid {html.escape(_fmt(inv.paid_amount))} {html.escape(str(inv.paid_asset))}.</p>"
        if inv.paid_btn_url:
            label = PAID_BTN_LABELS.get(inv.paid_btn_name or "", "Return")
            action += f'<a class="btn" href="{html.escape(inv.paid_btn_url)}">{html.escape(label)}</a>'
    else:
        action = "<p>This invoice has expired.</p>"
    page = _PAGE.format(
        title=html.escape(inv.hash),
        invoice_id=inv.invoice_id,
        amount=f"{html.escape(_fmt(inv.amount))} {html.escape(str(currency))}",
        status=html.escape(inv.status),
        description=html.escape(inv.description or ""),
        action=action,
    )
    return page.encode("utf-8")


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
    fault = fake._take_fault(method)
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
        status, obj = fake.handle_api(method, _params(request, body), request.header("crypto-pay-api-token"))
    fake.api_calls.append(ApiCall(method, http_method, status))
    return Response(status, _compact_json(obj), content_type="application/json")


async def _sandbox_pay(fake: FakeCryptoPay, request: Request) -> Response:
    options = _params(request, await request.body())
    if not request.params["invoice_id"].isdigit():
        raise FakeApiError(404, "INVOICE_NOT_FOUND")
    invoice = fake.pay(
        int(request.params["invoice_id"]),
        paid_asset=_param_str(options, "paid_asset"),
        comment=_param_str(options, "comment"),
        paid_anonymously=_param_bool(options, "paid_anonymously", False),
    )
    return Response(200, _compact_json({"ok": True, "result": invoice}), content_type="application/json")


async def _invoice(fake: FakeCryptoPay, request: Request) -> Response:
    inv = fake.invoice_by_hash(request.params["hash"])
    if inv is None:
        return Response.html("<html><body>Invoice not found</body></html>", 404)
    return Response.html(_invoice_page(inv))


async def _invoice_pay(fake: FakeCryptoPay, request: Request) -> Response:
    inv = fake.invoice_by_hash(request.params["hash"])
    if inv is None:
        return Response.html("<html><body>Invoice not found</body></html>", 404)
    form = _params(request, await request.body())
    try:
        fake.pay(inv.invoice_id, paid_asset=_param_str(form, "paid_asset"))
    except FakeApiError as exc:
        logger.info("sandbox pay page: %s", exc)
    return Response(303, b"", [("location", f"/invoice/{inv.hash}")])


# ----------------------------------------------------------------------- service


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
