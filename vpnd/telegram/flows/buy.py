"""Buying and renewing: plan → method → invoice; Telegram Stars and card pre-checkout and payment; top-ups.

Prices come from `vpnd.payments.service.quote_plan` (with the remembered promo code); purchases and
invoices from the payments service, which commits the purchase before calling any provider. The
"payment received" message is queued by finalize itself (outbox), so every path — webhook, watcher,
Stars, balance — tells the user the same way.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import psycopg
import telegram
import trio

from vpnd import money, pricing
from vpnd.config import GIB, Plan
from vpnd.db import conversation, quota, subscriptions
from vpnd.db.ledger import InsufficientBalance
from vpnd.db.purchases import PaymentError, ProviderUnavailable
from vpnd.payments import checkout, service
from vpnd.quota import format_bytes, limits_of
from vpnd.telegram import keyboards as kb
from vpnd.telegram.flows.access import my_subscription
from vpnd.telegram.turn import BotContext, Turn
from vpnd.texts import Html

if TYPE_CHECKING:
    from vpnd.telegram.router import Routes

log = logging.getLogger("vpnd.payments")

TOPUP_STATE = "topup_amount"
METHOD_CODES = {
    **{"c": "cryptopay", "s": "stars", "b": "balance", "k": "card"},
    **{"yk": "bank_card", "ys": "sbp", "y": "yookassa", "ya": "bank_card_save"},
}
#: The hosted checkout's buttons: YooKassa method → (its callback code, its label key).
CHECKOUT_METHODS = {"bank_card": ("yk", "buy.method.yookassa_card"), "sbp": ("ys", "buy.method.yookassa_sbp")}
#: How a gift may be paid: the methods whose purchase the shared grant path finalizes (no hosted checkout).
GIFT_METHODS = ("cryptopay", "stars", "card", "balance")
#: Telegram wants an answer to a pre-checkout query within 10 s; refuse rather than be late.
PRE_CHECKOUT_BUDGET = 8.0


def _money(minor: int, currency: str) -> str:
    return money.format_money(minor, currency)


def _devices_text(turn: Turn, plan: Plan) -> str:
    if plan.devices <= 0:
        return turn.t("buy.devices_unlimited")
    return turn.t("buy.devices_one" if plan.devices == 1 else "buy.devices", count=plan.devices)


def _traffic_text(turn: Turn, plan: Plan) -> str:
    """ "100 GB / month", "100 GB per 90 days", "100 GB in total", "unlimited traffic" (per `traffic_reset`)."""
    if plan.traffic_gb <= 0:
        return turn.t("buy.traffic_unlimited")
    if plan.traffic_reset == "monthly" or (plan.traffic_reset == "per_period" and plan.days == 30):
        return turn.t("buy.traffic_monthly", gb=plan.traffic_gb)
    if plan.traffic_reset == "per_period":
        return turn.t("buy.traffic_period", gb=plan.traffic_gb, days=plan.days)
    return turn.t("buy.traffic_total", gb=plan.traffic_gb)


async def choose_plan(turn: Turn) -> None:
    """The tiers side by side: one message describing each plan on sale, one button per plan."""
    rows = []
    tiers = []
    promo_note = ""
    for plan in turn.app.config.sale_plans:
        quote = await service.quote_plan(turn.app, turn.user.id, plan.code)
        title = plan.title.get(turn.lang, plan.code)
        list_price = pricing.plan_offer(plan)
        if quote.promo_code and not promo_note and quote.price.discount_percent:
            promo_note = turn.t("buy.promo_note", code=quote.promo_code, percent=quote.price.discount_percent)
        elif quote.promo_code and not promo_note and quote.price.currency == list_price.currency:
            off = _money(list_price.price_minor - quote.price.amount_minor, list_price.currency)
            promo_note = turn.t("buy.promo_note_amount", code=quote.promo_code, amount=off, plan=title)
        price = _money(list_price.price_minor, list_price.currency)
        per_month = _money(pricing.per_month_minor(list_price.price_minor, plan.days), list_price.currency)
        description = plan.describe(turn.lang)
        tiers.append(
            turn.t(
                "buy.tier",
                title=title,
                price=price,
                days=plan.days,
                per_month=per_month,
                devices=_devices_text(turn, plan),
                traffic=_traffic_text(turn, plan),
            )
            + (f"\n<i>{_escape(description)}</i>" if description else "")
        )
        label = turn.t("buy.plan_button", title=title, price=_money(quote.price.amount_minor, quote.price.currency))
        rows.append([kb.button(label, f"plan:{plan.code}")])
    own = await _own_hidden_plan(turn)
    if own is not None:  # no longer on sale, but its subscribers may renew it
        quote = await service.quote_plan(turn.app, turn.user.id, own.code)
        price = _money(quote.price.amount_minor, quote.price.currency)
        rows.append(
            [kb.button(turn.t("buy.renew_button", title=own.label(turn.lang), price=price), f"plan:{own.code}")]
        )
    if turn.ctx.cryptopay is not None:
        rows.append([kb.button(turn.t("buy.topup"), "topup")])
    rows.append([kb.button(turn.t("common.menu"), "menu")])
    text = turn.t("buy.choose_plan", promo=Html(promo_note), tiers=Html("\n\n".join(tiers)))
    await turn.show(text, kb.keyboard(*rows))


def _escape(text: str) -> str:
    import html

    return html.escape(text, quote=False)


async def _own_hidden_plan(turn: Turn) -> Plan | None:
    """The user's current plan when it is hidden (not the trial): they may renew it."""
    sub = await turn.app.db.run(subscriptions.get_subscription, turn.user.id)
    plan = turn.app.config.plan(sub.plan_code) if sub is not None and sub.plan_code else None
    return plan if plan is not None and not plan.visible and not plan.trial else None


