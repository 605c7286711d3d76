"""`vpnd admin ...` and `vpnd broadcast ...`: the operator's tools on the database, no daemon needed.

    vpnd admin stats
    vpnd admin user <id|@name>
    vpnd admin grant <id> <days|30d|12h> [--notify]
    vpnd admin extend-all <2d|12h> [--trials] [--yes]
    vpnd admin grant-traffic <id> <GB>
    vpnd admin revoke <id>
    vpnd admin reissue <id> [--notify]
    vpnd admin rotate-keys [--batch N] [--notify] [--yes] | --status | --pause | --resume | --cancel
    vpnd admin ban <id> [--reason TEXT]
    vpnd admin unban <id>
    vpnd admin promo create <CODE> <PERCENT> [--max-uses N] [--days D]
    vpnd admin promo create <CODE> --kind percent|amount|days|balance --value V [--plan P] [--user ID]
                            [--first-purchase] [--max-uses N] [--days D]
    vpnd admin promo list
    vpnd admin promo disable <CODE>
    vpnd admin gift refund <CODE>
    vpnd admin withdrawals [--status pending|approved|rejected|all]
    vpnd admin withdrawal approve|reject <id> [--note TEXT]
    vpnd admin nodes
    vpnd admin devices <id> [--reset]
    vpnd admin grant-device <id> [N]
    vpnd admin maintenance on [--message TEXT] | off | status
    vpnd admin users [--filter F] [--lang L] [--limit N] [--after ID]
    vpnd admin audit [--action A] [--admin ID] [--target T] [--limit N] [--before ID]
    vpnd broadcast list [--status S]
    vpnd broadcast pause|resume|cancel <id>
    vpnd broadcast report <id> [--csv FILE]

Every command takes `--config` and `--json` (one JSON document on stdout, for scripts). Exit codes:
0 done, 1 failed (not found, not possible now, database trouble), 2 usage. Each command is one
transaction running an action of `vpnd.services.admin_actions` (the same the bot's admin menu runs),
audited there like the bot's (`admin_audit`, admin id 0, details `{"via": "cli", "os_user": ...}`);
a refused action keeps its audit row. A running daemon hears of the change at commit (`pg_notify`):
access changes reach Xray, broadcast status changes the broadcasts nursery, and `--notify` messages
leave through the outbox.
"""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import json
import sys
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import attrs
import psycopg

from vpnd.config import SUPPORTED_LANGUAGES, Config
from vpnd.db import broadcasts as bdb
from vpnd.db import promo, quota, referrals
from vpnd.db.admin import USER_FILTERS, RevenueRow, TierRow, UserDetails
from vpnd.db.key_rotation import Rotation
from vpnd.db.key_rotation import Verb as RotationVerb
from vpnd.db.migrations import SchemaError, check_version, packaged_schema
from vpnd.db.payments import AUTO_RENEW_PREFIX, PaymentRules
from vpnd.db.subscriptions import Subscription
from vpnd.devices import device_name
from vpnd.pricing import format_money
from vpnd.quota import current_usage, limits_of
from vpnd.quota import format_bytes as format_quota_bytes
from vpnd.services import admin_actions as actions
from vpnd.services import broadcast_report
from vpnd.services import devices as device_actions
from vpnd.services import key_rotation as rotation_actions
from vpnd.services import maintenance as maintenance_actions
from vpnd.services import withdrawals as withdrawal_actions
from vpnd.telegram.admin import views
from vpnd.telegram.flows.access import format_bytes
from vpnd.texts import Texts

R = TypeVar("R")

OK, FAILED, USAGE = 0, 1, 2

MAX_GRANT_GB_TEXT = str(actions.MAX_GRANT_GB)
MAX_BAN_REASON_TEXT = str(actions.MAX_BAN_REASON)
MAX_PAGE_TEXT = str(actions.MAX_PAGE)

AddConfig = Callable[[argparse.ArgumentParser], argparse.ArgumentParser]


class Failed(Exception):
    """The command could not do what was asked (exit 1); the message says why."""


class Usage(Exception):
    """The arguments are wrong (exit 2)."""


# --- parsers ----------------------------------------------------------------------------------


