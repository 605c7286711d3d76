"""The fake Crypto Pay, under its old name: it lives in :mod:`vpnd_sandbox.cryptopay` now.

Kept so that ``from vpnd_sandbox.cryptopay_fake import FakeCryptoPay, serve_fake_cryptopay`` goes on working.
"""

from vpnd_sandbox.cryptopay import (
    ApiCall,
    ApiFault,
    FakeApiError,
    FakeCryptoPay,
    PendingUpdate,
    WebhookDelivery,
    cryptopay_router,
    serve_fake_cryptopay,
)

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
