"""Broadcasts: compose (text, preview, optional URL button), choose the segment, start; list, pause,
resume, cancel. The draft is a durable conversation state, so it survives a restart."""

from __future__ import annotations

import logging
import re
from typing import Any

import psycopg
from telegram.error import BadRequest

from vpnd.db import broadcasts as bdb
from vpnd.db import conversation
from vpnd.services import admin_actions as actions
from vpnd.telegram import keyboards as kb
from vpnd.telegram.admin import views
from vpnd.telegram.admin.common import (
    BC_BUTTON,
    BC_CONFIRM,
    BC_TEXT,
    CallbackAction,
    StateAction,
    actor,
    admin_menu,
    nonce,
    set_state,
)
from vpnd.telegram.admin.verbs import Press, Verb
from vpnd.telegram.turn import Turn

log = logging.getLogger("vpnd.admin")

MAX_BUTTON_TEXT = 64
BUTTON_INPUT = re.compile(r"(?P<label>[^|]{1,64}?)\s*\|\s*(?P<url>(?:https?|tg)://\S+)")


async def compose_broadcast(turn: Turn, press: Press) -> None:
    await set_state(turn, BC_TEXT)
    await turn.show(turn.t("admin.bc.ask_text"), views.back_keyboard(turn.t))


def _button_markup(draft: dict[str, Any]) -> kb.Keyboard | None:
    if draft.get("button_text") and draft.get("button_url"):
        return kb.keyboard([kb.url_button(draft["button_text"], draft["button_url"])])
    return None


async def _preview(turn: Turn, draft: dict[str, Any]) -> bool:
    """Render the draft to the admin exactly as recipients will see it; False if Telegram refuses it."""
    try:
        await turn.reply(draft["text"], _button_markup(draft))
    except BadRequest as exc:
        await turn.reply(turn.t("admin.bc.bad_html", error=str(exc)[:200]), views.back_keyboard(turn.t))
        return False
    return True


async def broadcast_text_entered(turn: Turn, text: str, data: dict[str, Any]) -> None:
    message = turn.update.effective_message
    raw = message.text if message is not None and message.text else text
    draft = {"text": raw.strip()}
    if not await _preview(turn, draft):
        return
    await set_state(turn, BC_BUTTON, draft)
    await turn.reply(
        turn.t("admin.bc.ask_button"),
        kb.keyboard(
            [kb.button(turn.t("admin.bc.no_button"), Verb.BROADCAST_NO_BUTTON.data())],
            [kb.button(turn.t("admin.cancel"), Verb.CANCEL.data())],
        ),
    )


async def broadcast_button_entered(turn: Turn, text: str, data: dict[str, Any]) -> None:
    match = BUTTON_INPUT.fullmatch(text.strip())
    if match is None or "text" not in data:
        await turn.reply(turn.t("admin.bc.bad_button"), views.back_keyboard(turn.t))
        return
    draft = {**data, "button_text": match["label"].strip()[:MAX_BUTTON_TEXT], "button_url": match["url"]}
    if not await _preview(turn, draft):
        return
    await set_state(turn, BC_BUTTON, draft)
    await turn.reply(turn.t("admin.bc.choose_segment"), views.segment_keyboard(turn.t))


async def broadcast_no_button(turn: Turn, press: Press) -> None:
    state = await turn.app.db.run(conversation.get_state, turn.user.id)
    if state is None or state.name != BC_BUTTON:
        await admin_menu(turn, turn.t("admin.bc.no_draft"))
        return
    await turn.show(turn.t("admin.bc.choose_segment"), views.segment_keyboard(turn.t))


