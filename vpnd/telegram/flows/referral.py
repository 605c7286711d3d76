"""Invite friends: the link, the cashback level, the earnings, and withdrawing them.

The "waiting for payout details" state is a database row with an expiry, like the promo code's. The
request itself (`vpnd.services.withdrawals.request`) re-checks everything under the user's row lock: a
second request while one waits, or earnings below `[referral] withdraw_min`, are refused politely.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import psycopg

from vpnd.db import conversation, referrals
from vpnd.money import format_money
from vpnd.pricing import next_referral_level, referral_level, to_minor
from vpnd.services import withdrawals
from vpnd.telegram import keyboards as kb
from vpnd.telegram.admin.verbs import Verb
from vpnd.telegram.turn import Turn

if TYPE_CHECKING:
    from vpnd.telegram.router import Routes

STATE = "withdraw"
STATE_TTL_SECONDS = 600


def _currency(turn: Turn) -> str:
    return turn.app.config.payments.currency


def _min_minor(turn: Turn) -> int:
    return to_minor(turn.app.config.referral.withdraw_min, _currency(turn))


async def show_invite(turn: Turn) -> None:
    facts = await turn.app.db.run(referrals.invite_facts, turn.user.id)
    levels = [(level.paying, level.percent) for level in turn.app.config.referral.effective_levels]
    current = referral_level(levels, facts.paying)
    upcoming = next_referral_level(levels, facts.paying)
    money = _currency(turn)
    link = f"https://t.me/{turn.ctx.bot_username}?start=ref_{turn.user.referral_code}"
    text = turn.t(
        "invite.text",
        percent=current[1] if current else 0,
        link=link,
        invited=facts.invited,
        earned=format_money(facts.earned_minor, money),
    )
    text += "\n" + turn.t("referral.level", percent=current[1] if current else 0, paying=facts.paying)
    if upcoming is not None:
        text += "\n" + turn.t("referral.next_level", needed=upcoming[0] - facts.paying, percent=upcoming[1])
    minimum = _min_minor(turn)
    text += "\n" + turn.t(
        "referral.withdrawable",
        amount=format_money(facts.withdrawable_minor, money),
        min=format_money(minimum, money),
    )
    rows = []
    if facts.pending is not None:
        amount = format_money(facts.pending.amount_minor, facts.pending.currency)
        text += "\n" + turn.t("referral.withdraw_waiting", id=facts.pending.id, amount=amount)
    elif facts.withdrawable_minor >= minimum and facts.withdrawable_minor > 0:
        rows.append([kb.button(turn.t("referral.withdraw_button"), "wd")])
    rows.append([kb.button(turn.t("common.menu"), "menu")])
    await turn.show(text, kb.keyboard(*rows))


async def ask_details(turn: Turn) -> None:
    facts = await turn.app.db.run(referrals.invite_facts, turn.user.id)
    money = _currency(turn)
    if facts.pending is not None:
        await turn.show(turn.t("referral.withdraw_pending"), kb.back_to_menu(turn.t))
        return
    minimum = _min_minor(turn)
    if facts.withdrawable_minor < minimum or facts.withdrawable_minor <= 0:
        text = turn.t(
            "referral.withdraw_below_min",
            amount=format_money(facts.withdrawable_minor, money),
            min=format_money(minimum, money),
        )
        await turn.show(text, kb.back_to_menu(turn.t))
        return
    await turn.app.db.run(conversation.set_state, turn.user.id, STATE, STATE_TTL_SECONDS)
    await turn.show(
        turn.t("referral.withdraw_ask", amount=format_money(facts.withdrawable_minor, money)),
        kb.keyboard([kb.button(turn.t("promo.cancel"), "wd_cancel")]),
    )


async def cancel(turn: Turn) -> None:
    from vpnd.telegram.flows.menu import show_menu

    await turn.app.db.run(conversation.clear_state, turn.user.id)
    await show_menu(turn, turn.t("referral.withdraw_cancelled"))


async def receive_details(turn: Turn, text: str) -> None:
    details = text.strip()
    if len(details) > referrals.MAX_DETAILS:  # stay in the state: the user may send a shorter text
        await turn.reply(
            turn.t("referral.withdraw_too_long", max=referrals.MAX_DETAILS),
            kb.keyboard([kb.button(turn.t("promo.cancel"), "wd_cancel")]),
        )
        return
    config = turn.app.config
    texts = turn.ctx.texts
    default_language = config.telegram.default_language

    def buttons(withdrawal_id: int) -> kb.Keyboard:
        return kb.keyboard(
            [
                kb.button(texts.get(default_language, "admin.withdrawal.approve"),
                          Verb.WITHDRAWAL_APPROVE.data(withdrawal_id)),
                kb.button(texts.get(default_language, "admin.withdrawal.reject"),
                          Verb.WITHDRAWAL_REJECT.data(withdrawal_id)),
            ]
        )  # fmt: skip

    def make(conn: psycopg.Connection[Any]) -> referrals.Withdrawal | referrals.Refusal:
        conversation.clear_state(conn, turn.user.id)
        return withdrawals.request(
            conn,
            turn.user.id,
            details,
            min_minor=_min_minor(turn),
            currency=_currency(turn),
            admin_ids=tuple(config.telegram.admin_ids),
            texts=texts,
            default_language=default_language,
            buttons=buttons,
        )

    made = await turn.app.db.run(make)
    if isinstance(made, referrals.Refusal):
        money = _currency(turn)
        text = turn.t(
            made.key, amount=format_money(made.withdrawable_minor, money), min=format_money(_min_minor(turn), money)
        )
        await turn.reply(text, kb.back_to_menu(turn.t))
        return
    amount = format_money(made.amount_minor, made.currency)
    await turn.reply(turn.t("referral.withdraw_requested", id=made.id, amount=amount), kb.back_to_menu(turn.t))


def register(routes: Routes) -> None:
    async def withdraw_route(turn: Turn, args: list[str]) -> None:
        await ask_details(turn)

    async def cancel_route(turn: Turn, args: list[str]) -> None:
        await cancel(turn)

    routes.callbacks["wd"] = withdraw_route
    routes.callbacks["wd_cancel"] = cancel_route
    routes.states[STATE] = receive_details
