"""Free trial and "My subscription": status, key, QR code, subscription URL, reissue, auto-renew."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from functools import partial
from typing import Any

import attrs
import psycopg
import trio

from vpnd import alerts, key_message
from vpnd.config_checks import KEY_PENDING_HINT, link_settings_gap
from vpnd.db import checkout as checkout_db
from vpnd.db import quota, subscriptions, xray_state
from vpnd.db.subscriptions import Subscription
from vpnd.key_message import key_caption, key_keyboard
from vpnd.qr import qr_png
from vpnd.quota import Limits, limits_of
from vpnd.quota import format_bytes as quota_bytes
from vpnd.subscription_url import user_links
from vpnd.telegram import keyboards as kb
from vpnd.telegram.flows import channel
from vpnd.telegram.flows.menu import show_menu
from vpnd.telegram.turn import Turn
from vpnd.texts import Html

log = logging.getLogger("vpnd.telegram.access")


async def trial(turn: Turn) -> None:
    config = turn.app.config.trial
    if not config.enabled:
        await turn.show(turn.t("trial.disabled"), kb.back_to_menu(turn.t))
        return
    if not await channel.may_take_trial(turn):
        return
    plan = turn.app.config.trial_plan
    outcome = await turn.app.db.run(subscriptions.grant_trial, turn.user.id, plan.days, plan.code)
    if not outcome.granted or outcome.subscription is None:
        await turn.show(turn.t("trial.refused"), kb.back_to_menu(turn.t))
        return
    text = turn.t("trial.granted", days=plan.days, expires=turn.format_date(outcome.subscription.expires_at))
    if await send_key(turn, outcome.subscription, text):
        return
    await turn.show(
        text, kb.keyboard([kb.button(turn.t("menu.subscription"), "sub")], [kb.button(turn.t("common.menu"), "menu")])
    )


async def send_key(turn: Turn, sub: Subscription, confirmation: str) -> bool:
    """The key message (`vpnd.key_message`): a photo of the subscription URL's QR code, `confirmation`
    and the URL as its caption, the connect buttons. False when the key cannot be built (the caller
    then shows `confirmation` as text; `links_or_report` has alerted the admins)."""
    if await links_or_report(turn, sub) is None:
        return False
    url = subscription_url(turn, sub)
    caption = key_caption(turn.ctx.texts, turn.lang, confirmation, url)
    if caption is None:
        return False
    png = await trio.to_thread.run_sync(qr_png, url)
    await turn.answer()
    await turn.ctx.sender.send_photo(
        turn.chat_id, png, caption=caption, reply_markup=key_keyboard(turn.ctx.texts, turn.lang)
    )
    return True


@attrs.frozen
class SubscriptionView:
    subscription: Subscription | None
    upload: int = 0
    download: int = 0
    #: This period's traffic against the plan's quota (None: no subscription).
    usage: quota.UsageView | None = None
    #: Devices the subscription may use (0: unlimited).
    device_limit: int = 0


def load_view(
    conn: psycopg.Connection[Any], user_id: int, limits_for: Callable[[str | None, str], Limits] | None = None
) -> SubscriptionView:
    sub = subscriptions.get_subscription(conn, user_id)
    traffic = xray_state.traffic_totals(conn, user_id)
    if sub is None or limits_for is None:
        return SubscriptionView(sub, traffic.uplink, traffic.downlink)
    limits = limits_for(sub.plan_code, sub.kind)
    usage = quota.usage_of(conn, user_id, limits)
    devices = limits.devices + usage.extra_devices if limits.devices else 0
    return SubscriptionView(sub, traffic.uplink, traffic.downlink, usage, devices)


def limits_text(turn: Turn, view: SubscriptionView) -> str:
    """The plan's limits as lines for "My subscription": traffic used / total and its reset, devices."""
    usage = view.usage
    if usage is None:
        return ""
    if usage.total_bytes <= 0:
        traffic = turn.t("sub.quota.unlimited")
    else:
        values = {"used": quota_bytes(usage.used_bytes), "total": quota_bytes(usage.total_bytes)}
        if usage.resets_at is None:
            traffic = turn.t("sub.quota.no_reset", **values)
        else:
            traffic = turn.t("sub.quota.used", reset=turn.format_date(usage.resets_at), **values)
        if usage.blocked:
            traffic += "\n" + turn.t("sub.quota.blocked")
    devices = (
        turn.t("sub.devices.limit", limit=view.device_limit) if view.device_limit else turn.t("sub.devices.unlimited")
    )
    return f"{traffic}\n{devices}\n"


def format_bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.2f} TB"


async def links_or_report(turn: Turn, sub: Subscription) -> list[str] | None:
    """The user's share links, or None when the configuration cannot build them (a gap such as an
    empty `[xray].public_key`): then the admins are alerted (once per incident) and the caller tells
    the user politely that the key is being prepared — a configuration gap is never a user's error."""
    try:
        return user_links(turn.app.config, sub, turn.lang)
    except ValueError as exc:
        gap = link_settings_gap(turn.app.config)
        detail = f"{gap.key}: {gap.detail}" if gap is not None else f"[xray] link settings: {exc}"
        log.error("event=key_unavailable user_id=%d detail=%s", turn.user.id, _quote(detail))
        await alerts.report_incident(
            turn.app, turn.ctx.texts, alerts.XRAY_LINKS, False, f"{detail}; {KEY_PENDING_HINT}"
        )
        return None