def add_parsers(sub: Any, with_config: AddConfig) -> None:
    """Add `admin` and `broadcast` to the `vpnd` command's subparsers."""

    def leaf(parent: Any, name: str, help_text: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = parent.add_parser(name, help=help_text)
        with_config(parser)
        parser.add_argument("--json", action="store_true", help="print one JSON document (for scripts)")
        return parser

    admin = sub.add_parser("admin", help="admin tools on the database (stats, users, promo codes)")
    actions = admin.add_subparsers(dest="admin_command", required=True, metavar="ACTION")
    leaf(actions, "stats", "users, subscriptions, conversion and revenue")
    leaf(actions, "nodes", "each Xray node: reachable, users, online now, traffic today, last sync")
    user = leaf(actions, "user", "a user's status, expiry, payments, balance and referrals")
    user.add_argument("query", help="a user id or @username")
    grant = leaf(actions, "grant", "give a user days (30, 30d) or hours (12h) of access")
    grant.add_argument("user_id", type=int)
    grant.add_argument("duration", help="days (30 or 30d) or hours (12h)")
    grant.add_argument("--notify", action="store_true", help="tell the user (through the outbox)")
    traffic = leaf(actions, "grant-traffic", "add GB to the current traffic period of a user's plan")
    traffic.add_argument("user_id", type=int)
    traffic.add_argument("gb", help=f"whole GB, 1 to {MAX_GRANT_GB_TEXT}")
    extend = leaf(actions, "extend-all", "add days or hours to every running subscription (an outage compensation)")
    extend.add_argument("duration", help="days (2 or 2d) or hours (12h)")
    extend.add_argument("--trials", action="store_true", help="running trials too (default: paid only)")
    extend.add_argument("--yes", action="store_true", help="do it (without: say how many it would extend)")
    revoke = leaf(actions, "revoke", "revoke a user's subscription")
    revoke.add_argument("user_id", type=int)
    reissue = leaf(actions, "reissue", "a new key (UUID and subscription URL) for one user; the old one stops working")
    reissue.add_argument("user_id", type=int)
    reissue.add_argument("--notify", action="store_true", help="send the user the new link (through the outbox)")
    rotate = leaf(actions, "rotate-keys", "replace everyone's key, batch by batch (after a leak); the daemon runs it")
    rotate.add_argument("--batch", type=int, default=None, help="keys per batch (default: [xray].rotate_batch_size)")
    rotate.add_argument("--notify", action="store_true", help="send each user with a running subscription the new link")
    rotate.add_argument("--yes", action="store_true", help="start it (without: say how many keys it would replace)")
    steer = rotate.add_mutually_exclusive_group()
    for verb in ("status", "pause", "resume", "cancel"):
        steer.add_argument(f"--{verb}", action="store_true", help=f"{verb} the current rotation")
    ban = leaf(actions, "ban", "ban a user: the bot ignores them and their key leaves Xray at once")
    ban.add_argument("user_id", type=int)
    ban.add_argument("--reason", default=None, help=f"why (in the audit log; at most {MAX_BAN_REASON_TEXT} characters)")
    unban = leaf(actions, "unban", "lift a ban: the bot answers again and the subscription's key is back")
    unban.add_argument("user_id", type=int)
    devices = leaf(actions, "devices", "a user's devices (apps that fetched the subscription URL) and limit")
    devices.add_argument("user_id", type=int)
    devices.add_argument("--reset", action="store_true", help="forget them all (each app takes a slot again)")
    grant_device = leaf(actions, "grant-device", "give a user N more device slots (default 1)")
    grant_device.add_argument("user_id", type=int)
    grant_device.add_argument("count", type=int, nargs="?", default=1)
    promo_parser = actions.add_parser("promo", help="promo codes: create, list, disable")
    promo_actions = promo_parser.add_subparsers(dest="promo_command", required=True, metavar="ACTION")
    create = leaf(promo_actions, "create", "create a promo code")
    create.add_argument("code")
    create.add_argument("percent", type=int, nargs="?", default=None, help="a percent discount (the short form)")
    create.add_argument("--kind", choices=promo.KINDS, default=None, help="what the code does (default percent)")
    create.add_argument("--value", default=None, help="the percent, the amount (2.50, shop currency) or the days")
    create.add_argument("--plan", default=None, help="a discount for this plan code only")
    create.add_argument("--user", type=int, default=None, help="a personal code: only this user id may use it")
    create.add_argument("--first-purchase", action="store_true", help="only for users who never paid")
    create.add_argument("--max-uses", type=int, default=None)
    create.add_argument("--days", type=int, default=None, help="valid for this many days (default: no expiry)")
    leaf(promo_actions, "list", "every promo code with its usage")
    disable = leaf(promo_actions, "disable", "switch a promo code off")
    disable.add_argument("code")
    maintenance = actions.add_parser("maintenance", help="maintenance mode: purchases and trials paused, keys work")
    switches = maintenance.add_subparsers(dest="maintenance_command", required=True, metavar="ACTION")
    leaf(switches, "on", "turn maintenance on").add_argument("--message", default="", help="the banner users see")
    leaf(switches, "off", "turn maintenance off")
    leaf(switches, "status", "whether maintenance is on, since when, with which text")

    listing = leaf(actions, "users", "list users by id, a page at a time (--after the last id shown)")
    listing.add_argument("--filter", default="all", choices=list(USER_FILTERS), help="which users (default: all)")
    listing.add_argument("--lang", default=None, help="only users with this language (en, ru, ...)")
    listing.add_argument("--limit", type=int, default=50, help=f"rows, 1 to {MAX_PAGE_TEXT} (default 50)")
    listing.add_argument("--after", type=int, default=None, help="start after this user id")
    audit = leaf(actions, "audit", "the audit log, newest first, a page at a time (--before the last id shown)")
    audit.add_argument("--action", default=None, help="only this action (grant, balance, lookup, ...)")
    audit.add_argument("--admin", type=int, default=None, help="only this admin's (0: the command line)")
    audit.add_argument("--target", default=None, help="only this target (a user id, a promo code, ...)")
    audit.add_argument("--limit", type=int, default=50, help=f"rows, 1 to {MAX_PAGE_TEXT} (default 50)")
    audit.add_argument("--before", type=int, default=None, help="older than this entry id")

    gift_parser = actions.add_parser("gift", help="gifts: refund an unredeemed gift to the buyer's balance")
    gift_actions = gift_parser.add_subparsers(dest="gift_command", required=True, metavar="ACTION")
    leaf(gift_actions, "refund", "refund an unredeemed gift to the buyer's balance").add_argument("code")

    payouts = leaf(actions, "withdrawals", "withdrawal requests of referral earnings, newest first")
    payouts.add_argument("--status", choices=[*referrals.STATUSES, "all"], default="pending")
    payouts.add_argument("--limit", type=int, default=50)
    payout = actions.add_parser("withdrawal", help="approve (pay once) or reject (release) a withdrawal request")
    payout_actions = payout.add_subparsers(dest="withdrawal_command", required=True, metavar="ACTION")
    for verb in ("approve", "reject"):
        decision = leaf(payout_actions, verb, f"{verb} a pending withdrawal request")
        decision.add_argument("withdrawal_id", type=int)
        decision.add_argument("--note", default=None, help="told to the user and kept in the audit log")

    broadcast = sub.add_parser("broadcast", help="list, pause, resume or cancel broadcasts; their delivery reports")
    verbs = broadcast.add_subparsers(dest="broadcast_command", required=True, metavar="ACTION")
    listing = leaf(verbs, "list", "recent broadcasts with their progress")
    listing.add_argument("--status", choices=["scheduled", "running", "paused", "cancelled", "done"])
    listing.add_argument("--limit", type=int, default=20)
    for verb in ("pause", "resume", "cancel"):
        leaf(verbs, verb, f"{verb} a broadcast").add_argument("broadcast_id", type=int)
    report = leaf(verbs, "report", "a broadcast's delivery report: sent, blocked the bot, failed")
    report.add_argument("broadcast_id", type=int)
    report.add_argument("--csv", metavar="FILE", help="also write every recipient with their outcome as CSV")


# --- running ----------------------------------------------------------------------------------


def cmd_admin(config: Config, args: argparse.Namespace) -> int:
    verb = getattr(args, f"{args.admin_command}_command", None)  # promo and maintenance have their own verbs
    command = f"{args.admin_command} {verb}" if verb else args.admin_command
    return _run(config, args, ADMIN_COMMANDS[command])


def cmd_broadcast(config: Config, args: argparse.Namespace) -> int:
    return _run(config, args, broadcast_command)


Command = Callable[[psycopg.Connection[Any], argparse.Namespace, Config], tuple[Any, str]]


def _run(config: Config, args: argparse.Namespace, command: Command) -> int:
    """Run one command in one transaction; print its result (text or JSON); return the exit code."""
    as_json = bool(getattr(args, "json", False))
    if not config.database.dsn:
        return _error(as_json, "[database].dsn is required (or set VPND_DATABASE_DSN)", USAGE)
    try:
        timeout = max(1, int(config.database.connect_timeout_seconds))
        with psycopg.connect(config.database.dsn, autocommit=True, connect_timeout=timeout) as conn:
            version = check_version(conn, packaged_schema())
            if version != packaged_schema().version:
                raise Failed(f"the database schema is at version {version or 'none'}; run `vpnd migrate` first")
            failure: Failed | None = None
            with conn.transaction():
                try:
                    value, text = command(conn, args, config)
                except Failed as exc:  # refused: keep its audit row (the transaction commits)
                    failure = exc
            if failure is not None:
                raise failure
    except Usage as exc:
        return _error(as_json, str(exc), USAGE)
    except (Failed, SchemaError) as exc:
        return _error(as_json, str(exc), FAILED)
    except psycopg.OperationalError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return _error(as_json, f"database: {reason}", FAILED)
    if as_json:
        print(json.dumps({"ok": True, "result": _jsonable(value)}, ensure_ascii=False, indent=2))
    else:
        print(text)
    return OK


def _error(as_json: bool, message: str, code: int) -> int:
    if as_json:
        print(json.dumps({"ok": False, "error": message}, ensure_ascii=False))
    print(f"vpnd: {message}", file=sys.stderr)
    return code


def _jsonable(value: Any) -> Any:
    if attrs.has(type(value)):
        data = attrs.asdict(value, recurse=False)
        for name in dir(type(value)):  # computed facts (e.g. conversion_percent) belong in the output too
            if isinstance(getattr(type(value), name, None), property) and not name.startswith("_"):
                data[name] = getattr(value, name)
        return _jsonable(data)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).isoformat()
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def _actor() -> actions.Actor:
    return actions.Actor.cli(_os_user())


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "?"


