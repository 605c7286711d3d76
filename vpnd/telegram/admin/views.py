"""Admin screens as pure functions: texts and keyboards from values (no I/O).

`t` is a text lookup `t(key, **values)` (a `Turn.t`, or `Texts.get` bound to a language).
Every button's data comes from `vpnd.telegram.admin.verbs.Verb`.
"""

from __future__ import annotations

import datetime as dt
import html
import math
from collections.abc import Callable, Iterable, Sequence
from decimal import ROUND_CEILING, Decimal

from vpnd.db import quota
from vpnd.db.admin import HealthFacts, RevenueRow, Stats, TierRow, UserDetails
from vpnd.db.broadcasts import Broadcast, Counts, Segment
from vpnd.db.promo import PromoCode
from vpnd.health import CheckResult
from vpnd.pricing import format_money
from vpnd.quota import Limits, current_usage
from vpnd.quota import format_bytes as quota_bytes
from vpnd.services.admin_actions import NodeStatus
from vpnd.telegram import keyboards as kb
from vpnd.telegram.admin.verbs import Verb
from vpnd.telegram.flows.access import format_bytes
from vpnd.telegram.texts import Html

T = Callable[..., str]


def esc(text: object) -> str:
    return html.escape(str(text), quote=False)


def fmt_time(when: dt.datetime | None, never: str = "—") -> str:
    return never if when is None else when.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def fmt_duration(seconds: float) -> str:
    """3725 → "1h 2m", 95 → "1m 35s", 7 → "7s"."""
    if not math.isfinite(seconds) or seconds < 0:
        return "—"
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


# --- menu -------------------------------------------------------------------------------------


def menu_keyboard(t: T) -> kb.Keyboard:
    return kb.keyboard(
        [kb.button(t("admin.menu.stats"), Verb.STATS.data()), kb.button(t("admin.menu.health"), Verb.HEALTH.data())],
        [kb.button(t("admin.menu.nodes"), Verb.NODES.data())],
        [kb.button(t("admin.menu.user"), Verb.FIND_USER.data()), kb.button(t("admin.menu.promo"), Verb.PROMOS.data())],
        [
            kb.button(t("admin.menu.broadcast"), Verb.BROADCAST_COMPOSE.data()),
            kb.button(t("admin.menu.broadcasts"), Verb.BROADCASTS.data()),
        ],
        [
            kb.button(t("admin.menu.export_users"), Verb.EXPORT.data("users")),
            kb.button(t("admin.menu.export_payments"), Verb.EXPORT.data("payments")),
        ],
        [
            kb.button(t("admin.menu.users"), Verb.USERS_FILTERS.data()),
            kb.button(t("admin.menu.audit"), Verb.AUDIT.data("-", 0)),
        ],
        [
            kb.button(t("admin.menu.extend_all"), Verb.EXTEND_ALL.data()),
            kb.button(t("admin.menu.maintenance"), Verb.MAINTENANCE.data()),
        ],
        [kb.button(t("admin.menu.rotate"), Verb.ROTATE_KEYS.data())],
    )


def back_keyboard(t: T) -> kb.Keyboard:
    return kb.keyboard([kb.button(t("admin.back"), Verb.MENU.data())])


def confirm_keyboard(t: T, confirm_data: str, confirm_label: str | None = None) -> kb.Keyboard:
    return kb.keyboard(
        [kb.button(confirm_label or t("admin.confirm"), confirm_data), kb.button(t("admin.cancel"), Verb.CANCEL.data())]
    )


# --- stats ------------------------------------------------------------------------------------


def _revenue_lines(t: T, rows: Sequence[RevenueRow]) -> str:
    if not rows:
        return t("admin.none")
    return "\n".join(f"{esc(r.key)}: {esc(format_money(r.amount_minor, r.currency))} ({r.payments})" for r in rows)


def stats_text(t: T, s: Stats) -> str:
    return (
        t(
            "admin.stats",
            total=s.users_total,
            today=s.users_today,
            week=s.users_7d,
            reachable=s.reachable,
            unreachable=s.unreachable,
            paid=s.active_paid,
            trials=s.active_trials,
            converted=s.trials_converted,
            trials_total=s.trials_total,
            conversion=f"{s.conversion_percent:.1f}",
            by_day=Html(_revenue_lines(t, s.revenue_by_day)),
            by_plan=Html(_revenue_lines(t, s.revenue_by_plan)),
            by_method=Html(_revenue_lines(t, s.revenue_by_method)),
            sales=Html(_revenue_lines(t, s.sales_by_plan)),
        )
        + "\n\n"
        + t("admin.stats.tiers", rows=Html(_tier_lines(t, s.tiers)))
    )


