"""`POST /webhooks/cryptopay`: Crypto Pay's signed invoice_paid updates.

Order matters: read the raw body with a cap (413 past it), verify the HMAC of exactly those bytes
with a constant-time compare (401 and no state change on a bad or missing signature), and only then
parse (400 for a signed body that is not an Update). A verified update answers 200 whatever the
outcome — granted, already processed, unknown purchase, amount mismatch, or an internal error that
was logged — so Crypto Pay stops retrying; the watcher is the backstop for anything not applied.
"""

from __future__ import annotations

import logging

from vpnd.app import App
from vpnd.cryptopay import SIGNATURE_HEADER, MalformedWebhook, parse_webhook_update, verify_webhook_signature
from vpnd.payments.service import finalize_cryptopay_invoice
from vpnd.web import BodyTooLarge, Request, Response, Router

log = logging.getLogger("vpnd.payments")

WEBHOOK_PATH = "/webhooks/cryptopay"
#: Crypto Pay updates are a few KiB; anything much larger is not one.
MAX_WEBHOOK_BODY = 64 * 1024


def add_payment_routes(router: Router, app: App, cryptopay_token: str) -> None:
    """Add the Crypto Pay webhook to `router` (before the HTTP server starts)."""
    if not cryptopay_token:
        raise ValueError("the Crypto Pay webhook needs the app token to verify signatures")

    async def cryptopay_webhook(request: Request) -> Response:
        request.max_body_bytes = min(request.max_body_bytes, MAX_WEBHOOK_BODY)
        try:
            body = await request.body()
        except BodyTooLarge:
            log.warning("event=webhook_refused reason=too_large client=%s", request.client_host)
            app.metrics.http_requests.labels("cryptopay_webhook", "413").inc()
            return Response.text("request body too large\n", 413)
        if not verify_webhook_signature(cryptopay_token, body, request.header(SIGNATURE_HEADER)):
            log.warning("event=webhook_refused reason=bad_signature client=%s", request.client_host)
            app.metrics.http_requests.labels("cryptopay_webhook", "401").inc()
            return Response.text("bad signature\n", 401)
        try:
            update = parse_webhook_update(body)
        except MalformedWebhook as exc:
            log.warning("event=webhook_refused reason=malformed error=%s", exc)
            app.metrics.http_requests.labels("cryptopay_webhook", "400").inc()
            return Response.text("malformed update\n", 400)
        app.metrics.http_requests.labels("cryptopay_webhook", "200").inc()
        if update.update_type != "invoice_paid" or not update.invoice.is_paid:
            log.info("event=webhook_ignored update_type=%s status=%s", update.update_type, update.invoice.status)
            return Response.json({"ok": True, "result": "ignored"})
        try:
            outcome = await finalize_cryptopay_invoice(app, update.invoice)
        except Exception:  # trio.Cancelled is not an Exception: it passes
            # Answer 200 anyway: a retry would fail the same way; the watcher will try again.
            log.exception("event=webhook_finalize_failed invoice_id=%s", update.invoice.invoice_id)
            return Response.json({"ok": True, "result": "error"})
        return Response.json({"ok": True, "result": outcome.status})

    router.add("POST", WEBHOOK_PATH, cryptopay_webhook)
