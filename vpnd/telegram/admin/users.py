"""A user's card and the actions on it: grant days, revoke, reissue the key, auto-renew, balance.

Changes that need a second look are confirmed with a button carrying a nonce (`common.nonce`); the
action itself (with its audit row) is `vpnd.services.admin_actions`.
"""

from __future__ import annotations

from typing import Any

from vpnd.db import admin as admin_db
from vpnd.db import gifts as gifts_db
from vpnd.db.admin import UserDetails
from vpnd.db.subscriptions import Subscription
from vpnd.pricing import InvalidAmount, format_money, parse_amount
from vpnd.quota import Limits, limits_of
from vpnd.services import admin_actions as actions
from vpnd.telegram import keyboards as kb
from vpnd.telegram.admin import people_views, roles, views
from vpnd.telegram.admin.common import (
    BALANCE,
    FIND,
    GRANT,
    CallbackAction,
    StateAction,
    actor,
    clear_state,
    nonce,
    not_found,
    set_state,
    with_notice,
)
from vpnd.telegram.admin.verbs import Press, Verb
from vpnd.telegram.turn import Turn


async def ask_user(turn: Turn, press: Press) -> None:
    await set_state(turn, FIND)
    await turn.show(turn.t("admin.user.ask"), views.back_keyboard(turn.t))


async def find_user(turn: Turn, text: str, data: dict[str, Any]) -> None:
    details = await turn.app.db.run(actions.lookup, actor(turn), text)
    if isinstance(details, actions.UserNotFound):
        await turn.reply(turn.t("admin.user.not_found", query=details.target), views.back_keyboard(turn.t))
        return
    await clear_state(turn)
    await turn.reply(
        views.user_text(turn.t, details, turn.app.config.payments.currency, _limits(turn, details)),
        await _keyboard(turn, details),
    )


async def show_user(turn: Turn, user_id: int, notice: str = "") -> None:
    details = await turn.app.db.run(admin_db.user_details, user_id)
    if details is None:
        await not_found(turn, user_id)
        return
    text = views.user_text(turn.t, details, turn.app.config.payments.currency, _limits(turn, details))
    await turn.show(with_notice(notice, text), await _keyboard(turn, details))


async def _keyboard(turn: Turn, details: UserDetails) -> kb.Keyboard:
    """The user's card buttons, with a refund button for each of their newest unredeemed gifts."""
    gifts = await turn.app.db.run(gifts_db.unredeemed_of, details.user.id)
    keyboard = views.user_keyboard(turn.t, details, [gift.code for gift in gifts])
    role = roles.role(turn)
    *rows, back = keyboard["inline_keyboard"]  # people's buttons go above "Back"; then what the role may press
    return roles.visible(kb.keyboard(*rows, *people_views.card_rows(turn.t, details, role), back), role)


def _limits(turn: Turn, details: UserDetails) -> tuple[Limits, str] | None:
    """The subscription's limits from the running config, and its plan's name."""
    sub = details.subscription
    if sub is None:
        return None
    plan = turn.app.config.plan(sub.plan_code) if sub.plan_code else None
    label = plan.label(turn.lang) if plan is not None else (sub.plan_code or "—")
    return limits_of(turn.app.config, sub.plan_code, sub.kind), label


async def user_card(turn: Turn, press: Press) -> None:
    await clear_state(turn)
    await show_user(turn, press.number(0))


# --- grant ----------------------------------------------------------------------------------------


async def ask_grant(turn: Turn, press: Press) -> None:
    user_id = press.number(0)
    await set_state(turn, GRANT, {"user_id": user_id})
    await turn.show(turn.t("admin.grant.ask", id=user_id), views.back_keyboard(turn.t))


async def grant_days_entered(turn: Turn, text: str, data: dict[str, Any]) -> None:
    user_id = int(data.get("user_id", 0))
    if not text.strip().isdecimal() or not 1 <= int(text.strip()) <= actions.MAX_GRANT_DAYS:
        await turn.reply(turn.t("admin.grant.bad_days", max=actions.MAX_GRANT_DAYS), views.back_keyboard(turn.t))
        return
    days = int(text.strip())
    await clear_state(turn)
    once = nonce()
    await turn.reply(
        turn.t("admin.grant.confirm", days=days, id=user_id),
        kb.keyboard(
            [kb.button(turn.t("admin.grant.notify"), Verb.GRANT_CONFIRM.data(user_id, days, 1, once))],
            [kb.button(turn.t("admin.grant.silent"), Verb.GRANT_CONFIRM.data(user_id, days, 0, once))],
            [kb.button(turn.t("admin.cancel"), Verb.CANCEL.data())],
        ),
    )


