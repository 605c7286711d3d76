"""Payment orchestration for the Telegram layer: async functions over `app.db.run` and providers.

Every database step is its own short transaction; provider calls (Crypto Pay) happen between
them, never inside one. A transaction that granted access or queued messages wakes the Xray
writer and the outbox sender by itself at commit (`vpnd.db.notify`).

Crypto Pay: `start_cryptopay_purchase` commits the purchase first, then creates the invoice
(payload = the purchase id), then attaches it — so a crash at any point leaves either nothing
payable or a purchase the webhook and the watcher can both match.

A new purchase (any method) supersedes the user's older pending ones; after its commit the
superseded Crypto Pay invoices are deleted at the provider (`delete_superseded_invoices`), within
a bound and never failing the new purchase: a deletion that fails or comes too late is covered by
finalize, which never honours a superseded purchase's discount (and the watcher retries it).

Telegram Stars: `start_stars_purchase` gives what `sendInvoice` needs (currency "XTR", one price,
payload = the purchase id); `check_pre_checkout` answers the pre_checkout_query; and
`finalize_stars_payment` handles successful_payment, keyed by `telegram_payment_charge_id`.

Cards (Telegram Payments, `[telegram_payments]`): the same with the provider token BotFather connected,
the plan's price in the card currency in its minor units, and `finalize_card_payment` keyed by the
provider's charge id (`provider_payment_charge_id`), Telegram's stored beside it.
"""

from __future__ import annotations

import datetime as dt
import html
import logging
from functools import partial
from typing import Any

import attrs
import psycopg
import trio

from vpnd import alerts
from vpnd.app import App
from vpnd.config import Config, Plan, TrafficPack
from vpnd.cryptopay import CryptoPayClient, CryptoPayError, Invoice, InvoiceNotFound
from vpnd.db import ledger, promo, purchases, subscriptions, users
from vpnd.db.incidents import incident_is_open
from vpnd.db.payments import FinalizeOutcome, PaymentRules, finalize_purchase, pay_from_balance
from vpnd.db.purchases import (
    MethodUnavailable,
    PackNotAvailable,
    ProviderUnavailable,
    Purchase,
    PurchaseNotPayable,
    UnknownPlan,
    UpgradeBasis,
)
from vpnd.money import format_money
from vpnd.pricing import (
    STARS_CURRENCY,
    InvalidAmount,
    Offer,
    Price,
    UpgradeTerms,
    from_minor,
    min_price_minor,
    pack_offer,
    plan_offer,
    price_offer,
    receipt_provider_data,
    received_to_minor,
    topup_offer,
)
from vpnd.quota import limits_of
from vpnd.texts import Texts

log = logging.getLogger("vpnd.payments")


def _plain(texts: Texts, language: str, key: str, **values: object) -> str:
    """Invoice descriptions are plain text (Crypto Pay, Telegram invoices), not HTML."""
    return html.unescape(texts.get(language, key, **values))


PRE_CHECKOUT_UNKNOWN = "payments.precheckout.unknown"
PRE_CHECKOUT_ALREADY_PAID = "payments.precheckout.already_paid"
PRE_CHECKOUT_EXPIRED = "payments.precheckout.expired"
PRE_CHECKOUT_MISMATCH = "payments.precheckout.amount_mismatch"

#: Crypto Pay refuses an `expires_in` below one second; leave room for clock skew.
MIN_INVOICE_SECONDS = 60
#: How long a new purchase may spend deleting the invoices it superseded before it answers the user.
DELETE_BUDGET_SECONDS = 8


def rules_of(app: App) -> PaymentRules:
    """The payment rules from the running config (its keys here are live on reload) and the app's texts."""
    config = app.config
    return PaymentRules(
        config.referral.percent,
        tuple(config.telegram.admin_ids),
        config.payments.currency,
        app.texts,
        default_language=config.telegram.default_language,
        notify_chat_id=config.payments.notify_chat_id or None,
        limits_for=partial(limits_of, config),
        bot_username=app.bot_username,
        referral_levels=tuple((level.paying, level.percent) for level in config.referral.effective_levels),
    )