def _when(value: dt.datetime | None) -> str:
    return "—" if value is None else value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


# --- admin commands ---------------------------------------------------------------------------


def stats_command(conn: psycopg.Connection[Any], args: argparse.Namespace, config: Config) -> tuple[Any, str]:
    s = actions.stats(conn, _actor())

    def revenue(rows: list[RevenueRow]) -> str:
        if not rows:
            return "  —"
        return "\n".join(f"  {r.key:<12} {format_money(r.amount_minor, r.currency):>16}  ({r.payments})" for r in rows)

    def tiers(rows: list[TierRow]) -> str:
        if not rows:
            return "  —"
        return "\n".join(
            f"  {r.plan:<12} {r.subscribers:>8}  {format_quota_bytes(r.traffic_bytes):>10}  blocked {r.blocked}"
            for r in rows
        )

    text = "\n".join(
        [
            f"users:             {s.users_total} (today {s.users_today}, last 7 days {s.users_7d})",
            f"reachable:         {s.reachable} (unreachable {s.unreachable})",
            f"active paid:       {s.active_paid}",
            f"active trials:     {s.active_trials}",
            f"trial → paid:      {s.trials_converted} of {s.trials_total} ({s.conversion_percent:.1f}%)",
            "revenue by day (last 30 days):",
            revenue(s.revenue_by_day),
            "revenue by plan:",
            revenue(s.revenue_by_plan),
            "revenue by method:",
            revenue(s.revenue_by_method),
            "plans sold (every method, balance and auto-renewals included):",
            revenue(s.sales_by_plan),
            "active subscribers by plan (traffic this period, blocked at the quota):",
            tiers(s.tiers),
        ]
    )
    return s, text