async def broadcast_segment(turn: Turn, press: Press) -> None:
    segment = bdb.Segment.parse(press.args[0], press.number(1) if len(press.args) > 1 else None)
    state = await turn.app.db.run(conversation.get_state, turn.user.id)
    if state is None or state.name not in (BC_BUTTON, BC_CONFIRM) or "text" not in state.data:
        await admin_menu(turn, turn.t("admin.bc.no_draft"))
        return
    count = await turn.app.db.run(bdb.count_segment, segment)
    if count == 0:
        await turn.show(turn.t("admin.bc.empty"), views.segment_keyboard(turn.t))
        return
    once = nonce()
    draft = {**state.data, "segment": segment.name, "days": segment.days, "nonce": once}
    await set_state(turn, BC_CONFIRM, draft)
    button = f"{draft['button_text']} → {draft['button_url']}" if draft.get("button_url") else turn.t("admin.none")
    text = turn.t("admin.bc.confirm", segment=views.segment_label(turn.t, segment), count=count, button=button)
    if turn.app.config.broadcast.paid:  # what the faster pace will cost, before the admin confirms
        text += "\n\n" + views.paid_cost_text(turn.t, count, turn.app.config.broadcast.paid_rate_per_second)
    await turn.show(text, views.confirm_keyboard(turn.t, Verb.BROADCAST_START.data(once), turn.t("admin.bc.start")))


async def broadcast_start(turn: Turn, press: Press) -> None:
    once = press.args[0]
    message = turn.callback.message if turn.callback is not None else None
    who, chat_id = actor(turn), turn.chat_id
    message_id = message.message_id if message is not None else None

    def create(conn: psycopg.Connection[Any]) -> bdb.Broadcast | None:
        """The confirmed draft (its nonce still current) becomes a broadcast, once."""
        state = conversation.get_state(conn, turn.user.id)
        if state is None or state.name != BC_CONFIRM or state.data.get("nonce") != once:
            return None
        draft = state.data
        conversation.clear_state(conn, turn.user.id)
        return actions.create_broadcast(
            conn,
            who,
            text=draft["text"],
            segment=bdb.Segment.parse(draft["segment"], draft.get("days")),
            button_text=draft.get("button_text"),
            button_url=draft.get("button_url"),
            progress_chat_id=chat_id,
            progress_message_id=message_id,
        )

    broadcast = await turn.app.db.run(create)
    if broadcast is None:
        await admin_menu(turn, turn.t("admin.bc.no_draft"))
        return
    log.info("event=broadcast_created id=%d total=%d segment=%s", broadcast.id, broadcast.total, broadcast.segment)
    counts = bdb.Counts(total=broadcast.total, pending=broadcast.total)
    await turn.show(
        views.progress_text(turn.t, broadcast, "running", counts, None),
        views.progress_keyboard(turn.t, broadcast.id, "running"),
    )


async def list_broadcasts(turn: Turn, press: Press) -> None:
    items = await turn.app.db.run(bdb.list_broadcasts, limit=10)
    await turn.show(views.broadcasts_text(turn.t, items), views.broadcasts_keyboard(turn.t, items))


def _status_action(verb: bdb.Action) -> CallbackAction:
    async def change(turn: Turn, press: Press) -> None:
        done = await turn.app.db.run(actions.change_broadcast, actor(turn), press.number(0), verb)
        if isinstance(done, actions.BroadcastNotFound):
            await admin_menu(turn)
            return
        if isinstance(done, actions.BroadcastUnchanged):
            assert done.view is not None
            view = done.view
        else:
            view = done
        b = view.broadcast
        await turn.show(
            views.progress_text(turn.t, b, b.status, view.counts, None), views.progress_keyboard(turn.t, b.id, b.status)
        )

    return change


CALLBACKS: dict[Verb, CallbackAction] = {
    Verb.BROADCAST_COMPOSE: compose_broadcast,
    Verb.BROADCAST_NO_BUTTON: broadcast_no_button,
    Verb.BROADCAST_SEGMENT: broadcast_segment,
    Verb.BROADCAST_START: broadcast_start,
    Verb.BROADCASTS: list_broadcasts,
    Verb.BROADCAST_PAUSE: _status_action("pause"),
    Verb.BROADCAST_RESUME: _status_action("resume"),
    Verb.BROADCAST_CANCEL: _status_action("cancel"),
}

STATES: dict[str, StateAction] = {BC_TEXT: broadcast_text_entered, BC_BUTTON: broadcast_button_entered}
