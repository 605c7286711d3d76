"""Promo codes: the list, a new code (typed as one line), disabling one."""

from __future__ import annotations

import re
from typing import Any

from vpnd.db import promo
from vpnd.services import admin_actions as actions
from vpnd.telegram.admin import views
from vpnd.telegram.admin.common import PROMO, CallbackAction, StateAction, actor, clear_state, set_state, with_notice
from vpnd.telegram.admin.verbs import Press, Verb
from vpnd.telegram.turn import Turn

#: CODE PERCENT [MAX_USES] [DAYS_VALID], or CODE KIND VALUE [MAX_USES] [DAYS_VALID]
PROMO_INPUT = re.compile(
    r"(?P<code>\S+)\s+(?:(?P<percent>\d{1,3})|(?P<kind>[A-Za-z]{1,10})\s+(?P<value>[0-9][0-9.,]{0,15}))"
    r"(?:\s+(?P<uses>\d{1,9}))?(?:\s+(?P<days>\d{1,4}))?"
)


async def show_promos(turn: Turn, press: Press | None = None, notice: str = "") -> None:
    promos = await turn.app.db.run(promo.list_promos, limit=30)
    await turn.show(with_notice(notice, views.promo_text(turn.t, promos)), views.promo_keyboard(turn.t, promos))


async def ask_promo(turn: Turn, press: Press) -> None:
    await set_state(turn, PROMO)
    await turn.show(turn.t("admin.promo.ask"), views.back_keyboard(turn.t))


async def promo_entered(turn: Turn, text: str, data: dict[str, Any]) -> None:
    match = PROMO_INPUT.fullmatch(text.strip())
    if match is None:
        await turn.reply(turn.t("admin.promo.bad"), views.back_keyboard(turn.t))
        return
    try:
        terms = promo.PromoTerms.parse(
            (match["kind"] or "percent").lower(), match["percent"] or match["value"],
            currency=turn.app.config.payments.currency,
        )  # fmt: skip
        created = await turn.app.db.run(
            actions.create_promo,
            actor(turn),
            match["code"],
            terms,
            max_uses=int(match["uses"]) if match["uses"] else None,
            valid_days=int(match["days"]) if match["days"] else None,
        )
    except ValueError:  # InvalidPromoCode, a bad percent, limit or number of days
        await turn.reply(turn.t("admin.promo.bad"), views.back_keyboard(turn.t))
        return
    if isinstance(created, actions.PromoExists):
        await turn.reply(turn.t("admin.promo.exists", code=created.target), views.back_keyboard(turn.t))
        return
    await clear_state(turn)
    promos = await turn.app.db.run(promo.list_promos, limit=30)
    notice = turn.t("admin.promo.created", code=created.code, value=views.promo_value(turn.t, created))
    await turn.reply(with_notice(notice, views.promo_text(turn.t, promos)), views.promo_keyboard(turn.t, promos))


async def disable_promo(turn: Turn, press: Press) -> None:
    disabled = await turn.app.db.run(actions.disable_promo, actor(turn), press.args[0])
    notice = "" if isinstance(disabled, actions.PromoNotFound) else turn.t("admin.promo.disabled_done", code=disabled)
    await show_promos(turn, notice=notice)


CALLBACKS: dict[Verb, CallbackAction] = {
    Verb.PROMOS: show_promos,
    Verb.PROMO_NEW: ask_promo,
    Verb.PROMO_DISABLE: disable_promo,
}

STATES: dict[str, StateAction] = {PROMO: promo_entered}