def nodes_command(conn: psycopg.Connection[Any], args: argparse.Namespace, config: Config) -> tuple[Any, str]:
    """The nodes as the daemon's writers last recorded them (this command reads; it reaches no node)."""
    found = actions.nodes(conn, _actor(), config.managed_nodes, "en", reconcile_interval=config.xray.reconcile_interval)
    if not found:
        return found, "no Xray nodes: [xray] enabled = false and no [[nodes]] in the configuration"
    width = max(len(node.name) for node in found)
    place = max(len(node.location) for node in found)
    return found, "\n".join(_node_line(node, width, place) for node in found)


def _node_line(node: actions.NodeStatus, width: int, place: int) -> str:
    row = node.record
    updated, synced = views.node_ago(node)
    state = {
        "up": "reachable: yes",
        "down": "reachable: no",
        "never": "never seen",
        "stale": f"stale: not updated for {updated}",
        "removed": "removed (retiring)",
    }[node.state]
    line = f"{node.name:<{width}}  {node.location:<{place}}  {state}"
    if row is None:
        return line
    line += (
        f"  users {row.users}  online {row.online}  traffic today {format_bytes(row.traffic_today)}"
        f"  last sync {f'{synced} ago' if synced else 'never'}"
    )
    return line + (f"  ({row.detail})" if node.state == "down" and row.detail else "")


def user_command(conn: psycopg.Connection[Any], args: argparse.Namespace, config: Config) -> tuple[Any, str]:
    query = args.query.strip()
    details = actions.lookup(conn, _actor(), query, payments_limit=10)
    if isinstance(details, actions.Refused):
        raise Failed(f"no user {query}")
    u, sub = details.user, details.subscription
    currency = config.payments.currency
    lines = [
        f"user:          {u.id}" + (f" (@{u.username})" if u.username else ""),
        f"name:          {u.first_name}",
        f"language:      {u.language}",
        f"joined:        {_when(details.created_at)}",
        f"reachable:     {'yes' if u.reachable else 'no (blocked the bot)'}",
        *([f"banned:        since {_when(u.banned_at)}"] if u.banned_at is not None else []),
        f"balance:       {format_money(u.balance_minor, currency)} ({u.balance_minor} minor units)",
        f"referrals:     {details.referrals.invited} invited, {details.referrals.earned_minor} minor units earned",
        *([f"owes:          {format_money(details.owed_minor, currency)}"] if details.owed_minor else []),
        f"trial ends:    {_when(details.trial_ends_at)}",
    ]
    if sub is None:
        lines.append("subscription:  none")
    else:
        active = sub.status == "active" and sub.expires_at > details.now
        lines.append(
            f"subscription:  {sub.kind}, {sub.status if not (sub.status == 'active' and not active) else 'expired'}, "
            f"until {_when(sub.expires_at)}, auto-renew {'on' if sub.auto_renew else 'off'}"
        )
    usage: dict[str, Any] = {}
    if sub is not None:
        usage, limit_lines = _limits(details, config)
        lines += limit_lines
    lines.append("payments:" if details.payments else "payments:      none")
    for p in details.payments:
        how = "balance (auto-renewal)" if p.provider_payment_id.startswith(AUTO_RENEW_PREFIX) else p.provider
        lines.append(f"  #{p.id} {_when(p.created_at)} {format_money(p.amount_minor, p.currency)} {how} {p.outcome}")
    return {**_jsonable(details), "usage": usage}, "\n".join(lines)


def _limits(details: UserDetails, config: Config) -> tuple[dict[str, Any], list[str]]:
    """The plan, this period's traffic and the devices of `details`' subscription: (JSON, text lines)."""
    sub = details.subscription
    assert sub is not None
    limits = limits_of(config, sub.plan_code, sub.kind)
    period = details.traffic_period
    usage = current_usage(limits, sub.starts_at, details.now, quota.period_facts(period))
    plan = config.plan(sub.plan_code) if sub.plan_code else None
    if plan is not None:
        plan_text = f"{plan.code} ({plan.label('en')})"
    else:
        plan_text = f"{sub.plan_code} (no longer configured: no limits)" if sub.plan_code else f"none ({sub.kind})"
    if usage.unlimited:
        traffic = f"{format_quota_bytes(usage.used)} this period (unlimited)"
    else:
        reset = f"resets {_when(usage.resets_at)}" if usage.resets_at else "never resets"
        traffic = f"{format_quota_bytes(usage.used)} of {format_quota_bytes(usage.total)} this period, {reset}"
        if period is not None and period.extra_bytes:
            traffic += f" ({format_quota_bytes(period.extra_bytes)} added)"
    device_limit = limits.devices + details.extra_devices if limits.devices else 0
    devices = f"{details.devices_used} of {device_limit}" if device_limit else f"{details.devices_used} (unlimited)"
    if details.extra_devices:
        devices += f" ({details.extra_devices} added)"
    lines = [
        f"plan:          {plan_text}",
        f"traffic:       {traffic}",
        f"blocked:       {'yes (over the traffic quota: off Xray)' if details.traffic_blocked else 'no'}",
        f"devices:       {devices}",
    ]
    facts = {
        "plan": sub.plan_code,
        "traffic_used_bytes": usage.used,
        "traffic_total_bytes": usage.total,
        "traffic_resets_at": usage.resets_at,
        "traffic_blocked": details.traffic_blocked,
        "devices_used": details.devices_used,
        "device_limit": device_limit,
    }
    return _jsonable(facts), lines


