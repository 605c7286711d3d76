"""Broadcasts: compose (a text, or a photo/video/document/animation with a caption), preview, buttons
(URL buttons and "go to plan" buttons), choose the segment (the count is shown), then on the confirm
screen: send a test to yourself, add per-language versions, start now or schedule; list, pause, resume,
cancel, and a delivery report (CSV). The draft is a durable conversation state, so it survives a restart."""

from __future__ import annotations

import datetime as dt
import io
import logging
import re
import zoneinfo
from typing import Any

import psycopg
import telegram
from telegram.error import BadRequest

from vpnd.config import SUPPORTED_LANGUAGES
from vpnd.db import broadcasts as bdb
from vpnd.db import conversation
from vpnd.roles import allows
from vpnd.services import admin_actions as actions
from vpnd.services import broadcast_report
from vpnd.telegram import keyboards as kb
from vpnd.telegram.admin import views
from vpnd.telegram.admin.common import (
    BC_BUTTON,
    BC_CONFIRM,
    BC_SCHEDULE,
    BC_TEXT,
    BC_VARIANT,
    CallbackAction,
    StateAction,
    actor,
    admin_menu,
    is_admin,
    nonce,
    set_state,
)
from vpnd.telegram.admin.roles import role
from vpnd.telegram.admin.verbs import Press, Verb
from vpnd.telegram.broadcast_message import markup_of, send_content
from vpnd.telegram.turn import Turn

log = logging.getLogger("vpnd.admin")

MAX_BUTTON_TEXT = 64
MAX_BUTTONS = 8
MAX_CAPTION = 1024
#: How far ahead a broadcast may be scheduled.
MAX_SCHEDULE_AHEAD = dt.timedelta(days=366)
#: One button per line: "Label - https://…", "Label | https://…" or "Label - plan:<code>".
BUTTON_LINE = re.compile(
    r"(?P<label>[^|\n]{1,64}?)\s+(?:-|\|)\s+(?P<target>(?:https?|tg)://\S+|plan:[A-Za-z0-9_-]{1,32})"
    r"|(?P<label2>[^|\n]{1,64}?)\s*\|\s*(?P<target2>(?:https?|tg)://\S+|plan:[A-Za-z0-9_-]{1,32})"
)
START_AT = re.compile(r"(\d{4})-(\d{2})-(\d{2})[ T](\d{1,2}):(\d{2})")


class BadButtons(ValueError):
    pass


def parse_buttons(text: str, plan_codes: frozenset[str]) -> list[dict[str, str]]:
    """The buttons message, one per line; BadButtons names the first line that is not one."""
    buttons: list[dict[str, str]] = []
    for line in (raw.strip() for raw in text.splitlines()):
        if not line:
            continue
        match = BUTTON_LINE.fullmatch(line)
        if match is None:
            raise BadButtons(line)
        label = (match["label"] or match["label2"]).strip()[:MAX_BUTTON_TEXT]
        target = match["target"] or match["target2"]
        if target.startswith("plan:"):
            code = target.removeprefix("plan:")
            if code not in plan_codes:
                raise BadButtons(line)
            buttons.append({"text": label, "plan": code})
        else:
            buttons.append({"text": label, "url": target})
    if not buttons or len(buttons) > MAX_BUTTONS:
        raise BadButtons(text[:64])
    return buttons


def parse_start_at(text: str, zone: str, now: dt.datetime) -> dt.datetime | None:
    """ "2026-12-24 18:00" in the operator's time zone → an aware UTC time; None when it is not such a
    time, is not in the future, or is more than MAX_SCHEDULE_AHEAD away."""
    match = START_AT.fullmatch(text.strip())
    if match is None:
        return None
    try:
        year, month, day, hour, minute = (int(part) for part in match.groups())
        local = dt.datetime(year, month, day, hour, minute, tzinfo=zoneinfo.ZoneInfo(zone))
    except ValueError:
        return None
    when = local.astimezone(dt.UTC)
    return when if now < when <= now + MAX_SCHEDULE_AHEAD else None


# --- composing --------------------------------------------------------------------------------


