"""People in the admin menu: the user list (filters, pages), the audit log viewer, and support's trial
extension. What each role may press is `vpnd.roles`; the dispatcher has checked it before these run.
"""

from __future__ import annotations

from typing import Any

from vpnd.services import admin_actions as actions
from vpnd.telegram.admin import people_views, views
from vpnd.telegram.admin.common import (
    CallbackAction,
    StateAction,
    actor,
    clear_state,
    nonce,
    not_found,
    set_state,
)
from vpnd.telegram.admin.users import show_user
from vpnd.telegram.admin.verbs import Press, Verb
from vpnd.telegram.turn import Turn

#: The audit viewer's filter input.
AUDIT_FILTER = "adm_audit"


# --- trial extension (support's grant) --------------------------------------------------------------


async def ask_trial(turn: Turn, press: Press) -> None:
    user_id = press.number(0)
    text = turn.t("admin.trial.ask", id=user_id, max=max(people_views.TRIAL_CHOICES))
    await turn.show(text, people_views.trial_keyboard(turn.t, user_id, nonce()))


async def trial_confirmed(turn: Turn, press: Press) -> None:
    user_id, days, once = press.number(0), press.number(1), press.args[2]
    done = await turn.app.db.run(actions.extend_trial, actor(turn), user_id, days, nonce=once)
    if isinstance(done, actions.UserNotFound):
        await not_found(turn, user_id)
        return
    if isinstance(done, actions.NotTrial):
        await show_user(turn, user_id, turn.t("admin.trial.not_trial", id=user_id))
        return
    if done.repeated or done.subscription is None:
        await show_user(turn, user_id, turn.t("admin.already_done"))
        return
    expires = views.fmt_time(done.subscription.expires_at)
    await show_user(turn, user_id, turn.t("admin.trial.done", id=user_id, days=days, expires=expires))


# --- the user list ------------------------------------------------------------------------------------


async def users_filters(turn: Turn, press: Press) -> None:
    await clear_state(turn)
    await turn.show(turn.t("admin.users.choose"), people_views.filters_keyboard(turn.t))


async def users_page(turn: Turn, press: Press) -> None:
    filter_name, lang, direction, cursor = press.args[0], press.args[1], press.args[2], press.number(3)
    language = None if lang == "-" else lang
    after = cursor if direction == "a" and cursor else None
    before = cursor if direction == "b" else None
    page = await turn.app.db.run(
        actions.list_users, actor(turn), filter_name, language=language, after=after, before=before,
        limit=people_views.PAGE_SIZE,
    )  # fmt: skip
    await turn.show(
        people_views.users_text(turn.t, filter_name, language, page),
        people_views.users_keyboard(turn.t, filter_name, language, page),
    )


# --- the audit log ------------------------------------------------------------------------------------


async def audit_page(turn: Turn, press: Press) -> None:
    await _show_audit(turn, press.args[0], press.number(1))


async def _show_audit(turn: Turn, spec: str, cursor: int) -> None:
    action, admin_id, target = people_views.audit_filters(spec)
    page = await turn.app.db.run(
        actions.audit_log, actor(turn), action=action, admin_id=admin_id, target=target,
        before=cursor if cursor > 0 else None, after=-cursor if cursor < 0 else None, limit=people_views.PAGE_SIZE,
    )  # fmt: skip
    await turn.show(people_views.audit_text(turn.t, spec, page), people_views.audit_keyboard(turn.t, spec, page))


async def ask_audit_filter(turn: Turn, press: Press) -> None:
    await set_state(turn, AUDIT_FILTER)
    await turn.show(turn.t("admin.audit.ask"), views.back_keyboard(turn.t))


async def audit_filter_entered(turn: Turn, text: str, data: dict[str, Any]) -> None:
    try:
        spec = people_views.parse_audit_filter(text)
    except ValueError:
        await turn.reply(turn.t("admin.audit.bad"), views.back_keyboard(turn.t))
        return
    await clear_state(turn)
    await _show_audit(turn, spec, 0)


CALLBACKS: dict[Verb, CallbackAction] = {
    Verb.TRIAL_EXTEND: ask_trial,
    Verb.TRIAL_EXTEND_CONFIRM: trial_confirmed,
    Verb.USERS_FILTERS: users_filters,
    Verb.USERS: users_page,
    Verb.AUDIT: audit_page,
    Verb.AUDIT_FILTER: ask_audit_filter,
}

STATES: dict[str, StateAction] = {AUDIT_FILTER: audit_filter_entered}