async def _plan_for_sale(turn: Turn, plan_code: str) -> Plan | None:
    """The plan, if this user may buy it: on sale, or hidden but their own running plan (a renewal).
    The trial plan is never sold."""
    plan = turn.app.config.plan(plan_code)
    if plan is None or plan.trial:
        return None
    if plan.visible:
        return plan
    sub = await turn.app.db.run(subscriptions.get_subscription, turn.user.id)
    return plan if sub is not None and sub.plan_code == plan.code else None


async def choose_method(turn: Turn, plan_code: str) -> None:
    plan_for_sale = await _plan_for_sale(turn, plan_code)
    if plan_for_sale is None:
        log.info("event=plan_refused user_id=%d plan=%r", turn.user.id, plan_code[:32])
        await turn.show(turn.t("buy.plan_unavailable"), kb.keyboard([kb.button(turn.t("common.back"), "buy")]))
        return
    try:
        quote = await service.quote_plan(turn.app, turn.user.id, plan_code)
    except PaymentError as exc:
        await turn.show(turn.t(exc.reason_key), kb.back_to_menu(turn.t))
        return
    plan = quote.plan
    price = _money(quote.price.amount_minor, quote.price.currency)
    rows = []
    if quote.fiat_offered:
        if turn.ctx.cryptopay is not None:
            rows.append([kb.button(turn.t("buy.method.cryptopay"), f"pay:{plan.code}:c")])
        rows += _checkout_buttons(turn, plan.code, quote.price.currency)
    if turn.app.config.stars.enabled and quote.stars_offered:
        rows.append([kb.button(turn.t("buy.method.stars", stars=f"{quote.price.stars} ⭐"), f"pay:{plan.code}:s")])
    card_note = ""
    if service.card_price_available(turn.app, plan):
        card = await service.quote_plan(turn.app, turn.user.id, plan.code, currency=turn.app.config.card_currency)
        card_price = _money(card.price.amount_minor, card.price.currency)
        if card.fiat_offered:
            rows.append([kb.button(turn.t("buy.method.card", price=card_price), f"pay:{plan.code}:k")])
        else:
            card_note = _not_offered(turn, card.price.currency)
    if quote.fiat_offered and quote.balance_covers:
        balance = _money(quote.balance_minor, quote.balance_currency)
        rows.append([kb.button(turn.t("buy.method.balance", balance=balance), f"pay:{plan.code}:b")])
    if plan.visible:  # a plan on sale may be bought for someone else (vpnd.telegram.flows.gifts)
        rows.append([kb.button(turn.t("gifts.buy_button"), f"gift:{plan.code}")])
    rows.append([kb.button(turn.t("common.back"), "buy")])
    text = turn.t("buy.choose_method", title=plan.title.get(turn.lang, plan.code), days=plan.days, price=price)
    text += _upgrade_note(turn, quote) + card_note + _promo_elsewhere_note(turn, quote)
    await turn.show(text, kb.keyboard(*rows))