def after_commit(app: App, outcome: FinalizeOutcome, provider: str) -> None:
    """Count and log the payment once its transaction committed (its rows wake their owners themselves)."""
    app.metrics.payments.labels(provider, outcome.status).inc()
    if outcome.applied:
        log.info(
            "event=payment_finalized provider=%s purchase_id=%s user_id=%s status=%s paid_late=%s",
            provider,
            outcome.purchase_id,
            outcome.user_id,
            outcome.status,
            outcome.paid_late,
        )


def _plan(app: App, plan_code: str) -> Plan:
    plan = app.config.plan(plan_code)
    if plan is None:
        raise UnknownPlan(plan_code)
    return plan


def _pack(app: App, pack_code: str) -> TrafficPack:
    pack = app.config.traffic_pack(pack_code)
    if pack is None:
        raise UnknownPlan(pack_code)
    return pack


@attrs.frozen
class Item:
    """What a purchase is of — a plan or a traffic pack — with its offer and the texts of its invoice."""

    offer: Offer
    title: str
    description: str


def item_of(
    app: App, code: str, *, pack: bool, language: str, currency: str | None = None, gift: bool = False
) -> Item:
    """The plan (or, with `pack`, the traffic pack) `code` as an offer in `currency` (default: its own);
    with `gift`, the plan bought as a gift (purchase kind `gift`: no promo code, no upgrade credit).

    Raises UnknownPlan, InvalidAmount (no price in `currency`).
    """
    if gift:
        plan = _plan(app, code)
        title = plan.title.get(language, plan.code)
        text = _plain(app.texts, language, "payments.invoice_gift", title=title, days=plan.days)
        return Item(attrs.evolve(plan_offer(plan, currency), kind="gift"), title, text)
    if pack:
        found = _pack(app, code)
        title = found.label(language)
        text = _plain(app.texts, language, "payments.invoice_pack", title=title, gb=found.gb)
        return Item(pack_offer(found, currency), title, text)
    plan = _plan(app, code)
    title = plan.title.get(language, plan.code)
    text = _plain(app.texts, language, "payments.invoice_plan", title=title, days=plan.days)
    return Item(plan_offer(plan, currency), title, text)


def _pack_allowed(conn: psycopg.Connection[Any], user_id: int, config: Config) -> bool:
    sub = subscriptions.get_subscription(conn, user_id)
    if sub is None or not sub.is_active(dt.datetime.now(dt.UTC)):
        return False
    return limits_of(config, sub.plan_code, sub.kind).limits_traffic


async def pack_allowed(app: App, user_id: int) -> bool:
    """Traffic packs are sold only to a user whose active subscription's plan has a traffic quota."""
    return await app.db.run(_pack_allowed, user_id, app.config)


async def _check_item(app: App, user_id: int, code: str, *, pack: bool, gift: bool = False) -> None:
    """Refuse what is not for sale to this user: a pack without a quota to add to (PackNotAvailable),
    the trial plan, and a hidden plan unless it is the user's own running plan (renewing it is allowed;
    giving it is not: a gift is of a plan on sale)."""
    if gift:
        plan = _plan(app, code)
        if plan.trial or not plan.visible:
            raise UnknownPlan(code)
        return
    if pack:
        if not await pack_allowed(app, user_id):
            raise PackNotAvailable(code)
        return
    plan = _plan(app, code)
    if plan.trial:
        raise UnknownPlan(code)
    if not plan.visible:
        sub = await app.db.run(subscriptions.get_subscription, user_id)
        if sub is None or sub.plan_code != plan.code:
            raise UnknownPlan(code)