def _tier_lines(t: T, rows: Sequence[TierRow]) -> str:
    if not rows:
        return t("admin.none")
    return "\n".join(
        t(
            "admin.stats.tier",
            plan=r.plan,
            subscribers=r.subscribers,
            traffic=quota_bytes(r.traffic_bytes),
            blocked=r.blocked,
        )
        for r in rows
    )


# --- user -------------------------------------------------------------------------------------


def limits_text(t: T, d: UserDetails, limits: Limits, plan_label: str) -> str:
    """The plan, this period's traffic (used / total, the reset, blocked) and the devices of `d`."""
    sub = d.subscription
    assert sub is not None
    usage = current_usage(limits, sub.starts_at, d.now, quota.period_facts(d.traffic_period))
    values = {"used": quota_bytes(usage.used), "total": quota_bytes(usage.total)}
    if usage.unlimited:
        traffic = t("admin.user.traffic_unlimited", **values)
    elif usage.resets_at is None:
        traffic = t("admin.user.traffic_no_reset", **values)
    else:
        traffic = t("admin.user.traffic", reset=fmt_time(usage.resets_at), **values)
    if d.traffic_blocked:
        traffic += t("admin.user.traffic_blocked")
    limit = limits.devices + d.extra_devices if limits.devices else 0
    devices = (
        t("admin.user.devices_used", used=d.devices_used, limit=limit)
        if limit
        else t("admin.user.devices_unlimited", used=d.devices_used)
    )
    return t("admin.user.limits", plan=plan_label, traffic=Html(traffic), devices=Html(devices))


def user_text(t: T, d: UserDetails, currency: str, limits: tuple[Limits, str] | None = None) -> str:
    """`limits`: the subscription's limits and its plan's name, for the usage lines."""
    sub = d.subscription
    if sub is None:
        subscription = t("admin.user.sub_none")
    else:
        status = sub.status if sub.status != "active" or sub.expires_at > d.now else "expired"
        subscription = t(
            "admin.user.sub",
            kind=sub.kind,
            status=status,
            expires=fmt_time(sub.expires_at),
            auto_renew=t("admin.on" if sub.auto_renew else "admin.off"),
        )
    payments = "\n".join(
        f"#{p.id} {esc(fmt_time(p.created_at))} · {esc(format_money(p.amount_minor, p.currency))} · "
        f"{esc(p.provider)} · {esc(p.outcome)}"
        for p in d.payments
    ) or t("admin.none")
    if limits is not None and sub is not None:
        subscription += "\n" + limits_text(t, d, *limits)
    return t(
        "admin.user.details",
        id=d.user.id,
        username=f"@{d.user.username}" if d.user.username else "",
        name=d.user.first_name,
        language=d.user.language,
        joined=fmt_time(d.created_at),
        reachable=t("admin.user.reachable" if d.user.reachable else "admin.user.unreachable")
        + ("\n" + t("admin.user.banned", since=fmt_time(d.user.banned_at)) if d.user.banned_at is not None else ""),
        balance=format_money(d.user.balance_minor, currency),
        invited=d.referrals.invited,
        earned=format_money(d.referrals.earned_minor, currency),
        subscription=Html(subscription),
        trial=fmt_time(d.trial_ends_at, t("admin.never")),
        payments=Html(payments),
    )