def _promo_elsewhere_note(turn: Turn, quote: service.Quote) -> str:
    """The remembered code is bound to another plan: say so, so the price without it is no surprise."""
    if quote.promo_elsewhere is None:
        return ""
    code, plan_code = quote.promo_elsewhere
    plan = turn.app.config.plan(plan_code)
    return "\n" + turn.t("promo.wrong_plan", code=code, plan=plan.label(turn.lang) if plan else plan_code)


def _not_offered(turn: Turn, currency: str) -> str:
    return "\n" + turn.t("buy.upgrade_not_offered_in", currency=currency)


def _upgrade_note(turn: Turn, quote: service.Quote) -> str:
    """Shown before paying: the credit for the running plan's unused part and the price after it."""
    basis = quote.upgrade
    if basis is None:
        return ""
    current = turn.app.config.plan(basis.plan_code)
    lines = [
        turn.t(
            "buy.upgrade_head",
            current=current.label(turn.lang) if current else basis.plan_code,
            until=turn.format_date(basis.expires_at),
            title=quote.plan.label(turn.lang),
            days=quote.plan.days,
        )
    ]
    offers = [(quote.upgrade_terms, quote.price.currency), (quote.upgrade_stars, pricing.STARS_CURRENCY)]
    for terms, currency in offers:
        if terms is None:
            continue
        if terms.price_minor is None:
            lines.append(turn.t("buy.upgrade_not_offered_in", currency=currency))
        else:
            lines.append(
                turn.t(
                    "buy.upgrade_line",
                    list=_money(terms.list_minor, currency),
                    credit=_money(terms.credit_minor, currency),
                    price=_money(terms.price_minor, currency),
                )
            )
    return "\n\n" + "\n".join(lines)


def _checkout_buttons(turn: Turn, plan_code: str, currency: str, verb: str = "pay") -> list[list[kb.Button]]:
    """Card and SBP (YooKassa), for plans priced in the shop's currency; one button when the page chooses."""
    config = turn.app.config.yookassa
    if turn.ctx.checkout is None or currency.upper() != config.currency.upper():
        return []
    # Card + auto-renewal: the same card payment, with the payer's consent to keep the card (opt-in).
    save = [kb.button(turn.t("buy.method.yookassa_card_autorenew"), f"{verb}:{plan_code}:ya")]
    if not config.methods:
        single = [kb.button(turn.t("buy.method.yookassa"), f"{verb}:{plan_code}:y")]
        return [single, save] if verb == "pay" else [single]
    rows = [
        [kb.button(turn.t(CHECKOUT_METHODS[m][1]), f"{verb}:{plan_code}:{CHECKOUT_METHODS[m][0]}")]
        for m in config.methods
    ]
    return [*rows, save] if "bank_card" in config.methods and verb == "pay" else rows


# --- traffic packs --------------------------------------------------------------------------------