async def _create_purchase(app: App, user_id: int, offer: Offer, method: purchases.Method) -> Purchase:
    payments = app.config.payments
    return await app.db.run(
        purchases.create_purchase,
        user_id,
        offer,
        method=method,
        ttl_minutes=payments.purchase_ttl_minutes,
        min_price_minor=min_price_minor(payments, offer.currency),
    )


async def delete_invoices(app: App, client: CryptoPayClient | None, invoice_ids: list[int], *, why: str) -> int:
    """Delete Crypto Pay invoices (outside any transaction), within `DELETE_BUDGET_SECONDS`; never raises.

    Returns how many are gone. A refusal (a paid invoice cannot be deleted), an error or the time
    running out is logged: the payment, if any, still arrives and finalize values it (see the module doc).
    """
    if not invoice_ids:
        return 0
    if client is None:
        log.warning("event=invoice_delete_skipped reason=cryptopay_off why=%s invoice_ids=%s", why, invoice_ids)
        return 0
    deleted = 0
    with trio.move_on_after(DELETE_BUDGET_SECONDS) as scope:
        for invoice_id in invoice_ids:
            try:
                await client.delete_invoice(invoice_id)
            except InvoiceNotFound:
                log.warning("event=invoice_not_deleted reason=paid_or_unknown why=%s invoice_id=%s", why, invoice_id)
                continue
            except CryptoPayError as exc:
                log.warning("event=invoice_delete_failed why=%s invoice_id=%s error=%s", why, invoice_id, exc)
                continue
            deleted += 1
            log.info("event=invoice_deleted why=%s invoice_id=%s", why, invoice_id)
    if scope.cancelled_caught:
        log.warning("event=invoice_delete_timeout why=%s invoice_ids=%s deleted=%d", why, invoice_ids, deleted)
    return deleted


async def delete_superseded_invoices(app: App, client: CryptoPayClient | None, purchase_id: int) -> int:
    """After `purchase_id` committed: delete the invoices of the purchases it superseded."""
    invoice_ids = await app.db.run(purchases.superseded_invoice_ids, purchase_id)
    return await delete_invoices(app, client, invoice_ids, why=f"superseded_by:{purchase_id}")


# --- quotes and promo codes -------------------------------------------------------------------


@attrs.frozen
class Quote:
    """What a plan costs this user now (with their remembered promo code), for the buy screen."""

    plan: Plan
    price: Price
    promo_code: str | None
    balance_minor: int
    balance_currency: str
    #: A pro-rata upgrade from the running paid plan: its basis (None: not an upgrade) and the terms in
    #: the quoted currency and in Stars (None: the credit does not apply in that currency).
    upgrade: UpgradeBasis | None = None
    upgrade_terms: UpgradeTerms | None = None
    upgrade_stars: UpgradeTerms | None = None
    #: The remembered code and the one plan it is bound to, when that is another plan (not applied here).
    promo_elsewhere: tuple[str, str] | None = None

    @property
    def balance_covers(self) -> bool:
        return (
            self.price.currency.upper() == self.balance_currency.upper()
            and self.balance_minor >= self.price.amount_minor
        )

    @property
    def fiat_offered(self) -> bool:
        """The plan can be bought in the quoted currency (an upgrade whose credit is too large cannot)."""
        return self.upgrade_terms is None or self.upgrade_terms.offered

    @property
    def stars_offered(self) -> bool:
        return bool(self.price.stars) and (self.upgrade_stars is None or self.upgrade_stars.offered)


