"""Fake Crypto Pay's records and constants: invoices, webhook updates and deliveries, API calls, the
assets, fiats and rates it knows, and how it writes numbers and times on the wire."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, Final, Literal

import attrs

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
class StoredInvoice:
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
        obj["amount"] = fmt(self.amount)
        if self.status == "paid":
            obj["paid_asset"] = self.paid_asset
            obj["paid_amount"] = fmt(self.paid_amount)
            if self.currency_type == "fiat":
                obj["paid_fiat_rate"] = fmt(self.paid_fiat_rate)
        if self.accepted_assets:
            obj["accepted_assets"] = list(self.accepted_assets)
        if self.status == "paid":
            obj["fee_asset"] = self.paid_asset
            obj["fee_amount"] = fmt(self.fee_amount)
            obj["fee_in_usd"] = fmt(quantize(present(self.fee_amount) * present(self.paid_usd_rate)))
        obj["pay_url"] = self.bot_invoice_url
        obj["bot_invoice_url"] = self.bot_invoice_url
        obj["mini_app_invoice_url"] = f"{self.bot_invoice_url}?via=mini_app"
        obj["web_app_invoice_url"] = f"{self.bot_invoice_url}?via=web_app"
        if self.description is not None:
            obj["description"] = self.description
        obj["status"] = self.status
        obj["created_at"] = iso(self.created_at)
        if self.status == "paid":
            obj["paid_usd_rate"] = fmt(self.paid_usd_rate)
        obj["allow_comments"] = self.allow_comments
        obj["allow_anonymous"] = self.allow_anonymous
        if self.expiration_date is not None:
            obj["expiration_date"] = iso(self.expiration_date)
        if self.status == "paid":
            obj["paid_at"] = iso(self.paid_at)
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


def present(value: Decimal | None) -> Decimal:
    assert value is not None
    return value


def quantize(value: Decimal, places: str = "0.00000001") -> Decimal:
    return value.quantize(Decimal(places), rounding=ROUND_HALF_UP)


def fmt(value: Decimal | None) -> str:
    text = format(present(value).normalize(), "f")
    return text


def iso(value: datetime | None) -> str:
    assert value is not None
    value = value.astimezone(UTC)
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


def compact_json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
