"""The admin flows (`/admin`): stats, user lookup and actions, promo codes, health, exports, broadcasts.

Admins are exactly `[telegram] admin_ids`. For anyone else `/admin` and every ``adm`` callback do not
exist: they get the very reply an unknown command or button gets (so nothing reveals them), nothing
changes, and the attempt is written to the audit log. Every admin action is audited as well
(`vpnd.db.admin.audit`), in the transaction of the action.

Changes that need a second look (grant, revoke, reissue, balance, starting a broadcast) are
confirmed with a button carrying a nonce; a second press of the same button changes nothing.
Multi-step inputs (a user id, a number of days, an amount, a broadcast draft) are durable
conversation states (`adm_*`), so they survive a restart and expire on their own.
"""

from __future__ import annotations

import io
import logging
import re
import secrets
import tempfile
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import psycopg
import telegram
from telegram.error import BadRequest

from vpnd.db import admin as admin_db
from vpnd.db import broadcasts as bdb
from vpnd.db import conversation, ledger, promo
from vpnd.db import payments as payments_db
from vpnd.db.subscriptions import Subscription
from vpnd.payments.service import rules_of
from vpnd.pricing import InvalidAmount, format_money, parse_amount
from vpnd.telegram import admin_views as views
from vpnd.telegram import keyboards as kb
from vpnd.telegram.flows import menu
from vpnd.telegram.turn import Turn

if TYPE_CHECKING:
    from vpnd.telegram.router import Routes

log = logging.getLogger("vpnd.admin")

#: How long a half-finished admin input (a state) is kept.
STATE_TTL_SECONDS = 30 * 60
MAX_GRANT_DAYS = 3650
MAX_BUTTON_TEXT = 64

FIND, GRANT, BALANCE, PROMO = "adm_find", "adm_grant", "adm_balance", "adm_promo"
BC_TEXT, BC_BUTTON, BC_CONFIRM = "adm_bc_text", "adm_bc_button", "adm_bc_confirm"

CallbackAction = Callable[[Turn, list[str]], Awaitable[None]]
StateAction = Callable[[Turn, str, dict[str, Any]], Awaitable[None]]


def is_admin(turn: Turn) -> bool:
    return turn.user.id in turn.app.config.telegram.admin_ids


def register(routes: Routes) -> None:
    """/admin, the ``adm`` callbacks and the ``adm_*`` states (all refused to non-admins)."""

    async def admin_command(turn: Turn, argument: str) -> None:
        if not is_admin(turn):
            await _refuse(turn, "command", "/admin")
            await menu.show_menu(turn, turn.t("common.unknown"))  # what an unknown command gets
            return
        await admin_menu(turn)

    async def admin_callback(turn: Turn, args: list[str]) -> None:
        data = ":".join([views.VERB, *args])
        if not is_admin(turn):
            await _refuse(turn, "callback", data)
            await menu.show_menu(turn)  # what an unknown button gets
            return
        action = CALLBACKS.get(args[0] if args else "")
        if action is None:
            await admin_menu(turn)
            return
        try:
            await action(turn, args[1:])
        except (ValueError, IndexError):  # malformed data (only an admin's own client can send it)
            log.info("event=admin_bad_callback data=%s", data[:64])
            await admin_menu(turn)

    def state_route(name: str) -> Callable[[Turn, str], Awaitable[None]]:
        async def route(turn: Turn, text: str) -> None:
            if not is_admin(turn):
                await _refuse(turn, "state", name)
                await turn.app.db.run(conversation.clear_state, turn.user.id)
                await menu.show_menu(turn, turn.t("common.unknown"))
                return
            state = await turn.app.db.run(conversation.get_state, turn.user.id)
            await STATES[name](turn, text, state.data if state is not None else {})

        return route

    routes.commands["admin"] = admin_command
    routes.hidden_commands.add("admin")
    routes.callbacks[views.VERB] = admin_callback
    for name in STATES:
        routes.states[name] = state_route(name)