async def quote_plan(app: App, user_id: int, plan_code: str, *, currency: str | None = None) -> Quote:
    """The price shown before buying (in `currency`, default the plan's); the purchase re-checks the promo code.

    Raises UnknownPlan, InvalidAmount (the plan has no price in `currency`).
    """
    plan = _plan(app, plan_code)
    offer = plan_offer(plan, currency)
    payments = app.config.payments

    def read(conn: psycopg.Connection[Any]) -> tuple[int, promo.PromoCheck | None, UpgradeBasis | None]:
        found = users.balance_and_pending_promo(conn, user_id)
        if found is None:
            raise purchases.UnknownUser(user_id)
        balance, code = found
        basis = purchases.upgrade_basis(conn, user_id)
        return balance, promo.validate_promo(conn, user_id, code) if code else None, basis

    balance, check, basis = await app.db.run(read)
    floor = min_price_minor(payments, offer.currency)
    if basis is not None and basis.plan_code != plan.code:
        # A switch from the running plan: the credit replaces any promo code (the purchase does the same).
        fiat = basis.terms(offer.price_minor, offer.currency, floor)
        stars = basis.terms(offer.stars, STARS_CURRENCY, 1) if offer.stars else None
        price = price_offer(offer, 0, floor)
        if fiat is not None and fiat.price_minor is not None:
            price = attrs.evolve(price, amount_minor=fiat.price_minor)
        if stars is not None and stars.price_minor is not None:
            price = attrs.evolve(price, stars=stars.price_minor)
        if fiat is not None or stars is not None:
            return Quote(plan, price, None, balance, payments.currency, basis, fiat, stars)
    percent = off = 0
    code: str | None = None
    elsewhere: tuple[str, str] | None = None
    if check is not None and check.ok and check.promo is not None:
        percent, off = check.promo.discount_for(plan.code, offer.currency)
        if percent or off:
            code = check.promo.code
        elif check.promo.plan_code not in (None, plan.code):
            elsewhere = (check.promo.code, check.promo.plan_code)
    price = price_offer(offer, percent, floor, amount_off_minor=off)
    return Quote(plan, price, code, balance, payments.currency, promo_elsewhere=elsewhere)


def _apply_promo_guarded(
    conn: psycopg.Connection[Any], user_id: int, code: str, config: Config, texts: Texts
) -> tuple[promo.PromoCheck, bool]:
    """One attempt, in one transaction: the user's limit, the check, the record, the spike alert.

    Returns the check and whether an admin alert was queued.
    """
    payments = config.payments
    window, limit, alert_at = (
        payments.promo_wrong_window_minutes,
        payments.promo_max_wrong_attempts,
        payments.promo_alert_wrong_attempts,
    )
    promo.lock_user(conn, user_id)
    wait = promo.wrong_attempts_wait(conn, user_id, limit, window)
    if wait is not None:
        return promo.PromoCheck(None, "promo.too_many", retry_after_seconds=wait), False
    check = promo.apply_promo(conn, user_id, code)
    if not check.ok:
        promo.record_wrong_attempt(conn, user_id, code, check.reason or "promo.not_found")
    wrong = promo.wrong_attempts_in_window(conn, window, alert_at)
    alert = None
    if wrong >= alert_at:
        detail = (
            f"{wrong} or more wrong promo codes typed in the last {window} minutes, by many accounts "
            f"(each is limited to {limit}): someone may be guessing codes"
        )
        alert = alerts.record_incident(conn, texts, config, alerts.PROMO_GUESSING, False, detail)
    elif incident_is_open(conn, alerts.PROMO_GUESSING):
        detail = f"{wrong} wrong promo codes in the last {window} minutes"
        alert = alerts.record_incident(conn, texts, config, alerts.PROMO_GUESSING, True, detail)
    return check, alert is not None


