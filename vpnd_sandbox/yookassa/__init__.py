"""A fake YooKassa (API v3) on loopback, for tests and the demo.

Same request and response shapes as the real service for what vpnd uses: ``POST /v3/payments``
(Basic auth shop id : secret key — 401 ``invalid_credentials`` otherwise; an ``Idempotence-Key``
is required, and a repeated key answers the first answer without creating anything; a bad amount
is 400 ``invalid_request`` with ``parameter``), ``GET /v3/payments/{id}`` (404 ``not_found``),
``POST /v3/refunds`` and ``GET /v3/refunds/{id}``.

The payer: a payment's ``confirmation_url`` is a page with "Pay" and "Fail" buttons
(:meth:`FakeYooKassa.pay` / :meth:`FakeYooKassa.fail` from Python; ``pay`` can change the amount
paid, for mismatch tests). Each change posts a notification (``payment.succeeded``,
``payment.canceled``, ``refund.succeeded``) to :attr:`FakeYooKassa.notification_url`, with switches
for duplicates (``notification_copies``), delays (``notification_delay``) and none
(``notifications_enabled = False``); non-200 answers are retried. Every attempt is recorded in
:attr:`FakeYooKassa.deliveries`.
"""

from vpnd_sandbox.yookassa.state import Delivery, FakeApiError, FakeYooKassa
from vpnd_sandbox.yookassa.web import serve_fake_yookassa, yookassa_router

__all__ = ["Delivery", "FakeApiError", "FakeYooKassa", "serve_fake_yookassa", "yookassa_router"]