async def _refuse(turn: Turn, kind: str, what: str) -> None:
    log.warning("event=admin_refused user_id=%d kind=%s", turn.user.id, kind)
    await turn.app.db.run(admin_db.audit_denied, turn.user.id, kind, what[:64], {"via": "bot"})


async def _audit(turn: Turn, action: str, target: object | None = None, result: str = "ok", **details: Any) -> None:
    await turn.app.db.run(admin_db.audit, turn.user.id, action, target, result, {"via": "bot", **details})


def _nonce() -> str:
    return secrets.token_hex(4)


async def _set_state(turn: Turn, name: str, data: dict[str, Any] | None = None) -> None:
    await turn.app.db.run(conversation.set_state, turn.user.id, name, STATE_TTL_SECONDS, data)


async def _clear_state(turn: Turn) -> None:
    await turn.app.db.run(conversation.clear_state, turn.user.id)


# --- menu, stats, health ----------------------------------------------------------------------


async def admin_menu(turn: Turn, notice: str = "") -> None:
    await _clear_state(turn)
    text = turn.t("admin.menu.title")
    await turn.show(f"{notice}\n\n{text}" if notice else text, views.menu_keyboard(turn.t))


async def show_stats(turn: Turn, args: list[str]) -> None:
    stats = await turn.app.db.run(admin_db.stats)
    await _audit(turn, "stats")
    await turn.show(views.stats_text(turn.t, stats), views.back_keyboard(turn.t))


async def show_health(turn: Turn, args: list[str]) -> None:
    checks = await turn.app.health.readiness()
    facts = await turn.app.db.run(admin_db.health_facts)
    await _audit(turn, "health")
    await turn.show(views.health_text(turn.t, checks, facts), views.back_keyboard(turn.t))


async def cancel_action(turn: Turn, args: list[str]) -> None:
    await admin_menu(turn, turn.t("admin.cancelled"))


# --- users ------------------------------------------------------------------------------------


async def ask_user(turn: Turn, args: list[str]) -> None:
    await _set_state(turn, FIND)
    await turn.show(turn.t("admin.user.ask"), views.back_keyboard(turn.t))


async def find_user(turn: Turn, text: str, data: dict[str, Any]) -> None:
    details = await turn.app.db.run(admin_db.user_details, text.strip())
    await _audit(turn, "lookup", text.strip()[:64], "ok" if details else "not_found")
    if details is None:
        await turn.reply(turn.t("admin.user.not_found", query=text.strip()[:64]), views.back_keyboard(turn.t))
        return
    await _clear_state(turn)
    await turn.reply(
        views.user_text(turn.t, details, turn.app.config.payments.currency), views.user_keyboard(turn.t, details)
    )


async def show_user(turn: Turn, user_id: int, notice: str = "") -> None:
    details = await turn.app.db.run(admin_db.user_details, user_id)
    if details is None:
        await turn.show(turn.t("admin.user.not_found", query=user_id), views.back_keyboard(turn.t))
        return
    text = views.user_text(turn.t, details, turn.app.config.payments.currency)
    await turn.show(f"{notice}\n\n{text}" if notice else text, views.user_keyboard(turn.t, details))


async def user_card(turn: Turn, args: list[str]) -> None:
    await _clear_state(turn)
    await show_user(turn, int(args[0]))


async def ask_grant(turn: Turn, args: list[str]) -> None:
    user_id = int(args[0])
    await _set_state(turn, GRANT, {"user_id": user_id})
    await turn.show(turn.t("admin.grant.ask", id=user_id), views.back_keyboard(turn.t))


async def grant_days_entered(turn: Turn, text: str, data: dict[str, Any]) -> None:
    user_id = int(data.get("user_id", 0))
    if not text.strip().isdigit() or not 1 <= int(text.strip()) <= MAX_GRANT_DAYS:
        await turn.reply(turn.t("admin.grant.bad_days", max=MAX_GRANT_DAYS), views.back_keyboard(turn.t))
        return
    days = int(text.strip())
    await _clear_state(turn)
    nonce = _nonce()
    await turn.reply(
        turn.t("admin.grant.confirm", days=days, id=user_id),
        kb.keyboard(
            [kb.button(turn.t("admin.grant.notify"), views.data("gc", user_id, days, 1, nonce))],
            [kb.button(turn.t("admin.grant.silent"), views.data("gc", user_id, days, 0, nonce))],
            [kb.button(turn.t("admin.cancel"), views.data("x"))],
        ),
    )