async def apply_promo_code(app: App, user_id: int, code: str, *, texts: Texts | None = None) -> promo.PromoCheck:
    """Validate a code typed by the user and remember it for their next purchase.

    Wrong codes are limited per user (`[payments].promo_max_wrong_attempts` per
    `promo_wrong_window_minutes`; then reason "promo.too_many" with `retry_after_seconds`), recorded
    in `promo_attempts` and counted (`vpnd_promo_attempts`); many wrong codes from all users in one
    window (`promo_alert_wrong_attempts`) alert the admins, once per incident.
    """
    check, _alerted = await app.db.run(_apply_promo_guarded, user_id, code, app.config, texts or app.texts)
    if check.ok:
        app.metrics.promo_attempts.labels("ok").inc()
    elif check.reason == "promo.too_many":
        app.metrics.promo_attempts.labels("limited").inc()
        log.warning("event=promo_limited user_id=%d retry_after=%.0f", user_id, check.retry_after_seconds)
    else:
        app.metrics.promo_attempts.labels("wrong").inc()
        log.info("event=promo_wrong user_id=%d reason=%s", user_id, check.reason)
    return check


# --- Crypto Pay -------------------------------------------------------------------------------


async def start_cryptopay_purchase(
    app: App,
    client: CryptoPayClient,
    user_id: int,
    *,
    plan_code: str | None = None,
    topup_minor: int | None = None,
    paid_btn_url: str | None = None,
    language: str = "en",
    pack: bool = False,
    gift: bool = False,
) -> tuple[Purchase, str]:
    """Create a purchase (a plan — with `pack`, the traffic pack `plan_code` — or a top-up of
    `topup_minor`) and its Crypto Pay invoice.

    Returns the purchase (with its invoice attached) and the URL to pay at. Raises UnknownPlan,
    PackNotAvailable, UpgradeNotOffered, pricing.InvalidAmount (top-up out of bounds), UnknownUser,
    ProviderUnavailable (Crypto Pay refused or failed; the purchase is then cancelled).
    """
    if (plan_code is None) == (topup_minor is None):
        raise ValueError("give exactly one of plan_code and topup_minor")
    if not app.config.cryptopay.enabled:
        raise MethodUnavailable("Crypto Pay is switched off")
    if plan_code is not None:
        await _check_item(app, user_id, plan_code, pack=pack, gift=gift)
        item = item_of(app, plan_code, pack=pack, language=language, gift=gift)
        offer, description = item.offer, item.description
    else:
        assert topup_minor is not None
        offer = topup_offer(topup_minor, app.config.payments)
        description = _plain(
            app.texts,
            language,
            "payments.invoice_topup",
            amount=format_money(topup_minor, offer.currency),
        )

    purchase = await _create_purchase(app, user_id, offer, "cryptopay")  # committed before any HTTP
    expires_in = max(MIN_INVOICE_SECONDS, int((purchase.expires_at - dt.datetime.now(dt.UTC)).total_seconds()))
    try:
        invoice = await client.create_invoice(
            amount=from_minor(purchase.amount_minor, purchase.currency),
            fiat=purchase.currency,
            payload=str(purchase.id),
            description=description[:1024],
            expires_in=expires_in,
            paid_btn_name="callback" if paid_btn_url else None,
            paid_btn_url=paid_btn_url,
            accepted_assets=app.config.cryptopay.accepted_assets or None,
        )
    except CryptoPayError as exc:
        log.warning("event=invoice_failed purchase_id=%s error=%s", purchase.id, exc)
        await app.db.run(purchases.expire_purchase, purchase.id, status="cancelled")
        raise ProviderUnavailable(str(exc)) from exc
    status = await app.db.run(purchases.attach_invoice, purchase.id, invoice.invoice_id, invoice.bot_invoice_url)
    await delete_superseded_invoices(app, client, purchase.id)
    if status is not None and status != "pending":
        # A newer purchase superseded this one while its invoice was being made (a double tap): the
        # newer one deleted what it could see, so this invoice is deleted here; the user pays the newer.
        await delete_invoices(app, client, [invoice.invoice_id], why=f"superseded:{purchase.id}")
        raise PurchaseNotPayable("payments.expired")
    return attrs.evolve(purchase, invoice_id=invoice.invoice_id, invoice_url=invoice.bot_invoice_url), (
        invoice.bot_invoice_url
    )


