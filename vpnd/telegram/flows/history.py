"""My payments: the user's purchases, top-ups and refunds, newest first, a page at a time.

The button's data carries only the page number (`pays:<page>`); whose payments is always the sender of
the update, so no button, however forged, shows another user's rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vpnd.db import history
from vpnd.money import format_money
from vpnd.telegram import keyboards as kb
from vpnd.telegram.turn import Turn
from vpnd.texts import Html

if TYPE_CHECKING:
    from vpnd.telegram.router import Routes

PER_PAGE = 10
#: At most this many digits of page number are read (only a forged button has more).
MAX_PAGE_DIGITS = 4
VERB = "pays"


async def show(turn: Turn, page: int = 0) -> None:
    found = await turn.app.db.run(history.history_page, turn.user.id, page, PER_PAGE)
    if not found.entries and page == 0:
        await turn.show(turn.t("history.empty"), kb.back_to_menu(turn.t))
        return
    lines = "\n".join(_line(turn, entry) for entry in found.entries)
    nav = [kb.button(turn.t("history.newer"), f"{VERB}:{page - 1}")] if page > 0 else []
    if found.has_more:
        nav.append(kb.button(turn.t("history.older"), f"{VERB}:{page + 1}"))
    keyboard = kb.keyboard(nav, [kb.button(turn.t("common.menu"), "menu")])
    await turn.show(turn.t("history.title", page=page + 1, entries=Html(lines)), keyboard)


def _line(turn: Turn, entry: history.HistoryEntry) -> str:
    if entry.kind in ("plan", "gift"):
        plan = turn.app.config.plan(entry.plan_code or "")
        what = plan.title.get(turn.lang, plan.code) if plan is not None else entry.plan_code or "?"
        what = f"🎁 {what}" if entry.kind == "gift" else what
    elif entry.kind == "pack":
        pack = turn.app.config.traffic_pack(entry.plan_code or "")
        what = pack.label(turn.lang) if pack is not None else entry.plan_code or "?"
    else:
        what = turn.t("history.topup")
    return turn.t(
        "history.entry",
        date=turn.format_date(entry.paid_at),
        what=what,
        amount=format_money(entry.amount_minor, entry.currency),
        method=history.method_name(turn.ctx.texts, turn.lang, entry.method, auto_renewal=entry.auto_renewal),
        status=turn.ctx.texts.get_or(turn.lang, f"history.status.{entry.outcome}", entry.outcome),
    )


def register(routes: Routes) -> None:
    async def page_route(turn: Turn, args: list[str]) -> None:
        text = args[0] if args else "0"
        await show(turn, int(text) if text.isdecimal() and len(text) <= MAX_PAGE_DIGITS else 0)

    async def payments_command(turn: Turn, argument: str) -> None:
        await show(turn)

    routes.callbacks[VERB] = page_route
    routes.commands["payments"] = payments_command
