"""Hosted checkouts: the payer pays on the provider's page; vpnd learns of it and verifies by asking.

The provider interface (`HostedCheckout`) is what a second hosted checkout would implement:
create a payment for a purchase (→ the page to send the payer to), fetch a payment or a refund by
id (the only thing vpnd trusts: notifications are unsigned hints), refund a payment. YooKassa is
the first (`YooKassaCheckout`, over `vpnd.yookassa`).

The flow, as Crypto Pay's (`vpnd.payments.service`): `start_checkout_purchase` commits the purchase
first, then creates the provider's payment (its idempotence key is the purchase, so a retried
create never makes a second payment), then records it. A notification (`checkout_webhook`) and the
watcher (`run_checkout_watcher`) both only *name* a payment: `settle_checkout_payment` fetches it
from the provider and acts on what the provider says — succeeded with the purchase id we recorded
→ `finalize_purchase` (exactly once: the purchase's row lock and the payments' unique keys; an
amount or currency that differs from the purchase is recorded and alerted, no access), canceled →
the purchase expires, pending → nothing. A payment id we never created changes nothing; one created
just before a crash and never recorded is recognised by the purchase id it carries, and recorded then.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from functools import partial
from typing import Any, Literal, Protocol

import attrs
import psycopg
import trio

from vpnd.app import App
from vpnd.cryptopay import CryptoPayClient
from vpnd.db import checkout as checkout_db
from vpnd.db import payments as payments_db
from vpnd.db import purchases, subscriptions
from vpnd.db.payments import FinalizeOutcome, PaymentRules, RefundReversal, finalize_purchase
from vpnd.db.purchases import MethodUnavailable, ProviderUnavailable, Purchase, PurchaseNotPayable
from vpnd.money import from_minor
from vpnd.payments.service import (
    _check_item,
    _create_purchase,
    after_commit,
    delete_superseded_invoices,
    item_of,
    rules_of,
)
from vpnd.periodic import run_periodic
from vpnd.pricing import InvalidAmount, received_to_minor
from vpnd.yookassa import PaymentNotFound, TransientYooKassaError, YooKassaClient, YooKassaError

log = logging.getLogger("vpnd.payments")

CheckoutStatus = Literal["pending", "succeeded", "canceled"]


class CheckoutError(Exception):
    """The provider refused or failed a call (`transient`: the same call may succeed later)."""

    def __init__(self, message: str, *, transient: bool = False, not_found: bool = False) -> None:
        super().__init__(message)
        self.transient = transient
        self.not_found = not_found


@attrs.frozen
class CheckoutPayment:
    """A provider's payment as the provider reports it (amounts in the currency's minor units; -1: unreadable)."""

    payment_id: str
    status: CheckoutStatus
    amount_minor: int
    currency: str
    #: The purchase id the payment carries (its metadata), as the provider reports it.
    purchase_id: int | None
    confirmation_url: str | None = None
    #: The method the provider saved with the payer's consent (for auto-renewal), and its title.
    saved_method_id: str | None = None
    saved_method_title: str = ""


@attrs.frozen
class CheckoutRefund:
    refund_id: str
    payment_id: str
    succeeded: bool


class HostedCheckout(Protocol):
    """A hosted checkout provider. `name` is its `payments.provider` and `purchases.method`."""

    @property
    def name(self) -> payments_db.Provider: ...

    async def create(
        self, purchase: Purchase, *, method: str | None, description: str, return_url: str, save_method: bool = False
    ) -> CheckoutPayment: ...

    async def charge(self, purchase: Purchase, *, saved_method_id: str, description: str, key: str) -> CheckoutPayment:
        """Charge a saved method without the payer; `key` makes a retry return the first charge."""
        ...

    async def fetch(self, payment_id: str) -> CheckoutPayment: ...

    async def refund(self, payment_id: str, amount_minor: int, currency: str, *, key: str) -> CheckoutRefund: ...

    async def fetch_refund(self, refund_id: str) -> CheckoutRefund: ...


def _minor(amount: Decimal, currency: str) -> int:
    try:
        return received_to_minor(amount, currency)
    except InvalidAmount:
        return -1


def _purchase_id(value: str | None) -> int | None:
    return int(value) if value is not None and value.isdecimal() and len(value) < 19 else None


@attrs.define
class YooKassaCheckout:
    """`HostedCheckout` over the YooKassa API (`capture: true`: a payment is `pending` until paid)."""

    client: YooKassaClient

    @property
    def name(self) -> payments_db.Provider:
        return "yookassa"

    async def create(
        self, purchase: Purchase, *, method: str | None, description: str, return_url: str, save_method: bool = False
    ) -> CheckoutPayment:
        with _errors():
            payment = await self.client.create_payment(
                amount=from_minor(purchase.amount_minor, purchase.currency),
                currency=purchase.currency,
                purchase_id=purchase.id,
                description=description,
                return_url=return_url,
                method=method,
                idempotence_key=f"vpnd-purchase-{purchase.id}",
                save_method=save_method,
            )
        return self._value(payment)

    async def charge(self, purchase: Purchase, *, saved_method_id: str, description: str, key: str) -> CheckoutPayment:
        with _errors():
            payment = await self.client.create_payment(
                amount=from_minor(purchase.amount_minor, purchase.currency),
                currency=purchase.currency,
                purchase_id=purchase.id,
                description=description,
                return_url="",
                method=None,
                idempotence_key=key,
                saved_method_id=saved_method_id,
            )
        return self._value(payment)

    async def fetch(self, payment_id: str) -> CheckoutPayment:
        with _errors():
            return self._value(await self.client.get_payment(payment_id))

    async def refund(self, payment_id: str, amount_minor: int, currency: str, *, key: str) -> CheckoutRefund:
        with _errors():
            refund = await self.client.create_refund(
                payment_id=payment_id, amount=from_minor(amount_minor, currency), currency=currency, idempotence_key=key
            )
        return CheckoutRefund(refund.id, refund.payment_id, refund.status == "succeeded")

    async def fetch_refund(self, refund_id: str) -> CheckoutRefund:
        with _errors():
            refund = await self.client.get_refund(refund_id)
        return CheckoutRefund(refund.id, refund.payment_id, refund.status == "succeeded")

    @staticmethod
    def _value(payment: Any) -> CheckoutPayment:
        # waiting_for_capture does not happen with capture: true; it is not money received yet either way.
        status: CheckoutStatus = payment.status if payment.status in ("succeeded", "canceled") else "pending"
        return CheckoutPayment(
            payment.id,
            status,
            _minor(payment.amount, payment.currency),
            payment.currency,
            _purchase_id(payment.purchase_id),
            payment.confirmation_url,
            payment.saved_method_id,
            payment.method_title,
        )


@contextmanager
def _errors() -> Iterator[None]:
    """YooKassa's errors as `CheckoutError` (the service layer speaks the interface's errors only)."""
    try:
        yield
    except YooKassaError as exc:
        raise CheckoutError(
            str(exc), transient=isinstance(exc, TransientYooKassaError), not_found=isinstance(exc, PaymentNotFound)
        ) from exc


# --- buying ----------------------------------------------------------------------------------


async def start_checkout_purchase(
    app: App,
    checkout: HostedCheckout,
    user_id: int,
    plan_code: str,
    *,
    method: str | None = None,
    language: str = "en",
    cryptopay: CryptoPayClient | None = None,
    save_method: bool = False,
    pack: bool = False,
) -> tuple[Purchase, str]:
    """Create a purchase of a plan and its payment at the provider; the purchase and the page URL.

    Raises UnknownPlan, UnknownUser, MethodUnavailable (switched off, or the plan is priced in
    another currency than the shop's), ProviderUnavailable (the provider refused or failed; the
    purchase is then cancelled), PurchaseNotPayable (a newer purchase superseded this one meanwhile).
    `save_method`: the payer consented to auto-renewal by this card (the provider keeps the method).
    """
    config = app.config.yookassa
    if not config.enabled:
        raise MethodUnavailable("YooKassa is switched off")
    await _check_item(app, user_id, plan_code, pack=pack)
    item = item_of(app, plan_code, pack=pack, language=language)
    offer, description = item.offer, item.description
    if offer.currency.upper() != config.currency.upper():
        raise MethodUnavailable(f"{plan_code} is priced in {offer.currency}, the shop takes {config.currency}")
    purchase = await _create_purchase(app, user_id, offer, checkout.name)  # committed before any HTTP
    try:
        payment = await checkout.create(
            purchase, method=method, description=description, return_url=config.return_url, save_method=save_method
        )
    except CheckoutError as exc:
        log.warning("event=checkout_failed provider=%s purchase_id=%s error=%s", checkout.name, purchase.id, exc)
        await app.db.run(purchases.expire_purchase, purchase.id, status="cancelled")
        raise ProviderUnavailable(str(exc)) from exc
    if payment.confirmation_url is None:  # nothing the payer could open: as good as refused
        await app.db.run(purchases.expire_purchase, purchase.id, status="cancelled")
        raise ProviderUnavailable(f"{checkout.name} payment {payment.payment_id} has no confirmation URL")
    status = await app.db.run(
        checkout_db.attach_checkout, purchase.id, checkout.name, payment.payment_id, payment.confirmation_url
    )
    await delete_superseded_invoices(app, cryptopay, purchase.id)
    if status != "pending":
        raise PurchaseNotPayable("payments.expired")
    return purchase, payment.confirmation_url


# --- settling --------------------------------------------------------------------------------


def _finalize_checkout(
    conn: psycopg.Connection[Any], provider: payments_db.Provider, payment: CheckoutPayment, rules: PaymentRules
) -> FinalizeOutcome | None:
    """Finalize the purchase a succeeded payment pays and stop watching it, in one transaction.

    A payment we have no record of, but which the API says is in our shop and names one of our
    purchases of this method that has no payment yet, was created by us just before a crash (between
    the create and its record): it is recorded now. None (nothing changed) when the payment is not
    one we created for the purchase it names.
    """
    purchase_id = checkout_db.purchase_of(conn, provider, payment.payment_id)
    if purchase_id is None and payment.purchase_id is not None:
        named = purchases.get_purchase(conn, payment.purchase_id)
        if named is not None and named.method == provider:
            attached = checkout_db.attach_checkout(conn, named.id, provider, payment.payment_id, None)
            purchase_id = named.id if attached is not None else None
    if purchase_id is None or purchase_id != payment.purchase_id:
        return None
    outcome = finalize_purchase(
        conn,
        purchase_id,
        provider=provider,
        provider_payment_id=payment.payment_id,
        amount_minor=payment.amount_minor,
        currency=payment.currency,
        rules=rules,
    )
    checkout_db.settle_checkout(conn, purchase_id, "succeeded")
    if payment.saved_method_id is not None and outcome.status == "granted" and outcome.user_id is not None:
        checkout_db.save_method(conn, outcome.user_id, provider, payment.saved_method_id, payment.saved_method_title)
        subscriptions.set_auto_renew(conn, outcome.user_id, True)  # what the payer consented to
    return outcome


def _cancel_checkout(conn: psycopg.Connection[Any], provider: str, payment_id: str) -> bool:
    purchase_id = checkout_db.purchase_of(conn, provider, payment_id)
    return purchase_id is not None and checkout_db.settle_checkout(conn, purchase_id, "canceled")


async def settle_checkout_payment(app: App, checkout: HostedCheckout, payment_id: str) -> str:
    """Act on what the provider says of `payment_id` (from a notification or the watcher); idempotent.

    Returns what happened: a finalize status, "pending", "canceled", "unknown" (no such payment, or
    not ours) or "forged" (the provider's payment names another purchase than the one we recorded).
    Raises CheckoutError when the provider cannot be asked now.
    """
    try:
        payment = await checkout.fetch(payment_id)
    except CheckoutError as exc:
        if exc.not_found:
            log.warning("event=checkout_unknown provider=%s payment_id=%r", checkout.name, payment_id[:64])
            return "unknown"
        raise
    if payment.status == "pending":
        return "pending"
    if payment.status == "canceled":
        changed = await app.db.run(_cancel_checkout, checkout.name, payment.payment_id)
        return "canceled" if changed else "unknown"
    outcome = await app.db.run(_finalize_checkout, checkout.name, payment, rules_of(app))
    if outcome is None:
        log.warning(
            "event=checkout_forged provider=%s payment_id=%s metadata_purchase_id=%s",
            checkout.name, payment.payment_id, payment.purchase_id,
        )  # fmt: skip
        return "forged"
    after_commit(app, outcome, checkout.name)
    return outcome.status


async def settle_checkout_refund(app: App, checkout: HostedCheckout, refund_id: str) -> RefundReversal | None:
    """A refund the provider reports (refund.succeeded): verified by fetching, then reversed once.

    None when the refund is unknown, not succeeded, or of a payment we did not create.
    """
    try:
        refund = await checkout.fetch_refund(refund_id)
    except CheckoutError as exc:
        if exc.not_found:
            return None
        raise
    if not refund.succeeded:
        return None
    purchase_id = await app.db.run(checkout_db.purchase_of, checkout.name, refund.payment_id)
    if purchase_id is None:
        log.warning("event=checkout_refund_unknown provider=%s refund_id=%s", checkout.name, refund.refund_id)
        return None
    return await app.db.run(partial(payments_db.reverse_refunded_purchase, rules=rules_of(app)), purchase_id)


# --- the watcher -----------------------------------------------------------------------------

#: Payments asked about per round and keyset page.
WATCH_BATCH = 100


async def watch_checkouts_once(app: App, checkout: HostedCheckout, *, batch_size: int = WATCH_BATCH) -> int:
    """One round over the payments not yet settled: how many purchases this round finalized or expired."""
    changed = 0
    after_id = 0
    while True:
        batch = await app.db.run(checkout_db.pending_checkouts, checkout.name, after_id=after_id, limit=batch_size)
        for ref in batch:
            try:
                result = await settle_checkout_payment(app, checkout, ref.payment_id)
            except CheckoutError as exc:
                log.warning("event=checkout_watch_failed payment_id=%s error=%s", ref.payment_id, exc)
                continue
            changed += result in ("granted", "credited", "canceled")
        if len(batch) < batch_size:
            return changed
        after_id = batch[-1].purchase_id
        await trio.lowlevel.checkpoint()


async def run_checkout_watcher(
    app: App, checkout: HostedCheckout, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """The backstop for lost notifications (a workers-nursery child); `started()` after its first round."""
    first = True

    def on_round() -> None:
        nonlocal first
        if first:
            first = False
            task_status.started()

    await run_periodic(
        f"{checkout.name}_watcher",
        lambda: app.config.yookassa.poll_interval,
        partial(watch_checkouts_once, app, checkout),
        metrics=app.metrics,
        on_round=on_round,
        retimed=app.config_reloaded.wait,
    )