async def compose_broadcast(turn: Turn, press: Press) -> None:
    await set_state(turn, BC_TEXT)
    await turn.show(turn.t("admin.bc.ask_text"), views.back_keyboard(turn.t))


def _markup(draft: dict[str, Any]) -> Any:
    return markup_of(draft.get("button_text"), draft.get("button_url"), draft.get("buttons") or [])


async def _send_draft(turn: Turn, draft: dict[str, Any], text: str) -> None:
    await send_content(
        turn.ctx.sender,
        turn.chat_id,
        text,
        _markup(draft),
        media_kind=draft.get("media_kind"),
        media_file_id=draft.get("media_file_id"),
    )


async def _preview(turn: Turn, draft: dict[str, Any], text: str | None = None) -> bool:
    """Render the draft to the admin exactly as recipients will see it; False if Telegram refuses it."""
    try:
        await _send_draft(turn, draft, text if text is not None else draft["text"])
    except BadRequest as exc:
        await turn.reply(turn.t("admin.bc.bad_html", error=str(exc)[:200]), views.back_keyboard(turn.t))
        return False
    return True


async def _ask_buttons(turn: Turn, draft: dict[str, Any]) -> None:
    if not await _preview(turn, draft):
        return
    await set_state(turn, BC_BUTTON, draft)
    await turn.reply(
        turn.t("admin.bc.ask_button") + "\n" + turn.t("admin.bc.ask_buttons_more"),
        kb.keyboard(
            [kb.button(turn.t("admin.bc.no_button"), Verb.BROADCAST_NO_BUTTON.data())],
            [kb.button(turn.t("admin.cancel"), Verb.CANCEL.data())],
        ),
    )


async def broadcast_text_entered(turn: Turn, text: str, data: dict[str, Any]) -> None:
    message = turn.update.effective_message
    raw = message.text if message is not None and message.text else text
    await _ask_buttons(turn, {"text": raw.strip()})


def _media_of(message: telegram.Message) -> tuple[str, str] | None:
    if message.animation is not None:  # before document: Telegram sends an animation as both
        return "animation", message.animation.file_id
    if message.photo:
        return "photo", message.photo[-1].file_id
    if message.video is not None:
        return "video", message.video.file_id
    if message.document is not None:
        return "document", message.document.file_id
    return None


async def media_entered(turn: Turn, message: telegram.Message) -> bool:
    """A message hook: a photo, video, document or animation sent while composing a broadcast becomes
    its media (Telegram's file_id, sent on by id), the caption its text."""
    media = _media_of(message)
    if media is None or not is_admin(turn) or not allows(role(turn), "broadcast"):
        return False
    state = await turn.app.db.run(conversation.get_state, turn.user.id)
    if state is None or state.name != BC_TEXT:
        return False
    caption = (message.caption or "").strip()
    if len(caption) > MAX_CAPTION:
        await turn.reply(turn.t("admin.bc.caption_too_long", max=MAX_CAPTION), views.back_keyboard(turn.t))
        return True
    await _ask_buttons(turn, {"text": caption, "media_kind": media[0], "media_file_id": media[1]})
    return True


def _segment_keyboard(turn: Turn) -> kb.Keyboard:
    plans = [p.code for p in turn.app.config.plans if not p.trial]
    return views.segment_keyboard(turn.t, SUPPORTED_LANGUAGES, plans)


async def broadcast_button_entered(turn: Turn, text: str, data: dict[str, Any]) -> None:
    plan_codes = frozenset(p.code for p in turn.app.config.plans)
    if "text" not in data:
        await admin_menu(turn, turn.t("admin.bc.no_draft"))
        return
    try:
        buttons = parse_buttons(text, plan_codes)
    except BadButtons:
        await turn.reply(turn.t("admin.bc.bad_button") + "\n" + turn.t("admin.bc.ask_buttons_more"))
        return
    draft = {**data, "buttons": buttons}
    if not await _preview(turn, draft):
        return
    await set_state(turn, BC_BUTTON, draft)
    await turn.reply(turn.t("admin.bc.choose_segment"), _segment_keyboard(turn))


