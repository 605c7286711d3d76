"""The fake service itself: invoices, payments, expiry, API faults and webhook delivery."""

from __future__ import annotations

import logging
import secrets
from collections import deque
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import attrs
import httpx
import trio

from vpnd.cryptopay import SIGNATURE_HEADER, sign_webhook_body
from vpnd_sandbox.cryptopay.params import param_amount, param_bool, param_int, param_list, param_str
from vpnd_sandbox.cryptopay.records import (
    ASSET_USD_RATES,
    ASSETS,
    FIAT_PER_USD,
    FIATS,
    MAX_EXPIRES_IN,
    PAID_BTN_NAMES,
    RECORD_LIMIT,
    SERVICE_FEE,
    ApiCall,
    ApiFault,
    FakeApiError,
    PendingUpdate,
    StoredInvoice,
    WebhookDelivery,
    compact_json,
    iso,
    quantize,
)

logger = logging.getLogger("vpnd_sandbox.cryptopay")


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
    invoices: dict[int, StoredInvoice] = attrs.field(factory=dict)
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

    def take_api_fault(self, method: str | None = None) -> ApiFault | None:
        """The fault an API call of `method` gets now (counted against ``times``), None for none."""
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

    def _refresh(self, inv: StoredInvoice) -> StoredInvoice:
        if inv.status == "active" and inv.expires_at is not None and trio.current_time() >= inv.expires_at:
            inv.status = "expired"
        return inv

    def invoice(self, invoice_id: int) -> dict[str, Any]:
        """The invoice as the API would return it now; FakeApiError 404 if unknown."""
        inv = self.invoices.get(invoice_id)
        if inv is None:
            raise FakeApiError(404, "INVOICE_NOT_FOUND")
        return self._refresh(inv).to_json()

    def invoice_by_hash(self, invoice_hash: str) -> StoredInvoice | None:
        for inv in self.invoices.values():
            if inv.hash == invoice_hash:
                return self._refresh(inv)
        return None

    def create_invoice(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """createInvoice with the real API's validation; returns the Invoice JSON object."""
        currency_type = param_str(params, "currency_type") or "crypto"
        if currency_type not in ("crypto", "fiat"):
            raise FakeApiError(400, "CURRENCY_TYPE_INVALID")
        asset = fiat = None
        accepted: tuple[str, ...] = ()
        if currency_type == "crypto":
            asset = param_str(params, "asset")
            if asset not in ASSETS:
                raise FakeApiError(400, "ASSET_INVALID")
        else:
            fiat = param_str(params, "fiat")
            if fiat not in FIATS:
                raise FakeApiError(400, "FIAT_INVALID")
            accepted_list = param_list(params, "accepted_assets")
            if accepted_list is not None:
                if any(a not in ASSETS for a in accepted_list):
                    raise FakeApiError(400, "ACCEPTED_ASSETS_INVALID")
                accepted = tuple(dict.fromkeys(accepted_list))
        amount = param_amount(params)
        description = param_str(params, "description", max_len=1024)
        hidden_message = param_str(params, "hidden_message", max_len=2048)
        payload = param_str(params, "payload", max_len=4096)
        paid_btn_name = param_str(params, "paid_btn_name")
        paid_btn_url = param_str(params, "paid_btn_url")
        if paid_btn_name is not None:
            if paid_btn_name not in PAID_BTN_NAMES:
                raise FakeApiError(400, "PAID_BTN_NAME_INVALID")
            if not paid_btn_url or not paid_btn_url.startswith(("http://", "https://")):
                raise FakeApiError(400, "PAID_BTN_URL_INVALID")
        elif paid_btn_url is not None:
            raise FakeApiError(400, "PAID_BTN_NAME_REQUIRED")
        expires_in = param_int(params, "expires_in")
        if expires_in is not None and not 1 <= expires_in <= MAX_EXPIRES_IN:
            raise FakeApiError(400, "EXPIRES_IN_INVALID")
        allow_comments = param_bool(params, "allow_comments", True)
        allow_anonymous = param_bool(params, "allow_anonymous", True)

        base = self.public_base_url or self.base_url or "http://fake-cryptopay.invalid"
        invoice_hash = "IV" + secrets.token_hex(6).upper()
        created_at = self.now()
        inv = StoredInvoice(
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
        asset = param_str(params, "asset")
        if asset is not None and asset not in ASSETS:
            raise FakeApiError(400, "ASSET_INVALID")
        fiat = param_str(params, "fiat")
        if fiat is not None and fiat not in FIATS:
            raise FakeApiError(400, "FIAT_INVALID")
        ids_raw = param_list(params, "invoice_ids")
        ids: set[int] | None = None
        if ids_raw is not None:
            if not all(i.isdigit() for i in ids_raw):
                raise FakeApiError(400, "INVOICE_IDS_INVALID")
            ids = {int(i) for i in ids_raw}
        status = param_str(params, "status")
        if status is not None and status not in ("active", "paid", "expired"):
            raise FakeApiError(400, "STATUS_INVALID")
        offset = param_int(params, "offset") or 0
        if offset < 0:
            raise FakeApiError(400, "OFFSET_INVALID")
        count = param_int(params, "count")
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
        invoice_id = param_int(params, "invoice_id")
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
            fiat_rate = quantize(usd_rate * FIAT_PER_USD[present_str(inv.fiat)])
            paid_amount = quantize(inv.amount / fiat_rate)
        inv.status = "paid"
        inv.paid_at = self.now()
        inv.paid_asset = asset
        inv.paid_amount = paid_amount
        inv.paid_fiat_rate = fiat_rate
        inv.paid_usd_rate = usd_rate
        inv.fee_amount = quantize(paid_amount * SERVICE_FEE)
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

    def _make_update(self, inv: StoredInvoice) -> PendingUpdate:
        payload = inv.to_json()
        # Deprecated fields the real service still puts in webhook payloads only.
        payload["fee"] = payload.get("fee_amount")
        payload["usd_rate"] = payload.get("paid_usd_rate")
        update_id = self._next_update_id
        update = {
            "update_id": update_id,
            "update_type": "invoice_paid",
            "request_date": iso(self.now()),
            "payload": payload,
        }
        self._next_update_id += 1
        body = compact_json(update)
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


def present_str(value: str | None) -> str:
    assert value is not None
    return value