async def choose_pack(turn: Turn) -> None:
    """The traffic packs with their prices, for a user whose active plan has a traffic quota."""
    config = turn.app.config

    def read(conn: psycopg.Connection[Any]) -> quota.UsageView | None:
        sub = subscriptions.get_subscription(conn, turn.user.id)
        if sub is None:
            return None
        return quota.usage_of(conn, turn.user.id, limits_of(config, sub.plan_code, sub.kind))

    usage = await turn.app.db.run(read)
    back = kb.keyboard([kb.button(turn.t("common.menu"), "menu")])
    if not await service.pack_allowed(turn.app, turn.user.id) or usage is None:
        await turn.show(turn.t("packs.no_quota"), back)
        return
    if not config.traffic_packs:
        await turn.show(turn.t("packs.none"), back)
        return
    lines, rows = [], []
    for pack in config.traffic_packs:
        offer = pricing.pack_offer(pack)
        price = _money(offer.price_minor, offer.currency)
        stars = f" · {pack.stars} ⭐" if pack.stars and config.stars.enabled else ""
        lines.append(
            turn.t("packs.item", title=pack.label(turn.lang), size=format_bytes(pack.gb * GIB), price=price + stars)
        )
        rows.append([kb.button(turn.t("packs.button", title=pack.label(turn.lang), price=price), f"pk:{pack.code}")])
    rows.append([kb.button(turn.t("common.menu"), "menu")])
    text = turn.t(
        "packs.choose", used=format_bytes(usage.used_bytes), total=format_bytes(usage.total_bytes),
        packs=Html("\n".join(lines)),
    )  # fmt: skip
    await turn.show(text, kb.keyboard(*rows))


async def choose_pack_method(turn: Turn, pack_code: str) -> None:
    config = turn.app.config
    pack = config.traffic_pack(pack_code)
    if pack is None:
        await turn.show(turn.t("packs.unknown"), kb.keyboard([kb.button(turn.t("common.back"), "packs")]))
        return
    if not await service.pack_allowed(turn.app, turn.user.id):
        await turn.show(turn.t("packs.no_quota"), kb.back_to_menu(turn.t))
        return
    offer = pricing.pack_offer(pack)
    price = _money(offer.price_minor, offer.currency)
    rows = []
    if turn.ctx.cryptopay is not None:
        rows.append([kb.button(turn.t("buy.method.cryptopay"), f"pp:{pack.code}:c")])
    rows += _checkout_buttons(turn, pack.code, offer.currency, verb="pp")
    if config.stars.enabled and pack.stars:
        rows.append([kb.button(turn.t("buy.method.stars", stars=f"{pack.stars} ⭐"), f"pp:{pack.code}:s")])
    if service.card_price_available(turn.app, pack):
        card = pricing.pack_offer(pack, config.card_currency)
        rows.append(
            [kb.button(turn.t("buy.method.card", price=_money(card.price_minor, card.currency)), f"pp:{pack.code}:k")]
        )
    balance = await service.balance_of(turn.app, turn.user.id)
    if offer.currency.upper() == config.payments.currency.upper() and balance >= offer.price_minor:
        rows.append(
            [
                kb.button(
                    turn.t("buy.method.balance", balance=_money(balance, config.payments.currency)), f"pp:{pack.code}:b"
                )
            ]
        )
    rows.append([kb.button(turn.t("common.back"), "packs")])
    text = turn.t("packs.choose_method", title=pack.label(turn.lang), size=format_bytes(pack.gb * GIB), price=price)
    await turn.show(text, kb.keyboard(*rows))


