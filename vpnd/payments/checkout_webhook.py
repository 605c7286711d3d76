"""`POST /webhooks/yookassa`: YooKassa's notifications (payment.succeeded, payment.canceled, refund.succeeded).

They are not signed, so two gates stand before any state changes: the sender's address must be in
`[yookassa].notify_networks` (the socket's peer: vpnd has no trusted-proxy setting, so forwarding
headers are not believed — 403 otherwise), and the body only names an object that is then fetched
from the API (`vpnd.payments.checkout`); what the API says is what is acted on. A body that is not
a notification answers 400. Otherwise 200 whatever the outcome (unknown payment, forged purchase
id, already paid), so YooKassa stops repeating it — except when the API could not be asked (503:
YooKassa repeats the notification; the watcher is the backstop for payments either way).
"""

from __future__ import annotations

import ipaddress
import logging

from vpnd.app import App
from vpnd.payments.checkout import CheckoutError, HostedCheckout, settle_checkout_payment, settle_checkout_refund
from vpnd.web import BodyTooLarge, Request, Response, Router
from vpnd.yookassa import MalformedNotification, parse_notification

log = logging.getLogger("vpnd.payments")

NOTIFICATION_PATH = "/webhooks/yookassa"
MAX_NOTIFICATION_BODY = 64 * 1024
PAYMENT_EVENTS = frozenset({"payment.succeeded", "payment.canceled", "payment.waiting_for_capture"})
REFUND_EVENTS = frozenset({"refund.succeeded"})


def allowed_sender(host: str, networks: tuple[str, ...]) -> bool:
    """True when `host` (the socket's peer) is inside one of `networks` (CIDR strings)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in ipaddress.ip_network(network, strict=False) for network in networks)


def add_checkout_routes(router: Router, app: App, checkout: HostedCheckout) -> None:
    """Add the YooKassa notification route to `router` (before the HTTP server starts)."""

    def answer(status: int, text: str) -> Response:
        app.metrics.http_requests.labels("yookassa_notification", str(status)).inc()
        return Response.text(text + "\n", status)

    async def notification(request: Request) -> Response:
        # Read live: a reload may change the networks.
        if not allowed_sender(request.client_host, app.config.yookassa.notify_networks):
            log.warning("event=notification_refused reason=network client=%s", request.client_host)
            return answer(403, "forbidden")
        request.max_body_bytes = min(request.max_body_bytes, MAX_NOTIFICATION_BODY)
        try:
            note = parse_notification(await request.body())
        except BodyTooLarge:
            return answer(413, "request body too large")
        except MalformedNotification as exc:
            log.warning("event=notification_refused reason=malformed error=%s", exc)
            return answer(400, "malformed notification")
        try:
            if note.event in PAYMENT_EVENTS:
                result = await settle_checkout_payment(app, checkout, note.object_id)
            elif note.event in REFUND_EVENTS:
                reversal = await settle_checkout_refund(app, checkout, note.object_id)
                result = "refunded" if reversal is not None and reversal.recorded else "no_change"
            else:
                result = "ignored"
        except CheckoutError as exc:
            log.warning("event=notification_unverified event_type=%s error=%s", note.event, exc)
            return answer(503 if exc.transient else 200, "not verified")
        except Exception:  # trio.Cancelled is not an Exception: it passes
            # Answer 200 anyway: a repeat would fail the same way; the watcher will try again.
            log.exception("event=notification_failed event_type=%s object_id=%s", note.event, note.object_id)
            return answer(200, "error")
        log.info("event=notification event_type=%s object_id=%s result=%s", note.event, note.object_id, result)
        return answer(200, result)

    router.add("POST", NOTIFICATION_PATH, notification)
