"""Promo codes: the bot asks, the user types, the code is validated and remembered for the next purchase.

The "waiting for a promo code" state is a database row with an expiry (it survives a restart and
dies on its own), not memory.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from vpnd.db import conversation
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


async def receive(turn: Turn, text: str) -> None:
    code = text.strip()[:64]
    check = await apply_promo_code(turn.app, turn.user.id, code, texts=turn.ctx.texts)
    if check.ok and check.promo is not None:
        await turn.app.db.run(conversation.clear_state, turn.user.id)
        await turn.reply(
            turn.t("promo.accepted", code=check.promo.code, percent=check.promo.percent),
            kb.keyboard([kb.button(turn.t("menu.buy"), "buy")], [kb.button(turn.t("common.menu"), "menu")]),
        )
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
