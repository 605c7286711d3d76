"""Refunding a user's unredeemed gift to their balance, from their card (the CLI: `vpnd admin gift refund`).

No nonce is needed on the confirmation: the refund itself happens at most once (a conditional UPDATE of the
gift), so a second press is refused ("refunded already") and audited like any refusal.
"""

from __future__ import annotations

from vpnd.payments.service import rules_of
from vpnd.pricing import format_money
from vpnd.services import admin_actions as actions
from vpnd.telegram.admin import views
from vpnd.telegram.admin.common import CallbackAction, actor
from vpnd.telegram.admin.users import show_user
from vpnd.telegram.admin.verbs import Press, Verb
from vpnd.telegram.turn import Turn


async def ask_refund(turn: Turn, press: Press) -> None:
    code = press.args[0]
    await turn.show(
        turn.t("admin.gift.confirm", code=code), views.confirm_keyboard(turn.t, Verb.GIFT_REFUND_CONFIRM.data(code))
    )


async def refund_confirmed(turn: Turn, press: Press) -> None:
    code = press.args[0]
    done = await turn.app.db.run(actions.refund_gift, actor(turn), code, rules=rules_of(turn.app))
    if isinstance(done, actions.GiftNotFound):
        await turn.show(turn.t("admin.gift.not_found", code=code), views.back_keyboard(turn.t))
        return
    if isinstance(done, actions.GiftNotRefundable):
        why = turn.t(f"admin.gift.why_{done.why}")
        await turn.show(turn.t("admin.gift.not_refundable", code=code, why=why), views.back_keyboard(turn.t))
        return
    assert done.gift is not None
    gift = done.gift
    notice = turn.t(
        "admin.gift.refunded", code=gift.code, amount=format_money(gift.value_minor, gift.currency),
        balance=format_money(done.balance_minor, gift.currency),
    )  # fmt: skip
    await show_user(turn, gift.buyer_id, notice)


CALLBACKS: dict[Verb, CallbackAction] = {Verb.GIFT_REFUND: ask_refund, Verb.GIFT_REFUND_CONFIRM: refund_confirmed}
