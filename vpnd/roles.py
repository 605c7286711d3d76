"""Who may do what in the admin menu: three roles and one table, action → the least role it needs (pure).

* **owner** — everything. The people in `[telegram].admin_ids` (as before roles existed) and the
  command line (`vpnd admin ...`: whoever can run it can read the config and the database anyway).
* **admin** — the shop's day-to-day: users and their access (grant paid days, revoke, ban), money
  (balance, refunds, gift refunds), promo codes, broadcasts, stats, the audit log. Not what acts on
  everyone at once or takes the whole database out: extend-all, maintenance mode, CSV exports — and not
  roles, which live only in the config file.
* **support** — helping one user: look them up, see their card and the user list, reissue their key,
  reset their devices, extend a *trial* (`TRIAL_EXTENSION_DAYS` at most, only when they have no
  subscription or a trial one), health and nodes. No money, nothing paid, no broadcasts, no bans.

Roles are ordered: a role may do what a lower role may. `[telegram].admin_roles` names the admins and
the support people (`{ "123" = "admin", "456" = "support" }`).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping


class Role(enum.IntEnum):
    SUPPORT = 1
    ADMIN = 2
    OWNER = 3

    @property
    def label(self) -> str:
        return self.name.lower()


#: The roles `[telegram].admin_roles` may give (owners are `[telegram].admin_ids`).
CONFIGURABLE = {"admin": Role.ADMIN, "support": Role.SUPPORT}

#: The most days one trial extension by support gives.
TRIAL_EXTENSION_DAYS = 7

#: Every admin action and the least role that may do it. An action missing here is owner-only.
ACTIONS: Mapping[str, Role] = {
    # looking, and helping one user
    "menu": Role.SUPPORT,
    "lookup": Role.SUPPORT,
    "users": Role.SUPPORT,
    "health": Role.SUPPORT,
    "nodes": Role.SUPPORT,
    "reissue": Role.SUPPORT,
    "devices": Role.SUPPORT,
    "devices_reset": Role.SUPPORT,
    "extend_trial": Role.SUPPORT,
    # the shop: access, money, promotions, messages to users
    "stats": Role.ADMIN,
    "audit": Role.ADMIN,
    "grant": Role.ADMIN,
    "grant_traffic": Role.ADMIN,
    "revoke": Role.ADMIN,
    "auto_renew": Role.ADMIN,
    "ban": Role.ADMIN,
    "balance": Role.ADMIN,
    "device_grant": Role.ADMIN,
    "refund": Role.ADMIN,
    "gift_refund": Role.ADMIN,
    "promo": Role.ADMIN,
    "broadcast": Role.ADMIN,
    "withdrawal": Role.ADMIN,
    # everyone at once, or the whole database
    "extend_all": Role.OWNER,
    "rotate_keys": Role.OWNER,
    "maintenance": Role.OWNER,
    "export": Role.OWNER,
}


def required(action: str) -> Role:
    """The least role `action` needs (owner for an action the table does not know)."""
    return ACTIONS.get(action, Role.OWNER)


def allows(role: Role | None, action: str) -> bool:
    return role is not None and role >= required(action)


def role_of(user_id: int, owners: tuple[int, ...], roles: Mapping[int, str]) -> Role | None:
    """The role of Telegram user `user_id` (None: not staff). An owner stays owner whatever `roles` says."""
    if user_id in owners:
        return Role.OWNER
    name = roles.get(user_id)
    return CONFIGURABLE.get(name) if name is not None else None
