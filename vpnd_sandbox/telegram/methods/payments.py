"""Bot API methods of payments: invoices (Telegram Stars, or fiat through a card provider's token),
pre-checkout answers, Stars refunds.

Checked like Telegram: a known currency (`vpnd.money.TELEGRAM_CURRENCIES` or XTR); XTR with an empty
provider token and one price; fiat with the provider token BotFather connected (`payment_provider_token`)
and integer amounts in the currency's minor units whose total is positive.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from vpnd.money import TELEGRAM_CURRENCIES
from vpnd_sandbox.telegram.limits import take_send_slot
from vpnd_sandbox.telegram.methods.checks import chat_of, reply_markup
from vpnd_sandbox.telegram.methods.messages import QUERY_TOO_OLD
from vpnd_sandbox.telegram.records import Invoice, Notice, StarPayment
from vpnd_sandbox.telegram.wire import JSONDict, Params, bad_request

if TYPE_CHECKING:
    from vpnd_sandbox.telegram.state import FakeTelegram


def send_invoice(fake: FakeTelegram, params: Params) -> JSONDict:
    user = chat_of(fake, params)
    fields: dict[str, str] = {}
    for name, max_length in (("title", 32), ("description", 255)):
        value = params.get_str(name) or ""
        if not value:
            raise bad_request(f"{name} is empty")
        if len(value) > max_length:
            raise bad_request(f"{name.upper()}_INVALID")
        fields[name] = value
    payload = params.get_str("payload") or ""
    if not 1 <= len(payload.encode()) <= 128:
        raise bad_request("INVOICE_PAYLOAD_INVALID")
    currency = params.get_str("currency") or ""
    if not currency:
        raise bad_request("currency is empty")
    if currency != "XTR" and currency not in TELEGRAM_CURRENCIES:
        raise bad_request("CURRENCY_INVALID")
    token = params.get_str("provider_token") or ""
    if token != ("" if currency == "XTR" else fake.payment_provider_token):
        # Stars take no provider token; fiat needs the one BotFather connected.
        raise bad_request("PAYMENT_PROVIDER_INVALID")
    prices = params.get_json("prices", error="can't parse prices JSON object")
    if not isinstance(prices, list) or not prices or (currency == "XTR" and len(prices) != 1):
        raise bad_request("prices must contain exactly one item for payments in Telegram Stars")
    for price in prices:
        if (
            not isinstance(price, dict)
            or not isinstance(price.get("label"), str)
            or not isinstance(price.get("amount"), int)
            or isinstance(price.get("amount"), bool)
        ):
            raise bad_request("can't parse prices JSON object")
    total = sum(price["amount"] for price in prices)
    if not 1 <= total <= (100_000 if currency == "XTR" else 10**12):
        raise bad_request("CURRENCY_TOTAL_AMOUNT_INVALID")
    markup = reply_markup(params)
    if markup is not None:
        first = (markup.get("inline_keyboard") or [[]])[0][:1]
        if not first or not first[0].get("pay"):
            raise bad_request("REPLY_MARKUP_BUY_EMPTY")
    take_send_slot(fake, user.id)
    invoice = Invoice(
        title=fields["title"],
        description=fields["description"],
        payload=payload,
        currency=currency,
        total_amount=total,
        prices=[{"label": price["label"], "amount": price["amount"]} for price in prices],
        start_parameter=params.get_str("start_parameter") or "",
        need_email=params.get_bool("need_email"),
        send_email_to_provider=params.get_bool("send_email_to_provider"),
        provider_data=params.get_str("provider_data"),
    )
    message = fake._add_message(user, from_bot=True, invoice=invoice, reply_markup=markup)
    return message.to_api()


def answer_pre_checkout_query(fake: FakeTelegram, params: Params) -> bool:
    query = fake.pre_checkout_queries.get(params.get_str("pre_checkout_query_id") or "")
    if query is None or query.answered:
        raise bad_request(QUERY_TOO_OLD)
    if fake.pre_checkout_timeout is not None and trio.current_time() - query.created_at > fake.pre_checkout_timeout:
        raise bad_request(QUERY_TOO_OLD)
    if not params.has("ok"):
        raise bad_request("ok is empty")
    ok = params.get_bool("ok")
    error_message = params.get_str("error_message")
    if not ok and not error_message:
        raise bad_request("ERROR_MESSAGE_EMPTY")
    query.answered = True
    query.ok = ok
    user = fake.users[query.user_id]
    if not ok:
        query.error_message = error_message
        fake.notices.append(
            Notice(seq=fake.change_seq + 1, chat_id=user.id, kind="payment_error", text=error_message or "")
        )
        fake._changed()
        return True
    stars = query.invoice.currency == "XTR"
    charge_id = fake._new_id("stxFAKE" if stars else "tgcFAKE")
    query.charge_id = charge_id
    query.invoice.paid_charge_id = charge_id
    if stars:  # refundStarPayment refunds Stars only; a card is refunded at its provider
        fake.payments[charge_id] = StarPayment(
            charge_id=charge_id, user_id=user.id, amount=query.invoice.total_amount, payload=query.invoice.payload
        )
    payment = {
        "currency": query.invoice.currency,
        "total_amount": query.invoice.total_amount,
        "invoice_payload": query.invoice.payload,
        "telegram_payment_charge_id": charge_id,
        "provider_payment_charge_id": "" if stars else fake._new_id("prvFAKE"),
    }
    if query.invoice.need_email:
        payment["order_info"] = {"email": f"user{user.id}@example.test"}
    paid = fake._add_message(user, from_bot=False, successful_payment=payment)
    fake._queue_update("message", paid.to_api())
    return True


def refund_star_payment(fake: FakeTelegram, params: Params) -> bool:
    user_id = params.get_int("user_id")
    if user_id is None:
        raise bad_request("user_id is empty")
    payment = fake.payments.get(params.get_str("telegram_payment_charge_id") or "")
    if payment is None:
        raise bad_request("CHARGE_NOT_FOUND")
    if payment.user_id != user_id:
        raise bad_request("USER_ID_INVALID")
    if payment.refunded:
        raise bad_request("CHARGE_ALREADY_REFUNDED")
    payment.refunded = True
    user = fake.users[user_id]
    refund = fake._add_message(
        user,
        from_bot=False,
        refunded_payment={
            "currency": "XTR",
            "total_amount": payment.amount,
            "invoice_payload": payment.payload,
            "telegram_payment_charge_id": payment.charge_id,
        },
    )
    fake._queue_update("message", refund.to_api())
    return True