def _duration(text: str) -> dt.timedelta:
    try:
        return actions.parse_duration(text)
    except ValueError as exc:
        raise Usage(str(exc)) from None


def grant_command(conn: psycopg.Connection[Any], args: argparse.Namespace, config: Config) -> tuple[Any, str]:
    duration = _duration(args.duration)
    unit, amount = actions.describe_duration(duration)
    texts = Texts.load()

    def notify(lang: str, sub: Subscription) -> str:
        key = "admin.grant.user_text" if unit == "days" else "admin.grant.user_text_hours"
        return texts.get(lang, key, **{unit: amount}, expires=_when(sub.expires_at))

    done = _done(actions.grant(conn, _actor(), args.user_id, duration, notify_text=notify if args.notify else None))
    assert done.subscription is not None
    return done.subscription, (
        f"granted {amount} {unit} to user {args.user_id}: access until {_when(done.subscription.expires_at)}"
        + (" (the user will be notified)" if args.notify else "")
    )


def extend_all_command(conn: psycopg.Connection[Any], args: argparse.Namespace, config: Config) -> tuple[Any, str]:
    duration = _duration(args.duration)
    unit, amount = actions.describe_duration(duration)
    what = "paid subscriptions and trials" if args.trials else "paid subscriptions"
    if not args.yes:
        count = actions.extendable(conn, trials=args.trials)
        return {"would_extend": count, unit: amount, "trials": args.trials}, (
            f"would extend {count} running {what} by {amount} {unit}; run again with --yes to do it"
        )
    done = actions.extend_everyone(conn, _actor(), duration, trials=args.trials)
    return {"extended": done.count, unit: amount, "trials": args.trials}, (
        f"extended {done.count} running {what} by {amount} {unit}"
    )


def grant_traffic_command(conn: psycopg.Connection[Any], args: argparse.Namespace, config: Config) -> tuple[Any, str]:
    text = str(args.gb).strip()
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= actions.MAX_GRANT_GB:
        raise Usage(f"GB must be a whole number from 1 to {actions.MAX_GRANT_GB}, not {text[:20]!r}")
    gb = int(text)
    done = _done(actions.grant_traffic(conn, _actor(), args.user_id, gb, partial(limits_of, config)))
    period = done.period
    state = (
        "still over it: buy or grant more to put them back"
        if done.blocked
        else "the user may connect (a running daemon puts them back on Xray at once)"
    )
    return done, (
        f"added {gb} GB to user {args.user_id}'s traffic: {format_quota_bytes(period.used_bytes)} used of "
        f"{format_quota_bytes(done.total_bytes)} this period; {state}"
    )


def revoke_command(conn: psycopg.Connection[Any], args: argparse.Namespace, config: Config) -> tuple[Any, str]:
    done = _done(actions.revoke(conn, _actor(), args.user_id))
    return done.subscription, f"revoked the subscription of user {args.user_id}"


def reissue_command(conn: psycopg.Connection[Any], args: argparse.Namespace, config: Config) -> tuple[Any, str]:
    texts = Texts.load()
    base = config.http.public_base_url

    def notify(lang: str, sub: Subscription) -> str:
        return texts.get(lang, "admin.rotate.user_text", sub_url=f"{base}/sub/{sub.sub_token}")

    done = _done(actions.reissue(conn, _actor(), args.user_id, notify_text=notify if args.notify else None))
    assert done.subscription is not None
    return done.subscription, (
        f"new key for user {args.user_id}: the old key and subscription URL stop working"
        + (" (the user will be sent the new link)" if args.notify else "")
    )


def _rotation_text(r: Rotation, interval: float) -> str:
    done = r.rotated + r.skipped
    text = (
        f"key rotation #{r.id} {r.status}: {done} of {r.total} subscriptions done ({r.rotated} keys replaced, "
        f"{r.skipped} reissued already), {r.notified} users told; {r.batch_size} per batch"
    )
    if r.is_open:
        text += f" every {interval:g} s (the running daemon does it)"
    return text + f"; started {_when(r.created_at)}" + (f", ended {_when(r.finished_at)}" if r.finished_at else "")


def rotate_keys_command(conn: psycopg.Connection[Any], args: argparse.Namespace, config: Config) -> tuple[Any, str]:
    interval = config.xray.rotate_interval_seconds
    if args.status:
        found = rotation_actions.status(conn)
        return found, _rotation_text(found, interval) if found is not None else "no key rotation yet"
    verbs: tuple[RotationVerb, ...] = ("pause", "resume", "cancel")
    for verb in verbs:
        if getattr(args, verb):
            changed = _done(rotation_actions.change(conn, _actor(), verb))
            return changed, _rotation_text(changed, interval)
    batch = config.xray.rotate_batch_size if args.batch is None else args.batch
    if not 1 <= batch <= 10_000:
        raise Usage("--batch must be from 1 to 10000")
    if not args.yes:
        facts = rotation_actions.rotatable(conn)
        told = f"; {facts.running} running ones would be told" if args.notify else ""
        return {"would_rotate": facts.subscriptions, "running": facts.running, "batch_size": batch}, (
            f"would replace the keys of {facts.subscriptions} subscriptions ({facts.running} running), "
            f"{batch} every {interval:g} s{told}; run again with --yes to start"
        )
    started = _done(rotation_actions.start(conn, _actor(), batch_size=batch, notify=args.notify)).rotation
    return started, _rotation_text(started, interval) + "; follow it with --status"


