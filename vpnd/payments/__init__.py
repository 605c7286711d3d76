"""Payments: Crypto Pay (invoices, signed webhook, watcher), Telegram Stars, balance, promo and referral money.

The money core lives in the database layer (`vpnd.db.purchases`, `vpnd.db.payments`,
`vpnd.db.promo`, `vpnd.db.ledger`) as plain transaction functions; this package holds the async
orchestration the Telegram layer calls (`service`), the webhook route (`webhook`) and the watcher
(`watcher`). Pure price arithmetic is in `vpnd.pricing`.
"""

from vpnd.db.ledger import InsufficientBalance
from vpnd.db.payments import FinalizeOutcome, PaymentRules
from vpnd.db.promo import PromoCheck
from vpnd.db.purchases import (
    MethodUnavailable,
    PaymentError,
    ProviderUnavailable,
    Purchase,
    PurchaseNotFound,
    PurchaseNotPayable,
    UnknownPlan,
    UnknownUser,
)

__all__ = [
    "FinalizeOutcome",
    "InsufficientBalance",
    "MethodUnavailable",
    "PaymentError",
    "PaymentRules",
    "PromoCheck",
    "ProviderUnavailable",
    "Purchase",
    "PurchaseNotFound",
    "PurchaseNotPayable",
    "UnknownPlan",
    "UnknownUser",
]