def user_keyboard(t: T, d: UserDetails, gift_codes: Sequence[str] = ()) -> kb.Keyboard:
    uid = d.user.id
    rows: list[list[kb.Button]] = [
        [
            kb.button(t("admin.user.grant"), Verb.GRANT.data(uid)),
            kb.button(t("admin.user.balance"), Verb.BALANCE.data(uid)),
        ]
    ]
    if d.subscription is not None:
        auto = d.subscription.auto_renew
        rows.append(
            [
                kb.button(t("admin.user.revoke"), Verb.REVOKE.data(uid)),
                kb.button(t("admin.user.reissue"), Verb.REISSUE.data(uid)),
            ]
        )
        rows.append(
            [
                kb.button(
                    t("admin.user.auto_renew", state=t("admin.on" if auto else "admin.off")),
                    Verb.AUTO_RENEW.data(uid, "off" if auto else "on"),
                )
            ]
        )
        rows.append([kb.button(t("admin.user.devices"), Verb.DEVICES.data(uid))])
    banned = d.user.banned_at is not None
    ban_label = t("admin.user.unban" if banned else "admin.user.ban")
    rows.append([kb.button(ban_label, Verb.BAN.data(uid, "off" if banned else "on"))])
    for payment in d.payments:
        if payment.provider in ("stars", "yookassa") and payment.outcome == "granted":
            rows.append(
                [kb.button(t("admin.refund.button", id=payment.purchase_id), Verb.REFUND.data(payment.purchase_id))]
            )
    for code in gift_codes:  # the user's unredeemed gifts: refundable to their balance
        rows.append([kb.button(t("admin.gift.refund_button", code=code), Verb.GIFT_REFUND.data(code))])
    rows.append([kb.button(t("admin.back"), Verb.MENU.data())])
    return kb.keyboard(*rows)


# --- promo ------------------------------------------------------------------------------------


def promo_text(t: T, promos: Sequence[PromoCode]) -> str:
    if not promos:
        return t("admin.promo.none")
    lines = [
        t(
            "admin.promo.line",
            code=p.code,
            value=promo_value(t, p),
            used=p.used_count,
            max=t("admin.unlimited") if p.max_uses is None else p.max_uses,
            expires=fmt_time(p.expires_at, t("admin.never")),
            conditions=promo_conditions(t, p),
            state=t("admin.promo.active" if p.active else "admin.promo.disabled"),
        )
        for p in promos
    ]
    return t("admin.promo.list", codes=Html("\n".join(lines)))


def promo_value(t: T, p: PromoCode) -> str:
    """What the code does: −20%, −2.00 USD, +7 days, +5.00 USD balance."""
    if p.kind == "percent":
        return t("admin.promo.value_percent", percent=p.percent or 0)
    if p.kind == "days":
        return t("admin.promo.value_days", days=p.grant_days or 0)
    amount = format_money(p.amount_minor or 0, p.currency or "")
    return t("admin.promo.value_amount" if p.kind == "amount" else "admin.promo.value_balance", amount=amount)


def promo_conditions(t: T, p: PromoCode) -> str:
    """For whom: a plan, one user, first purchases only (empty for anyone)."""
    parts = [t("admin.promo.cond_plan", plan=p.plan_code)] if p.plan_code is not None else []
    parts += [t("admin.promo.cond_user", user=p.user_id)] if p.user_id is not None else []
    parts += [t("admin.promo.cond_first")] if p.first_purchase else []
    return "".join(parts)


def promo_keyboard(t: T, promos: Iterable[PromoCode]) -> kb.Keyboard:
    disable = [
        [kb.button(t("admin.promo.disable", code=p.code), Verb.PROMO_DISABLE.data(p.code))] for p in promos if p.active
    ]
    return kb.keyboard(
        [kb.button(t("admin.promo.create"), Verb.PROMO_NEW.data())],
        *disable,
        [kb.button(t("admin.back"), Verb.MENU.data())],
    )


# --- health -----------------------------------------------------------------------------------


def health_text(t: T, checks: dict[str, CheckResult], facts: HealthFacts) -> str:
    merged = dict(checks)
    for stored in facts.stored_checks:  # the health worker's recorded states, where /readyz has none
        if stored.name not in merged:
            merged[stored.name] = CheckResult(stored.ok, f"{stored.detail} (since {fmt_time(stored.since)})")
    lines = "\n".join(
        t("admin.health.line", mark="✅" if r.ok else "❌", name=name, detail=r.detail)
        for name, r in sorted(merged.items())
    )
    lag = facts.xray_lag_seconds
    return t(
        "admin.health",
        checks=Html(lines or t("admin.none")),
        xray=t("admin.health.never") if lag is None else fmt_duration(lag),
        outbox=facts.outbox_pending,
        outbox_age=fmt_duration(facts.outbox_age_seconds),
        running=facts.running_broadcasts,
        paused=facts.paused_broadcasts,
    )