def _finalize_invoice(conn: psycopg.Connection[Any], invoice: Invoice, rules: PaymentRules) -> FinalizeOutcome:
    """The purchase an invoice pays is its payload (our purchase id), else the purchase it is attached to."""
    purchase_id = _purchase_id(invoice.payload) if invoice.payload is not None else None
    if purchase_id is None or purchases.get_purchase(conn, purchase_id) is None:
        attached = purchases.get_by_invoice(conn, invoice.invoice_id)
        if attached is not None:
            purchase_id = attached.id
    currency = (invoice.fiat if invoice.currency_type == "fiat" else invoice.asset) or "?"
    try:
        amount_minor = received_to_minor(invoice.amount, currency)
    except InvalidAmount:
        amount_minor = -1
    return finalize_purchase(
        conn,
        purchase_id if purchase_id is not None else -1,
        provider="cryptopay",
        provider_payment_id=str(invoice.invoice_id),
        amount_minor=amount_minor,
        currency=currency,
        rules=rules,
    )


async def finalize_cryptopay_invoice(app: App, invoice: Invoice) -> FinalizeOutcome:
    """Finalize a paid Crypto Pay invoice (from the webhook or the watcher); idempotent."""
    if not invoice.is_paid:
        raise ValueError(f"invoice {invoice.invoice_id} is {invoice.status}, not paid")
    outcome = await app.db.run(_finalize_invoice, invoice, rules_of(app))
    after_commit(app, outcome, "cryptopay")
    return outcome


# --- Telegram Stars ---------------------------------------------------------------------------


@attrs.frozen
class TelegramInvoice:
    """What `sendInvoice` needs: `prices=[LabeledPrice(title, amount)]` in `currency`'s minor units.

    Stars: `currency="XTR"` and no provider token; a card: the provider's token, a fiat currency and
    what the provider wants for a fiscal receipt.
    """

    purchase: Purchase
    title: str
    description: str
    payload: str
    currency: str
    amount: int
    provider_token: str = ""
    need_email: bool = False
    send_email_to_provider: bool = False
    #: JSON for the provider (a fiscal receipt), or None.
    provider_data: str | None = None


async def start_stars_purchase(
    app: App,
    user_id: int,
    plan_code: str,
    *,
    language: str = "en",
    cryptopay: CryptoPayClient | None = None,
    pack: bool = False,
    gift: bool = False,
) -> TelegramInvoice:
    """Create a Stars purchase of a plan (with `pack`: of a traffic pack). Raises UnknownPlan,
    PackNotAvailable, UpgradeNotOffered, MethodUnavailable (no Stars price), UnknownUser.

    `cryptopay` deletes the Crypto Pay invoices this purchase supersedes (after its commit).
    """
    if not app.config.stars.enabled:
        raise MethodUnavailable("Telegram Stars are switched off")
    await _check_item(app, user_id, plan_code, pack=pack, gift=gift)
    item = item_of(app, plan_code, pack=pack, language=language, gift=gift)
    purchase = await _create_purchase(app, user_id, item.offer, "stars")
    await delete_superseded_invoices(app, cryptopay, purchase.id)
    assert purchase.stars is not None
    return TelegramInvoice(
        purchase, item.title[:32], item.description[:255], str(purchase.id), STARS_CURRENCY, purchase.stars
    )


def _purchase_id(payload: str | int) -> int | None:
    if isinstance(payload, int):
        return payload
    text = payload.strip()
    return int(text) if text.isdecimal() and len(text) < 19 else None


