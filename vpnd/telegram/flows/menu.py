"""Start, the main menu, language, invite friends, help."""

from __future__ import annotations

from vpnd.db import subscriptions, users
from vpnd.money import format_money
from vpnd.telegram import keyboards as kb
from vpnd.telegram.flows import maintenance
from vpnd.telegram.turn import Turn


async def show_menu(turn: Turn, prefix: str = "") -> None:
    facts = turn.prefetched_menu_facts()
    if facts is None:
        facts = await turn.app.db.run(subscriptions.menu_facts, turn.user.id)
    eligible = facts.trial_eligible and turn.app.config.trial.enabled
    text = turn.t("menu.title")
    if turn.user.balance_minor:
        text += "\n" + turn.t("menu.balance", balance=format_money(turn.user.balance_minor, _currency(turn)))
    if prefix:
        text = prefix + "\n\n" + text
    if turn.maintenance.on:
        text = maintenance.banner(turn) + "\n\n" + text
    await turn.show(text, kb.main_menu(turn.t, trial_eligible=eligible, has_subscription=facts.has_subscription))


def _currency(turn: Turn) -> str:
    return turn.app.config.payments.currency


async def start(turn: Turn, argument: str, created: bool) -> None:
    greeting = turn.t("start.welcome", name=turn.user.first_name or "friend")
    if argument.startswith("gift_"):  # a gift's link (new user or not): redeem it
        from vpnd.telegram.flows import gifts  # here: gifts → buy → access → menu would be circular

        await gifts.redeem(turn, argument, prefix=greeting)
        return
    if created and argument.startswith("ref_"):
        referrer = await turn.app.db.run(users.record_referral, turn.user.id, argument[4:])
        if referrer is not None:
            greeting += "\n" + turn.t("start.referred")
    await show_menu(turn, greeting)


async def choose_language(turn: Turn) -> None:
    await turn.show(turn.t("language.choose"), kb.languages(turn.t))


async def set_language(turn: Turn, code: str) -> None:
    if code not in turn.ctx.texts.catalogs:
        await choose_language(turn)
        return
    await turn.app.db.run(users.set_language, turn.user.id, code)
    turn.lang = code
    await show_menu(turn, turn.t("language.set"))


async def invite(turn: Turn) -> None:
    from vpnd.telegram.flows import referral  # here: referral → admin verbs → admin → menu would be circular

    await referral.show_invite(turn)


async def help_text(turn: Turn) -> None:
    await turn.show(
        turn.t("help.text", support=turn.app.config.telegram.support_contact),
        kb.keyboard([kb.button(turn.t("menu.support"), "support")], [kb.button(turn.t("common.menu"), "menu")]),
    )