async def grant_confirmed(turn: Turn, args: list[str]) -> None:
    user_id, days, notify, nonce = int(args[0]), int(args[1]), args[2] == "1", args[3]
    if not 1 <= days <= MAX_GRANT_DAYS:
        raise ValueError("days out of range")
    texts = turn.ctx.texts

    def user_text(lang: str, sub: Subscription) -> str:
        return texts.get(lang, "admin.grant.user_text", days=days, expires=views.fmt_time(sub.expires_at))

    try:
        done = await turn.app.db.run(
            admin_db.grant, turn.user.id, user_id, days, notify_text=user_text if notify else None, nonce=nonce
        )
    except admin_db.UserNotFound:
        await turn.show(turn.t("admin.user.not_found", query=user_id), views.back_keyboard(turn.t))
        return
    if done.repeated:
        await show_user(turn, user_id, turn.t("admin.already_done"))
        return
    assert done.subscription is not None
    notice = turn.t("admin.grant.done", days=days, id=user_id, expires=views.fmt_time(done.subscription.expires_at))
    await show_user(turn, user_id, notice)


async def ask_revoke(turn: Turn, args: list[str]) -> None:
    user_id = int(args[0])
    await turn.show(
        turn.t("admin.revoke.confirm", id=user_id), views.confirm_keyboard(turn.t, views.data("rvc", user_id, _nonce()))
    )


async def revoke_confirmed(turn: Turn, args: list[str]) -> None:
    await _access_action(turn, args, admin_db.revoke, "admin.revoke.done")


async def ask_reissue(turn: Turn, args: list[str]) -> None:
    user_id = int(args[0])
    await turn.show(
        turn.t("admin.reissue.confirm", id=user_id),
        views.confirm_keyboard(turn.t, views.data("rkc", user_id, _nonce())),
    )


async def reissue_confirmed(turn: Turn, args: list[str]) -> None:
    await _access_action(turn, args, admin_db.reissue, "admin.reissue.done")


async def _access_action(turn: Turn, args: list[str], action: Any, done_key: str) -> None:
    """A confirmed revoke/reissue: run it once (the nonce makes a second press a no-op), nudge Xray."""
    user_id, nonce = int(args[0]), args[1]
    try:
        done = await turn.app.db.run(action, turn.user.id, user_id, nonce=nonce)
    except admin_db.UserNotFound:
        await turn.show(turn.t("admin.user.not_found", query=user_id), views.back_keyboard(turn.t))
        return
    if done.repeated:
        notice = turn.t("admin.already_done")
    elif done.subscription is None:
        notice = turn.t("admin.no_subscription", id=user_id)
    else:
        notice = turn.t(done_key, id=user_id)
    await show_user(turn, user_id, notice)


async def toggle_auto_renew(turn: Turn, args: list[str]) -> None:
    user_id, enabled = int(args[0]), args[1] == "on"
    try:
        await turn.app.db.run(admin_db.set_auto_renew, turn.user.id, user_id, enabled)
    except admin_db.UserNotFound:
        await turn.show(turn.t("admin.user.not_found", query=user_id), views.back_keyboard(turn.t))
        return
    state = turn.t("admin.on" if enabled else "admin.off")
    await show_user(turn, user_id, turn.t("admin.auto_renew.done", id=user_id, state=state))


async def ask_balance(turn: Turn, args: list[str]) -> None:
    user_id = int(args[0])
    details = await turn.app.db.run(admin_db.user_details, user_id)
    if details is None:
        await turn.show(turn.t("admin.user.not_found", query=user_id), views.back_keyboard(turn.t))
        return
    await _set_state(turn, BALANCE, {"user_id": user_id})
    balance = format_money(details.user.balance_minor, turn.app.config.payments.currency)
    await turn.show(turn.t("admin.balance.ask", id=user_id, balance=balance), views.back_keyboard(turn.t))


