"""Payment methods come from the data: one the code has never named is in the stats, the CSV export,
the user's history, the admin chat's notice and the payment alerts, with no change to any of them."""

from __future__ import annotations

import csv
import io

import attrs

from tests.payments.conftest import ADMINS, Env
from vpnd.db import admin, history
from vpnd.db.payments import finalize_purchase
from vpnd.payments.service import rules_of

SALES_CHAT = -1001234567890


async def test_a_method_added_later_is_covered_everywhere(env: Env) -> None:
    # What a migration that adds a payment method does: the three methods of the schema are no longer all.
    env.sql("ALTER TABLE purchases DROP CONSTRAINT purchases_method_check")
    env.sql("ALTER TABLE payments DROP CONSTRAINT payments_provider_check")
    user = await env.add_user(1001)
    paid, mismatched = (
        env.scalar(
            "INSERT INTO purchases (user_id, kind, plan_code, days, method, amount_minor, currency, expires_at, "
            "list_amount_minor) VALUES (%s, 'plan', 'm1', 30, 'futurepay', 499, 'USD', now() + interval '1 hour', 499) "
            "RETURNING id",
            (user,),
        )
        for _ in range(2)
    )
    rules = attrs.evolve(rules_of(env.app), notify_chat_id=SALES_CHAT)

    async def finalize(purchase_id: int, payment_id: str, amount_minor: int) -> str:
        outcome = await env.app.db.run(
            finalize_purchase, purchase_id, provider="futurepay", provider_payment_id=payment_id,
            amount_minor=amount_minor, currency="USD", rules=rules,
        )  # fmt: skip
        return outcome.status

    assert await finalize(paid, "fp-1", 499) == "granted"
    assert await finalize(paid, "fp-1", 499) == "already_paid"
    assert await finalize(mismatched, "fp-2", 1) == "amount_mismatch"

    stats = await env.app.db.run(admin.stats)
    assert [(r.key, r.amount_minor, r.payments) for r in stats.revenue_by_method] == [("futurepay", 499, 1)]
    out = io.StringIO()
    await env.app.db.run(admin.export_payments_csv, out)
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert [(r["provider"], r["outcome"]) for r in rows] == [("futurepay", "granted"), ("futurepay", "amount_mismatch")]

    page = await env.app.db.run(history.history_page, user, 0, 10)
    assert [(e.purchase_id, e.method, e.outcome) for e in page.entries] == [
        (mismatched, "futurepay", "amount_mismatch"),
        (paid, "futurepay", "granted"),
    ]
    # One notice, for the payment that succeeded; the mismatch alerts the admins, naming the method.
    assert env.sql("SELECT dedupe_key, payload->>'text' FROM outbox WHERE chat_id = %s", (SALES_CHAT,)) == [
        (
            f"payment_notice:{paid}",
            f"💸 Payment #{paid}: 4.99 USD via futurepay\nUser: {user} (@user{user})\nPlan: m1\nPromo code: —\n"
            "Referrer: —",
        )
    ]
    alerts = env.sql("SELECT payload->>'text' FROM outbox WHERE chat_id = ANY(%s)", (list(ADMINS),))
    assert len(alerts) == len(ADMINS) and all("via futurepay" in text for (text,) in alerts)
