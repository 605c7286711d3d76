"""Terms of service and privacy policy (`[terms]`): until a user has accepted the current version,
every update of theirs is answered with the terms and an "I accept" button, and nothing else happens.

Payments are not held back: pre-checkout queries and successful payments are handled before this
gate (the router runs their hooks first), so money that arrived is always granted. A /start argument
(a referral `ref_…`, or any other deep link) that came before the acceptance is kept in the database
(`terms_pending_starts`) and processed right after it, as if /start had come then.

The button carries the version it accepts (``tos:<version>``): a press for any other version — an old
message after the version changed, or forged data — records nothing and shows the current terms.
"""

from __future__ import annotations

import html
import logging
import re
from typing import TYPE_CHECKING

from vpnd.db import terms as terms_db
from vpnd.db.terms import TermsStatus
from vpnd.telegram import keyboards as kb
from vpnd.telegram.turn import Turn

if TYPE_CHECKING:
    from vpnd.telegram.router import Routes

log = logging.getLogger("vpnd.telegram.terms")

#: The "I accept" button's verb: ``tos:<version>``.
ACCEPT = "tos"
#: What Telegram passes as a /start deep-link parameter (anything else is not kept).
START_ARGUMENT = re.compile(r"[A-Za-z0-9_-]{1,64}")
DOCUMENTS = ("terms", "privacy")


def due(turn: Turn) -> bool:
    """Whether this user still has to accept the current terms."""
    return turn.terms is not None and not turn.terms.accepted


async def holds_press(turn: Turn, data: str) -> bool:
    """Answer a button press with the terms when they are due (True); the accept button itself passes."""
    if not due(turn) or kb.parse_callback(data)[0] == ACCEPT:
        return False
    await show_terms(turn)
    return True


async def holds_message(turn: Turn, text: str) -> bool:
    """Answer a message with the terms when they are due (True), keeping a /start argument for later."""
    if not due(turn):
        return False
    command, _, argument = text.strip().partition(" ")
    argument = argument.strip()
    if command.split("@", 1)[0].lower() == "/start" and START_ARGUMENT.fullmatch(argument):
        await turn.app.db.run(terms_db.remember_start, turn.user.id, argument, turn.user_created)
    await show_terms(turn)
    return True


async def show_terms(turn: Turn, notice: str = "") -> None:
    config = turn.app.config.terms
    default_lang = turn.app.config.telegram.default_language
    updated = turn.terms is not None and turn.terms.accepted_before
    parts = [notice] if notice else []
    parts.append(turn.t("terms.updated" if updated else "terms.intro"))
    rows = []
    for document in DOCUMENTS:
        text = config.text(document, turn.lang, default_lang)
        url = config.terms_url if document == "terms" else config.privacy_url
        if text:
            parts.append(turn.t(f"terms.{document}_heading") + "\n" + html.escape(text, quote=False))
        if url:
            rows.append([kb.url_button(turn.t(f"terms.{document}_link"), url)])
    rows.append([kb.button(turn.t("terms.accept"), f"{ACCEPT}:{config.version}")])
    await turn.show("\n\n".join(parts), kb.keyboard(*rows))


def register(routes: Routes) -> None:
    async def accept(turn: Turn, args: list[str]) -> None:
        from vpnd.telegram.flows.menu import show_menu

        config = turn.app.config.terms
        if not config.enabled:
            await show_menu(turn)
            return
        if args != [config.version]:  # an old message's button, or forged data: nothing is recorded
            log.info(
                "event=terms_stale_accept user_id=%d data_hex=%s", turn.user.id, ":".join(args)[:40].encode().hex()
            )
            await turn.answer(turn.t("terms.outdated"), alert=True)
            if due(turn):
                await show_terms(turn, "⚠️ " + turn.t("terms.outdated"))
            else:
                await show_menu(turn)
            return
        pending = await turn.app.db.run(terms_db.accept, turn.user.id, config.version)
        turn.terms = TermsStatus(accepted=True, accepted_before=True)
        await turn.answer(turn.t("terms.accepted"))
        # The /start that waited for this, as if it came now (its referral counts if it was the first contact).
        turn.user_created = pending.first_contact if pending is not None else False
        await routes.commands["start"](turn, pending.argument if pending is not None else "")

    routes.callbacks[ACCEPT] = accept