def _quote(text: str) -> str:
    from vpnd.logs import quote

    return quote(text)


def subscription_url(turn: Turn, sub: Subscription) -> str:
    return key_message.subscription_url(turn.app.config.http.public_base_url, sub.sub_token)


async def my_subscription(turn: Turn, notice: str = "") -> None:
    view = await turn.app.db.run(load_view, turn.user.id, partial(limits_of, turn.app.config))
    sub = view.subscription
    if sub is None:
        await show_menu(turn, turn.t("sub.none"))
        return
    now = dt.datetime.now(dt.UTC)
    status = "active" if sub.is_active(now) else ("revoked" if sub.status == "revoked" else "expired")
    days_left = max(0, (sub.expires_at - now).days) if status == "active" else 0
    links = await links_or_report(turn, sub)
    if links is None:
        await turn.show(
            turn.t("sub.key_pending"),
            kb.keyboard([kb.button(turn.t("menu.renew"), "buy")], [kb.button(turn.t("common.menu"), "menu")]),
        )
        return
    nodes = turn.app.config.nodes_for_plan(sub.plan_code)
    if len(nodes) > 1:  # several locations: each link under its name
        link_html = Html(
            "\n".join(
                f"{_escape(node.label(turn.lang))}\n<code>{_escape(link)}</code>"
                for node, link in zip(nodes, links, strict=True)
            )
        )
    else:
        link_html = Html("\n".join(f"<code>{_escape(link)}</code>" for link in links))
    text = turn.t(
        "sub.details",
        kind=turn.t(f"sub.kind.{sub.kind}"),
        status=turn.t(f"sub.status.{status}"),
        expires=turn.format_date(sub.expires_at),
        days_left=days_left,
        upload=format_bytes(view.upload),
        download=format_bytes(view.download),
        limits=Html(limits_text(turn, view)),
        auto_renew=turn.t("sub.auto_renew.on" if sub.auto_renew else "sub.auto_renew.off"),
        link=link_html,
        sub_url=Html(f"<code>{_escape(subscription_url(turn, sub))}</code>"),
    )
    if notice:
        text = notice + "\n\n" + text
    toggle = "sub.auto_renew_toggle_off" if sub.auto_renew else "sub.auto_renew_toggle_on"
    card = await turn.app.db.run(checkout_db.saved_method, turn.user.id)
    card_rows = [[kb.button(turn.t("sub.card_remove", title=card.title or "•"), "card:rm")]] if card else []
    if status == "active" and limits_of(turn.app.config, sub.plan_code, sub.kind).limits_traffic:
        card_rows.append([kb.button(turn.t("quota.buy_pack"), "packs")])  # extra traffic for this period
    await turn.show(
        text,
        kb.keyboard(
            [kb.button(turn.t("connect.button"), "conn")],
            [kb.button(turn.t("sub.qr"), "qr"), kb.button(turn.t("sub.reissue"), "reissue")],
            [kb.button(turn.t("sub.devices"), "dev")],
            [kb.button(turn.t(toggle), "ar:off" if sub.auto_renew else "ar:on")],
            *card_rows,
            [kb.button(turn.t("menu.renew"), "buy")],
            [kb.button(turn.t("common.menu"), "menu")],
        ),
    )


def _escape(text: str) -> str:
    import html

    return html.escape(text, quote=False)


async def send_qr(turn: Turn) -> None:
    sub = await turn.app.db.run(subscriptions.get_subscription, turn.user.id)
    if sub is None:
        await show_menu(turn, turn.t("sub.none"))
        return
    links = await links_or_report(turn, sub)
    if links is None:
        await turn.answer(turn.t("sub.key_pending"), alert=True)
        return
    png = await trio.to_thread.run_sync(qr_png, links[0])
    await turn.answer()
    await turn.ctx.sender.send_photo(turn.chat_id, png, caption=turn.t("sub.qr_caption"))


async def reissue(turn: Turn) -> None:
    try:
        await turn.app.db.run(subscriptions.reissue_key, turn.user.id)
    except subscriptions.ReissueRateLimited as exc:
        await turn.answer(turn.t("sub.reissue_limited", seconds=exc.retry_after_seconds), alert=True)
        return
    except subscriptions.NoSubscription:
        await show_menu(turn, turn.t("sub.none"))
        return
    await my_subscription(turn, turn.t("sub.reissued"))


async def set_auto_renew(turn: Turn, enabled: bool) -> None:
    sub = await turn.app.db.run(subscriptions.set_auto_renew, turn.user.id, enabled)
    if sub is None:
        await show_menu(turn, turn.t("sub.none"))
        return
    await turn.answer(turn.t("sub.auto_renew_set_on" if enabled else "sub.auto_renew_set_off"))
    await my_subscription(turn)


async def remove_saved_card(turn: Turn) -> None:
    """Unlink the saved card: auto-renewal never charges it again (the balance still may)."""
    removed = await turn.app.db.run(checkout_db.forget_method, turn.user.id)
    await turn.answer(turn.t("sub.card_removed" if removed else "sub.card_none"))
    await my_subscription(turn)