def ban_command(conn: psycopg.Connection[Any], args: argparse.Namespace, config: Config) -> tuple[Any, str]:
    banned = args.admin_command == "ban"
    reason = getattr(args, "reason", None)  # `unban` takes none
    staff = (*config.telegram.admin_ids, *config.telegram.admin_roles)  # no role of staff is banned
    done = _done(actions.set_banned(conn, _actor(), args.user_id, banned, admin_ids=staff, reason=reason))
    if not done.changed:
        return done, f"user {args.user_id} was {'already banned' if banned else 'not banned'}: nothing changed"
    if banned:
        return done, f"banned user {args.user_id}: the bot ignores them, their key leaves Xray at once"
    return done, f"unbanned user {args.user_id}"


def devices_command(conn: psycopg.Connection[Any], args: argparse.Namespace, config: Config) -> tuple[Any, str]:
    if args.reset:
        removed = _done(device_actions.reset_devices(conn, _actor(), args.user_id))
        return {"user_id": args.user_id, "removed": removed}, f"forgot {removed} device(s) of user {args.user_id}"
    view = _done(device_actions.admin_devices(conn, _actor(), args.user_id, partial(limits_of, config)))
    limit = f"{view.used} of {view.limit}" if view.limit else f"{view.used} (no limit)"
    lines = [f"user {view.user_id}: devices {limit}, extra slots granted {view.extra}"]
    if not view.has_subscription:
        lines[0] += ", no subscription"
    for d in view.devices:
        system = " ".join(part for part in (d.os, d.os_version) if part) or "?"
        lines.append(
            f"  {device_name(d)}  {system}  first {_when(d.first_seen)}  last {_when(d.last_seen)}  "
            f"hwid {d.hwid}" + (f"  ua {d.user_agent}" if d.user_agent else "")
        )
    return view, "\n".join(lines)


def grant_device_command(conn: psycopg.Connection[Any], args: argparse.Namespace, config: Config) -> tuple[Any, str]:
    try:
        extra = _done(device_actions.grant_devices(conn, _actor(), args.user_id, args.count))
    except ValueError as exc:
        raise Usage(str(exc)) from None
    return {"user_id": args.user_id, "extra_devices": extra}, (
        f"granted {args.count} device slot(s) to user {args.user_id}: {extra} extra slot(s) in all"
    )


def promo_create_command(conn: psycopg.Connection[Any], args: argparse.Namespace, config: Config) -> tuple[Any, str]:
    if args.days is not None and not 1 <= args.days <= actions.MAX_GRANT_DAYS:
        raise Usage(f"--days must be from 1 to {actions.MAX_GRANT_DAYS}")
    if args.percent is not None and (args.kind is not None or args.value is not None):
        raise Usage("give either CODE PERCENT or --kind/--value, not both")
    if args.percent is None and args.value is None:
        raise Usage("give a PERCENT, or --value (with --kind)")
    if args.plan is not None and config.plan(args.plan) is None:
        raise Usage(f"--plan: no plan {args.plan!r} in the config")
    try:
        terms = promo.PromoTerms.parse(
            "percent" if args.percent is not None else args.kind or "percent",
            str(args.percent) if args.percent is not None else args.value,
            currency=config.payments.currency, plan_code=args.plan, user_id=args.user,
            first_purchase=args.first_purchase,
        )  # fmt: skip
        created = _done(
            actions.create_promo(conn, _actor(), args.code, terms, max_uses=args.max_uses, valid_days=args.days)
        )
    except ValueError as exc:  # a bad code, kind, value or limit
        raise Usage(str(exc)) from None
    return created, f"created {created.code}: {created.summary()}" + (
        f", at most {created.max_uses} uses" if created.max_uses else ""
    ) + (f", until {_when(created.expires_at)}" if created.expires_at else "")


def promo_list_command(conn: psycopg.Connection[Any], args: argparse.Namespace, config: Config) -> tuple[Any, str]:
    codes: list[promo.PromoCode] = []
    after: str | None = None
    while True:
        page = promo.list_promos(conn, after_code=after, limit=200)
        codes.extend(page)
        if len(page) < 200:
            break
        after = page[-1].code
    lines = [
        f"{p.code:<20} {p.summary():<28} used {p.used_count}/{p.max_uses if p.max_uses is not None else '∞'}  "
        f"expires {_when(p.expires_at)}  {'active' if p.active else 'disabled'}"
        for p in codes
    ]
    return codes, "\n".join(lines) if lines else "no promo codes"


def promo_disable_command(conn: psycopg.Connection[Any], args: argparse.Namespace, config: Config) -> tuple[Any, str]:
    code = _done(actions.disable_promo(conn, _actor(), args.code))
    return {"code": code, "active": False}, f"disabled {code}"


