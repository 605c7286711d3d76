"""Approving or rejecting a withdrawal request, from the buttons on the admins' notice of it.

No nonce is needed: a decision happens at most once (`vpnd.db.referrals.decide_withdrawal`), so a second
press — by the same admin, another admin, or the CLI in between — is answered "decided already" and
audited like any refusal; an approval pays once.
"""

from __future__ import annotations

from vpnd.money import format_money
from vpnd.services import withdrawals as actions
from vpnd.services.admin_actions import Refused
from vpnd.telegram.admin import views
from vpnd.telegram.admin.common import CallbackAction, actor
from vpnd.telegram.admin.verbs import Press, Verb
from vpnd.telegram.turn import Turn


async def _decide(turn: Turn, press: Press, *, approve: bool) -> None:
    withdrawal_id = press.number(0)
    done = await turn.app.db.run(
        actions.decide, actor(turn), withdrawal_id, approve=approve, note=None, texts=turn.ctx.texts,
        default_language=turn.app.config.telegram.default_language,
    )  # fmt: skip
    if isinstance(done, actions.WithdrawalNotFound):
        text = turn.t("admin.withdrawal.not_found", id=withdrawal_id)
    elif isinstance(done, actions.WithdrawalDecided):
        text = turn.t("admin.withdrawal.already", id=withdrawal_id, status=done.status)
    elif isinstance(done, Refused):  # no other refusal: a guard for the type checker
        text = turn.t("admin.bad_button")
    else:
        key = "admin.withdrawal.approved" if approve else "admin.withdrawal.rejected"
        text = turn.t(key, id=done.id, user=done.user_id, amount=format_money(done.amount_minor, done.currency))
    await turn.show(text, views.back_keyboard(turn.t))


async def approve(turn: Turn, press: Press) -> None:
    await _decide(turn, press, approve=True)


async def reject(turn: Turn, press: Press) -> None:
    await _decide(turn, press, approve=False)


CALLBACKS: dict[Verb, CallbackAction] = {Verb.WITHDRAWAL_APPROVE: approve, Verb.WITHDRAWAL_REJECT: reject}