async def pay(turn: Turn, plan_code: str, method: str, *, pack: bool = False, gift: bool = False) -> None:
    """Pay for a plan (with `pack`: a traffic pack; with `gift`: a plan bought as a gift) by `method`."""
    try:
        if gift and method not in GIFT_METHODS:
            await choose_plan(turn)
        elif method == "bank_card_save" and not pack:
            await _pay_checkout(turn, plan_code, "bank_card", save_method=True)
        elif method in ("bank_card", "sbp", "yookassa"):
            await _pay_checkout(turn, plan_code, None if method == "yookassa" else method, pack=pack)
        elif method == "cryptopay":
            await _pay_cryptopay(turn, plan_code=plan_code, pack=pack, gift=gift)
        elif method == "stars":
            await _pay_stars(turn, plan_code, pack=pack, gift=gift)
        elif method == "card":
            await _pay_card(turn, plan_code, pack=pack, gift=gift)
        elif method == "balance":
            await _pay_balance(turn, plan_code, pack=pack, gift=gift)
        else:
            await choose_plan(turn)
    except InsufficientBalance as exc:
        balance = _money(exc.balance_minor, turn.app.config.payments.currency)
        price = _money(exc.needed_minor, turn.app.config.payments.currency)
        await turn.answer(turn.t(exc.reason_key, balance=balance, price=price), alert=True)
    except ProviderUnavailable:
        await turn.answer(turn.t("payments.provider_unavailable"), alert=True)
    except PaymentError as exc:
        await turn.answer(
            turn.t(exc.reason_key if exc.reason_key in turn.ctx.texts.catalogs["en"] else "payments.error"), alert=True
        )


async def _pay_cryptopay(
    turn: Turn, *, plan_code: str | None = None, topup_minor: int | None = None, pack: bool = False, gift: bool = False
) -> None:
    client = turn.ctx.cryptopay
    if client is None:
        await turn.answer(turn.t("payments.method_unavailable"), alert=True)
        return
    purchase, url = await service.start_cryptopay_purchase(
        turn.app, client, turn.user.id, plan_code=plan_code, topup_minor=topup_minor, language=turn.lang, pack=pack,
        gift=gift,
    )  # fmt: skip
    price = _money(purchase.amount_minor, purchase.currency)
    if plan_code is not None and pack:
        found = turn.app.config.traffic_pack(plan_code)
        title = found.label(turn.lang) if found else plan_code
    elif plan_code is not None:
        plan = turn.app.config.plan(plan_code)
        title = plan.title.get(turn.lang, plan.code) if plan else plan_code
    else:
        title = turn.t("buy.topup")
    text = turn.t(
        "buy.cryptopay_invoice", price=price, title=title, minutes=turn.app.config.payments.purchase_ttl_minutes
    )
    await _show_payment_page(turn, text, price, url)


async def _pay_checkout(
    turn: Turn, plan_code: str, method: str | None, *, save_method: bool = False, pack: bool = False
) -> None:
    """Create the payment at the hosted checkout and show the button to its page.

    `save_method`: the user chose "Card + auto-renewal"; the page's text says what they consent to.
    """
    provider = turn.ctx.checkout
    if provider is None:
        await turn.answer(turn.t("payments.method_unavailable"), alert=True)
        return
    purchase, url = await checkout.start_checkout_purchase(
        turn.app, provider, turn.user.id, plan_code, method=method, language=turn.lang, cryptopay=turn.ctx.cryptopay,
        save_method=save_method, pack=pack,
    )  # fmt: skip
    price = _money(purchase.amount_minor, purchase.currency)
    found = turn.app.config.traffic_pack(plan_code) if pack else turn.app.config.plan(plan_code)
    title = found.label(turn.lang) if found else plan_code
    text = turn.t("buy.checkout_payment", price=price, title=title)
    if save_method:
        text = text + "\n\n" + turn.t("buy.card_autorenew_consent", price=price)
    await _show_payment_page(turn, text, price, url)


async def _show_payment_page(turn: Turn, text: str, price: str, url: str) -> None:
    """The purchase's text with a button to the provider's payment page (Crypto Pay, a hosted checkout)."""
    await turn.show(
        text,
        kb.keyboard(
            [kb.url_button(turn.t("buy.pay_button", price=price), url)], [kb.button(turn.t("common.menu"), "menu")]
        ),
    )


