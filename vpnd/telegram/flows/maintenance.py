"""Maintenance mode as users meet it: a banner with the admin's text on the menu, and the routes that
start a purchase, a trial, a pack or a promo code answered politely instead of run.

The state is read with the user's row at the start of every turn (`Turn.maintenance`). Nothing else
is paused: payments that arrive (webhooks, successful payments, pre-checkout queries for invoices
already issued) are granted, "My subscription", keys and the subscription URL keep working, and
staff (owners, admins and support: `[telegram] admin_ids`, `admin_roles`) are never held back.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from vpnd.roles import role_of
from vpnd.telegram import keyboards as kb
from vpnd.telegram.turn import Turn
from vpnd.texts import Html

if TYPE_CHECKING:
    from vpnd.telegram.router import Routes

A = TypeVar("A")

#: Button verbs, commands and conversation states that start buying something (a new flow that sells
#: adds its own here). Buying: buy, plan, pay, top-up (topup, tu, its typed amount); packs: packs, pk,
#: pp; gifts: gift, gp (redeeming one is not paused); the trial (and its channel check, trialchk); promo
#: codes (the button, the command, the typed code).
PAUSED_CALLBACKS = (
    "buy", "plan", "pay", "topup", "tu", "packs", "pk", "pp", "gift", "gp", "trial", "trialchk", "promo",
)  # fmt: skip
PAUSED_COMMANDS = ("buy", "trial", "promo")
PAUSED_STATES = ("promo", "topup_amount")


def holds(turn: Turn) -> bool:
    """Whether maintenance holds this user back: it is on, and they are not staff (an owner, an admin or
    support — the people who check the shop before it opens again)."""
    telegram_config = turn.app.config.telegram
    staff = role_of(turn.user.id, telegram_config.admin_ids, telegram_config.admin_roles) is not None
    return turn.maintenance.on and not staff


def banner(turn: Turn) -> str:
    """The banner for the top of the menu while maintenance is on (admins see it too), else ""."""
    if not turn.maintenance.on:
        return ""
    message = turn.maintenance.message or Html(turn.t("maintenance.default_message"))  # the admin's: escaped
    return turn.t("maintenance.banner", message=message)


async def refuse(turn: Turn) -> None:
    await turn.answer()
    await turn.show(banner(turn) + "\n\n" + turn.t("maintenance.paused"), kb.back_to_menu(turn.t))


def paused(route: Callable[[Turn, A], Awaitable[None]]) -> Callable[[Turn, A], Awaitable[None]]:
    """`route`, answered with the maintenance notice while maintenance holds the user."""

    async def guarded(turn: Turn, argument: A) -> None:
        if holds(turn):
            await refuse(turn)
            return
        await route(turn, argument)

    return guarded


def register(routes: Routes) -> None:
    """Pause the purchase routes registered so far (call it after every flow has registered)."""
    for verb in PAUSED_CALLBACKS:
        if verb in routes.callbacks:
            routes.callbacks[verb] = paused(routes.callbacks[verb])
    for command in PAUSED_COMMANDS:
        if command in routes.commands:
            routes.commands[command] = paused(routes.commands[command])
    for state in PAUSED_STATES:
        if state in routes.states:
            routes.states[state] = paused(routes.states[state])