async def grant_confirmed(turn: Turn, press: Press) -> None:
    user_id, days, notify, once = press.number(0), press.number(1), press.args[2] == "1", press.args[3]
    texts = turn.ctx.texts

    def user_text(lang: str, sub: Subscription) -> str:
        return texts.get(lang, "admin.grant.user_text", days=days, expires=views.fmt_time(sub.expires_at))

    done = await turn.app.db.run(
        actions.grant, actor(turn), user_id, days, notify_text=user_text if notify else None, nonce=once
    )
    if isinstance(done, actions.UserNotFound):
        await not_found(turn, user_id)
        return
    if done.repeated:
        await show_user(turn, user_id, turn.t("admin.already_done"))
        return
    assert done.subscription is not None
    notice = turn.t("admin.grant.done", days=days, id=user_id, expires=views.fmt_time(done.subscription.expires_at))
    await show_user(turn, user_id, notice)


# --- revoke, reissue, auto-renew ------------------------------------------------------------------


async def ask_revoke(turn: Turn, press: Press) -> None:
    user_id = press.number(0)
    confirm = Verb.REVOKE_CONFIRM.data(user_id, nonce())
    await turn.show(turn.t("admin.revoke.confirm", id=user_id), views.confirm_keyboard(turn.t, confirm))


async def revoke_confirmed(turn: Turn, press: Press) -> None:
    user_id = press.number(0)
    done = await turn.app.db.run(actions.revoke, actor(turn), user_id, nonce=press.args[1])
    await _access_changed(turn, user_id, done, "admin.revoke.done")


async def ask_reissue(turn: Turn, press: Press) -> None:
    user_id = press.number(0)
    confirm = Verb.REISSUE_CONFIRM.data(user_id, nonce())
    await turn.show(turn.t("admin.reissue.confirm", id=user_id), views.confirm_keyboard(turn.t, confirm))


async def reissue_confirmed(turn: Turn, press: Press) -> None:
    user_id = press.number(0)
    done = await turn.app.db.run(actions.reissue, actor(turn), user_id, nonce=press.args[1])
    await _access_changed(turn, user_id, done, "admin.reissue.done")


async def _access_changed(
    turn: Turn, user_id: int, done: actions.Access | actions.UserNotFound | actions.NoSubscription, done_key: str
) -> None:
    """After a confirmed revoke/reissue: show the card (the commit itself wakes the Xray writer)."""
    if isinstance(done, actions.UserNotFound):
        await not_found(turn, user_id)
        return
    if isinstance(done, actions.NoSubscription):
        notice = turn.t("admin.no_subscription", id=user_id)
    elif done.repeated:
        notice = turn.t("admin.already_done")
    else:
        notice = turn.t(done_key, id=user_id)
    await show_user(turn, user_id, notice)


async def toggle_auto_renew(turn: Turn, press: Press) -> None:
    user_id, enabled = press.number(0), press.args[1] == "on"
    done = await turn.app.db.run(actions.set_auto_renew, actor(turn), user_id, enabled)
    if isinstance(done, actions.UserNotFound):
        await not_found(turn, user_id)
        return
    if isinstance(done, actions.NoSubscription):
        await show_user(turn, user_id, turn.t("admin.no_subscription", id=user_id))
        return
    state = turn.t("admin.on" if enabled else "admin.off")
    await show_user(turn, user_id, turn.t("admin.auto_renew.done", id=user_id, state=state))


# --- ban -----------------------------------------------------------------------------------------


async def ask_ban(turn: Turn, press: Press) -> None:
    user_id, ban = press.number(0), press.args[1] == "on"
    confirm = Verb.BAN_CONFIRM.data(user_id, press.args[1], nonce())
    key = "admin.ban.confirm" if ban else "admin.unban.confirm"
    await turn.show(turn.t(key, id=user_id), views.confirm_keyboard(turn.t, confirm))