async def broadcast_no_button(turn: Turn, press: Press) -> None:
    state = await turn.app.db.run(conversation.get_state, turn.user.id)
    if state is None or state.name != BC_BUTTON:
        await admin_menu(turn, turn.t("admin.bc.no_draft"))
        return
    await turn.show(turn.t("admin.bc.choose_segment"), _segment_keyboard(turn))


# --- the confirm screen -----------------------------------------------------------------------


def _confirm_keyboard(turn: Turn, once: str) -> kb.Keyboard:
    t = turn.t
    return kb.keyboard(
        [kb.button(t("admin.bc.start"), Verb.BROADCAST_START.data(once))],
        [kb.button(t("admin.bc.test"), Verb.BROADCAST_TEST.data(once))],
        [
            kb.button(t("admin.bc.schedule"), Verb.BROADCAST_SCHEDULE.data(once)),
            kb.button(t("admin.bc.add_variant"), Verb.BROADCAST_VARIANT.data(once)),
        ],
        [kb.button(t("admin.cancel"), Verb.CANCEL.data())],
    )


def _segment_of(draft: dict[str, Any]) -> bdb.Segment:
    return bdb.Segment.parse(draft["segment"], draft.get("days"), draft.get("arg"))


async def _show_confirm(turn: Turn, draft: dict[str, Any]) -> None:
    """The confirm screen for a draft with a segment: the recipient count now, then the choices."""
    segment = _segment_of(draft)
    count = await turn.app.db.run(bdb.count_segment, segment)
    labels = [b["text"] for b in draft.get("buttons") or []]
    if draft.get("button_url"):
        labels.insert(0, f"{draft['button_text']} → {draft['button_url']}")
    text = turn.t(
        "admin.bc.confirm",
        segment=views.segment_label(turn.t, segment),
        count=count,
        button=", ".join(labels) if labels else turn.t("admin.none"),
    )
    extras = [turn.t(f"admin.bc.media.{draft['media_kind']}")] if draft.get("media_kind") else []
    if draft.get("variants"):
        extras.append(turn.t("admin.bc.variants", languages=", ".join(sorted(draft["variants"]))))
    if extras:
        text += "\n" + "\n".join(extras)
    if turn.app.config.broadcast.paid:  # what the faster pace will cost, before the admin confirms
        text += "\n\n" + views.paid_cost_text(turn.t, count, turn.app.config.broadcast.paid_rate_per_second)
    await turn.show(text, _confirm_keyboard(turn, draft["nonce"]))


async def broadcast_segment(turn: Turn, press: Press) -> None:
    segment = bdb.Segment.from_words(list(press.args))
    if segment.name == "plan" and turn.app.config.plan(segment.arg or "") is None:
        raise ValueError("no such plan")  # a forged or stale button: the admin menu says so
    state = await turn.app.db.run(conversation.get_state, turn.user.id)
    if state is None or state.name not in (BC_BUTTON, BC_CONFIRM) or "text" not in state.data:
        await admin_menu(turn, turn.t("admin.bc.no_draft"))
        return
    count = await turn.app.db.run(bdb.count_segment, segment)
    if count == 0:
        await turn.show(turn.t("admin.bc.empty"), _segment_keyboard(turn))
        return
    draft = {**state.data, "segment": segment.name, "days": segment.days, "arg": segment.arg, "nonce": nonce()}
    await set_state(turn, BC_CONFIRM, draft)
    await _show_confirm(turn, draft)


async def _confirmed_draft(turn: Turn, once: str, *states: str) -> dict[str, Any] | None:
    state = await turn.app.db.run(conversation.get_state, turn.user.id)
    if state is None or state.name not in (states or (BC_CONFIRM,)) or state.data.get("nonce") != once:
        await admin_menu(turn, turn.t("admin.bc.no_draft"))
        return None
    return state.data


