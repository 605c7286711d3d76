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

Where each concern lives: :mod:`~vpnd_sandbox.cryptopay.state` (:class:`FakeCryptoPay`: invoices,
payments, faults, webhook delivery), :mod:`~vpnd_sandbox.cryptopay.records` (records, constants, wire
formats of numbers and times), :mod:`~vpnd_sandbox.cryptopay.params` (parameter coercion),
:mod:`~vpnd_sandbox.cryptopay.page` (the payment page), :mod:`~vpnd_sandbox.cryptopay.web` (routes on
:mod:`vpnd.web` and :func:`serve_fake_cryptopay`).
"""

from vpnd_sandbox.cryptopay.records import ApiCall, ApiFault, FakeApiError, PendingUpdate, WebhookDelivery
from vpnd_sandbox.cryptopay.state import FakeCryptoPay
from vpnd_sandbox.cryptopay.web import cryptopay_router, serve_fake_cryptopay

__all__ = [
    "ApiCall",
    "ApiFault",
    "FakeApiError",
    "FakeCryptoPay",
    "PendingUpdate",
    "WebhookDelivery",
    "cryptopay_router",
    "serve_fake_cryptopay",
]
