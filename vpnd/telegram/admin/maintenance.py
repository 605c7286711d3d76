"""Maintenance mode from the admin menu: its status, "Turn on…" (the banner text is typed next) and
"Turn off". The switch is `vpnd.services.maintenance.switch`, audited like every admin action."""

from __future__ import annotations

from typing import Any

from vpnd.db.maintenance import Maintenance
from vpnd.services import maintenance as service
from vpnd.telegram import keyboards as kb
from vpnd.telegram.admin import views
from vpnd.telegram.admin.common import CallbackAction, StateAction, actor, clear_state, set_state, with_notice
from vpnd.telegram.admin.verbs import Press, Verb
from vpnd.telegram.turn import Turn

#: The admin is typing the banner text.
TEXT = "adm_maint"
#: Typed instead of a text: the default text of each user's language.
DEFAULT_TEXT = "-"


def status_text(turn: Turn, state: Maintenance) -> str:
    if not state.on:
        return turn.t("admin.maintenance.off")
    since = turn.format_date(state.since) if state.since is not None else "—"
    return turn.t("admin.maintenance.on", since=since, message=state.message or turn.t("maintenance.default_message"))


def status_keyboard(turn: Turn, state: Maintenance) -> kb.Keyboard:
    switch = (
        kb.button(turn.t("admin.maintenance.turn_off"), Verb.MAINTENANCE_OFF.data())
        if state.on
        else kb.button(turn.t("admin.maintenance.turn_on"), Verb.MAINTENANCE_ON.data())
    )
    return kb.keyboard([switch], [kb.button(turn.t("admin.back"), Verb.MENU.data())])


async def show_status(turn: Turn, press: Press | None = None, notice: str = "") -> None:
    state = await turn.app.db.run(service.status)
    await turn.show(with_notice(notice, status_text(turn, state)), status_keyboard(turn, state))


async def ask_text(turn: Turn, press: Press) -> None:
    await set_state(turn, TEXT)
    await turn.show(turn.t("admin.maintenance.ask", limit=service.MAX_MESSAGE_CHARS), views.back_keyboard(turn.t))


async def text_entered(turn: Turn, text: str, data: dict[str, Any]) -> None:
    message = "" if text.strip() == DEFAULT_TEXT else text
    try:
        state = await turn.app.db.run(service.switch, actor(turn), True, message)
    except ValueError:  # too long, or control characters: ask again (the state stays)
        await turn.reply(turn.t("admin.maintenance.bad", limit=service.MAX_MESSAGE_CHARS), views.back_keyboard(turn.t))
        return
    await clear_state(turn)
    await turn.reply(
        with_notice(turn.t("admin.maintenance.switched_on"), status_text(turn, state)), status_keyboard(turn, state)
    )


async def switch_off(turn: Turn, press: Press) -> None:
    await turn.app.db.run(service.switch, actor(turn), False)
    await show_status(turn, notice=turn.t("admin.maintenance.switched_off"))


CALLBACKS: dict[Verb, CallbackAction] = {
    Verb.MAINTENANCE: show_status,
    Verb.MAINTENANCE_ON: ask_text,
    Verb.MAINTENANCE_OFF: switch_off,
}

STATES: dict[str, StateAction] = {TEXT: text_entered}