def parse_delta(text: str, currency: str) -> int:
    """ "+5", "5", "-2.50" → signed minor units (InvalidAmount when it is not an amount)."""
    cleaned = text.strip()
    sign = -1 if cleaned.startswith("-") else 1
    return sign * parse_amount(cleaned.lstrip("+-"), currency)


async def balance_entered(turn: Turn, text: str, data: dict[str, Any]) -> None:
    user_id = int(data.get("user_id", 0))
    currency = turn.app.config.payments.currency
    try:
        delta = parse_delta(text, currency)
    except InvalidAmount:
        await turn.reply(turn.t("admin.balance.bad"), views.back_keyboard(turn.t))
        return
    await _clear_state(turn)
    amount = ("+" if delta > 0 else "−") + format_money(abs(delta), currency)
    await turn.reply(
        turn.t("admin.balance.confirm", id=user_id, amount=amount),
        views.confirm_keyboard(turn.t, views.data("balc", user_id, delta, _nonce())),
    )


async def balance_confirmed(turn: Turn, args: list[str]) -> None:
    user_id, delta, nonce = int(args[0]), int(args[1]), args[2]
    currency = turn.app.config.payments.currency
    try:
        done = await turn.app.db.run(admin_db.adjust_balance, turn.user.id, user_id, delta, nonce=nonce)
    except admin_db.UserNotFound:
        await turn.show(turn.t("admin.user.not_found", query=user_id), views.back_keyboard(turn.t))
        return
    except ledger.InsufficientBalance as exc:
        await _audit(turn, "balance", user_id, "insufficient_balance", delta_minor=delta, nonce=nonce)
        notice = turn.t(
            "admin.balance.insufficient",
            balance=format_money(exc.balance_minor, currency),
            amount=format_money(exc.needed_minor, currency),
        )
        await show_user(turn, user_id, notice)
        return
    balance = format_money(done.balance_minor or 0, currency)
    notice = (
        turn.t("admin.already_done") if done.repeated else turn.t("admin.balance.done", id=user_id, balance=balance)
    )
    await show_user(turn, user_id, notice)


# --- promo codes ------------------------------------------------------------------------------


async def show_promos(turn: Turn, args: list[str], notice: str = "") -> None:
    promos = await turn.app.db.run(promo.list_promos, limit=30)
    text = views.promo_text(turn.t, promos)
    await turn.show(f"{notice}\n\n{text}" if notice else text, views.promo_keyboard(turn.t, promos))


async def ask_promo(turn: Turn, args: list[str]) -> None:
    await _set_state(turn, PROMO)
    await turn.show(turn.t("admin.promo.ask"), views.back_keyboard(turn.t))


PROMO_INPUT = re.compile(r"(?P<code>\S+)\s+(?P<percent>\d{1,3})(?:\s+(?P<uses>\d{1,9}))?(?:\s+(?P<days>\d{1,4}))?")


async def promo_entered(turn: Turn, text: str, data: dict[str, Any]) -> None:
    match = PROMO_INPUT.fullmatch(text.strip())
    if match is None:
        await turn.reply(turn.t("admin.promo.bad"), views.back_keyboard(turn.t))
        return
    code, percent = match["code"], int(match["percent"])
    max_uses = int(match["uses"]) if match["uses"] else None
    days = int(match["days"]) if match["days"] else None

    def create(conn: psycopg.Connection[Any]) -> promo.PromoCode:
        expires = None
        if days:
            row = conn.execute("SELECT now() + %s * interval '1 day'", (days,)).fetchone()
            expires = row[0] if row else None
        created = promo.create_promo(
            conn, code, percent, max_uses=max_uses, expires_at=expires, created_by=turn.user.id
        )
        admin_db.audit(conn, turn.user.id, "promo_create", created.code, "ok", {"percent": percent, "via": "bot"})
        return created

    try:
        created = await turn.app.db.run(create)
    except promo.PromoExists:
        await turn.reply(turn.t("admin.promo.exists", code=code.upper()), views.back_keyboard(turn.t))
        return
    except ValueError:  # InvalidPromoCode, a bad percent or limit
        await turn.reply(turn.t("admin.promo.bad"), views.back_keyboard(turn.t))
        return
    await _clear_state(turn)
    promos = await turn.app.db.run(promo.list_promos, limit=30)
    notice = turn.t("admin.promo.created", code=created.code, percent=created.percent)
    await turn.reply(f"{notice}\n\n{views.promo_text(turn.t, promos)}", views.promo_keyboard(turn.t, promos))