def gift_refund_command(conn: psycopg.Connection[Any], args: argparse.Namespace, config: Config) -> tuple[Any, str]:
    rules = PaymentRules(
        config.referral.percent, tuple(config.telegram.admin_ids), config.payments.currency, Texts.load(),
        default_language=config.telegram.default_language,
    )  # fmt: skip
    done = _done(actions.refund_gift(conn, _actor(), args.code, rules=rules))
    assert done.gift is not None
    gift = done.gift
    value = format_money(gift.value_minor, gift.currency)
    result = {"code": gift.code, "buyer_id": gift.buyer_id, "refunded_minor": gift.value_minor,
              "currency": gift.currency, "balance_minor": done.balance_minor}  # fmt: skip
    return result, (
        f"refunded gift {gift.code}: {value} to user {gift.buyer_id}'s balance "
        f"(now {format_money(done.balance_minor, gift.currency)})"
    )


def withdrawals_command(conn: psycopg.Connection[Any], args: argparse.Namespace, config: Config) -> tuple[Any, str]:
    if not 1 <= args.limit <= 1000:
        raise Usage("--limit must be from 1 to 1000")
    status = None if args.status == "all" else args.status
    items = referrals.list_withdrawals(conn, status=status, limit=args.limit)
    lines = [
        f"#{w.id:<5} {w.status:<8} user {w.user_id:<12} {format_money(w.amount_minor, w.currency):>12}  "
        f"{_when(w.created_at)}  {w.details!r}" + (f"  note: {w.note!r}" if w.note else "")
        for w in items
    ]
    return items, "\n".join(lines) if lines else "no withdrawal requests" + (f" ({status})" if status else "")


def withdrawal_command(conn: psycopg.Connection[Any], args: argparse.Namespace, config: Config) -> tuple[Any, str]:
    approve = args.withdrawal_command == "approve"
    if args.note is not None and len(args.note) > referrals.MAX_NOTE:
        raise Usage(f"--note is at most {referrals.MAX_NOTE} characters")
    done = _done(
        withdrawal_actions.decide(
            conn, _actor(), args.withdrawal_id, approve=approve, note=args.note, texts=Texts.load(),
            default_language=config.telegram.default_language,
        )
    )  # fmt: skip
    amount = format_money(done.amount_minor, done.currency)
    if approve:
        return done, f"approved withdrawal #{done.id}: pay {amount} to user {done.user_id} ({done.details!r})"
    return done, f"rejected withdrawal #{done.id}: {amount} is back on user {done.user_id}'s balance"


def maintenance_command(conn: psycopg.Connection[Any], args: argparse.Namespace, config: Config) -> tuple[Any, str]:
    verb = args.maintenance_command
    if verb == "status":
        state = maintenance_actions.status(conn)
    else:
        try:
            state = maintenance_actions.switch(conn, _actor(), verb == "on", args.message if verb == "on" else "")
        except ValueError as exc:
            raise Usage(str(exc)) from None
    if not state.on:
        return state, "maintenance is off" + (f" (since {_when(state.since)})" if state.since else "")
    shown = state.message or "(the default text of each user's language)"
    return state, f"maintenance is on since {_when(state.since)}: purchases and trials are paused\nbanner: {shown}"


def users_command(conn: psycopg.Connection[Any], args: argparse.Namespace, config: Config) -> tuple[Any, str]:
    if args.lang is not None and args.lang not in SUPPORTED_LANGUAGES:
        raise Usage(f"--lang: expected one of {', '.join(SUPPORTED_LANGUAGES)}, got {args.lang!r}")
    try:
        page = actions.list_users(conn, _actor(), args.filter, language=args.lang, after=args.after, limit=args.limit)
    except ValueError as exc:
        raise Usage(str(exc)) from None
    lines = [
        f"{row.id:>12}  {(('@' + row.username) if row.username else row.first_name)[:24]:<24}  {row.language}  "
        f"{'banned' if row.banned else (row.kind or '-')}  {row.status or '-'}  {_when(row.expires_at)}"
        for row in page.rows
    ]
    if page.more_after and page.rows:
        lines.append(f"more: --after {page.rows[-1].id}")
    value = {"users": page.rows, "next_after": page.rows[-1].id if page.more_after and page.rows else None}
    return value, "\n".join(lines) or "no users"


def audit_command(conn: psycopg.Connection[Any], args: argparse.Namespace, config: Config) -> tuple[Any, str]:
    try:
        page = actions.audit_log(
            conn, _actor(), action=args.action, admin_id=args.admin, target=args.target, before=args.before,
            limit=args.limit,
        )  # fmt: skip
    except ValueError as exc:
        raise Usage(str(exc)) from None
    lines = [
        f"#{e.id}  {_when(e.created_at)}  admin {e.admin_id}  {e.action}  {e.target or '-'}  {e.result}  "
        f"{json.dumps(e.details, ensure_ascii=False, sort_keys=True)}"
        for e in page.rows
    ]
    if page.more_before and page.rows:
        lines.append(f"more: --before {page.rows[-1].id}")
    value = {"entries": page.rows, "next_before": page.rows[-1].id if page.more_before and page.rows else None}
    return value, "\n".join(lines) or "no entries"


def _done(outcome: R | actions.Refused) -> R:
    """An action's result; its refusal (audited already, the transaction commits) as `Failed`."""
    if isinstance(outcome, actions.Refused):
        raise Failed(_REFUSALS[type(outcome)](outcome))
    return outcome