async def broadcast_test(turn: Turn, press: Press) -> None:
    """The exact message, in the admin's language version, to the admin only (no recipient row)."""
    draft = await _confirmed_draft(turn, press.args[0])
    if draft is None:
        return
    variants: dict[str, str] = draft.get("variants") or {}
    if not await _preview(turn, draft, variants.get(turn.lang) or draft["text"]):
        return
    await turn.reply(turn.t("admin.bc.test_sent"), _confirm_keyboard(turn, draft["nonce"]))


async def broadcast_variant(turn: Turn, press: Press) -> None:
    draft = await _confirmed_draft(turn, press.args[0])
    if draft is None:
        return
    await set_state(turn, BC_VARIANT, draft)
    await turn.show(
        turn.t("admin.bc.ask_variant", languages=", ".join(SUPPORTED_LANGUAGES)), views.back_keyboard(turn.t)
    )


async def broadcast_variant_entered(turn: Turn, text: str, data: dict[str, Any]) -> None:
    message = turn.update.effective_message
    raw = (message.text if message is not None and message.text else text).strip()
    language, _, body = raw.partition("\n")
    language, body = language.strip().lower(), body.strip()
    if "nonce" not in data or "segment" not in data:
        await admin_menu(turn, turn.t("admin.bc.no_draft"))
        return
    if language not in SUPPORTED_LANGUAGES or not body or (data.get("media_kind") and len(body) > MAX_CAPTION):
        await turn.reply(turn.t("admin.bc.bad_variant", languages=", ".join(SUPPORTED_LANGUAGES)))
        return
    if not await _preview(turn, data, body):
        return
    draft = {**data, "variants": {**(data.get("variants") or {}), language: body}}
    await set_state(turn, BC_CONFIRM, draft)
    await _show_confirm(turn, draft)


async def broadcast_schedule(turn: Turn, press: Press) -> None:
    draft = await _confirmed_draft(turn, press.args[0])
    if draft is None:
        return
    await set_state(turn, BC_SCHEDULE, draft)
    zone = turn.app.config.broadcast.timezone
    example = (dt.datetime.now(zoneinfo.ZoneInfo(zone)) + dt.timedelta(hours=1)).strftime("%Y-%m-%d %H:00")
    await turn.show(turn.t("admin.bc.ask_time", zone=zone, example=example), views.back_keyboard(turn.t))


def _create_from_draft(
    conn: psycopg.Connection[Any],
    who: actions.Actor,
    user_id: int,
    once: str,
    states: tuple[str, ...],
    chat_id: int,
    message_id: int | None,
    start_at: dt.datetime | None,
) -> bdb.Broadcast | None:
    """The confirmed draft (its nonce still current, in one of `states`) becomes a broadcast, once."""
    state = conversation.get_state(conn, user_id)
    if state is None or state.name not in states or state.data.get("nonce") != once:
        return None
    draft = state.data
    conversation.clear_state(conn, user_id)
    content = bdb.Content(
        draft["text"],
        draft.get("media_kind"),
        draft.get("media_file_id"),
        tuple(
            (b["text"], "plan", b["plan"]) if "plan" in b else (b["text"], "url", b["url"])
            for b in draft.get("buttons") or []
        ),
        tuple(sorted((draft.get("variants") or {}).items())),
    )
    return actions.create_broadcast(
        conn,
        who,
        text=draft["text"],
        segment=_segment_of(draft),
        button_text=draft.get("button_text"),
        button_url=draft.get("button_url"),
        progress_chat_id=chat_id,
        progress_message_id=message_id,
        content=content,
        start_at=start_at,
    )


