"""The admin menu (`/admin`): stats, health, users and their access, refunds, promo codes, broadcasts,
CSV exports — one module per concern, the actions themselves in `vpnd.services.admin_actions`.

Staff are `[telegram] admin_ids` (owners) and `[telegram] admin_roles` (admins, support). Each button
and typed input is checked against the staff member's role before its handler runs
(`vpnd.telegram.admin.roles`): a forbidden one is refused politely and audited (``forbidden``).

For anyone else `/admin`, every ``adm`` button and every ``adm_*`` state do not exist: they get the
very reply an unknown command or button gets (so nothing reveals them), nothing changes, and the
attempt is audited. An admin's button is parsed through
`verbs.parse`: one that is unknown or of the wrong shape (stale, forged) gets a polite answer
(``admin.bad_button``) and changes nothing. Multi-step inputs (a user id, days, an amount, a
broadcast draft) are durable conversation states (`adm_*`), so they survive a restart and expire
on their own.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from vpnd.db import conversation
from vpnd.telegram.admin import (
    broadcasts,
    callback_data,
    compensate,
    devices,
    export,
    gifts,
    maintenance,
    people,
    promo,
    refunds,
    roles,
    rotation,
    stats,
    users,
    withdrawals,
)
from vpnd.telegram.admin.common import (
    CallbackAction,
    StateAction,
    admin_menu,
    cancel_action,
    is_admin,
    log,
    permitted,
    refuse,
    show_menu,
)
from vpnd.telegram.admin.verbs import Verb, parse
from vpnd.telegram.flows import menu
from vpnd.telegram.turn import Turn

if TYPE_CHECKING:
    from vpnd.telegram.router import Routes

__all__ = ["CALLBACKS", "STATES", "is_admin", "register"]

#: Every verb's handler (a test checks that no verb is left without one).
CALLBACKS: dict[Verb, CallbackAction] = {
    Verb.MENU: show_menu,
    Verb.CANCEL: cancel_action,
    **stats.CALLBACKS,
    **users.CALLBACKS,
    **devices.CALLBACKS,
    **refunds.CALLBACKS,
    **gifts.CALLBACKS,
    **promo.CALLBACKS,
    **broadcasts.CALLBACKS,
    **export.CALLBACKS,
    **maintenance.CALLBACKS,
    **compensate.CALLBACKS,
    **rotation.CALLBACKS,
    **withdrawals.CALLBACKS,
    **people.CALLBACKS,
}

STATES: dict[str, StateAction] = {
    **users.STATES,
    **promo.STATES,
    **broadcasts.STATES,
    **maintenance.STATES,
    **compensate.STATES,
    **people.STATES,
}


def register(routes: Routes) -> None:
    """/admin, the ``adm`` callbacks and the ``adm_*`` states (all refused to non-admins)."""

    async def admin_command(turn: Turn, argument: str) -> None:
        if not is_admin(turn):
            await refuse(turn, "command", "/admin")
            await menu.show_menu(turn, turn.t("common.unknown"))  # what an unknown command gets
            return
        await admin_menu(turn)

    async def admin_callback(turn: Turn, args: list[str]) -> None:
        data = callback_data.join(args)
        if not is_admin(turn):
            await refuse(turn, "callback", data)
            await menu.show_menu(turn)  # what an unknown button gets
            return
        press = parse(data)
        try:
            if press is not None:
                if not await permitted(turn, roles.verb_action(press.verb), data):
                    return
                await CALLBACKS[press.verb](turn, press)
                return
        except ValueError:  # arguments of the right shape but out of range (e.g. 0 days)
            pass
        log.info("event=admin_bad_callback data=%s", data[:64])
        await admin_menu(turn, turn.t("admin.bad_button"))

    def state_route(name: str) -> Callable[[Turn, str], Awaitable[None]]:
        async def route(turn: Turn, text: str) -> None:
            if not is_admin(turn):
                await refuse(turn, "state", name)
                await turn.app.db.run(conversation.clear_state, turn.user.id)
                await menu.show_menu(turn, turn.t("common.unknown"))
                return
            if not await permitted(turn, roles.STATE_ACTIONS.get(name, name), name):
                return
            state = await turn.app.db.run(conversation.get_state, turn.user.id)
            await STATES[name](turn, text, state.data if state is not None else {})

        return route

    routes.commands["admin"] = admin_command
    routes.hidden_commands.add("admin")
    routes.callbacks[callback_data.PREFIX] = admin_callback
    for name in STATES:
        routes.states[name] = state_route(name)
    routes.message_hooks.append(broadcasts.media_entered)
