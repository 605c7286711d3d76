"""Gifts: buy a plan for someone else, list one's gifts, redeem a code.

Buying goes through the buy flow's payment code with `gift=True` (a purchase of kind `gift`); when it
is paid, finalize makes the gift and the "payment received" message carries its code and link
(`vpnd.db.payments`). The recipient opens `t.me/<bot>?start=gift_<code>` (`vpnd.telegram.flows.menu`
hands the argument here), sends `/gift <code>`, or presses "Redeem a gift" and types it — the "waiting
for a gift code" state is a database row with an expiry, like the promo code's.

The buyer may redeem their own gift: they paid for it; it is then simply their plan.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from vpnd import money, pricing
from vpnd.db import conversation
from vpnd.db.gifts import Gift
from vpnd.payments import service
from vpnd.services import gifts as gift_service
from vpnd.telegram import keyboards as kb
from vpnd.telegram.flows import buy
from vpnd.telegram.turn import Turn
from vpnd.texts import Html

if TYPE_CHECKING:
    from vpnd.telegram.router import Routes

STATE = "gift_code"
STATE_TTL_SECONDS = 600
#: The gift's payment buttons: method code in the callback data → the buy flow's method.
METHODS = {"c": "cryptopay", "s": "stars", "k": "card", "b": "balance"}
#: "My gifts" shows this many, newest first.
LIST_LIMIT = 20


async def choose_method(turn: Turn, plan_code: str) -> None:
    """How to pay for the plan as a gift: the methods the grant path shares (see `buy.GIFT_METHODS`)."""
    config = turn.app.config
    plan = config.plan(plan_code)
    if plan is None or plan.trial or not plan.visible:
        await turn.show(turn.t("buy.plan_unavailable"), kb.keyboard([kb.button(turn.t("common.back"), "buy")]))
        return
    offer = pricing.plan_offer(plan)
    rows = []
    if turn.ctx.cryptopay is not None:
        rows.append([kb.button(turn.t("buy.method.cryptopay"), f"gp:{plan.code}:c")])
    if config.stars.enabled and plan.stars:
        rows.append([kb.button(turn.t("buy.method.stars", stars=f"{plan.stars} ⭐"), f"gp:{plan.code}:s")])
    if service.card_price_available(turn.app, plan):
        card = pricing.plan_offer(plan, config.card_currency)
        price = money.format_money(card.price_minor, card.currency)
        rows.append([kb.button(turn.t("buy.method.card", price=price), f"gp:{plan.code}:k")])
    balance = await service.balance_of(turn.app, turn.user.id)
    if offer.currency.upper() == config.payments.currency.upper() and balance >= offer.price_minor:
        shown = money.format_money(balance, config.payments.currency)
        rows.append([kb.button(turn.t("buy.method.balance", balance=shown), f"gp:{plan.code}:b")])
    rows.append([kb.button(turn.t("common.back"), f"plan:{plan.code}")])
    text = turn.t(
        "gifts.choose_method", title=plan.label(turn.lang), days=plan.days,
        price=money.format_money(offer.price_minor, offer.currency),
    )  # fmt: skip
    await turn.show(text, kb.keyboard(*rows))


def _status(turn: Turn, gift: Gift) -> str:
    if gift.status == "redeemed" and gift.redeemed_at is not None:
        return turn.t("gifts.status_redeemed", date=turn.format_date(gift.redeemed_at))
    if gift.status == "refunded":
        return turn.t("gifts.status_refunded")
    return turn.t("gifts.status_unredeemed")


def _link(turn: Turn, code: str) -> str:
    return f"https://t.me/{turn.ctx.bot_username}?start=gift_{code}"


async def my_gifts(turn: Turn) -> None:
    """The buyer's gifts (code, plan, status), newest first; the link of each one still to hand on."""
    found = await gift_service.gifts_of(turn.app, turn.user.id, limit=LIST_LIMIT)
    lines = []
    for gift in found:
        plan = turn.app.config.plan(gift.plan_code)
        item = turn.t(
            "gifts.item", code=gift.code, title=plan.label(turn.lang) if plan else gift.plan_code, days=gift.days,
            status=Html(_status(turn, gift)),
        )  # fmt: skip
        if gift.status == "unredeemed":
            item += "\n" + turn.t("gifts.item_link", link=_link(turn, gift.code))
        lines.append(item)
    text = turn.t("gifts.list", items=Html("\n\n".join(lines))) if lines else turn.t("gifts.none")
    await turn.show(
        text,
        kb.keyboard(
            [kb.button(turn.t("gifts.redeem_button"), "gift_redeem")],
            [kb.button(turn.t("gifts.buy_another"), "buy")],
            [kb.button(turn.t("common.menu"), "menu")],
        ),
    )


