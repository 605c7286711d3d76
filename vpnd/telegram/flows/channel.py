"""The trial's channel requirement (`[trial] required_channel`): join the channel, then take the trial.

Membership is read with `getChatMember`; a positive answer is remembered for
`[trial] membership_cache_seconds` (`BotContext.membership`, bounded), a negative one never, so "Check
again" right after joining asks Telegram again.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio
from telegram.error import TelegramError

from vpnd import alerts
from vpnd.telegram import keyboards as kb
from vpnd.telegram.client import ChatNotFound, ChatUnreachable, SendFailed
from vpnd.telegram.membership import chat_param, is_member, join_url
from vpnd.telegram.turn import Turn

if TYPE_CHECKING:
    from vpnd.telegram.router import Routes

log = logging.getLogger("vpnd.telegram.channel")

#: How long a membership check may take before it counts as failed (the user is waiting).
CHECK_TIMEOUT_SECONDS = 8.0


async def may_take_trial(turn: Turn, *, again: bool = False) -> bool:
    """True when no channel is required or the user is in it; otherwise shows how to join and returns
    False. `again`: the user pressed "Check again" (a still-missing membership is said in an alert).

    When Telegram cannot answer — the bot is not an administrator of the channel, the channel is gone or
    misspelt, the network is down — the check *fails open*: the trial is granted and the admins are alerted
    (once per incident). The requirement is a growth rule, not a security boundary: a trial is one per
    Telegram account, short, and already guarded by `grant_trial`, so a few granted without the check while
    an admin fixes the channel cost little. Failing closed would turn every such mistake into a silent
    outage of the trial for every new user, who would be told to join a channel they already joined and
    could do nothing about it — and nobody would be told why.
    """
    config = turn.app.config.trial
    channel = config.required_channel
    if not channel:
        return True
    cache = turn.ctx.membership
    if cache.confirmed(channel, turn.user.id, trio.current_time()):
        return True
    try:
        with trio.fail_after(CHECK_TIMEOUT_SECONDS):
            member = await turn.ctx.sender.get_chat_member(chat_param(channel), turn.user.id)
    except (ChatNotFound, ChatUnreachable, SendFailed, TelegramError, trio.TooSlowError) as exc:
        detail = f"[trial].required_channel {channel}: getChatMember failed ({type(exc).__name__}: {exc})"
        log.warning("event=trial_channel_check_failed user_id=%d error=%r", turn.user.id, str(exc)[:200])
        await alerts.report_incident(
            turn.app,
            turn.ctx.texts,
            alerts.TRIAL_CHANNEL,
            False,
            f"{detail}; the trial is granted without the check until the bot is an administrator there",
        )
        return True
    if is_member(member):
        cache.remember(channel, turn.user.id, trio.current_time(), config.membership_cache_seconds)
        await alerts.report_incident(turn.app, turn.ctx.texts, alerts.TRIAL_CHANNEL, True, f"{channel}: checked")
        return True
    if again:
        await turn.answer(turn.t("trial.not_member_yet"), alert=True)
    await turn.show(
        turn.t("trial.join_required"),
        kb.keyboard(
            [kb.url_button(turn.t("trial.join_button"), join_url(channel, config.channel_invite_link))],
            [kb.button(turn.t("trial.check_again"), "trialchk")],
            [kb.button(turn.t("common.menu"), "menu")],
        ),
    )
    return False


def register(routes: Routes) -> None:
    async def check_again(turn: Turn, args: list[str]) -> None:
        from vpnd.telegram.flows import access

        if await may_take_trial(turn, again=True):
            await access.trial(turn)

    routes.callbacks["trialchk"] = check_again