_GIFT_REFUSALS: dict[str, str] = {
    "redeemed": "it was redeemed already",
    "refunded": "it was refunded already",
    "other_currency": "it was paid in another currency than the balance's",
}


_REFUSALS: dict[type[actions.Refused], Callable[[Any], str]] = {
    actions.UserNotFound: lambda r: f"no user {r.target}",
    actions.NoSubscription: lambda r: f"user {r.target} has no subscription",
    actions.InactiveSubscription: lambda r: f"user {r.target}'s subscription has ended (expired or revoked)",
    actions.UnlimitedTraffic: lambda r: f"user {r.target}'s plan has unlimited traffic: there is no quota to add to",
    actions.CannotBanAdmin: lambda r: f"user {r.target} is an admin ([telegram].admin_ids): not banned",
    actions.PromoExists: lambda r: f"the promo code {r.target} exists already",
    actions.PromoNotFound: lambda r: f"no active promo code {r.target}",
    actions.GiftNotFound: lambda r: f"no gift {r.target}",
    actions.GiftNotRefundable: lambda r: f"gift {r.target} cannot be refunded: " + _GIFT_REFUSALS.get(r.why, r.why),
    actions.BroadcastNotFound: lambda r: f"no broadcast #{r.target}",
    rotation_actions.RotationRunning: lambda r: f"key rotation #{r.target} is open already: "
    "cancel it first (--cancel) or wait for it to end (--status)",
    rotation_actions.NoRotation: lambda r: (
        f"no key rotation is open: nothing to {r.verb}" if r.rotation is None
        else f"key rotation #{r.target} is {r.rotation.status}: cannot {r.verb} it"
    ),
    withdrawal_actions.WithdrawalNotFound: lambda r: f"no withdrawal #{r.target}",
    withdrawal_actions.WithdrawalDecided: lambda r: f"withdrawal #{r.target} was {r.status} already: nothing changed",
    actions.NotTrial: lambda r: f"user {r.target} has a paid subscription (support extends trials only)",
    actions.BroadcastUnchanged: lambda r: f"broadcast #{r.target} is {r.view.broadcast.status}; cannot {r.verb} it",
}


ADMIN_COMMANDS: dict[str, Command] = {
    "stats": stats_command,
    "nodes": nodes_command,
    "user": user_command,
    "grant": grant_command,
    "extend-all": extend_all_command,
    "grant-traffic": grant_traffic_command,
    "revoke": revoke_command,
    "reissue": reissue_command,
    "rotate-keys": rotate_keys_command,
    "ban": ban_command,
    "unban": ban_command,
    "devices": devices_command,
    "grant-device": grant_device_command,
    "promo create": promo_create_command,
    "promo list": promo_list_command,
    "promo disable": promo_disable_command,
    "gift refund": gift_refund_command,
    "withdrawals": withdrawals_command,
    "withdrawal approve": withdrawal_command,
    "withdrawal reject": withdrawal_command,
    "maintenance on": maintenance_command,
    "maintenance off": maintenance_command,
    "maintenance status": maintenance_command,
    "users": users_command,
    "audit": audit_command,
}


# --- broadcast commands -----------------------------------------------------------------------


def _describe(view: actions.BroadcastView) -> str:
    b, c = view.broadcast, view.counts
    segment = b.target.label()
    if b.status == "scheduled":
        return f"#{b.id:<5} {b.status:<9} {segment:<26} starts {_when(b.start_at)}  created {_when(b.created_at)}"
    return (
        f"#{b.id:<5} {b.status:<9} {segment:<26} sent {c.sent}, failed {c.failed}, skipped {c.skipped}, "
        f"pending {c.pending} of {c.total}  created {_when(b.created_at)}"
    )


def _report_command(conn: psycopg.Connection[Any], args: argparse.Namespace) -> tuple[Any, str]:
    if bdb.get_broadcast(conn, args.broadcast_id) is None:
        raise Failed(f"no broadcast #{args.broadcast_id}")
    report = bdb.report(conn, args.broadcast_id)
    text = (
        f"#{args.broadcast_id}: sent {report.sent}, blocked the bot {report.blocked}, failed {report.failed}, "
        f"skipped {report.skipped}, pending {report.pending}"
    )
    if args.csv:
        try:
            rows = broadcast_report.write_csv_file(conn, args.broadcast_id, args.csv)
        except FileExistsError:
            raise Failed(f"{args.csv} exists already; choose a new file") from None
        except OSError as exc:
            raise Failed(f"cannot write {args.csv}: {exc.strerror or exc}") from None
        text += f"\n{rows} recipients written to {args.csv}"
    return report, text


def broadcast_command(conn: psycopg.Connection[Any], args: argparse.Namespace, config: Config) -> tuple[Any, str]:
    verb = args.broadcast_command
    if verb == "list":
        if not 1 <= args.limit <= 1000:
            raise Usage("--limit must be from 1 to 1000")
        items = bdb.list_broadcasts(conn, limit=args.limit, status=args.status)
        views = [actions.BroadcastView(b, bdb.counts(conn, b.id)) for b in items]
        return views, "\n".join(_describe(v) for v in views) if views else "no broadcasts"
    if verb == "report":
        return _report_command(conn, args)
    view = _done(actions.change_broadcast(conn, _actor(), args.broadcast_id, verb))
    return view, _describe(view)