async def check_pre_checkout(
    app: App, purchase_id: str | int, amount: int, currency: str, *, user_id: int | None = None
) -> tuple[bool, str | None]:
    """Answer a pre_checkout_query: (True, None), or (False, reason locale key).

    OK only when the purchase (the invoice payload) exists, is the user's (when `user_id` is given),
    is pending and unexpired, and `amount`/`currency` are what its invoice asked: a Stars purchase its
    Stars price and "XTR", a card purchase its price in minor units and its currency.
    Answer Telegram within 10 s: bound the call (e.g. `trio.move_on_after(8)`) and refuse on timeout.
    """
    wanted = _purchase_id(purchase_id)
    if wanted is None:
        return False, PRE_CHECKOUT_UNKNOWN

    purchase, now = await app.db.run(purchases.get_purchase_at_now, wanted)
    if purchase is None or (user_id is not None and purchase.user_id != user_id):
        return False, PRE_CHECKOUT_UNKNOWN
    if await app.db.run(users.is_banned, purchase.user_id):  # an invoice sent before the ban: no money taken
        return False, PRE_CHECKOUT_UNKNOWN
    if purchase.status == "paid":
        return False, PRE_CHECKOUT_ALREADY_PAID
    if not purchase.is_payable(now):
        return False, PRE_CHECKOUT_EXPIRED
    if purchase.method == "stars":
        expected: tuple[int | None, str] = (purchase.stars, STARS_CURRENCY)
    elif purchase.method == "card":
        expected = (purchase.amount_minor, purchase.currency.upper())
    else:
        return False, PRE_CHECKOUT_MISMATCH
    if (amount, currency) != expected:
        return False, PRE_CHECKOUT_MISMATCH
    return True, None


async def finalize_stars_payment(
    app: App,
    purchase_id: str | int,
    *,
    telegram_payment_charge_id: str,
    total_amount: int,
    currency: str,
) -> FinalizeOutcome:
    """Handle a successful_payment (`invoice_payload`, its charge id, `total_amount`, `currency`).

    Idempotent on the charge id: a second delivery answers `already_paid` and changes nothing.
    """
    wanted = _purchase_id(purchase_id)
    outcome = await app.db.run(
        finalize_purchase,
        wanted if wanted is not None else -1,
        provider="stars",
        provider_payment_id=telegram_payment_charge_id,
        amount_minor=total_amount,
        currency=currency,
        rules=rules_of(app),
    )
    after_commit(app, outcome, "stars")
    return outcome


# --- cards (Telegram Payments) ----------------------------------------------------------------


def card_price_available(app: App, plan: Plan | TrafficPack) -> bool:
    """Cards are configured and the plan (or pack) has a price in the card currency."""
    return app.config.telegram_payments.enabled and plan.price_in(app.config.card_currency) is not None


async def start_card_purchase(
    app: App,
    user_id: int,
    plan_code: str,
    *,
    language: str = "en",
    cryptopay: CryptoPayClient | None = None,
    pack: bool = False,
    gift: bool = False,
) -> TelegramInvoice:
    """Create a card purchase of a plan (with `pack`: of a traffic pack) in the card currency.

    Raises UnknownPlan, PackNotAvailable, UpgradeNotOffered, MethodUnavailable (cards off, or no price in
    the card currency), UnknownUser. `cryptopay` deletes the Crypto Pay invoices this purchase supersedes.
    """
    config = app.config.telegram_payments
    await _check_item(app, user_id, plan_code, pack=pack, gift=gift)
    sold: Plan | TrafficPack = _pack(app, plan_code) if pack else _plan(app, plan_code)
    if not card_price_available(app, sold):
        raise MethodUnavailable(f"{plan_code} is not sold by card in {app.config.card_currency}")
    item = item_of(app, plan_code, pack=pack, language=language, currency=app.config.card_currency, gift=gift)
    purchase = await _create_purchase(app, user_id, item.offer, "card")
    await delete_superseded_invoices(app, cryptopay, purchase.id)
    title, description = item.title, item.description
    provider_data = None
    if config.receipt:
        provider_data = receipt_provider_data(description, purchase.amount_minor, purchase.currency, config.vat_code)
    return TelegramInvoice(
        purchase,
        title[:32],
        description[:255],
        str(purchase.id),
        purchase.currency.upper(),
        purchase.amount_minor,
        config.provider_token,
        config.need_email or config.receipt,
        config.send_email_to_provider or config.receipt,
        provider_data,
    )


