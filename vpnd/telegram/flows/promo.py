"""Promo codes: the bot asks, the user types, the code is validated and remembered for the next purchase.

The "waiting for a promo code" state is a database row with an expiry (it survives a restart and
dies on its own), not memory.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from vpnd import money
from vpnd.db import conversation
from vpnd.db.promo import PromoCheck
from vpnd.payments.service import apply_promo_code
from vpnd.telegram import keyboards as kb
from vpnd.telegram.turn import Turn

if TYPE_CHECKING:
    from vpnd.telegram.router import Routes

STATE = "promo"
STATE_TTL_SECONDS = 600


async def ask(turn: Turn) -> None:
    await turn.app.db.run(conversation.set_state, turn.user.id, STATE, STATE_TTL_SECONDS)
    await turn.show(turn.t("promo.ask"), kb.keyboard([kb.button(turn.t("promo.cancel"), "promo_cancel")]))


async def cancel(turn: Turn) -> None:
    from vpnd.telegram.flows.menu import show_menu

    await turn.app.db.run(conversation.clear_state, turn.user.id)
    await show_menu(turn, turn.t("promo.cancelled"))


def accepted_text(turn: Turn, check: PromoCheck) -> str:
    """What an accepted code does, in the user's words: a discount remembered, or days / money given now."""
    promo = check.promo
    assert promo is not None
    if promo.kind == "days" and check.subscription is not None:
        return turn.t(
            "promo.days_added", code=promo.code, days=promo.grant_days or 0,
            expires=turn.format_date(check.subscription.expires_at),
        )  # fmt: skip
    if promo.kind == "balance":
        currency = promo.currency or turn.app.config.payments.currency
        return turn.t(
            "promo.balance_added", code=promo.code, amount=money.format_money(promo.amount_minor or 0, currency),
            balance=money.format_money(check.balance_minor or 0, currency),
        )  # fmt: skip
    if promo.kind == "amount":
        text = turn.t(
            "promo.accepted_amount", code=promo.code,
            amount=money.format_money(promo.amount_minor or 0, promo.currency or turn.app.config.payments.currency),
        )  # fmt: skip
    else:
        text = turn.t("promo.accepted", code=promo.code, percent=promo.percent or 0)
    if promo.plan_code is not None:
        plan = turn.app.config.plan(promo.plan_code)
        title = plan.label(turn.lang) if plan is not None else promo.plan_code
        text += "\n" + turn.t("promo.plan_only", plan=title)
    return text


async def receive(turn: Turn, text: str) -> None:
    code = text.strip()[:64]
    check = await apply_promo_code(turn.app, turn.user.id, code, texts=turn.ctx.texts)
    if check.ok and check.promo is not None:
        await turn.app.db.run(conversation.clear_state, turn.user.id)
        after = ("menu.subscription", "sub") if check.subscription is not None else ("menu.buy", "buy")
        first = kb.button(turn.t(after[0]), after[1])
        await turn.reply(accepted_text(turn, check), kb.keyboard([first], [kb.button(turn.t("common.menu"), "menu")]))
        return
    # Stay in the state (the user may retype) until it expires or they cancel.
    minutes = max(1, math.ceil(check.retry_after_seconds / 60))
    await turn.reply(
        turn.t(check.reason or "promo.not_found", minutes=minutes),
        kb.keyboard([kb.button(turn.t("promo.cancel"), "promo_cancel")]),
    )


def register(routes: Routes) -> None:
    async def promo_route(turn: Turn, args: list[str]) -> None:
        await ask(turn)

    async def cancel_route(turn: Turn, args: list[str]) -> None:
        await cancel(turn)

    async def promo_command(turn: Turn, argument: str) -> None:
        if argument:
            await receive(turn, argument)
        else:
            await ask(turn)

    routes.callbacks["promo"] = promo_route
    routes.callbacks["promo_cancel"] = cancel_route
    routes.commands["promo"] = promo_command
    routes.states[STATE] = receive
