"""The Crypto Pay watcher: the backstop for lost, late or failed webhooks.

Every `[cryptopay].poll_interval` it walks the purchases that have an invoice and may still be
paid — pending ones, and ones expired early by a newer purchase while their invoice is still open
— in keyset batches with a LIMIT, asks Crypto Pay about each batch with one `getInvoices`, and
finalizes the paid ones (idempotent: racing the webhook is harmless) and expires the pending ones
whose invoice expired. A superseded purchase whose invoice is still active (its deletion after the
newer purchase failed) has the invoice deleted now. Each database step is its own short
transaction; no connection is held across an HTTP call. It also expires invoice-less purchases
past their expiry.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from functools import partial

import trio

from vpnd.app import App
from vpnd.cryptopay import CryptoPayClient
from vpnd.db import purchases
from vpnd.db.purchases import InvoiceRef
from vpnd.payments.service import delete_invoices, expire_stale_purchases, finalize_cryptopay_invoice
from vpnd.periodic import run_periodic

log = logging.getLogger("vpnd.payments")

WORKER_NAME = "payment_watcher"
#: Invoices per getInvoices call (Crypto Pay allows up to 1000 per page).
DEFAULT_BATCH = 100
#: A pending purchase whose invoice Crypto Pay no longer knows is expired this long after its expiry.
UNKNOWN_INVOICE_GRACE = dt.timedelta(minutes=10)


async def watch_once(app: App, client: CryptoPayClient, *, batch_size: int = DEFAULT_BATCH) -> int:
    """One round: returns how many purchases changed (finalized by this round, or expired)."""
    changed = await _walk(app, client, purchases.pending_invoices, batch_size, expire=True)
    changed += await _walk(app, client, purchases.superseded_invoices, batch_size, expire=False)
    changed += await expire_stale_purchases(app)
    return changed


async def _walk(
    app: App,
    client: CryptoPayClient,
    query: Callable[..., list[InvoiceRef]],
    batch_size: int,
    *,
    expire: bool,
) -> int:
    changed = 0
    after_id = 0
    while True:
        batch = await app.db.run(query, after_id=after_id, limit=batch_size)
        if not batch:
            return changed
        invoices = await client.get_invoices(invoice_ids=[ref.invoice_id for ref in batch], count=len(batch))
        by_id = {invoice.invoice_id: invoice for invoice in invoices}
        for ref in batch:
            invoice = by_id.get(ref.invoice_id)
            if invoice is None:
                if expire and ref.expires_at + UNKNOWN_INVOICE_GRACE < dt.datetime.now(dt.UTC):
                    log.warning("event=invoice_unknown purchase_id=%s invoice_id=%s", ref.purchase_id, ref.invoice_id)
                    changed += await app.db.run(purchases.expire_purchase, ref.purchase_id)
                continue
            if invoice.is_paid:
                outcome = await finalize_cryptopay_invoice(app, invoice)
                changed += outcome.applied
            elif invoice.status == "expired" and expire:
                changed += await app.db.run(purchases.expire_purchase, ref.purchase_id)
            elif invoice.status == "active" and not expire:
                await delete_invoices(app, client, [invoice.invoice_id], why=f"superseded:{ref.purchase_id}")
        if len(batch) < batch_size:
            return changed
        after_id = batch[-1].purchase_id
        await trio.lowlevel.checkpoint()


async def run_payment_watcher(
    app: App,
    client: CryptoPayClient,
    *,
    batch_size: int = DEFAULT_BATCH,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the watcher forever (a workers-nursery child); `started()` after its first round."""
    first = True

    def on_round() -> None:
        nonlocal first
        if first:
            first = False
            task_status.started()

    await run_periodic(
        WORKER_NAME,
        lambda: app.config.cryptopay.poll_interval,  # read live: a config reload may change it
        partial(watch_once, app, client, batch_size=batch_size),
        metrics=app.metrics,
        on_round=on_round,
        retimed=app.config_reloaded.wait,
    )