async def disable_promo(turn: Turn, args: list[str]) -> None:
    code = args[0]

    def disable(conn: psycopg.Connection[Any]) -> bool:
        disabled = promo.disable_promo(conn, code)
        admin_db.audit(conn, turn.user.id, "promo_disable", code, "ok" if disabled else "not_found", {"via": "bot"})
        return disabled

    disabled = await turn.app.db.run(disable)
    await show_promos(turn, [], turn.t("admin.promo.disabled_done", code=code) if disabled else "")


# --- exports ----------------------------------------------------------------------------------

EXPORTS: dict[str, Callable[..., int]] = {
    "users": admin_db.export_users_csv,
    "payments": admin_db.export_payments_csv,
}


def build_csv(conn: psycopg.Connection[Any], kind: str) -> tuple[bytes, int]:
    """Write the export to a temporary file (in the database worker thread) and return its bytes."""
    with tempfile.TemporaryFile("w+b") as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8", newline="")
        rows = EXPORTS[kind](conn, text)
        text.flush()
        raw.seek(0)
        content = raw.read()
        text.detach()
    return content, rows


async def export_csv(turn: Turn, args: list[str]) -> None:
    kind = args[0]
    if kind not in EXPORTS:
        raise ValueError(kind)
    what = turn.t(f"admin.export.{kind}")
    await turn.answer(turn.t("admin.export.started", what=what))
    content, rows = await turn.app.db.run(build_csv, kind)
    await _audit(turn, "export", kind, rows=rows)
    chat_id = turn.chat_id
    document = telegram.InputFile(content, filename=f"{kind}.csv")
    caption = turn.t("admin.export.done", what=what, rows=rows)
    bot = turn.ctx.bot

    async def send() -> telegram.Message:
        return await bot.send_document(chat_id, document, caption=caption, parse_mode="HTML")

    await turn.ctx.sender.call(chat_id, send)


# --- broadcasts -------------------------------------------------------------------------------


async def compose_broadcast(turn: Turn, args: list[str]) -> None:
    await _set_state(turn, BC_TEXT)
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
    await _set_state(turn, BC_BUTTON, draft)
    await turn.reply(
        turn.t("admin.bc.ask_button"),
        kb.keyboard(
            [kb.button(turn.t("admin.bc.no_button"), views.data("bn"))],
            [kb.button(turn.t("admin.cancel"), views.data("x"))],
        ),
    )


BUTTON_INPUT = re.compile(r"(?P<label>[^|]{1,64}?)\s*\|\s*(?P<url>(?:https?|tg)://\S+)")


async def broadcast_button_entered(turn: Turn, text: str, data: dict[str, Any]) -> None:
    match = BUTTON_INPUT.fullmatch(text.strip())
    if match is None or "text" not in data:
        await turn.reply(turn.t("admin.bc.bad_button"), views.back_keyboard(turn.t))
        return
    draft = {**data, "button_text": match["label"].strip()[:MAX_BUTTON_TEXT], "button_url": match["url"]}
    if not await _preview(turn, draft):
        return
    await _set_state(turn, BC_BUTTON, draft)
    await turn.reply(turn.t("admin.bc.choose_segment"), views.segment_keyboard(turn.t))