async def _pay_stars(turn: Turn, plan_code: str, *, pack: bool = False, gift: bool = False) -> None:
    invoice = await service.start_stars_purchase(
        turn.app, turn.user.id, plan_code, language=turn.lang, cryptopay=turn.ctx.cryptopay, pack=pack, gift=gift
    )
    await _send_invoice(turn, invoice)


async def _pay_card(turn: Turn, plan_code: str, *, pack: bool = False, gift: bool = False) -> None:
    invoice = await service.start_card_purchase(
        turn.app, turn.user.id, plan_code, language=turn.lang, cryptopay=turn.ctx.cryptopay, pack=pack, gift=gift
    )
    await _send_invoice(turn, invoice)


async def _send_invoice(turn: Turn, invoice: service.TelegramInvoice) -> None:
    await turn.answer()
    await turn.ctx.sender.call(
        turn.chat_id,
        lambda: turn.ctx.bot.send_invoice(
            turn.chat_id,
            title=invoice.title,
            description=invoice.description,
            payload=invoice.payload,
            currency=invoice.currency,
            prices=[telegram.LabeledPrice(invoice.title, invoice.amount)],
            provider_token=invoice.provider_token,
            need_email=invoice.need_email,
            send_email_to_provider=invoice.send_email_to_provider,
            provider_data=invoice.provider_data,
        ),
    )


async def _pay_balance(turn: Turn, plan_code: str, *, pack: bool = False, gift: bool = False) -> None:
    outcome = await service.pay_with_balance(
        turn.app, turn.user.id, plan_code, cryptopay=turn.ctx.cryptopay, pack=pack, gift=gift
    )
    log.info("event=paid_from_balance user_id=%d status=%s pack=%s", turn.user.id, outcome.status, pack)
    if gift:  # the code and its link arrive in the "payment received" message (outbox)
        await turn.show(turn.t("gifts.bought_from_balance"), kb.keyboard([kb.button(turn.t("gifts.mine"), "gifts")]))
        return
    await my_subscription(turn, turn.t("buy.paid_from_balance"))


async def choose_topup(turn: Turn) -> None:
    payments = turn.app.config.payments
    currency = payments.currency
    presets = pricing.topup_presets_minor(payments)
    await turn.app.db.run(conversation.set_state, turn.user.id, TOPUP_STATE, 600)
    balance = await service.balance_of(turn.app, turn.user.id)
    rows = [[kb.button(_money(minor, currency), f"tu:{minor}") for minor in presets]]
    rows.append([kb.button(turn.t("common.back"), "buy")])
    text = turn.t(
        "buy.topup_choose",
        balance=_money(balance, currency),
        min=_money(pricing.to_minor(payments.topup_min, currency), currency),
        max=_money(pricing.to_minor(payments.topup_max, currency), currency),
    )
    await turn.show(text, kb.keyboard(*rows))


async def topup_typed(turn: Turn, text: str) -> None:
    payments = turn.app.config.payments
    currency = payments.currency
    try:
        minor = pricing.parse_amount(text, currency)
        pricing.check_topup_amount(minor, payments)
    except pricing.InvalidAmount:
        await turn.reply(
            turn.t(
                "buy.topup_invalid",
                min=_money(pricing.to_minor(payments.topup_min, currency), currency),
                max=_money(pricing.to_minor(payments.topup_max, currency), currency),
            )
        )
        return
    await turn.app.db.run(conversation.clear_state, turn.user.id)
    try:
        await _pay_cryptopay(turn, topup_minor=minor)
    except ProviderUnavailable:
        await turn.reply(turn.t("payments.provider_unavailable"))


# --- Telegram Stars and cards: pre-checkout and successful payment -------------------------------


