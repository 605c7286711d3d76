"""Extend everyone (an outage compensation) from the admin menu: the duration is typed ("2d", "12h"),
then confirmed with the number of subscriptions it will extend — paid only, or trials too. The action
is `vpnd.services.admin_actions.extend_everyone`: one statement, one audit row, once per confirmation."""

from __future__ import annotations

from typing import Any

from vpnd.services import admin_actions as actions
from vpnd.telegram import keyboards as kb
from vpnd.telegram.admin import views
from vpnd.telegram.admin.common import CallbackAction, StateAction, actor, clear_state, nonce, set_state, with_notice
from vpnd.telegram.admin.verbs import Press, Verb
from vpnd.telegram.turn import Turn

#: The admin is typing the duration.
DURATION = "adm_extend"


def duration_text(turn: Turn, hours: int) -> str:
    return turn.t("admin.extend.days", n=hours // 24) if hours % 24 == 0 else turn.t("admin.extend.hours", n=hours)


async def ask_duration(turn: Turn, press: Press) -> None:
    await set_state(turn, DURATION)
    await turn.show(turn.t("admin.extend.ask"), views.back_keyboard(turn.t))


async def duration_entered(turn: Turn, text: str, data: dict[str, Any]) -> None:
    try:
        duration = actions.parse_duration(text)
    except ValueError:
        await turn.reply(turn.t("admin.extend.bad", max=actions.MAX_GRANT_DAYS), views.back_keyboard(turn.t))
        return
    await clear_state(turn)
    hours = int(duration.total_seconds()) // 3600
    paid = await turn.app.db.run(actions.extendable, trials=False)
    everyone = await turn.app.db.run(actions.extendable, trials=True)
    once = nonce()
    await turn.reply(
        turn.t("admin.extend.confirm", duration=duration_text(turn, hours), paid=paid, all=everyone),
        kb.keyboard(
            [kb.button(turn.t("admin.extend.paid_only", n=paid), Verb.EXTEND_ALL_CONFIRM.data(hours, 0, once))],
            [kb.button(turn.t("admin.extend.with_trials", n=everyone), Verb.EXTEND_ALL_CONFIRM.data(hours, 1, once))],
            [kb.button(turn.t("admin.cancel"), Verb.CANCEL.data())],
        ),
    )


async def extend_confirmed(turn: Turn, press: Press) -> None:
    hours, trials, once = press.number(0), press.args[1] == "1", press.args[2]
    duration = actions.parse_duration(f"{hours}h")  # the verb's pattern bounds it; this checks the range
    done = await turn.app.db.run(actions.extend_everyone, actor(turn), duration, trials=trials, nonce=once)
    if done.repeated:
        notice = turn.t("admin.already_done")
    else:
        notice = turn.t("admin.extend.done", count=done.count, duration=duration_text(turn, hours))
    await turn.show(with_notice(notice, turn.t("admin.menu.title")), views.menu_keyboard(turn.t))


CALLBACKS: dict[Verb, CallbackAction] = {
    Verb.EXTEND_ALL: ask_duration,
    Verb.EXTEND_ALL_CONFIRM: extend_confirmed,
}

STATES: dict[str, StateAction] = {DURATION: duration_entered}