async def broadcast_no_button(turn: Turn, args: list[str]) -> None:
    state = await turn.app.db.run(conversation.get_state, turn.user.id)
    if state is None or state.name != BC_BUTTON:
        await admin_menu(turn, turn.t("admin.bc.no_draft"))
        return
    await turn.show(turn.t("admin.bc.choose_segment"), views.segment_keyboard(turn.t))


async def broadcast_segment(turn: Turn, args: list[str]) -> None:
    segment = bdb.Segment.parse(args[0], int(args[1]) if len(args) > 1 else None)
    state = await turn.app.db.run(conversation.get_state, turn.user.id)
    if state is None or state.name not in (BC_BUTTON, BC_CONFIRM) or "text" not in state.data:
        await admin_menu(turn, turn.t("admin.bc.no_draft"))
        return
    count = await turn.app.db.run(bdb.count_segment, segment)
    if count == 0:
        await turn.show(turn.t("admin.bc.empty"), views.segment_keyboard(turn.t))
        return
    nonce = _nonce()
    draft = {**state.data, "segment": segment.name, "days": segment.days, "nonce": nonce}
    await _set_state(turn, BC_CONFIRM, draft)
    button = f"{draft['button_text']} → {draft['button_url']}" if draft.get("button_url") else turn.t("admin.none")
    text = turn.t("admin.bc.confirm", segment=views.segment_label(turn.t, segment), count=count, button=button)
    if turn.app.config.broadcast.paid:  # what the faster pace will cost, before the admin confirms
        text += "\n\n" + views.paid_cost_text(turn.t, count, turn.app.config.broadcast.paid_rate_per_second)
    await turn.show(text, views.confirm_keyboard(turn.t, views.data("bgo", nonce), turn.t("admin.bc.start")))


async def broadcast_start(turn: Turn, args: list[str]) -> None:
    nonce = args[0]
    message = turn.callback.message if turn.callback is not None else None
    admin_id, chat_id = turn.user.id, turn.chat_id
    message_id = message.message_id if message is not None else None

    def create(conn: psycopg.Connection[Any]) -> bdb.Broadcast | None:
        state = conversation.get_state(conn, admin_id)
        if state is None or state.name != BC_CONFIRM or state.data.get("nonce") != nonce:
            return None
        draft = state.data
        broadcast = bdb.create_broadcast(
            conn,
            created_by=admin_id,
            text=draft["text"],
            segment=bdb.Segment.parse(draft["segment"], draft.get("days")),
            button_text=draft.get("button_text"),
            button_url=draft.get("button_url"),
            progress_chat_id=chat_id,
            progress_message_id=message_id,
        )
        conversation.clear_state(conn, admin_id)
        admin_db.audit(
            conn,
            admin_id,
            "broadcast_create",
            broadcast.id,
            "ok",
            {"segment": broadcast.segment, "days": broadcast.segment_days, "total": broadcast.total, "via": "bot"},
        )
        return broadcast

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


async def list_broadcasts(turn: Turn, args: list[str]) -> None:
    items = await turn.app.db.run(bdb.list_broadcasts, limit=10)
    await turn.show(views.broadcasts_text(turn.t, items), views.broadcasts_keyboard(turn.t, items))


def _status_action(action: bdb.Action) -> CallbackAction:
    async def change(turn: Turn, args: list[str]) -> None:
        broadcast_id = int(args[0])
        admin_id = turn.user.id

        def apply(conn: psycopg.Connection[Any]) -> tuple[bdb.StatusChange, bdb.Counts]:
            change = bdb.change_status(conn, broadcast_id, action)
            result = "ok" if change.changed else ("not_found" if not change.found else "unchanged")
            admin_db.audit(conn, admin_id, f"broadcast_{action}", broadcast_id, result, {"via": "bot"})
            return change, bdb.counts(conn, broadcast_id)

        change, counts = await turn.app.db.run(apply)
        if change.broadcast is None:
            await admin_menu(turn)
            return
        b = change.broadcast
        await turn.show(
            views.progress_text(turn.t, b, b.status, counts, None), views.progress_keyboard(turn.t, b.id, b.status)
        )

    return change