async def ban_confirmed(turn: Turn, press: Press) -> None:
    user_id, ban = press.number(0), press.args[1] == "on"
    done = await turn.app.db.run(
        actions.set_banned,
        actor(turn),
        user_id,
        ban,
        admin_ids=(*turn.app.config.telegram.admin_ids, *turn.app.config.telegram.admin_roles),  # staff
        nonce=press.args[2],
    )
    if isinstance(done, actions.UserNotFound):
        await not_found(turn, user_id)
        return
    if isinstance(done, actions.CannotBanAdmin):
        await show_user(turn, user_id, turn.t("admin.ban.admin", id=user_id))
        return
    if not done.changed:
        notice = turn.t("admin.already_done")
    else:
        notice = turn.t("admin.ban.done" if ban else "admin.unban.done", id=user_id)
    await show_user(turn, user_id, notice)


# --- balance --------------------------------------------------------------------------------------


async def ask_balance(turn: Turn, press: Press) -> None:
    user_id = press.number(0)
    details = await turn.app.db.run(admin_db.user_details, user_id)
    if details is None:
        await not_found(turn, user_id)
        return
    await set_state(turn, BALANCE, {"user_id": user_id})
    balance = format_money(details.user.balance_minor, turn.app.config.payments.currency)
    await turn.show(turn.t("admin.balance.ask", id=user_id, balance=balance), views.back_keyboard(turn.t))


def parse_delta(text: str, currency: str) -> int:
    """ "+5", "5", "-2.50" → signed minor units (InvalidAmount when it is not an amount)."""
    cleaned = text.strip()
    sign = -1 if cleaned.startswith("-") else 1
    return sign * parse_amount(cleaned.lstrip("+-"), currency)


async def balance_entered(turn: Turn, text: str, data: dict[str, Any]) -> None:
    user_id = int(data.get("user_id", 0))
    currency = turn.app.config.payments.currency
    try:
        delta = parse_delta(text, currency)
    except InvalidAmount:
        await turn.reply(turn.t("admin.balance.bad"), views.back_keyboard(turn.t))
        return
    await clear_state(turn)
    amount = ("+" if delta > 0 else "−") + format_money(abs(delta), currency)
    await turn.reply(
        turn.t("admin.balance.confirm", id=user_id, amount=amount),
        views.confirm_keyboard(turn.t, Verb.BALANCE_CONFIRM.data(user_id, delta, nonce())),
    )


async def balance_confirmed(turn: Turn, press: Press) -> None:
    user_id, delta, once = press.number(0), press.number(1), press.args[2]
    currency = turn.app.config.payments.currency
    done = await turn.app.db.run(actions.change_balance, actor(turn), user_id, delta, nonce=once)
    if isinstance(done, actions.UserNotFound):
        await not_found(turn, user_id)
        return
    if isinstance(done, actions.InsufficientBalance):
        notice = turn.t(
            "admin.balance.insufficient",
            balance=format_money(done.balance_minor, currency),
            amount=format_money(done.needed_minor, currency),
        )
        await show_user(turn, user_id, notice)
        return
    balance = format_money(done.balance_minor, currency)
    notice = (
        turn.t("admin.already_done") if done.repeated else turn.t("admin.balance.done", id=user_id, balance=balance)
    )
    await show_user(turn, user_id, notice)


CALLBACKS: dict[Verb, CallbackAction] = {
    Verb.FIND_USER: ask_user,
    Verb.USER: user_card,
    Verb.GRANT: ask_grant,
    Verb.GRANT_CONFIRM: grant_confirmed,
    Verb.REVOKE: ask_revoke,
    Verb.REVOKE_CONFIRM: revoke_confirmed,
    Verb.REISSUE: ask_reissue,
    Verb.REISSUE_CONFIRM: reissue_confirmed,
    Verb.AUTO_RENEW: toggle_auto_renew,
    Verb.BAN: ask_ban,
    Verb.BAN_CONFIRM: ban_confirmed,
    Verb.BALANCE: ask_balance,
    Verb.BALANCE_CONFIRM: balance_confirmed,
}

STATES: dict[str, StateAction] = {FIND: find_user, GRANT: grant_days_entered, BALANCE: balance_entered}
