"""Money received: `finalize_purchase`, exactly once, in one transaction on one connection.

Whatever calls it — the Crypto Pay webhook, the watcher, Telegram's successful_payment, a balance
payment — and however often, late or concurrently, the first committed call grants and every other
one sees "already paid" and changes nothing:

1. the user's row, then the purchase's row are locked (the lock order of `vpnd.db.purchases`);
   the purchase's status moves to `paid` only from pending/expired/cancelled (compare-and-set);
2. the payment is inserted; `UNIQUE (purchase_id)` and `UNIQUE (provider, provider_payment_id)`
   back the idempotency up in the database itself;
3. the amount and currency are compared with the purchase; a mismatch is recorded (outcome
   `amount_mismatch`), alerted to every admin through the outbox, and grants nothing;
4. access is extended with `grant_days` (a plan) or the balance credited through the ledger (a
   top-up) on the same connection; the referrer's reward is credited once per purchase (the
   ledger's `UNIQUE (reason, reference)`);
5. a promo discount is honoured only when the code's use is consumed now, under its limit and once
   per user, and the purchase was not superseded by a newer one — so a code with `max_uses = N`
   gives at most N discounted grants however many invoices carried it. Otherwise the payment is
   *repriced*: valued at the list price (`list_amount_minor`), it buys the whole plans it covers and
   the rest is credited to the balance; the payment is flagged (`repriced`) and the admins alerted.
   A payment for a superseded invoice is alerted either way;
6. the user's "payment received" message is queued in the outbox with a dedupe key, and so is the
   admin chat's notice of the payment (`[payments] notify_chat_id`, `vpnd.db.history`), whatever the provider.

No HTTP, no second connection: the commit wakes the Xray writer and the outbox sender by itself
(`vpnd.db.notify`; `FinalizeOutcome.access_changed` / `.notified` say whether it will).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from typing import Any, Literal

import attrs
import psycopg
from psycopg.rows import class_row

from vpnd.db import gifts, history, ledger, outbox, promo, quota, referrals
from vpnd.db.history import AUTO_RENEW_PREFIX as AUTO_RENEW_PREFIX  # re-exported (admin_cli)
from vpnd.db.purchases import (
    MethodUnavailable,
    Purchase,
    PurchaseNotFound,
    PurchaseNotPayable,
    get_purchase,
    lock_user,
)
from vpnd.db.subscriptions import COLUMNS as SUBSCRIPTION_COLUMNS
from vpnd.db.subscriptions import Subscription, get_subscription, grant_days, switch_plan
from vpnd.db.users import language_of
from vpnd.money import STARS_CURRENCY, format_money
from vpnd.pricing import referral_level, referral_reward
from vpnd.quota import UNLIMITED, Limits, format_bytes
from vpnd.texts import Texts

log = logging.getLogger("vpnd.payments")

Provider = Literal["cryptopay", "stars", "balance", "card", "yookassa"]
FinalizeStatus = Literal[
    "granted",  # a plan's days were given
    "credited",  # a top-up reached the balance
    "gifted",  # a gift purchase made its gift (code); nobody's access changed yet
    "already_paid",  # this same payment was finalized before: nothing changed
    "amount_mismatch",  # recorded and alerted; no access
    "duplicate_payment",  # another payment already paid this purchase (or this provider id paid another)
    "unknown_purchase",  # alerted; nothing recorded
]


def _no_limits(plan_code: str | None, kind: str) -> Limits:
    return UNLIMITED


@attrs.frozen
class PaymentRules:
    """What finalize needs from the configuration and the texts, as values.

    The caller builds it (`vpnd.payments.service.rules_of`) from the running config — whose keys here
    are live on reload — and the texts loaded once at start; building it is cheap.
    """

    referral_percent: int
    admin_ids: tuple[int, ...]
    #: The balance (and referral rewards) are kept in this currency.
    balance_currency: str
    #: Messages queued for users are rendered in their language (vpnd/locales).
    texts: Texts
    default_language: str = "en"
    #: The chat told of every successful payment (`[payments] notify_chat_id`); None: nobody.
    notify_chat_id: int | None = None
    #: The limits of a subscription of (plan_code, kind) — `vpnd.quota.limits_of` over the running config.
    limits_for: Callable[[str | None, str], Limits] = _no_limits
    #: The bot's @username, for a gift's t.me link ("" when unknown in this process: the link is then
    #: the `/start gift_<code>` command to send the bot).
    bot_username: str = ""
    #: Cashback levels, (paying referrals, percent) ascending (`[referral] levels`); empty: `referral_percent`.
    referral_levels: tuple[tuple[int, int], ...] = ()

    @property
    def levels(self) -> tuple[tuple[int, int], ...]:
        return self.referral_levels or ((0, self.referral_percent),)

    def gift_link(self, code: str) -> str:
        if self.bot_username:
            return f"https://t.me/{self.bot_username}?start=gift_{code}"
        return f"/start gift_{code}"

    def announce(self, conn: psycopg.Connection[Any], purchase_id: int) -> None:
        """Queue the admin chat's notice of the payment just recorded, in the same transaction (once per purchase)."""
        if self.notify_chat_id is not None:
            history.queue_payment_notice(conn, self.notify_chat_id, self.texts, self.default_language, purchase_id)

    def text(self, conn: psycopg.Connection[Any], recipient: int, key: str, /, **values: object) -> str:
        """`key` rendered in the language of user `recipient` (values are HTML-escaped)."""
        return self.texts.get(language_of(conn, recipient, self.default_language), key, **values)


