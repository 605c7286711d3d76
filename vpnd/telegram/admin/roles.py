"""Roles in the admin menu: each button (verb) and each typed input (state) stands for one action of
`vpnd.roles.ACTIONS`, and the dispatcher (`vpnd.telegram.admin.register`) checks it before any
handler runs — so a forged button for a verb the role may not use changes nothing, and is audited
(result ``forbidden``). Screens show a role only the buttons it may press (`visible`).
"""

from __future__ import annotations

from vpnd.roles import Role, allows, role_of
from vpnd.telegram import keyboards as kb
from vpnd.telegram.admin.verbs import Verb, parse
from vpnd.telegram.turn import Turn

#: Every verb's action (a test checks that none is left out).
VERB_ACTIONS: dict[Verb, str] = {
    Verb.MENU: "menu",
    Verb.CANCEL: "menu",
    Verb.STATS: "stats",
    Verb.HEALTH: "health",
    Verb.NODES: "nodes",
    Verb.FIND_USER: "lookup",
    Verb.USER: "lookup",
    Verb.GRANT: "grant",
    Verb.GRANT_CONFIRM: "grant",
    Verb.REVOKE: "revoke",
    Verb.REVOKE_CONFIRM: "revoke",
    Verb.REISSUE: "reissue",
    Verb.REISSUE_CONFIRM: "reissue",
    Verb.AUTO_RENEW: "auto_renew",
    Verb.BAN: "ban",
    Verb.BAN_CONFIRM: "ban",
    Verb.BALANCE: "balance",
    Verb.BALANCE_CONFIRM: "balance",
    Verb.DEVICES: "devices",
    Verb.DEVICES_RESET: "devices_reset",
    Verb.DEVICES_RESET_CONFIRM: "devices_reset",
    Verb.DEVICE_GRANT: "device_grant",
    Verb.DEVICE_GRANT_CONFIRM: "device_grant",
    Verb.PROMOS: "promo",
    Verb.PROMO_NEW: "promo",
    Verb.PROMO_DISABLE: "promo",
    Verb.EXPORT: "export",
    Verb.BROADCAST_COMPOSE: "broadcast",
    Verb.BROADCAST_NO_BUTTON: "broadcast",
    Verb.BROADCAST_SEGMENT: "broadcast",
    Verb.BROADCAST_START: "broadcast",
    Verb.BROADCASTS: "broadcast",
    Verb.BROADCAST_PAUSE: "broadcast",
    Verb.BROADCAST_RESUME: "broadcast",
    Verb.BROADCAST_CANCEL: "broadcast",
    Verb.REFUND: "refund",
    Verb.REFUND_CONFIRM: "refund",
    Verb.GIFT_REFUND: "gift_refund",
    Verb.GIFT_REFUND_CONFIRM: "gift_refund",
    Verb.EXTEND_ALL: "extend_all",
    Verb.EXTEND_ALL_CONFIRM: "extend_all",
    Verb.MAINTENANCE: "maintenance",
    Verb.MAINTENANCE_ON: "maintenance",
    Verb.MAINTENANCE_OFF: "maintenance",
    Verb.TRIAL_EXTEND: "extend_trial",
    Verb.TRIAL_EXTEND_CONFIRM: "extend_trial",
    Verb.USERS_FILTERS: "users",
    Verb.USERS: "users",
    Verb.AUDIT: "audit",
    Verb.AUDIT_FILTER: "audit",
    Verb.ROTATE_KEYS: "rotate_keys",
    Verb.ROTATE_KEYS_NEW: "rotate_keys",
    Verb.ROTATE_KEYS_START: "rotate_keys",
    Verb.ROTATE_KEYS_STEER: "rotate_keys",
    Verb.WITHDRAWAL_APPROVE: "withdrawal",
    Verb.WITHDRAWAL_REJECT: "withdrawal",
    Verb.BROADCAST_TEST: "broadcast",
    Verb.BROADCAST_SCHEDULE: "broadcast",
    Verb.BROADCAST_VARIANT: "broadcast",
    Verb.BROADCAST_REPORT: "broadcast",
}

#: Every typed input's action; a state not listed is owner-only (`vpnd.roles.required`).
STATE_ACTIONS: dict[str, str] = {
    "adm_find": "lookup",
    "adm_grant": "grant",
    "adm_balance": "balance",
    "adm_promo": "promo",
    "adm_bc_text": "broadcast",
    "adm_bc_button": "broadcast",
    "adm_bc_confirm": "broadcast",
    "adm_bc_schedule": "broadcast",
    "adm_bc_variant": "broadcast",
    "adm_maint": "maintenance",
    "adm_extend": "extend_all",
    "adm_audit": "audit",
}


def role(turn: Turn) -> Role | None:
    """The role of the user of this turn (None: not staff)."""
    telegram = turn.app.config.telegram
    return role_of(turn.user.id, telegram.admin_ids, telegram.admin_roles)


def verb_action(verb: Verb) -> str:
    return VERB_ACTIONS.get(verb, verb.name.lower())


def visible(keyboard: kb.Keyboard, role: Role | None) -> kb.Keyboard:
    """`keyboard` without the admin buttons `role` may not press (rows left empty are dropped)."""

    def shown(button: kb.Button) -> bool:
        press = parse(button.get("callback_data", ""))
        return press is None or allows(role, verb_action(press.verb))

    rows = [[b for b in row if shown(b)] for row in keyboard["inline_keyboard"]]
    return kb.keyboard(*rows)
