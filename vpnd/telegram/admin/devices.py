"""A user's devices in the admin menu (from the user's card): the list, reset, one more slot.

Reset and grant are confirmed with a button carrying a nonce; the actions (with their audit rows) are
`vpnd.services.devices`, the same the `vpnd admin devices` / `grant-device` commands run.
"""

from __future__ import annotations

from functools import partial

from vpnd.devices import device_name
from vpnd.quota import limits_of
from vpnd.services import admin_actions as actions
from vpnd.services import devices as device_actions
from vpnd.telegram import keyboards as kb
from vpnd.telegram.admin import views
from vpnd.telegram.admin.common import CallbackAction, actor, nonce, not_found, with_notice
from vpnd.telegram.admin.verbs import Press, Verb
from vpnd.telegram.turn import Turn


async def show_devices(turn: Turn, user_id: int, notice: str = "") -> None:
    view = await turn.app.db.run(
        device_actions.admin_devices, actor(turn), user_id, partial(limits_of, turn.app.config)
    )
    if isinstance(view, actions.UserNotFound):
        await not_found(turn, user_id)
        return
    limit = str(view.limit) if view.limit else "∞"
    lines = [turn.t("admin.devices.title", id=user_id, used=view.used, limit=limit, extra=view.extra)]
    for d in view.devices:
        system = " ".join(part for part in (d.os, d.os_version) if part) or "?"
        lines.append(
            turn.t("admin.devices.item", name=device_name(d), os=system, seen=views.fmt_time(d.last_seen), hwid=d.hwid)
        )
    if not view.devices:
        lines.append(turn.t("admin.devices.none"))
    rows = [
        [
            kb.button(turn.t("admin.devices.reset"), Verb.DEVICES_RESET.data(user_id)),
            kb.button(turn.t("admin.devices.grant"), Verb.DEVICE_GRANT.data(user_id)),
        ],
        [kb.button(turn.t("admin.back"), Verb.USER.data(user_id))],
    ]
    await turn.show(with_notice(notice, "\n".join(lines)), kb.keyboard(*rows))


async def devices(turn: Turn, press: Press) -> None:
    await show_devices(turn, press.number(0))


async def ask_reset(turn: Turn, press: Press) -> None:
    user_id = press.number(0)
    confirm = Verb.DEVICES_RESET_CONFIRM.data(user_id, nonce())
    await turn.show(turn.t("admin.devices.reset_confirm", id=user_id), views.confirm_keyboard(turn.t, confirm))


async def reset_confirmed(turn: Turn, press: Press) -> None:
    user_id = press.number(0)
    done = await turn.app.db.run(device_actions.reset_devices, actor(turn), user_id, nonce=press.args[1])
    if isinstance(done, actions.UserNotFound):
        await not_found(turn, user_id)
        return
    if isinstance(done, device_actions.AlreadyDone):
        await show_devices(turn, user_id, turn.t("admin.already_done"))
        return
    await show_devices(turn, user_id, turn.t("admin.devices.reset_done", id=user_id, count=done))


async def ask_grant(turn: Turn, press: Press) -> None:
    user_id = press.number(0)
    confirm = Verb.DEVICE_GRANT_CONFIRM.data(user_id, nonce())
    await turn.show(turn.t("admin.devices.grant_confirm", id=user_id), views.confirm_keyboard(turn.t, confirm))


async def grant_confirmed(turn: Turn, press: Press) -> None:
    user_id = press.number(0)
    try:
        done = await turn.app.db.run(device_actions.grant_devices, actor(turn), user_id, 1, nonce=press.args[1])
    except ValueError:  # at the most extra slots already
        await show_devices(turn, user_id, turn.t("admin.devices.grant_max", max=device_actions.MAX_GRANT_DEVICES))
        return
    if isinstance(done, actions.UserNotFound):
        await not_found(turn, user_id)
        return
    if isinstance(done, actions.NoSubscription):
        await show_devices(turn, user_id, turn.t("admin.no_subscription", id=user_id))
        return
    if isinstance(done, device_actions.AlreadyDone):
        await show_devices(turn, user_id, turn.t("admin.already_done"))
        return
    await show_devices(turn, user_id, turn.t("admin.devices.grant_done", id=user_id, extra=done))


CALLBACKS: dict[Verb, CallbackAction] = {
    Verb.DEVICES: devices,
    Verb.DEVICES_RESET: ask_reset,
    Verb.DEVICES_RESET_CONFIRM: reset_confirmed,
    Verb.DEVICE_GRANT: ask_grant,
    Verb.DEVICE_GRANT_CONFIRM: grant_confirmed,
}