async def finalize_card_payment(
    app: App,
    purchase_id: str | int,
    *,
    telegram_payment_charge_id: str,
    provider_payment_charge_id: str,
    total_amount: int,
    currency: str,
) -> FinalizeOutcome:
    """Handle a card successful_payment, keyed by the provider's charge id: a second delivery changes nothing.

    The same provider charge id presented for another purchase is a `duplicate_payment` (alerted, no grant).
    """
    wanted = _purchase_id(purchase_id)
    outcome = await app.db.run(
        finalize_purchase,
        wanted if wanted is not None else -1,
        provider="card",
        provider_payment_id=provider_payment_charge_id or f"telegram:{telegram_payment_charge_id}",
        amount_minor=total_amount,
        currency=currency.upper(),
        rules=rules_of(app),
        telegram_charge_id=telegram_payment_charge_id,
    )
    after_commit(app, outcome, "card")
    return outcome


# --- balance ----------------------------------------------------------------------------------


def _buy_with_balance(
    conn: psycopg.Connection[Any],
    user_id: int,
    offer: Offer,
    ttl_minutes: int,
    floor_minor: int,
    rules: PaymentRules,
) -> FinalizeOutcome:
    purchase = purchases.create_purchase(
        conn, user_id, offer, method="balance", ttl_minutes=ttl_minutes, min_price_minor=floor_minor
    )
    return pay_from_balance(conn, user_id, purchase.id, rules=rules)


async def pay_with_balance(
    app: App,
    user_id: int,
    plan_code: str,
    *,
    cryptopay: CryptoPayClient | None = None,
    pack: bool = False,
    gift: bool = False,
) -> FinalizeOutcome:
    """Buy a plan (with `pack`: a traffic pack) from the balance in one transaction (purchase created,
    debited, granted).

    Raises (nothing changed): UnknownPlan, PackNotAvailable, UpgradeNotOffered, UnknownUser,
    MethodUnavailable (priced in another currency), ledger.InsufficientBalance (`.needed_minor`,
    `.balance_minor`). `cryptopay` deletes the Crypto Pay invoices this purchase supersedes (after its commit).
    """
    await _check_item(app, user_id, plan_code, pack=pack, gift=gift)
    offer = item_of(app, plan_code, pack=pack, language="en", gift=gift).offer
    payments = app.config.payments
    if offer.currency.upper() != payments.currency.upper():
        raise MethodUnavailable("the plan is priced in another currency than the balance")
    outcome = await app.db.run(
        _buy_with_balance,
        user_id,
        offer,
        payments.purchase_ttl_minutes,
        min_price_minor(payments, offer.currency),
        rules_of(app),
    )
    after_commit(app, outcome, "balance")
    await delete_superseded_invoices(app, cryptopay, outcome.purchase_id)
    return outcome


async def pay_purchase_with_balance(app: App, user_id: int, purchase_id: int) -> FinalizeOutcome:
    """Pay an existing pending `balance` purchase (e.g. after a confirmation button)."""
    outcome = await app.db.run(pay_from_balance, user_id, purchase_id, rules=rules_of(app))
    after_commit(app, outcome, "balance")
    return outcome


async def balance_of(app: App, user_id: int) -> int:
    return await app.db.run(ledger.balance_of, user_id)


# --- housekeeping -----------------------------------------------------------------------------


async def expire_stale_purchases(app: App, *, batch_size: int = 500, max_batches: int = 100) -> int:
    """Expire pending purchases without an invoice past their expiry, in bounded batches."""
    total = 0
    for _ in range(max_batches):
        done = await app.db.run(purchases.expire_stale, limit=batch_size)
        total += done
        if done < batch_size:
            break
        await trio.lowlevel.checkpoint()
    return total