# --- nodes ------------------------------------------------------------------------------------

NODE_MARKS = {"up": "✅", "down": "❌", "never": "⚪️", "stale": "⚠️", "removed": "🗑"}


def node_ago(node: NodeStatus) -> tuple[str, str]:
    """(since its last record, since its last sync) as durations ("" where there is none)."""
    row = node.record
    if row is None:
        return "", ""
    synced = "" if row.synced_at is None else fmt_duration((row.db_now - row.synced_at).total_seconds())
    return fmt_duration(row.seconds_since_update), synced


#: The nodes screen stays under Telegram's 4096 characters: details are clipped, and nodes that do not
#: fit are counted instead (the CLI lists them all).
NODES_TEXT_BUDGET = 3500
NODE_DETAIL_CHARS = 200


def nodes_text(t: T, nodes: Sequence[NodeStatus]) -> str:
    if not nodes:
        return t("admin.nodes.none")
    parts: list[str] = []
    used = 0
    for index, node in enumerate(nodes):
        part = _node_text(t, node)
        if used + len(part) > NODES_TEXT_BUDGET:
            parts.append(t("admin.nodes.more", count=len(nodes) - index))
            break
        parts.append(part)
        used += len(part) + 2
    return t("admin.nodes", nodes=Html("\n\n".join(parts)))


def _node_text(t: T, node: NodeStatus) -> str:
    row = node.record
    updated, synced = node_ago(node)
    detail = row.detail if row is not None else ""
    if len(detail) > NODE_DETAIL_CHARS:
        detail = detail[:NODE_DETAIL_CHARS] + "…"
    state = t(f"admin.nodes.{node.state}", detail=detail, age=updated)
    head = t("admin.nodes.node", mark=NODE_MARKS[node.state], name=node.name, location=node.location, state=Html(state))
    if row is None:
        return head
    facts = t(
        "admin.nodes.facts",
        users=row.users,
        online=row.online,
        traffic=format_bytes(row.traffic_today),
        synced=t("admin.nodes.ago", age=synced) if synced else t("admin.never"),
    )
    return f"{head}\n{facts}"


def nodes_keyboard(t: T) -> kb.Keyboard:
    return kb.keyboard(
        [kb.button(t("admin.nodes.refresh"), Verb.NODES.data()), kb.button(t("admin.back"), Verb.MENU.data())]
    )


# --- broadcasts -------------------------------------------------------------------------------


def segment_label(t: T, segment: Segment) -> str:
    return t(f"admin.segment.{segment.name}", days=segment.days or 0, arg=segment.arg or "")


def segment_keyboard(t: T, languages: Sequence[str] = (), plans: Sequence[str] = ()) -> kb.Keyboard:
    def seg(name: str, *args: object) -> kb.Button:
        label = t(f"admin.segment.{name}", days=args[0] if args else 0, arg=args[0] if args else "")
        return kb.button(label, Verb.BROADCAST_SEGMENT.data(name, *args))

    rows = [
        [seg("all")],
        [seg("active"), seg("trial")],
        [seg("nosub"), seg("neverpaid")],
        [seg("expiring", 1), seg("expiring", 3), seg("expiring", 7)],
        [seg("expired", 7), seg("expired", 30), seg("expired", 90)],
        [seg("paid", 7), seg("paid", 30), seg("paid", 90)],
    ]
    rows += [[seg("lang", lang) for lang in languages[i : i + 3]] for i in range(0, len(languages), 3)]
    rows += [[seg("plan", code) for code in plans[i : i + 2]] for i in range(0, len(plans), 2)]
    return kb.keyboard(*rows, [kb.button(t("admin.cancel"), Verb.CANCEL.data())])


def status_label(t: T, status: str) -> str:
    return t(f"admin.bc.status.{status}")