async def broadcast_schedule_entered(turn: Turn, text: str, data: dict[str, Any]) -> None:
    zone = turn.app.config.broadcast.timezone
    start_at = parse_start_at(text, zone, dt.datetime.now(dt.UTC))
    if start_at is None:
        await turn.reply(turn.t("admin.bc.bad_time", zone=zone), views.back_keyboard(turn.t))
        return
    once = str(data.get("nonce", ""))
    # The confirmation goes into a new message, which the scheduled broadcast's progress then edits.
    local = start_at.astimezone(zoneinfo.ZoneInfo(zone)).strftime("%Y-%m-%d %H:%M")
    placeholder = await turn.reply(turn.t("admin.bc.scheduling"))
    broadcast = await turn.app.db.run(
        _create_from_draft,
        actor(turn),
        turn.user.id,
        once,
        (BC_SCHEDULE,),
        turn.chat_id,
        placeholder.message_id,
        start_at,
    )
    if broadcast is None:
        await admin_menu(turn, turn.t("admin.bc.no_draft"))
        return
    log.info("event=broadcast_scheduled id=%d start_at=%s", broadcast.id, start_at.isoformat())
    await turn.ctx.sender.edit_text(
        turn.chat_id,
        placeholder.message_id,
        turn.t("admin.bc.scheduled", id=broadcast.id, when=local, zone=zone),
        reply_markup=views.progress_keyboard(turn.t, broadcast.id, "scheduled"),
    )


async def broadcast_start(turn: Turn, press: Press) -> None:
    message = turn.callback.message if turn.callback is not None else None
    message_id = message.message_id if message is not None else None
    broadcast = await turn.app.db.run(
        _create_from_draft, actor(turn), turn.user.id, press.args[0], (BC_CONFIRM,), turn.chat_id, message_id, None
    )
    if broadcast is None:
        await admin_menu(turn, turn.t("admin.bc.no_draft"))
        return
    log.info("event=broadcast_created id=%d total=%d segment=%s", broadcast.id, broadcast.total, broadcast.segment)
    counts = bdb.Counts(total=broadcast.total, pending=broadcast.total)
    await turn.show(
        views.progress_text(turn.t, broadcast, "running", counts, None),
        views.progress_keyboard(turn.t, broadcast.id, "running"),
    )


# --- after the start --------------------------------------------------------------------------


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


def _report(conn: psycopg.Connection[Any], broadcast_id: int) -> tuple[bdb.Report, bytes] | None:
    if bdb.get_broadcast(conn, broadcast_id) is None:
        return None
    out = io.StringIO()
    broadcast_report.write_csv(conn, broadcast_id, out)
    return bdb.report(conn, broadcast_id), out.getvalue().encode()


async def broadcast_report_document(turn: Turn, press: Press) -> None:
    """The delivery report: the counts as the caption, every recipient's outcome as a CSV document."""
    broadcast_id = press.number(0)
    found = await turn.app.db.run(_report, broadcast_id)
    if found is None:
        await admin_menu(turn)
        return
    report, content = found
    caption = turn.t(
        "admin.bc.report_caption",
        id=broadcast_id,
        sent=report.sent,
        blocked=report.blocked,
        failed=report.failed,
        skipped=report.skipped,
        pending=report.pending,
    )
    chat_id, bot = turn.chat_id, turn.ctx.bot
    document = telegram.InputFile(content, filename=f"broadcast-{broadcast_id}.csv")

    async def send() -> telegram.Message:
        return await bot.send_document(chat_id, document, caption=caption, parse_mode="HTML")

    await turn.ctx.sender.call(chat_id, send)


CALLBACKS: dict[Verb, CallbackAction] = {
    Verb.BROADCAST_COMPOSE: compose_broadcast,
    Verb.BROADCAST_NO_BUTTON: broadcast_no_button,
    Verb.BROADCAST_SEGMENT: broadcast_segment,
    Verb.BROADCAST_START: broadcast_start,
    Verb.BROADCAST_TEST: broadcast_test,
    Verb.BROADCAST_SCHEDULE: broadcast_schedule,
    Verb.BROADCAST_VARIANT: broadcast_variant,
    Verb.BROADCAST_REPORT: broadcast_report_document,
    Verb.BROADCASTS: list_broadcasts,
    Verb.BROADCAST_PAUSE: _status_action("pause"),
    Verb.BROADCAST_RESUME: _status_action("resume"),
    Verb.BROADCAST_CANCEL: _status_action("cancel"),
}

STATES: dict[str, StateAction] = {
    BC_TEXT: broadcast_text_entered,
    BC_BUTTON: broadcast_button_entered,
    BC_VARIANT: broadcast_variant_entered,
    BC_SCHEDULE: broadcast_schedule_entered,
}