async def pre_checkout(ctx: BotContext, update_id: int, update: telegram.Update) -> bool:
    query = update.pre_checkout_query
    if query is None:
        return False
    ok: bool = False
    reason: str | None = "payments.precheckout.unknown"
    with trio.move_on_after(PRE_CHECKOUT_BUDGET):
        ok, reason = await service.check_pre_checkout(
            ctx.app, query.invoice_payload, query.total_amount, query.currency, user_id=query.from_user.id
        )
    lang = ctx.texts.language(query.from_user.language_code, ctx.app.config.telegram.default_language)
    message = None if ok else ctx.texts.get(lang, reason or "payments.precheckout.unknown")
    try:
        await ctx.sender.call(
            query.from_user.id,
            lambda: ctx.bot.answer_pre_checkout_query(query.id, ok, error_message=message),
            counts_as_message=False,
        )
    except telegram.error.BadRequest as exc:  # "query is too old": Telegram already told the user
        log.warning("event=pre_checkout_answer_failed update_id=%d error=%s", update_id, str(exc)[:120])
    return True


async def successful_payment(turn: Turn, message: telegram.Message) -> bool:
    payment = message.successful_payment
    if payment is None:
        return False
    if payment.currency != pricing.STARS_CURRENCY:
        outcome = await service.finalize_card_payment(
            turn.app,
            payment.invoice_payload,
            telegram_payment_charge_id=payment.telegram_payment_charge_id,
            provider_payment_charge_id=payment.provider_payment_charge_id,
            total_amount=payment.total_amount,
            currency=payment.currency,
        )
        log.info("event=card_payment user_id=%d status=%s", turn.user.id, outcome.status)
        return True
    outcome = await service.finalize_stars_payment(
        turn.app,
        payment.invoice_payload,
        telegram_payment_charge_id=payment.telegram_payment_charge_id,
        total_amount=payment.total_amount,
        currency=payment.currency,
    )
    log.info("event=stars_payment user_id=%d status=%s", turn.user.id, outcome.status)
    return True


def register(routes: Routes) -> None:
    async def buy_route(turn: Turn, args: list[str]) -> None:
        await choose_plan(turn)

    async def plan_route(turn: Turn, args: list[str]) -> None:
        if args:
            await choose_method(turn, args[0])
        else:
            await choose_plan(turn)

    async def pay_route(turn: Turn, args: list[str]) -> None:
        if len(args) == 2 and args[1] in METHOD_CODES:
            await pay(turn, args[0], METHOD_CODES[args[1]])
        else:
            await choose_plan(turn)

    async def topup_route(turn: Turn, args: list[str]) -> None:
        await choose_topup(turn)

    async def topup_preset_route(turn: Turn, args: list[str]) -> None:
        if not args or not args[0].isdecimal():
            await choose_topup(turn)
            return
        try:
            await _pay_cryptopay(turn, topup_minor=int(args[0]))
        except (ProviderUnavailable, pricing.InvalidAmount, PaymentError):
            await turn.answer(turn.t("payments.provider_unavailable"), alert=True)

    async def buy_command(turn: Turn, argument: str) -> None:
        await choose_plan(turn)

    async def packs_route(turn: Turn, args: list[str]) -> None:
        await choose_pack(turn)

    async def pack_route(turn: Turn, args: list[str]) -> None:
        if args:
            await choose_pack_method(turn, args[0])
        else:
            await choose_pack(turn)

    async def pay_pack_route(turn: Turn, args: list[str]) -> None:
        if len(args) == 2 and args[1] in METHOD_CODES:
            await pay(turn, args[0], METHOD_CODES[args[1]], pack=True)
        else:
            await choose_pack(turn)

    routes.callbacks.update(
        {"buy": buy_route, "plan": plan_route, "pay": pay_route, "topup": topup_route, "tu": topup_preset_route}
    )
    routes.callbacks.update({"packs": packs_route, "pk": pack_route, "pp": pay_pack_route})
    routes.commands["buy"] = buy_command
    routes.states[TOPUP_STATE] = topup_typed
    routes.update_hooks.append(pre_checkout)
    routes.message_hooks.append(successful_payment)