def progress_keyboard(t: T, broadcast_id: int, status: str) -> kb.Keyboard | None:
    if status == "running":
        return kb.keyboard(
            [
                kb.button(t("admin.bc.pause"), Verb.BROADCAST_PAUSE.data(broadcast_id)),
                kb.button(t("admin.bc.cancel"), Verb.BROADCAST_CANCEL.data(broadcast_id)),
            ]
        )
    if status == "paused":
        return kb.keyboard(
            [
                kb.button(t("admin.bc.resume"), Verb.BROADCAST_RESUME.data(broadcast_id)),
                kb.button(t("admin.bc.cancel"), Verb.BROADCAST_CANCEL.data(broadcast_id)),
            ]
        )
    if status == "scheduled":
        return kb.keyboard([kb.button(t("admin.bc.cancel"), Verb.BROADCAST_CANCEL.data(broadcast_id))])
    return None


def report_keyboard(t: T, broadcast_id: int) -> kb.Keyboard:
    """Under a finished broadcast's summary: its delivery report (counts and a CSV)."""
    return kb.keyboard([kb.button(t("admin.bc.report"), Verb.BROADCAST_REPORT.data(broadcast_id))])


def progress_text(t: T, b: Broadcast, status: str, counts: Counts, rate: float | None) -> str:
    """The admin's progress message: counts, rate (recipients per second) and ETA."""
    eta = counts.pending / rate if rate and rate > 0 and status == "running" else math.inf
    return t(
        "admin.bc.progress",
        id=b.id,
        status=status_label(t, status),
        segment=segment_label(t, b.target),
        sent=counts.sent,
        failed=counts.failed,
        skipped=counts.skipped,
        pending=counts.pending,
        total=counts.total,
        rate="—" if rate is None else f"{rate:.1f}",
        eta=fmt_duration(eta),
    )


def summary_text(t: T, b: Broadcast, status: str, counts: Counts, seconds: float | None) -> str:
    return t(
        "admin.bc.summary",
        id=b.id,
        status=status_label(t, status),
        sent=counts.sent,
        failed=counts.failed,
        skipped=counts.skipped,
        total=counts.total,
        duration=fmt_duration(seconds if seconds is not None else math.inf),
    )


def broadcasts_text(t: T, items: Sequence[Broadcast]) -> str:
    if not items:
        return t("admin.bc.none")
    lines = [
        t(
            "admin.bc.list_item",
            id=b.id,
            status=status_label(t, b.status),
            segment=segment_label(t, b.target),
            total=b.total,
            created=fmt_time(b.created_at),
        )
        for b in items
    ]
    return t("admin.bc.list", items=Html("\n".join(lines)))


def broadcasts_keyboard(t: T, items: Sequence[Broadcast]) -> kb.Keyboard:
    rows: list[list[kb.Button]] = []
    for b in items:
        finished = b.status in ("done", "cancelled")
        markup = report_keyboard(t, b.id) if finished else progress_keyboard(t, b.id, b.status)
        if markup is not None:
            rows.append([{**button, "text": f"#{b.id} {button['text']}"} for button in markup["inline_keyboard"][0]])
    rows.append([kb.button(t("admin.back"), Verb.MENU.data())])
    return kb.keyboard(*rows)


#: Telegram's free broadcast pace (messages per second) and the price of each paid message above it.
FREE_BROADCAST_RATE = 30.0
STARS_PER_PAID_MESSAGE = Decimal("0.1")


def paid_broadcast_stars(recipients: int, paid_rate: float) -> tuple[int, int]:
    """(estimate, ceiling) of the Stars a paid broadcast to `recipients` costs at `paid_rate`/s.

    Telegram charges 0.1 Star per message sent above the free 30/s: at `paid_rate` that is the share
    (paid_rate - 30) / paid_rate of the messages. The Bot API reference words it as 0.1 Star per
    message with `allow_paid_broadcast`, so the ceiling (every message charged) is shown as well."""
    ceiling = STARS_PER_PAID_MESSAGE * recipients
    above = max(0.0, paid_rate - FREE_BROADCAST_RATE) / paid_rate if paid_rate > 0 else 0.0
    estimate = ceiling * Decimal(str(round(above, 6)))
    return int(estimate.to_integral_value(ROUND_CEILING)), int(ceiling.to_integral_value(ROUND_CEILING))


def paid_cost_text(t: T, recipients: int, paid_rate: float) -> str:
    stars, max_stars = paid_broadcast_stars(recipients, paid_rate)
    return t(
        "admin.bc.paid_cost", rate=f"{paid_rate:g}", stars=stars, max_stars=max_stars, free=f"{FREE_BROADCAST_RATE:g}"
    )