async def ask_code(turn: Turn) -> None:
    await turn.app.db.run(conversation.set_state, turn.user.id, STATE, STATE_TTL_SECONDS)
    await turn.show(turn.t("gifts.ask"), kb.keyboard([kb.button(turn.t("promo.cancel"), "gift_cancel")]))


async def cancel(turn: Turn) -> None:
    await turn.app.db.run(conversation.clear_state, turn.user.id)
    await turn.show(turn.t("gifts.cancelled"), kb.back_to_menu(turn.t))


async def redeem(turn: Turn, text: str, *, prefix: str = "") -> None:
    """Redeem the code in `text` (typed, `/gift <code>`, or `/start gift_<code>` with `prefix` the greeting)."""
    outcome = await gift_service.redeem_gift(turn.app, turn.user.id, text)
    if outcome.ok and outcome.gift is not None and outcome.subscription is not None:
        await turn.app.db.run(conversation.clear_state, turn.user.id)
        plan = turn.app.config.plan(outcome.gift.plan_code)
        reply = turn.t(
            "gifts.redeemed", title=plan.label(turn.lang) if plan else outcome.gift.plan_code,
            days=outcome.gift.days, expires=turn.format_date(outcome.subscription.expires_at),
        )  # fmt: skip
        keyboard = kb.keyboard(
            [kb.button(turn.t("menu.subscription"), "sub")], [kb.button(turn.t("common.menu"), "menu")]
        )
    else:
        minutes = max(1, math.ceil(outcome.retry_after_seconds / 60))
        reply = turn.t(outcome.reason or "gifts.not_found", minutes=minutes)
        # A wrong code: the user may retype (the state stays until it expires or they cancel).
        keyboard = kb.keyboard(
            [kb.button(turn.t("promo.cancel"), "gift_cancel")], [kb.button(turn.t("common.menu"), "menu")]
        )
    await turn.reply(f"{prefix}\n\n{reply}" if prefix else reply, keyboard)


def register(routes: Routes) -> None:
    async def gift_route(turn: Turn, args: list[str]) -> None:
        if args:
            await choose_method(turn, args[0])
        else:
            await buy.choose_plan(turn)

    async def gift_pay_route(turn: Turn, args: list[str]) -> None:
        if len(args) == 2 and args[1] in METHODS:
            await buy.pay(turn, args[0], METHODS[args[1]], gift=True)
        else:
            await buy.choose_plan(turn)

    async def gifts_route(turn: Turn, args: list[str]) -> None:
        await my_gifts(turn)

    async def redeem_route(turn: Turn, args: list[str]) -> None:
        await ask_code(turn)

    async def cancel_route(turn: Turn, args: list[str]) -> None:
        await cancel(turn)

    async def gift_command(turn: Turn, argument: str) -> None:
        if argument:
            await redeem(turn, argument)
        else:
            await ask_code(turn)

    async def gifts_command(turn: Turn, argument: str) -> None:
        await my_gifts(turn)

    routes.callbacks.update(
        {"gift": gift_route, "gp": gift_pay_route, "gifts": gifts_route, "gift_redeem": redeem_route,
         "gift_cancel": cancel_route}
    )  # fmt: skip
    routes.commands["gift"] = gift_command
    routes.commands["gifts"] = gifts_command
    routes.states[STATE] = redeem
