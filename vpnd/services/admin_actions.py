"""Admin actions, written once for the bot's admin menu and the `vpnd admin`/`vpnd broadcast` CLI.

Each action is a plain function `action(conn, actor, ...)` that runs inside the caller's transaction
(`await db.run(action, actor, ...)` on the bot side, the CLI's one transaction on its connection) and
does its change AND its `admin_audit` row there, so an action is never done without its record, nor
recorded without being done. The audit row's shape is the same whoever acts: the action's facts
plus the actor's channel (`Actor.details`).

A refusal (no such user, no subscription, a debit the balance does not cover, ...) is *returned* as a
typed value, not raised: it is audited too, and a raised exception would roll that row back with the
transaction. Bad input (days out of range, a malformed promo code) is a `ValueError`, checked by the
front ends before they call, and not audited.

Nobody has to wake the owners of what changed (Xray writer, outbox, broadcasts): the commit's
`pg_notify` (database triggers) does, whichever process committed, the bot's or the CLI's.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Collection, Sequence
from typing import Any, ClassVar, Literal, TextIO, TypeVar

import attrs
import psycopg

from vpnd.config import NodeConfig
from vpnd.db import admin as admin_db
from vpnd.db import broadcasts as bdb
from vpnd.db import gifts, ledger, locks, outbox, promo, quota, subscriptions, users
from vpnd.db import payments as payments_db
from vpnd.db.admin import HealthFacts, Stats, UserDetails
from vpnd.db.nodes import NodeRow, list_nodes
from vpnd.db.payments import PaymentRules, RefundReversal
from vpnd.db.subscriptions import Subscription
from vpnd.quota import Limits
from vpnd.roles import TRIAL_EXTENSION_DAYS

Conn = psycopg.Connection[Any]

#: The most days one grant may give.
MAX_GRANT_DAYS = 3650
#: The most GB one traffic grant may add.
MAX_GRANT_GB = 100_000
GIB = 2**30


@attrs.frozen
class Actor:
    """Who acts, and through which channel: a Telegram admin, or an operator on the command line."""

    admin_id: int
    via: str  # "bot" | "cli"
    os_user: str | None = None

    @classmethod
    def telegram(cls, user_id: int) -> Actor:
        return cls(user_id, "bot")

    @classmethod
    def cli(cls, os_user: str) -> Actor:
        """The command line has no Telegram identity: admin id 0 and the OS user who ran it."""
        return cls(admin_db.CLI_ADMIN_ID, "cli", os_user)

    @property
    def user_id(self) -> int | None:
        """The acting Telegram user (None on the command line)."""
        return self.admin_id if self.via == "bot" else None

    def details(self, **facts: Any) -> dict[str, Any]:
        """An audit row's details: the action's facts, then the channel (and the OS user on the CLI)."""
        return {**facts, "via": self.via, **({"os_user": self.os_user} if self.os_user is not None else {})}


def _audit(
    conn: Conn,
    actor: Actor,
    action: str,
    target: object | None,
    result: str = "ok",
    *,
    nonce: str | None = None,
    **facts: Any,
) -> None:
    """One audit row; `nonce` (a confirmation button's) is recorded when there is one."""
    details = actor.details(**facts, **({"nonce": nonce} if nonce is not None else {}))
    admin_db.audit(conn, actor.admin_id, action, target, result, details)


# --- refusals -------------------------------------------------------------------------------------


@attrs.frozen
class Refused:
    """An action that was not done; `reason` is the audit row's result."""

    target: object
    reason: ClassVar[str] = "refused"


@attrs.frozen
class UserNotFound(Refused):
    reason: ClassVar[str] = "not_found"


@attrs.frozen
class NoSubscription(Refused):
    reason: ClassVar[str] = "no_subscription"


@attrs.frozen
class InactiveSubscription(Refused):
    """The subscription has ended (expired or revoked)."""

    reason: ClassVar[str] = "inactive"


@attrs.frozen
class UnlimitedTraffic(Refused):
    """The subscription's plan has no traffic quota: there is nothing to add to."""

    reason: ClassVar[str] = "unlimited"


@attrs.frozen
class InsufficientBalance(Refused):
    balance_minor: int = 0
    needed_minor: int = 0
    reason: ClassVar[str] = "insufficient_balance"


@attrs.frozen
class CannotBanAdmin(Refused):
    """Admins (`[telegram].admin_ids`) are not banned: remove them from the list first."""

    reason: ClassVar[str] = "admin"


@attrs.frozen
class PromoExists(Refused):
    reason: ClassVar[str] = "exists"


@attrs.frozen
class PromoNotFound(Refused):
    reason: ClassVar[str] = "not_found"


@attrs.frozen
class GiftNotFound(Refused):
    reason: ClassVar[str] = "not_found"


@attrs.frozen
class GiftNotRefundable(Refused):
    """Redeemed already (its days were given), refunded already, or paid in another currency than the balance."""

    why: str = ""
    reason: ClassVar[str] = "not_refundable"


@attrs.frozen
class BroadcastNotFound(Refused):
    reason: ClassVar[str] = "not_found"


@attrs.frozen
class BroadcastUnchanged(Refused):
    """The broadcast is not in a status the verb applies to (e.g. resuming a cancelled one)."""

    view: BroadcastView | None = None
    verb: str = ""
    reason: ClassVar[str] = "unchanged"


F = TypeVar("F", bound=Refused)


def _refuse(conn: Conn, actor: Actor, action: str, refusal: F, **facts: Any) -> F:
    """Audit a refusal (in the action's transaction) and hand it back to be returned."""
    _audit(conn, actor, action, refusal.target, refusal.reason, **facts)
    return refusal


# --- results --------------------------------------------------------------------------------------


@attrs.frozen
class Access:
    """A subscription after grant/revoke/reissue/auto-renew; `repeated`: the nonce was used, nothing changed."""

    subscription: Subscription | None
    repeated: bool = False


@attrs.frozen
class Balance:
    balance_minor: int
    repeated: bool = False


@attrs.frozen
class BroadcastView:
    broadcast: bdb.Broadcast
    counts: bdb.Counts


# --- reading (audited: an admin looked) -------------------------------------------------------------


def stats(conn: Conn, actor: Actor) -> Stats:
    found = admin_db.stats(conn)
    _audit(conn, actor, "stats", None)
    return found


def health(conn: Conn, actor: Actor) -> HealthFacts:
    facts = admin_db.health_facts(conn)
    _audit(conn, actor, "health", None)
    return facts


#: A node's record is "stale" past its writer's idle round interval plus this: the writers record at
#: each round (at most every 10 s), and an idle daemon's rounds are `[xray].reconcile_interval` apart.
NODE_STALE_MARGIN = 30.0
#: ... and never sooner than this (a short reconcile interval does not make a busy node look stale).
NODE_STALE_MIN = 60.0

NodeState = Literal["up", "down", "never", "stale", "removed"]


@attrs.frozen
class NodeStatus:
    """One node as operators see it: from the configuration (name, location) and its writer's record.

    `state`: "up"/"down" as last recorded; "never" — configured, never recorded (the daemon has not run
    since it was added); "stale" — recorded longer ago than `stale_after` seconds (the daemon is not
    running, or the writer is stuck); "removed" — recorded, no longer configured (being retired: its
    users are taken off it, then its row is deleted).
    """

    name: str
    #: Its location in the language asked for ("" once removed).
    location: str
    state: NodeState
    record: NodeRow | None
    stale_after: float


def nodes(
    conn: Conn, actor: Actor, configured: Sequence[NodeConfig], language: str, *, reconcile_interval: float
) -> list[NodeStatus]:
    """Every node vpnd drives (configuration order) joined with its record, then the removed ones."""
    records = {row.name: row for row in list_nodes(conn)}
    stale_after = max(NODE_STALE_MIN, reconcile_interval + NODE_STALE_MARGIN)

    def state(row: NodeRow | None) -> NodeState:
        if row is None:
            return "never"
        if row.seconds_since_update > stale_after:
            return "stale"
        return "up" if row.reachable else "down"

    found: list[NodeStatus] = []
    for node in configured:
        row = records.pop(node.name, None)
        found.append(NodeStatus(node.name, node.label(language), state(row), row, stale_after))
    found += [NodeStatus(name, "", "removed", row, stale_after) for name, row in records.items()]
    _audit(conn, actor, "nodes", None)
    return found


def lookup(conn: Conn, actor: Actor, query: str, *, payments_limit: int = 5) -> UserDetails | UserNotFound:
    """A user by id or @username."""
    query = query.strip()
    details = admin_db.user_details(conn, query, payments_limit=payments_limit)
    if details is None:
        return _refuse(conn, actor, "lookup", UserNotFound(query[:64]))
    _audit(conn, actor, "lookup", query[:64])
    return details


#: What can be exported as CSV, by kind.
EXPORTS: dict[str, Callable[..., int]] = {
    "users": admin_db.export_users_csv,
    "payments": admin_db.export_payments_csv,
}


def export_csv(conn: Conn, actor: Actor, kind: str, out: TextIO) -> int:
    """Write the `kind` export as CSV to `out`; return its rows. ValueError for an unknown kind."""
    if kind not in EXPORTS:
        raise ValueError(f"no export {kind!r}")
    rows = EXPORTS[kind](conn, out)
    _audit(conn, actor, "export", kind, rows=rows)
    return rows


# --- a user's access and balance ------------------------------------------------------------------


def parse_duration(text: str) -> dt.timedelta:
    """An admin's duration: "30" or "30d" (days), "12h" (hours); from 1 hour to MAX_GRANT_DAYS days.
    ValueError, with what is expected, for anything else."""
    match = _DURATION.fullmatch(text.strip().lower())
    if match is None:
        raise ValueError(f"{text.strip()[:20]!r} is not a duration: send days (30 or 30d) or hours (12h)")
    amount, unit = int(match.group(1)), match.group(2) or "d"
    duration = dt.timedelta(hours=amount) if unit == "h" else dt.timedelta(days=amount)
    if not dt.timedelta(hours=1) <= duration <= dt.timedelta(days=MAX_GRANT_DAYS):
        raise ValueError(f"a duration is from 1 hour to {MAX_GRANT_DAYS} days")
    return duration


_DURATION = re.compile(r"(\d{1,6})\s*([dh]?)")


def describe_duration(duration: dt.timedelta) -> tuple[str, int]:
    """("days", n) when `duration` is whole days, else ("hours", n): for texts and audit rows."""
    hours = int(duration.total_seconds()) // 3600
    return ("days", hours // 24) if hours % 24 == 0 else ("hours", hours)


def grant(
    conn: Conn,
    actor: Actor,
    user_id: int,
    duration: int | dt.timedelta,
    *,
    notify_text: Callable[[str, Subscription], str] | None = None,
    nonce: str | None = None,
) -> Access | UserNotFound:
    """Give `duration` of access (days, or a timedelta for hours) as a paid-kind subscription, once per
    `nonce` (a confirmation button's).

    With `notify_text(language, subscription)` (a pure renderer) the user's message is queued in the
    outbox in the same transaction.
    """
    if isinstance(duration, int):
        if not 1 <= duration <= MAX_GRANT_DAYS:
            raise ValueError(f"days must be from 1 to {MAX_GRANT_DAYS}")
        duration = dt.timedelta(days=duration)
    elif not dt.timedelta(hours=1) <= duration <= dt.timedelta(days=MAX_GRANT_DAYS):
        raise ValueError(f"a duration is from 1 hour to {MAX_GRANT_DAYS} days")
    unit, amount = describe_duration(duration)
    if nonce is not None and admin_db.nonce_used(conn, nonce):
        return Access(subscriptions.get_subscription(conn, user_id), repeated=True)
    user = admin_db.lock_user(conn, user_id)
    if user is None:
        return _refuse(conn, actor, "grant", UserNotFound(user_id), **{unit: amount})
    sub = subscriptions.grant_time(conn, user_id, duration, kind="paid")
    if notify_text is not None:
        outbox.enqueue(
            conn, user_id, notify_text(user.language, sub), dedupe_key=f"admin_grant:{nonce}" if nonce else None
        )
    facts: dict[str, Any] = {unit: amount, "notify": notify_text is not None, "expires_at": sub.expires_at.isoformat()}
    _audit(conn, actor, "grant", user_id, nonce=nonce, **facts)
    return Access(sub)


@attrs.frozen
class Extended:
    """After extending everyone: how many subscriptions; `repeated`: the nonce was used, nothing changed."""

    count: int
    duration: dt.timedelta
    repeated: bool = False


#: Serializes "extend everyone" (a button pressed twice at once must not extend twice).
EXTEND_ALL_LOCK = 0x76706E64_65787464


def extend_everyone(
    conn: Conn, actor: Actor, duration: dt.timedelta, *, trials: bool, nonce: str | None = None
) -> Extended:
    """Add `duration` to every running subscription (paid; trials too with `trials`; banned users left
    out) in one statement: an outage compensation. One audit row with the count."""
    if not dt.timedelta(hours=1) <= duration <= dt.timedelta(days=MAX_GRANT_DAYS):
        raise ValueError(f"a duration is from 1 hour to {MAX_GRANT_DAYS} days")
    locks.xact_lock(conn, EXTEND_ALL_LOCK)
    if nonce is not None and admin_db.nonce_used(conn, nonce):
        return Extended(0, duration, repeated=True)
    count = subscriptions.extend_all(conn, duration, trials=trials)
    unit, amount = describe_duration(duration)
    facts: dict[str, Any] = {unit: amount, "trials": trials, "count": count}
    _audit(conn, actor, "extend_all", None, nonce=nonce, **facts)
    return Extended(count, duration)


def extendable(conn: Conn, *, trials: bool) -> int:
    """How many subscriptions `extend_everyone` would extend now (the confirmation shows it)."""
    return subscriptions.count_extendable(conn, trials=trials)


def revoke(
    conn: Conn, actor: Actor, user_id: int, *, nonce: str | None = None
) -> Access | UserNotFound | NoSubscription:
    """End the user's subscription now (the Xray writer removes the key)."""
    return _change_access(conn, actor, "revoke", user_id, nonce, subscriptions.revoke)


def reissue(
    conn: Conn,
    actor: Actor,
    user_id: int,
    *,
    nonce: str | None = None,
    notify_text: Callable[[str, Subscription], str] | None = None,
) -> Access | UserNotFound | NoSubscription:
    """A new key for the user (an admin is not held to the user's own reissue rate limit). With
    `notify_text(language, subscription)` a user who is not banned is told in the same transaction."""

    def new_key(conn: Conn, user_id: int) -> Subscription | None:
        try:
            sub = subscriptions.reissue_key(conn, user_id, limit=1_000_000, window_seconds=1)
        except subscriptions.NoSubscription:
            return None
        user = users.get_user(conn, user_id)
        if notify_text is not None and user is not None and user.banned_at is None:
            key = f"admin_reissue:{nonce}" if nonce else None
            outbox.enqueue(conn, user_id, notify_text(user.language, sub), dedupe_key=key)
        return sub

    facts: dict[str, Any] = {"notify": True} if notify_text is not None else {}
    return _change_access(conn, actor, "reissue", user_id, nonce, new_key, **facts)


def set_auto_renew(conn: Conn, actor: Actor, user_id: int, enabled: bool) -> Access | UserNotFound | NoSubscription:
    def switch(conn: Conn, user_id: int) -> Subscription | None:
        return subscriptions.set_auto_renew(conn, user_id, enabled)

    return _change_access(conn, actor, "auto_renew", user_id, None, switch, enabled=enabled)


def _change_access(
    conn: Conn,
    actor: Actor,
    action: str,
    user_id: int,
    nonce: str | None,
    change: Callable[[Conn, int], Subscription | None],
    **facts: Any,
) -> Access | UserNotFound | NoSubscription:
    """One change of a user's subscription: once per nonce, refused without a user or a subscription."""
    if nonce is not None and admin_db.nonce_used(conn, nonce):
        return Access(subscriptions.get_subscription(conn, user_id), repeated=True)
    if admin_db.lock_user(conn, user_id) is None:
        return _refuse(conn, actor, action, UserNotFound(user_id), **facts)
    sub = change(conn, user_id)
    if sub is None:
        return _refuse(conn, actor, action, NoSubscription(user_id), nonce=nonce, **facts)
    _audit(conn, actor, action, user_id, nonce=nonce, **facts)
    return Access(sub)


@attrs.frozen
class Banned:
    """After a ban or unban; `changed`: False when the user already was so (or the nonce was used)."""

    user_id: int
    banned_at: dt.datetime | None
    changed: bool


#: The longest ban reason kept (the audit row and `vpnd admin user` show it).
MAX_BAN_REASON = 200


def set_banned(
    conn: Conn,
    actor: Actor,
    user_id: int,
    banned: bool,
    *,
    admin_ids: Collection[int] = (),
    reason: str | None = None,
    nonce: str | None = None,
) -> Banned | UserNotFound | CannotBanAdmin:
    """Ban (the bot ignores the user, their key leaves Xray at commit, reminders, renewals and broadcasts
    skip them, an open invoice is refused at pre-checkout) or unban (all of it back; the subscription kept
    its expiry). Once per `nonce`; an admin in `admin_ids` is never banned."""
    action = "ban" if banned else "unban"
    reason = (reason or "").strip()[:MAX_BAN_REASON] or None
    if nonce is not None and admin_db.nonce_used(conn, nonce):
        user = users.get_user(conn, user_id)
        return Banned(user_id, user.banned_at if user else None, changed=False)
    if banned and user_id in admin_ids:
        return _refuse(conn, actor, action, CannotBanAdmin(user_id))
    if admin_db.lock_user(conn, user_id) is None:
        return _refuse(conn, actor, action, UserNotFound(user_id))
    change = users.set_banned(conn, user_id, banned, reason)
    assert change is not None  # the user is locked
    facts: dict[str, Any] = {"changed": change.changed, **({"reason": reason} if banned and reason else {})}
    _audit(conn, actor, action, user_id, nonce=nonce, **facts)
    return Banned(user_id, change.user.banned_at, change.changed)


@attrs.frozen
class TrafficGranted:
    """The current period after a traffic grant."""

    period: quota.Period
    #: The period's whole quota now.
    total_bytes: int
    #: Still over the quota (the grant was not enough to put the user back).
    blocked: bool
    repeated: bool = False


def grant_traffic(
    conn: Conn,
    actor: Actor,
    user_id: int,
    gb: int,
    limits_for: Callable[[str | None, str], Limits],
    *,
    nonce: str | None = None,
) -> TrafficGranted | UserNotFound | NoSubscription | InactiveSubscription | UnlimitedTraffic:
    """Add `gb` GB to the current traffic period of the user's subscription — the path a traffic pack
    takes (`vpnd.db.quota.add_extra`): a user blocked at their quota is put back when usage is now under
    it (the commit wakes the Xray writers). `limits_for(plan_code, kind)`: the running config's limits."""
    if not 1 <= gb <= MAX_GRANT_GB:
        raise ValueError(f"GB must be from 1 to {MAX_GRANT_GB}")
    if nonce is not None and admin_db.nonce_used(conn, nonce):
        found = _traffic_now(conn, user_id, limits_for)
        if found is not None:
            return attrs.evolve(found, repeated=True)
    if admin_db.lock_user(conn, user_id) is None:
        return _refuse(conn, actor, "grant_traffic", UserNotFound(user_id), gb=gb)
    locked = quota.lock_subscription(conn, user_id)
    if locked is None:
        return _refuse(conn, actor, "grant_traffic", NoSubscription(user_id), nonce=nonce, gb=gb)
    if locked[2] != "active":
        return _refuse(conn, actor, "grant_traffic", InactiveSubscription(user_id), nonce=nonce, gb=gb)
    limits = limits_for(locked[0], locked[1])
    if not limits.limits_traffic:
        return _refuse(conn, actor, "grant_traffic", UnlimitedTraffic(user_id), nonce=nonce, gb=gb)
    period = quota.add_extra(conn, user_id, gb * GIB, limits)
    assert period is not None  # the subscription is there and locked
    total = quota.total_bytes(limits, period)
    _audit(conn, actor, "grant_traffic", user_id, nonce=nonce, gb=gb, extra_bytes=period.extra_bytes, total_bytes=total)
    return TrafficGranted(period, total, blocked=period.used_bytes >= total)


def _traffic_now(conn: Conn, user_id: int, limits_for: Callable[[str | None, str], Limits]) -> TrafficGranted | None:
    sub = subscriptions.get_subscription(conn, user_id)
    period = quota.current_period(conn, user_id)
    if sub is None or period is None:
        return None
    total = quota.total_bytes(limits_for(sub.plan_code, sub.kind), period)
    return TrafficGranted(period, total, blocked=period.used_bytes >= total)


def change_balance(
    conn: Conn, actor: Actor, user_id: int, delta_minor: int, *, nonce: str
) -> Balance | UserNotFound | InsufficientBalance:
    """Credit (delta > 0) or debit (delta < 0) the balance through the ledger, once per nonce
    (the nonce is the ledger entry's reference too)."""
    if admin_db.lock_user(conn, user_id) is None:
        return _refuse(conn, actor, "balance", UserNotFound(user_id), delta_minor=delta_minor, nonce=nonce)
    try:
        entry = ledger.record(conn, user_id, delta_minor, ledger.ADMIN, f"admin:{nonce}")
    except ledger.InsufficientBalance as exc:  # raised before anything was written
        refusal = InsufficientBalance(user_id, exc.balance_minor, exc.needed_minor)
        return _refuse(conn, actor, "balance", refusal, delta_minor=delta_minor, nonce=nonce)
    balance = ledger.balance_of(conn, user_id)
    if entry is None:
        return Balance(balance, repeated=True)
    _audit(conn, actor, "balance", user_id, delta_minor=delta_minor, nonce=nonce)
    return Balance(balance)


# --- promo codes ----------------------------------------------------------------------------------


def create_promo(
    conn: Conn,
    actor: Actor,
    code: str,
    terms: promo.PromoTerms | int,
    *,
    max_uses: int | None = None,
    valid_days: int | None = None,
) -> promo.PromoCode | PromoExists:
    """A new promo code (`terms`, or a percent; valid for `valid_days` from now, or without end).
    ValueError for a bad code, terms, limit or number of days."""
    if valid_days is not None and not 1 <= valid_days <= MAX_GRANT_DAYS:
        raise ValueError(f"days must be from 1 to {MAX_GRANT_DAYS}")
    if isinstance(terms, int):
        terms = promo.PromoTerms(percent=terms)
    terms.check()
    facts: dict[str, Any] = {
        "kind": terms.kind, "percent": terms.percent, "amount_minor": terms.amount_minor, "currency": terms.currency,
        "grant_days": terms.grant_days, "plan": terms.plan_code, "user": terms.user_id,
        "first_purchase": terms.first_purchase, "max_uses": max_uses, "valid_days": valid_days,
    }  # fmt: skip
    facts = {key: value for key, value in facts.items() if value is not None and value is not False}
    try:
        created = promo.create_promo(
            conn, code, terms, max_uses=max_uses, valid_days=valid_days, created_by=actor.user_id
        )
    except promo.PromoExists:
        return _refuse(conn, actor, "promo_create", PromoExists(promo.normalize_code(code)), **facts)
    _audit(conn, actor, "promo_create", created.code, **facts)
    return created


def disable_promo(conn: Conn, actor: Actor, code: str) -> str | PromoNotFound:
    """Switch a code off; returns the code as stored (upper case)."""
    key = code.strip().upper()
    if not promo.disable_promo(conn, code):
        return _refuse(conn, actor, "promo_disable", PromoNotFound(key))
    _audit(conn, actor, "promo_disable", key)
    return key


# --- broadcasts -----------------------------------------------------------------------------------


def create_broadcast(
    conn: Conn,
    actor: Actor,
    *,
    text: str,
    segment: bdb.Segment,
    button_text: str | None = None,
    button_url: str | None = None,
    progress_chat_id: int | None = None,
    progress_message_id: int | None = None,
    content: bdb.Content | None = None,
    start_at: dt.datetime | None = None,
) -> bdb.Broadcast:
    """A running broadcast to everyone in `segment` now (the broadcasts nursery sends it); with
    `start_at`, a scheduled one that the nursery starts then."""
    broadcast = bdb.create_broadcast(
        conn,
        created_by=actor.admin_id,
        text=text,
        segment=segment,
        button_text=button_text,
        button_url=button_url,
        progress_chat_id=progress_chat_id,
        progress_message_id=progress_message_id,
        content=content,
        start_at=start_at,
    )
    facts: dict[str, Any] = {"segment": broadcast.segment, "days": broadcast.segment_days, "total": broadcast.total}
    if broadcast.segment_arg is not None:
        facts["arg"] = broadcast.segment_arg
    if start_at is not None:
        facts["start_at"] = start_at.isoformat()
    if broadcast.media_kind is not None:
        facts["media"] = broadcast.media_kind
    _audit(conn, actor, "broadcast_create", broadcast.id, **facts)
    return broadcast


def change_broadcast(
    conn: Conn, actor: Actor, broadcast_id: int, verb: bdb.Action
) -> BroadcastView | BroadcastNotFound | BroadcastUnchanged:
    """Pause, resume or cancel a broadcast; refused when there is none or its status does not allow it."""
    change = bdb.change_status(conn, broadcast_id, verb)
    action = f"broadcast_{verb}"
    if change.broadcast is None:
        return _refuse(conn, actor, action, BroadcastNotFound(broadcast_id))
    view = BroadcastView(change.broadcast, bdb.counts(conn, broadcast_id))
    if not change.changed:
        return _refuse(conn, actor, action, BroadcastUnchanged(broadcast_id, view, verb))
    _audit(conn, actor, action, broadcast_id)
    return view


# --- refunds --------------------------------------------------------------------------------------


def record_refund(conn: Conn, actor: Actor, purchase_id: int, charge_id: str, *, rules: PaymentRules) -> RefundReversal:
    """Record a Stars refund the provider has made, taking back everything the purchase gave, once."""
    reversal = payments_db.reverse_refunded_purchase(conn, purchase_id, rules=rules)
    referral = reversal.referral
    facts: dict[str, Any] = {
        "charge_id": charge_id,
        "days_removed": reversal.days_removed,
        "access_ended": reversal.access_ended,
        "referrer_id": reversal.referrer_id,
        "referral_debited_minor": referral.debited_minor if referral else 0,
        "referral_owed_minor": referral.owed_minor if referral else 0,
    }
    _audit(conn, actor, "refund", purchase_id, "ok" if reversal.recorded else "repeated", **facts)
    return reversal


def refund_gift(
    conn: Conn, actor: Actor, code: str, *, rules: PaymentRules
) -> gifts.Refund | GiftNotFound | GiftNotRefundable:
    """Refund an unredeemed gift to its buyer's balance (once: a second refund is refused, as is the
    refund of a redeemed gift); the buyer is told. Audited either way (action `gift_refund`)."""
    done = gifts.refund(
        conn, code, balance_currency=rules.balance_currency, texts=rules.texts, default_language=rules.default_language
    )
    target = done.gift.code if done.gift is not None else code.strip()[:64]
    if done.reason == "not_found":
        return _refuse(conn, actor, "gift_refund", GiftNotFound(target))
    if done.reason is not None:
        assert done.gift is not None
        facts = {"why": done.reason, "status": done.gift.status, "buyer_id": done.gift.buyer_id}
        return _refuse(conn, actor, "gift_refund", GiftNotRefundable(target, done.reason), **facts)
    assert done.gift is not None
    _audit(
        conn, actor, "gift_refund", target, buyer_id=done.gift.buyer_id, value_minor=done.gift.value_minor,
        currency=done.gift.currency,
    )  # fmt: skip
    return done


def refund_failed(conn: Conn, actor: Actor, purchase_id: int, error: str) -> None:
    """Audit a refund the provider refused (nothing changed here)."""
    _audit(conn, actor, "refund", purchase_id, "failed", error=error[:200])


# --- roles (`vpnd.roles`) -----------------------------------------------------------------------


def forbidden(conn: Conn, actor: Actor, action: str, what: str, *, role: str) -> None:
    """Audit a staff member's attempt at an action their role does not allow (nothing else happens)."""
    _audit(conn, actor, action, what[:64], "forbidden", role=role)


@attrs.frozen
class NotTrial(Refused):
    """The user has (or had) a paid subscription: support extends trials only."""

    reason: ClassVar[str] = "not_trial"


def extend_trial(
    conn: Conn, actor: Actor, user_id: int, days: int, *, nonce: str | None = None
) -> Access | UserNotFound | NotTrial:
    """Support's grant: 1 to `roles.TRIAL_EXTENSION_DAYS` days of *trial*, only for a user with no
    subscription or a trial one (a paid customer's days are an admin's to give). Once per `nonce`."""
    if not 1 <= days <= TRIAL_EXTENSION_DAYS:
        raise ValueError(f"days must be from 1 to {TRIAL_EXTENSION_DAYS}")
    if nonce is not None and admin_db.nonce_used(conn, nonce):
        return Access(subscriptions.get_subscription(conn, user_id), repeated=True)
    if admin_db.lock_user(conn, user_id) is None:
        return _refuse(conn, actor, "extend_trial", UserNotFound(user_id), days=days)
    current = subscriptions.get_subscription(conn, user_id)
    if current is not None and current.kind != "trial":
        return _refuse(conn, actor, "extend_trial", NotTrial(user_id), nonce=nonce, days=days)
    sub = subscriptions.grant_time(conn, user_id, dt.timedelta(days=days), kind="trial")
    _audit(conn, actor, "extend_trial", user_id, nonce=nonce, days=days, expires_at=sub.expires_at.isoformat())
    return Access(sub)


# --- the user list and the audit log ----------------------------------------------------------------

#: The most rows one page of the user list or the audit log has.
MAX_PAGE = 100


def list_users(
    conn: Conn,
    actor: Actor,
    filter_name: str,
    *,
    language: str | None = None,
    after: int | None = None,
    before: int | None = None,
    limit: int = 10,
) -> admin_db.Page[admin_db.UserRow]:
    """A page of the user list (`vpnd.db.admin.USER_FILTERS`). ValueError for an unknown filter or limit."""
    if filter_name not in admin_db.USER_FILTERS:
        raise ValueError(f"no filter {filter_name!r} (known: {', '.join(admin_db.USER_FILTERS)})")
    if not 1 <= limit <= MAX_PAGE:
        raise ValueError(f"the limit is from 1 to {MAX_PAGE}")
    page = admin_db.list_users(conn, filter_name, language=language, after=after, before=before, limit=limit)
    _audit(conn, actor, "users", None, filter=filter_name, language=language, rows=len(page.rows))
    return page


def audit_log(
    conn: Conn,
    actor: Actor,
    *,
    action: str | None = None,
    admin_id: int | None = None,
    target: str | None = None,
    before: int | None = None,
    after: int | None = None,
    limit: int = 10,
) -> admin_db.Page[admin_db.AuditEntry]:
    """A page of the audit log, newest first (this look itself is audited after it is read)."""
    if not 1 <= limit <= MAX_PAGE:
        raise ValueError(f"the limit is from 1 to {MAX_PAGE}")
    page = admin_db.audit_page(
        conn, action=action, admin_id=admin_id, target=target, before=before, after=after, limit=limit
    )
    _audit(conn, actor, "audit", None, of_action=action, of_admin=admin_id, of_target=target)
    return page