async def ask_refund(turn: Turn, args: list[str]) -> None:
    purchase_id = int(args[0])
    await turn.show(
        turn.t("admin.refund.confirm", id=purchase_id),
        views.confirm_keyboard(turn.t, views.data("rfc", purchase_id)),
    )


async def refund_confirmed(turn: Turn, args: list[str]) -> None:
    """Refund a Telegram Stars payment: the Bot API call first (outside any transaction), then the record.

    Telegram refuses a second refund of the same charge, so a repeated press changes nothing.
    Everything the payment gave is taken back in the recording transaction
    (`payments_db.reverse_refunded_purchase`): its days (the Xray writer is nudged, so access that
    ended is removed at once), the referrer's reward and any balance it credited.
    """
    purchase_id = int(args[0])
    charge = await turn.app.db.run(payments_db.stars_charge, purchase_id)
    if charge is None:
        await turn.show(turn.t("admin.refund.not_stars", id=purchase_id), views.back_keyboard(turn.t))
        return
    user_id, charge_id = charge
    try:
        await turn.ctx.sender.call(
            user_id,
            lambda: turn.ctx.bot.refund_star_payment(user_id, charge_id),
            counts_as_message=False,
        )
    except telegram.error.TelegramError as exc:
        await _audit(turn, "refund", purchase_id, result="failed", error=str(exc)[:200])
        await turn.show(
            turn.t("admin.refund.failed", id=purchase_id, error=str(exc)[:200]), views.back_keyboard(turn.t)
        )
        return

    rules = rules_of(turn.app)

    def record(conn: psycopg.Connection[Any]) -> payments_db.RefundReversal:
        reversal = payments_db.reverse_refunded_purchase(conn, purchase_id, rules=rules)
        referral = reversal.referral
        details = {
            "charge_id": charge_id,
            "days_removed": reversal.days_removed,
            "access_ended": reversal.access_ended,
            "referrer_id": reversal.referrer_id,
            "referral_debited_minor": referral.debited_minor if referral else 0,
            "referral_owed_minor": referral.owed_minor if referral else 0,
        }
        admin_db.audit(conn, turn.user.id, "refund", purchase_id, "ok" if reversal.recorded else "repeated", details)
        return reversal

    reversal = await turn.app.db.run(record)
    currency = turn.app.config.payments.currency
    referral = reversal.referral
    taken = (referral.debited_minor + referral.owed_minor) if referral else 0
    done = turn.t(
        "admin.refund.done",
        id=purchase_id,
        days=reversal.days_removed,
        reward=format_money(taken, currency),
        owed=format_money(referral.owed_minor if referral else 0, currency),
    )
    await show_user(turn, user_id, done)


CALLBACKS: dict[str, CallbackAction] = {
    "st": show_stats,
    "hl": show_health,
    "x": cancel_action,
    "fu": ask_user,
    "u": user_card,
    "g": ask_grant,
    "gc": grant_confirmed,
    "rv": ask_revoke,
    "rvc": revoke_confirmed,
    "rk": ask_reissue,
    "rkc": reissue_confirmed,
    "ar": toggle_auto_renew,
    "bal": ask_balance,
    "balc": balance_confirmed,
    "pr": show_promos,
    "pn": ask_promo,
    "pd": disable_promo,
    "ex": export_csv,
    "bc": compose_broadcast,
    "bn": broadcast_no_button,
    "bs": broadcast_segment,
    "bgo": broadcast_start,
    "bl": list_broadcasts,
    "bp": _status_action("pause"),
    "br": _status_action("resume"),
    "bx": _status_action("cancel"),
    "rf": ask_refund,
    "rfc": refund_confirmed,
}

STATES: dict[str, StateAction] = {
    FIND: find_user,
    GRANT: grant_days_entered,
    BALANCE: balance_entered,
    PROMO: promo_entered,
    BC_TEXT: broadcast_text_entered,
    BC_BUTTON: broadcast_button_entered,
}