@attrs.frozen
class FinalizeOutcome:
    status: FinalizeStatus
    purchase_id: int
    user_id: int | None = None
    paid_late: bool = False
    #: The subscription after a plan was granted.
    subscription: Subscription | None = None
    #: The balance after a top-up was credited.
    balance_minor: int | None = None
    referral_reward_minor: int = 0
    promo_consumed: bool = False
    #: Outbox rows were queued (the commit wakes the outbox sender).
    notified: bool = False
    #: The promo discount was refused: valued at the list price, the rest credited (flagged, alerted).
    repriced: bool = False

    @property
    def applied(self) -> bool:
        """This call was the one that finalized the purchase (granted or credited)."""
        return self.status in ("granted", "credited", "gifted")

    @property
    def access_changed(self) -> bool:
        """Who may connect changed (the commit wakes the Xray writer)."""
        return self.status == "granted"


@attrs.frozen
class _Payment:
    provider: str
    provider_payment_id: str
    outcome: str
    purchase_id: int


def _fmt_date(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _alert_admins(conn: psycopg.Connection[Any], rules: PaymentRules, kind: str, key: str, **fields: object) -> bool:
    queued = False
    for admin_id in rules.admin_ids:
        text = rules.text(conn, admin_id, f"admin.{kind}", **fields)
        queued |= outbox.enqueue(conn, admin_id, text, dedupe_key=f"alert:{kind}:{key}:{admin_id}")
    log.warning("event=payment_%s %s", kind, " ".join(f"{k}={v}" for k, v in fields.items()))
    return queued


def _payment_for_purchase(conn: psycopg.Connection[Any], purchase_id: int) -> _Payment | None:
    row = conn.execute(
        "SELECT provider, provider_payment_id, outcome, purchase_id FROM payments WHERE purchase_id = %s",
        (purchase_id,),
    ).fetchone()
    return _Payment(*row) if row else None


def _payment_by_provider_id(conn: psycopg.Connection[Any], provider: str, provider_payment_id: str) -> _Payment | None:
    row = conn.execute(
        "SELECT provider, provider_payment_id, outcome, purchase_id FROM payments "
        "WHERE provider = %s AND provider_payment_id = %s",
        (provider, provider_payment_id),
    ).fetchone()
    return _Payment(*row) if row else None


def _expected(purchase: Purchase, provider: str) -> tuple[int | None, str]:
    """What this purchase must be paid with through `provider` (Stars: the Stars amount, in XTR)."""
    if provider != purchase.method:
        return None, ""
    if provider == "stars":
        return purchase.stars, STARS_CURRENCY
    return purchase.amount_minor, purchase.currency


def finalize_purchase(
    conn: psycopg.Connection[Any],
    purchase_id: int,
    *,
    provider: Provider,
    provider_payment_id: str,
    amount_minor: int,
    currency: str,
    rules: PaymentRules,
    telegram_charge_id: str | None = None,
) -> FinalizeOutcome:
    """Record a payment received for `purchase_id` and give what was bought, exactly once.

    `amount_minor`/`currency` are what the provider says was paid (Stars: the number of Stars and
    "XTR"). A card payment is keyed by the provider's charge id and keeps Telegram's (`telegram_charge_id`).
    Run it as the whole of a transaction (`await db.run(finalize_purchase, ...)`), or as the
    last step of one (`pay_from_balance`). See the module docstring for the steps.
    """
    received = format_money(amount_minor, currency)
    owner = conn.execute("SELECT user_id FROM purchases WHERE id = %s", (purchase_id,)).fetchone()
    if owner is None:
        notified = _alert_admins(
            conn, rules, "payment_unknown", f"{provider}:{provider_payment_id}",
            purchase_id=purchase_id, received=received, provider=provider, provider_payment_id=provider_payment_id,
        )  # fmt: skip
        return FinalizeOutcome("unknown_purchase", purchase_id, notified=notified)
    user_id = int(owner[0])
    lock_user(conn, user_id)
    purchase = get_purchase(conn, purchase_id, lock=True)
    assert purchase is not None  # purchases are never deleted

    earlier = _payment_for_purchase(conn, purchase_id)
    if earlier is not None and (earlier.provider, earlier.provider_payment_id) == (provider, provider_payment_id):
        return FinalizeOutcome("already_paid", purchase_id, user_id, purchase.paid_late)
    if earlier is None:
        earlier = _payment_by_provider_id(conn, provider, provider_payment_id)
    if earlier is not None:
        notified = _alert_admins(
            conn, rules, "payment_duplicate", f"{provider}:{provider_payment_id}",
            purchase_id=purchase_id, user_id=user_id, received=received, provider=provider,
            provider_payment_id=provider_payment_id,
            first=f"{earlier.provider} {earlier.provider_payment_id} (purchase #{earlier.purchase_id})",
        )  # fmt: skip
        return FinalizeOutcome("duplicate_payment", purchase_id, user_id, notified=notified)

    now = _now(conn)
    paid_late = purchase.status != "pending" or purchase.expires_at <= now
    expected_amount, expected_currency = _expected(purchase, provider)
    matches = expected_amount == amount_minor and expected_currency.upper() == currency.upper()
    conn.execute(
        "UPDATE purchases SET status = 'paid', paid_at = now(), paid_late = %s WHERE id = %s",
        (paid_late, purchase_id),
    )

    if not matches:
        _insert_payment(
            conn, purchase, provider, provider_payment_id, amount_minor, currency, "amount_mismatch",
            telegram_charge_id=telegram_charge_id,
        )  # fmt: skip
        expected = (
            format_money(expected_amount, expected_currency) if expected_amount is not None else f"a {purchase.method}"
        )
        _alert_admins(
            conn, rules, "payment_mismatch", f"{provider}:{provider_payment_id}",
            purchase_id=purchase_id, user_id=user_id, expected=expected, received=received, provider=provider,
            provider_payment_id=provider_payment_id,
        )  # fmt: skip
        mismatch_text = rules.text(conn, user_id, "payments.mismatch_user")
        outbox.enqueue(conn, user_id, mismatch_text, dedupe_key=f"payment:{purchase_id}")
        return FinalizeOutcome("amount_mismatch", purchase_id, user_id, paid_late, notified=True)

    paid = format_money(purchase.amount_minor, purchase.currency)
    if provider == "stars":
        paid = format_money(amount_minor, currency)
    if purchase.kind == "pack":
        return _finalize_pack(
            conn, purchase, provider, provider_payment_id, amount_minor, currency, paid, paid_late, rules,
            telegram_charge_id,
        )  # fmt: skip
    if purchase.kind == "gift":
        return _finalize_gift(
            conn, purchase, provider, provider_payment_id, amount_minor, currency, paid, paid_late, rules,
            telegram_charge_id,
        )  # fmt: skip
    if purchase.kind != "plan":
        ledger.record(conn, user_id, purchase.amount_minor, ledger.TOPUP, ledger.purchase_reference(purchase_id))
        topped_up = ledger.balance_of(conn, user_id)
        text = rules.text(
            conn, user_id, "payments.received_topup", amount=paid, balance=format_money(topped_up, purchase.currency)
        )
        if paid_late:
            text += "\n" + rules.text(conn, user_id, "payments.received_late")
        _insert_payment(
            conn, purchase, provider, provider_payment_id, amount_minor, currency, "granted",
            credited_minor=purchase.amount_minor, telegram_charge_id=telegram_charge_id,
        )  # fmt: skip
        outbox.enqueue(conn, user_id, text, dedupe_key=f"payment:{purchase_id}")
        rules.announce(conn, purchase_id)
        return FinalizeOutcome("credited", purchase_id, user_id, paid_late, balance_minor=topped_up, notified=True)

    if not purchase.days:
        raise ValueError(f"purchase {purchase_id} is a plan without days")
    referrer = _lock_referrer(conn, user_id, rules)  # before the promo code's row: the lock order
    consumed = False
    if purchase.promo_code and purchase.superseded_by is None:
        consumed = promo.consume(conn, purchase.promo_code, user_id, purchase_id)
    discounted = purchase.discount_percent > 0 or (
        purchase.list_amount_minor is not None and purchase.amount_minor < purchase.list_amount_minor
    )
    refused = purchase.promo_code is not None and discounted and not consumed
    value = Valuation(purchase.days, 0, 0, purchase.amount_minor)
    if refused:
        value = _at_list_price(purchase, rules)

    subscription: Subscription | None = None
    balance: int | None = None
    upgraded: bool | None = None  # None: not an upgrade; False: its basis had changed (granted as a purchase)
    if value.days:
        subscription, upgraded = _grant_plan(conn, purchase, value.days)
    if value.credited_minor:
        ledger.record(
            conn, user_id, value.credited_minor, ledger.PAYMENT_CREDIT, ledger.purchase_reference(purchase_id)
        )
        balance = ledger.balance_of(conn, user_id)
    _insert_payment(
        conn, purchase, provider, provider_payment_id, amount_minor, currency, "granted",
        granted_days=value.days or None, credited_minor=value.credited_minor, repriced=refused,
        telegram_charge_id=telegram_charge_id,
    )  # fmt: skip

    if refused:
        text = rules.text(
            conn, user_id, "payments.received_repriced", amount=paid, code=purchase.promo_code,
            price=_list_price_text(purchase),
        )  # fmt: skip
        if subscription is not None:
            text += "\n" + rules.text(
                conn, user_id, "payments.repriced_days", days=value.days, expires=_fmt_date(subscription.expires_at)
            )
        if balance is not None:
            text += "\n" + rules.text(
                conn, user_id, "payments.repriced_credit",
                credited=format_money(value.credited_minor, purchase.currency),
                balance=format_money(balance, purchase.currency),
            )  # fmt: skip
    elif upgraded:
        assert subscription is not None
        text = rules.text(
            conn, user_id, "payments.received_upgrade", amount=paid, credit=_credit_text(purchase),
            days=purchase.days, expires=_fmt_date(subscription.expires_at),
        )  # fmt: skip
        if paid_late:
            text += "\n" + rules.text(conn, user_id, "payments.received_late")
    else:
        assert subscription is not None
        text = rules.text(
            conn,
            user_id,
            "payments.received_plan",
            amount=paid,
            days=purchase.days,
            expires=_fmt_date(subscription.expires_at),
        )
        if upgraded is False:
            text += "\n" + rules.text(conn, user_id, "payments.upgrade_basis_changed", credit=_credit_text(purchase))
        if paid_late:
            text += "\n" + rules.text(conn, user_id, "payments.received_late")
    if refused or purchase.superseded_by is not None:
        _alert_flagged(conn, rules, purchase, refused, value, received, provider, provider_payment_id)

    reward = _reward_referrer(conn, purchase, referrer, value.bought_minor, rules) if referrer is not None else 0
    if subscription is not None:  # the key message: QR code photo, link and connect buttons (`vpnd.key_message`)
        language = language_of(conn, user_id, rules.default_language)
        outbox.enqueue(
            conn, user_id, text, dedupe_key=f"payment:{purchase_id}", method=outbox.KEY_METHOD, extra={"lang": language}
        )
    else:
        outbox.enqueue(conn, user_id, text, dedupe_key=f"payment:{purchase_id}")
    rules.announce(conn, purchase_id)
    return FinalizeOutcome(
        "granted" if value.days else "credited",
        purchase_id,
        user_id,
        paid_late,
        subscription=subscription,
        balance_minor=balance,
        referral_reward_minor=reward,
        promo_consumed=consumed,
        notified=True,
        repriced=refused,
    )


def _credit_text(purchase: Purchase) -> str:
    if purchase.method == "stars":
        return format_money(purchase.upgrade_credit_minor, STARS_CURRENCY)
    return format_money(purchase.upgrade_credit_minor, purchase.currency)


def _grant_plan(conn: psycopg.Connection[Any], purchase: Purchase, days: int) -> tuple[Subscription, bool | None]:
    """Give a plan purchase its days; returns the subscription and whether it was an upgrade (None: not one).

    A pro-rata upgrade switches the subscription to the new plan from now for its days (`switch_plan`)
    when its basis still holds: the plan it replaces is still the running one. If that plan was renewed
    after the quote (it now ends later than `upgrade_basis_expires_at`), the time the renewal added is kept
    on top. If the basis is gone — the old plan ended, or another plan runs now — the credit has nothing
    left to replace, and the payment is granted like any purchase (`grant_days`: from now when nothing
    runs, stacked onto a running plan otherwise), returning False so the user is told.
    """
    user_id = purchase.user_id
    assert purchase.plan_code is not None
    if purchase.upgrade_from is not None:
        quota.lock_subscription(conn, user_id)  # the lock order: user, purchase, subscription
        current = get_subscription(conn, user_id)
        if current is not None and current.is_active(_now(conn)) and current.plan_code == purchase.upgrade_from:
            basis = purchase.upgrade_basis_expires_at or current.expires_at
            keep = max(0, (current.expires_at - basis) // dt.timedelta(seconds=1))
            return switch_plan(conn, user_id, days, purchase.plan_code, keep_seconds=keep), True
        log.info("event=upgrade_basis_changed purchase_id=%s user_id=%s", purchase.id, user_id)
        return grant_days(conn, user_id, days, kind="paid", plan_code=purchase.plan_code), False
    return grant_days(conn, user_id, days, kind="paid", plan_code=purchase.plan_code), None


def _finalize_pack(
    conn: psycopg.Connection[Any],
    purchase: Purchase,
    provider: str,
    provider_payment_id: str,
    amount_minor: int,
    currency: str,
    paid: str,
    paid_late: bool,
    rules: PaymentRules,
    telegram_charge_id: str | None,
) -> FinalizeOutcome:
    """A traffic pack: its bytes are added to the current period of a subscription with a quota.

    Lock order: the user's row and the purchase's (held by finalize), then the subscription's
    (`quota.lock_subscription`), then its period's (`quota.add_extra`). When the payment lands and the
    user has no active subscription with a traffic quota any more (it ended, or moved to an unlimited
    plan), the pack's price is credited to the balance instead (like a repriced plan), and the user is
    told; in another currency than the balance's it cannot be, and the admins are alerted.
    """
    user_id = purchase.user_id
    pack_bytes = purchase.pack_bytes or 0
    quota.lock_subscription(conn, user_id)
    sub = get_subscription(conn, user_id)
    limits = rules.limits_for(sub.plan_code, sub.kind) if sub is not None else UNLIMITED
    if sub is not None and sub.is_active(_now(conn)) and limits.limits_traffic and pack_bytes > 0:
        period = quota.add_extra(conn, user_id, pack_bytes, limits)  # opens the period if none is current yet
        assert period is not None
        _insert_payment(
            conn, purchase, provider, provider_payment_id, amount_minor, currency, "granted",
            granted_bytes=pack_bytes, telegram_charge_id=telegram_charge_id,
        )  # fmt: skip
        text = rules.text(
            conn, user_id, "payments.received_pack", amount=paid, added=format_bytes(pack_bytes),
            used=format_bytes(period.used_bytes), total=format_bytes(quota.total_bytes(limits, period)),
        )  # fmt: skip
        if paid_late:
            text += "\n" + rules.text(conn, user_id, "payments.received_late")
        outbox.enqueue(conn, user_id, text, dedupe_key=f"payment:{purchase.id}")
        rules.announce(conn, purchase.id)
        return FinalizeOutcome("granted", purchase.id, user_id, paid_late, subscription=sub, notified=True)

    value = purchase.amount_minor  # for Stars: the price the Stars stood for
    same_currency = purchase.currency.upper() == rules.balance_currency.upper()
    credited = value if same_currency else 0
    balance: int | None = None
    if credited:
        ledger.record(conn, user_id, credited, ledger.PAYMENT_CREDIT, ledger.purchase_reference(purchase.id))
        balance = ledger.balance_of(conn, user_id)
        text = rules.text(
            conn, user_id, "payments.pack_credited", amount=paid,
            credited=format_money(credited, purchase.currency), balance=format_money(balance, purchase.currency),
        )  # fmt: skip
    else:
        text = rules.text(conn, user_id, "payments.pack_not_credited", amount=paid)
        _alert_admins(
            conn, rules, "pack_uncredited", f"{provider}:{provider_payment_id}",
            purchase_id=purchase.id, user_id=user_id, received=paid, provider=provider,
        )  # fmt: skip
    _insert_payment(
        conn, purchase, provider, provider_payment_id, amount_minor, currency, "granted",
        credited_minor=credited, telegram_charge_id=telegram_charge_id,
    )  # fmt: skip
    log.info("event=pack_credited purchase_id=%s user_id=%s credited=%s", purchase.id, user_id, credited)
    outbox.enqueue(conn, user_id, text, dedupe_key=f"payment:{purchase.id}")
    rules.announce(conn, purchase.id)
    return FinalizeOutcome("credited", purchase.id, user_id, paid_late, balance_minor=balance, notified=True)


def _finalize_gift(
    conn: psycopg.Connection[Any],
    purchase: Purchase,
    provider: str,
    provider_payment_id: str,
    amount_minor: int,
    currency: str,
    paid: str,
    paid_late: bool,
    rules: PaymentRules,
    telegram_charge_id: str | None,
) -> FinalizeOutcome:
    """A gift: the buyer's subscription is left alone; a gift (`vpnd.db.gifts`) with a new code is made,
    and the buyer gets the code and its link. Its value (what a refund to the balance credits) is the
    purchase's price — for Stars the fiat price the Stars stood for. No promo code applies to a gift and
    it earns no referral reward (a refunded gift would otherwise leave the reward behind)."""
    assert purchase.plan_code is not None and purchase.days
    gift = gifts.create_gift(
        conn, purchase.id, purchase.user_id, purchase.plan_code, purchase.days, purchase.amount_minor,
        purchase.currency,
    )  # fmt: skip
    _insert_payment(
        conn, purchase, provider, provider_payment_id, amount_minor, currency, "granted",
        telegram_charge_id=telegram_charge_id,
    )  # fmt: skip
    user_id = purchase.user_id
    text = rules.text(
        conn, user_id, "payments.received_gift", amount=paid, days=purchase.days, code=gift.code,
        link=rules.gift_link(gift.code),
    )  # fmt: skip
    if paid_late:
        text += "\n" + rules.text(conn, user_id, "payments.received_late")
    outbox.enqueue(conn, user_id, text, dedupe_key=f"payment:{purchase.id}")
    rules.announce(conn, purchase.id)
    log.info("event=gift_created purchase_id=%s user_id=%s gift_id=%s", purchase.id, user_id, gift.id)
    return FinalizeOutcome("gifted", purchase.id, user_id, paid_late, notified=True)


@attrs.frozen
class Valuation:
    """What a plan payment gives: days, balance credit, what could not be credited, and the value of the days."""

    days: int
    credited_minor: int
    uncredited_minor: int
    #: The part of the payment that bought days (the base of the referral reward).
    bought_minor: int


def _at_list_price(purchase: Purchase, rules: PaymentRules) -> Valuation:
    """A discounted payment whose discount was refused: whole plans at the list price, the rest to the balance.

    The money's value is the purchase's price (`amount_minor`, in its currency; for Stars the fiat price
    the Stars stood for). Less than one plan buys no days: it all goes to the balance. When the plan's
    currency is not the balance's, the rest cannot be credited and is left to the admins (alerted).
    """
    assert purchase.days
    paid = purchase.amount_minor
    plans = paid // purchase.list_amount_minor if purchase.list_amount_minor else 0
    bought = plans * (purchase.list_amount_minor or 0)
    rest = paid - bought
    if purchase.currency.upper() != rules.balance_currency.upper():
        return Valuation(plans * purchase.days, 0, rest, bought)
    return Valuation(plans * purchase.days, rest, 0, bought)


def _list_price_text(purchase: Purchase) -> str:
    if purchase.list_amount_minor is None:
        return "?"
    return format_money(purchase.list_amount_minor, purchase.currency)


def _alert_flagged(
    conn: psycopg.Connection[Any],
    rules: PaymentRules,
    purchase: Purchase,
    refused: bool,
    value: Valuation,
    received: str,
    provider: str,
    provider_payment_id: str,
) -> None:
    """Tell the admins about a payment for a superseded invoice or at a refused discount (what it got)."""
    for admin_id in rules.admin_ids:
        why_key = "admin.flag.superseded" if purchase.superseded_by is not None else "admin.flag.promo_used"
        why = rules.text(conn, admin_id, why_key, code=purchase.promo_code or "", newer=purchase.superseded_by or "")
        text = rules.text(
            conn, admin_id, "admin.payment_flagged",
            purchase_id=purchase.id, user_id=purchase.user_id, received=received, provider=provider,
            provider_payment_id=provider_payment_id, why=why,
            price=_list_price_text(purchase) if refused else format_money(purchase.amount_minor, purchase.currency),
            days=value.days, credited=format_money(value.credited_minor, purchase.currency),
            uncredited=format_money(value.uncredited_minor, purchase.currency),
        )  # fmt: skip
        key = f"alert:payment_flagged:{provider}:{provider_payment_id}:{admin_id}"
        outbox.enqueue(conn, admin_id, text, dedupe_key=key)
    log.warning(
        "event=payment_flagged purchase_id=%s user_id=%s superseded_by=%s repriced=%s days=%s credited=%s "
        "uncredited=%s",
        purchase.id, purchase.user_id, purchase.superseded_by, refused, value.days, value.credited_minor,
        value.uncredited_minor,
    )  # fmt: skip


def _insert_payment(
    conn: psycopg.Connection[Any],
    purchase: Purchase,
    provider: str,
    provider_payment_id: str,
    amount_minor: int,
    currency: str,
    outcome: str,
    *,
    granted_days: int | None = None,
    credited_minor: int = 0,
    repriced: bool = False,
    telegram_charge_id: str | None = None,
    granted_bytes: int | None = None,
) -> None:
    conn.execute(
        "INSERT INTO payments (purchase_id, user_id, provider, provider_payment_id, amount_minor, currency, outcome, "
        "granted_days, credited_minor, repriced, telegram_payment_charge_id, granted_bytes) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (purchase.id, purchase.user_id, provider, provider_payment_id, amount_minor, currency, outcome,
         granted_days, credited_minor, repriced, telegram_charge_id, granted_bytes),
    )  # fmt: skip


def _lock_referrer(conn: psycopg.Connection[Any], user_id: int, rules: PaymentRules) -> int | None:
    """The user's referrer, its row locked (the lock order), when referral rewards are on."""
    if all(percent <= 0 for _, percent in rules.levels):
        return None
    row = conn.execute(
        "SELECT r.id FROM users u JOIN users r ON r.id = u.referred_by WHERE u.id = %s FOR UPDATE OF r", (user_id,)
    ).fetchone()
    return int(row[0]) if row else None


def _now(conn: psycopg.Connection[Any]) -> dt.datetime:
    row = conn.execute("SELECT now()").fetchone()
    assert row is not None
    value: dt.datetime = row[0]
    return value


def _reward_referrer(
    conn: psycopg.Connection[Any], purchase: Purchase, referrer: int, bought_minor: int, rules: PaymentRules
) -> int:
    """Credit the referrer's share of what a plan purchase bought, once per purchase; return the reward."""
    if purchase.currency.upper() != rules.balance_currency.upper():
        return 0
    # The referrer's level now, in this transaction (this payment's buyer counts as paying already).
    level = referral_level(rules.levels, referrals.paying_referrals(conn, referrer))
    reward = referral_reward(bought_minor, level[1] if level else 0)
    if reward <= 0:
        return 0
    entry = ledger.record(conn, referrer, reward, ledger.REFERRAL_REWARD, ledger.purchase_reference(purchase.id))
    if entry is None:
        return 0
    outbox.enqueue(
        conn,
        referrer,
        rules.text(conn, referrer, "payments.referral_reward", amount=format_money(reward, purchase.currency)),
        dedupe_key=f"referral_reward:{purchase.id}",
    )
    return reward


def pay_from_balance(
    conn: psycopg.Connection[Any], user_id: int, purchase_id: int, *, rules: PaymentRules
) -> FinalizeOutcome:
    """Pay a pending `balance` purchase from the user's balance, in the caller's transaction.

    With the user's row locked: the purchase must be this user's, a plan, pending and unexpired, in
    the balance currency; the debit goes through the ledger (reason `purchase`, reference
    `purchase:<id>`), then `finalize_purchase` grants. Raises (and so rolls back everything):
    PurchaseNotFound, PurchaseNotPayable, MethodUnavailable, ledger.InsufficientBalance.
    """
    lock_user(conn, user_id)
    purchase = get_purchase(conn, purchase_id, lock=True)
    if purchase is None or purchase.user_id != user_id:
        raise PurchaseNotFound(purchase_id)
    if purchase.status == "paid":
        raise PurchaseNotPayable("payments.already_paid")
    if purchase.method != "balance" or purchase.kind == "topup":
        raise PurchaseNotPayable("payments.wrong_method")
    if not purchase.is_payable(_now(conn)):
        raise PurchaseNotPayable("payments.expired")
    if purchase.currency.upper() != rules.balance_currency.upper():
        raise MethodUnavailable("the plan is priced in another currency than the balance")
    reference = ledger.purchase_reference(purchase_id)
    if ledger.record(conn, user_id, -purchase.amount_minor, ledger.PURCHASE, reference) is None:
        raise PurchaseNotPayable("payments.already_paid")
    return finalize_purchase(
        conn,
        purchase_id,
        provider="balance",
        provider_payment_id=reference,
        amount_minor=purchase.amount_minor,
        currency=purchase.currency,
        rules=rules,
    )


def record_auto_renewal(
    conn: psycopg.Connection[Any],
    user_id: int,
    *,
    plan_code: str,
    days: int,
    amount_minor: int,
    currency: str,
    ledger_reference: str,
) -> int:
    """The purchase and payment rows of an auto-renewal the caller has just charged and granted.

    An auto-renewal is a plan purchase paid from the balance like any other (stats, CSV exports and
    the user's payment history see it so); it supersedes nothing and sends no "payment received"
    message (the renewal worker sends its own). Idempotent with the charge: the payment id is the
    ledger reference of the charge, unique per provider. Returns the purchase id.
    """
    row = conn.execute(
        """
        INSERT INTO purchases (user_id, kind, plan_code, days, method, amount_minor, currency, status, expires_at,
                               paid_at, list_amount_minor)
        VALUES (%s, 'plan', %s, %s, 'balance', %s, %s, 'paid', now(), now(), %s)
        RETURNING id
        """,
        (user_id, plan_code, days, amount_minor, currency, amount_minor),
    ).fetchone()
    assert row is not None
    purchase_id = int(row[0])
    conn.execute(
        "INSERT INTO payments (purchase_id, user_id, provider, provider_payment_id, amount_minor, currency, outcome, "
        "granted_days) VALUES (%s, %s, 'balance', %s, %s, %s, 'granted', %s)",
        (purchase_id, user_id, AUTO_RENEW_PREFIX + ledger_reference, amount_minor, currency, days),
    )
    return purchase_id


@attrs.frozen
class PaymentRecord:
    id: int
    purchase_id: int
    user_id: int
    provider: str
    provider_payment_id: str
    amount_minor: int
    currency: str
    outcome: str
    created_at: dt.datetime


def payments_of(
    conn: psycopg.Connection[Any], user_id: int, *, before_id: int | None = None, limit: int = 20
) -> list[PaymentRecord]:
    """A user's payments, newest first, in keyset pages (for admin lookup)."""
    rows = conn.execute(
        "SELECT id, purchase_id, user_id, provider, provider_payment_id, amount_minor, currency, outcome, created_at "
        "FROM payments WHERE user_id = %s AND id < %s ORDER BY id DESC LIMIT %s",
        (user_id, before_id if before_id is not None else 2**63 - 1, limit),
    ).fetchall()
    return [PaymentRecord(*row) for row in rows]


def stars_charge(conn: psycopg.Connection[Any], purchase_id: int) -> tuple[int, str] | None:
    """(user_id, telegram_payment_charge_id) of a purchase paid with Stars — what refundStarPayment needs."""
    row = conn.execute(
        "SELECT user_id, provider_payment_id FROM payments WHERE purchase_id = %s AND provider = 'stars'",
        (purchase_id,),
    ).fetchone()
    return (int(row[0]), str(row[1])) if row else None


def mark_refunded(conn: psycopg.Connection[Any], purchase_id: int) -> bool:
    """Record that the payment of a purchase was refunded (after refundStarPayment succeeded)."""
    row = conn.execute(
        "UPDATE payments SET outcome = 'refunded' WHERE purchase_id = %s AND outcome <> 'refunded' RETURNING id",
        (purchase_id,),
    ).fetchone()
    return row is not None


@attrs.frozen
class RefundReversal:
    """What `reverse_refunded_purchase` took back (nothing when `recorded` is False: done before)."""

    recorded: bool
    user_id: int | None = None
    days_removed: int = 0
    #: The subscription after the days were taken back (None: no days to take back).
    subscription: Subscription | None = None
    #: The days taken back ended the subscription (Xray must drop the user now).
    access_ended: bool = False
    referrer_id: int | None = None
    referral: ledger.Reversal | None = None
    credit: ledger.Reversal | None = None
    notified: bool = False
    #: A traffic pack's bytes taken back from the current period.
    bytes_taken: int = 0


SHORTEN = f"""
UPDATE subscriptions SET
    expires_at = greatest(expires_at - %(days)s * interval '1 day', least(expires_at, now())),
    status = CASE WHEN status = 'active' AND expires_at - %(days)s * interval '1 day' <= now()
                  THEN 'expired' ELSE status END,
    updated_at = now()
WHERE user_id = %(user_id)s
RETURNING {SUBSCRIPTION_COLUMNS}
"""


def reverse_refunded_purchase(
    conn: psycopg.Connection[Any], purchase_id: int, *, rules: PaymentRules
) -> RefundReversal:
    """Record a refund (after the provider refunded) and take back everything the purchase gave, once.

    In one transaction, with the lock order (the buyer's row, the purchase's, the referrer's): the
    payment becomes `refunded` (compare-and-set: a second call changes nothing); the days it granted
    are taken off the subscription (ended at once when that reaches the past — the commit wakes the
    Xray writer); the referrer's reward and any balance the payment credited are debited through the
    ledger — as far as each balance goes, the rest recorded as owed (`ledger.debit_or_owe`), never
    a negative balance; the user is told.
    """
    owner = conn.execute("SELECT user_id FROM purchases WHERE id = %s", (purchase_id,)).fetchone()
    if owner is None:
        return RefundReversal(False)
    user_id = int(owner[0])
    lock_user(conn, user_id)
    purchase = get_purchase(conn, purchase_id, lock=True)
    assert purchase is not None
    row = conn.execute(
        "UPDATE payments p SET outcome = 'refunded' FROM payments old "
        "WHERE p.id = old.id AND p.purchase_id = %s AND old.outcome <> 'refunded' "
        "RETURNING old.outcome, p.granted_days, p.credited_minor, p.granted_bytes, p.created_at",
        (purchase_id,),
    ).fetchone()
    if row is None:
        return RefundReversal(False, user_id)
    previous, granted_days, credited = str(row[0]), row[1], int(row[2])
    granted_bytes, paid_at = int(row[3] or 0), row[4]
    if previous != "granted":  # an amount mismatch gave nothing
        return RefundReversal(True, user_id)
    if purchase.kind == "gift":
        gifts.void_refunded_purchase(conn, purchase_id)  # a redeemed one gave its days to someone else
    reference = ledger.purchase_reference(purchase_id)

    subscription: Subscription | None = None
    days = int(granted_days or 0)
    if days:
        with conn.cursor(row_factory=class_row(Subscription)) as cur:
            subscription = cur.execute(SHORTEN, {"days": days, "user_id": user_id}).fetchone()
    credit = ledger.debit_or_owe(conn, user_id, credited, ledger.REFUND, reference) if credited else None
    bytes_taken = _take_back_pack(conn, user_id, granted_bytes, paid_at, rules) if granted_bytes else 0

    referrer_id: int | None = None
    referral: ledger.Reversal | None = None
    reward = conn.execute(
        "SELECT user_id, delta_minor FROM balance_ledger WHERE reason = %s AND reference = %s",
        (ledger.REFERRAL_REWARD, reference),
    ).fetchone()
    if reward is not None:
        referrer_id = int(reward[0])
        referral = ledger.debit_or_owe(conn, referrer_id, int(reward[1]), ledger.REFERRAL_REVERSAL, reference)

    ended = subscription is not None and not subscription.is_active(_now(conn))
    if bytes_taken:
        text = rules.text(conn, user_id, "payments.refunded_pack", id=purchase_id, taken=format_bytes(bytes_taken))
    elif subscription is None:
        text = rules.text(conn, user_id, "payments.refunded_user", id=purchase_id)
    elif ended:
        text = rules.text(conn, user_id, "payments.refunded_ended", id=purchase_id, days=days)
    else:
        text = rules.text(
            conn, user_id, "payments.refunded_shortened", id=purchase_id, days=days,
            expires=_fmt_date(subscription.expires_at),
        )  # fmt: skip
    notified = outbox.enqueue(conn, user_id, text, dedupe_key=f"refund:{purchase_id}")
    log.info(
        "event=refund_reversed purchase_id=%s user_id=%s days=%s ended=%s referrer=%s referral=%s credit=%s",
        purchase_id, user_id, days, ended, referrer_id, referral, credit,
    )  # fmt: skip
    return RefundReversal(
        True, user_id, days, subscription, ended, referrer_id, referral, credit, notified=notified,
        bytes_taken=bytes_taken,
    )  # fmt: skip


def _take_back_pack(
    conn: psycopg.Connection[Any], user_id: int, granted_bytes: int, paid_at: dt.datetime, rules: PaymentRules
) -> int:
    """A refunded traffic pack: take back what is left of its bytes, if the period it went into still runs.

    The pack went into the period current when it was paid; if that period is still the current one (it
    started before the payment and has not ended), its extra quota is lowered by the pack's bytes, but
    only as far as they are unused (`total − used`, and never below the other extras): traffic already
    used is not clawed back (the user may then stand exactly at 100 % and is blocked by the next traffic
    reading). A period that rolled over since, or a subscription without one, loses nothing. Returns
    the bytes taken back. Lock order: the user and the purchase (held), the subscription, its period.
    """
    locked = quota.lock_subscription(conn, user_id)
    if locked is None:
        return 0
    plan_code, kind, _status = locked
    period = quota.current_period(conn, user_id)
    now = _now(conn)
    if period is None or period.started_at > paid_at or (period.ends_at is not None and period.ends_at <= now):
        return 0
    limits = rules.limits_for(plan_code, kind)
    left = max(0, quota.total_bytes(limits, period) - period.used_bytes) if limits.limits_traffic else granted_bytes
    taken = min(granted_bytes, left, period.extra_bytes)
    if taken > 0:
        conn.execute(
            "UPDATE traffic_periods SET extra_bytes = extra_bytes - %s WHERE user_id = %s AND current", (taken, user_id)
        )
    log.info("event=pack_refunded user_id=%s granted_bytes=%s taken=%s", user_id, granted_bytes, taken)
    return taken
