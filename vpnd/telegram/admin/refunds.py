"""Refunds of Telegram Stars and hosted checkout (YooKassa) payments, from a user's card."""

from __future__ import annotations

import telegram

from vpnd.db import checkout as checkout_db
from vpnd.db import payments as payments_db
from vpnd.payments.checkout import CheckoutError
from vpnd.payments.service import rules_of
from vpnd.pricing import format_money
from vpnd.services import admin_actions as actions
from vpnd.telegram.admin import views
from vpnd.telegram.admin.common import CallbackAction, actor
from vpnd.telegram.admin.users import show_user
from vpnd.telegram.admin.verbs import Press, Verb
from vpnd.telegram.turn import Turn


async def ask_refund(turn: Turn, press: Press) -> None:
    purchase_id = press.number(0)
    await turn.show(
        turn.t("admin.refund.confirm", id=purchase_id),
        views.confirm_keyboard(turn.t, Verb.REFUND_CONFIRM.data(purchase_id)),
    )


async def refund_confirmed(turn: Turn, press: Press) -> None:
    """Refund a Telegram Stars payment: the Bot API call first (outside any transaction), then the record.

    Telegram refuses a second refund of the same charge, so a repeated press changes nothing.
    Everything the payment gave is taken back in the recording transaction
    (`payments_db.reverse_refunded_purchase`): its days (the commit wakes the Xray writer, so access that
    ended is removed at once), the referrer's reward and any balance it credited.
    """
    purchase_id = press.number(0)
    charge = await turn.app.db.run(payments_db.stars_charge, purchase_id)
    if charge is None:
        await _refund_checkout(turn, purchase_id)
        return
    user_id, charge_id = charge
    try:
        await turn.ctx.sender.call(
            user_id,
            lambda: turn.ctx.bot.refund_star_payment(user_id, charge_id),
            counts_as_message=False,
        )
    except telegram.error.TelegramError as exc:
        await turn.app.db.run(actions.refund_failed, actor(turn), purchase_id, str(exc))
        await turn.show(
            turn.t("admin.refund.failed", id=purchase_id, error=str(exc)[:200]), views.back_keyboard(turn.t)
        )
        return

    await _recorded(turn, purchase_id, user_id, charge_id)


async def _refund_checkout(turn: Turn, purchase_id: int) -> None:
    """A hosted checkout payment: the provider's refund first (its idempotence key is the purchase, so a
    repeated press makes no second refund), then the same record. The provider's refund.succeeded
    notification finds it recorded and changes nothing."""
    charge = await turn.app.db.run(checkout_db.granted_charge, purchase_id)
    provider = turn.ctx.checkout
    if charge is None or provider is None or provider.name != charge.provider:
        await turn.show(turn.t("admin.refund.not_stars", id=purchase_id), views.back_keyboard(turn.t))
        return
    try:
        refund = await provider.refund(
            charge.payment_id, charge.amount_minor, charge.currency, key=f"vpnd-refund-{purchase_id}"
        )
    except CheckoutError as exc:
        await turn.app.db.run(actions.refund_failed, actor(turn), purchase_id, str(exc))
        await turn.show(
            turn.t("admin.refund.failed", id=purchase_id, error=str(exc)[:200]), views.back_keyboard(turn.t)
        )
        return
    await _recorded(turn, purchase_id, charge.user_id, refund.refund_id)


async def _recorded(turn: Turn, purchase_id: int, user_id: int, charge_id: str) -> None:
    reversal = await turn.app.db.run(
        actions.record_refund, actor(turn), purchase_id, charge_id, rules=rules_of(turn.app)
    )
    currency = turn.app.config.payments.currency
    referral = reversal.referral
    taken = (referral.debited_minor + referral.owed_minor) if referral else 0
    done = turn.t(
        "admin.refund.done",
        id=purchase_id,
        days=reversal.days_removed,
        reward=format_money(taken, currency),
        owed=format_money(referral.owed_minor if referral else 0, currency),
    )
    await show_user(turn, user_id, done)


CALLBACKS: dict[Verb, CallbackAction] = {Verb.REFUND: ask_refund, Verb.REFUND_CONFIRM: refund_confirmed}
