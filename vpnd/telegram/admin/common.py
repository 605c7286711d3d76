"""What every admin screen shares: who is an admin, the acting `Actor`, conversation states, the menu."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from vpnd.db import admin as admin_db
from vpnd.db import conversation
from vpnd.roles import allows
from vpnd.services import admin_actions
from vpnd.services.admin_actions import Actor
from vpnd.telegram.admin import roles, views
from vpnd.telegram.admin.verbs import Press
from vpnd.telegram.turn import Turn

log = logging.getLogger("vpnd.admin")

#: How long a half-finished admin input (a state) is kept.
STATE_TTL_SECONDS = 30 * 60

#: Durable conversation states of the admin's multi-step inputs.
FIND, GRANT, BALANCE, PROMO = "adm_find", "adm_grant", "adm_balance", "adm_promo"
BC_TEXT, BC_BUTTON, BC_CONFIRM = "adm_bc_text", "adm_bc_button", "adm_bc_confirm"
BC_SCHEDULE, BC_VARIANT = "adm_bc_schedule", "adm_bc_variant"

CallbackAction = Callable[[Turn, Press], Awaitable[None]]
StateAction = Callable[[Turn, str, dict[str, Any]], Awaitable[None]]


def is_admin(turn: Turn) -> bool:
    """Staff of any role (`vpnd.roles`): the admin menu exists for them."""
    return roles.role(turn) is not None


def actor(turn: Turn) -> Actor:
    return Actor.telegram(turn.user.id)


async def permitted(turn: Turn, action: str, what: str) -> bool:
    """Whether this staff member's role allows `action` (`vpnd.roles.ACTIONS`); when not, the attempt is
    audited (``forbidden``) and answered with the menu and a notice, and nothing else happens."""
    role = roles.role(turn)
    if allows(role, action):
        return True
    label = role.label if role is not None else "none"
    log.warning("event=admin_forbidden user_id=%d role=%s action=%s", turn.user.id, label, action)
    await turn.app.db.run(admin_actions.forbidden, actor(turn), action, what, role=label)
    await admin_menu(turn, turn.t("admin.forbidden"))
    return False


async def refuse(turn: Turn, kind: str, what: str) -> None:
    """Audit an attempt by someone who is not an admin (bounded: `admin_db.audit_denied`)."""
    log.warning("event=admin_refused user_id=%d kind=%s", turn.user.id, kind)
    await turn.app.db.run(admin_db.audit_denied, turn.user.id, kind, what[:64], {"via": "bot"})


def nonce() -> str:
    """A confirmation button's one-time mark (a second press of it changes nothing)."""
    return secrets.token_hex(4)


async def set_state(turn: Turn, name: str, data: dict[str, Any] | None = None) -> None:
    await turn.app.db.run(conversation.set_state, turn.user.id, name, STATE_TTL_SECONDS, data)


async def clear_state(turn: Turn) -> None:
    await turn.app.db.run(conversation.clear_state, turn.user.id)


def with_notice(notice: str, text: str) -> str:
    return f"{notice}\n\n{text}" if notice else text


async def admin_menu(turn: Turn, notice: str = "") -> None:
    await clear_state(turn)
    keyboard = roles.visible(views.menu_keyboard(turn.t), roles.role(turn))
    await turn.show(with_notice(notice, turn.t("admin.menu.title")), keyboard)


async def show_menu(turn: Turn, press: Press) -> None:
    await admin_menu(turn)


async def cancel_action(turn: Turn, press: Press) -> None:
    await admin_menu(turn, turn.t("admin.cancelled"))


async def not_found(turn: Turn, user_id: object) -> None:
    await turn.show(turn.t("admin.user.not_found", query=user_id), views.back_keyboard(turn.t))
